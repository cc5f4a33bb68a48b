"""Errors raised for bad user input.

The CLI turns a :class:`UserInputError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(message)
        self.problem = problem
        self.fix = fix
