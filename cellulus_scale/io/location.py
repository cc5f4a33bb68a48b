"""Where a store or file lives: a local path, or a URL of object storage (``s3://``, ``gs://``,
``https://`` for reading, ...) reached through fsspec, with credentials and endpoints taken from
the usual environment (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``~/.aws``). zarr opens either from :attr:`Location.url`."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellulus_scale.errors import UserInputError


def is_url(path: str | os.PathLike[str] | Location) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local path."""
    if isinstance(path, Location):
        return path.remote
    text = str(path)
    return "://" in text and not text.startswith("file://")


def read_only_url(path: str | os.PathLike[str] | Location) -> bool:
    """Whether ``path`` is a URL that can only be read (``http://``, ``https://``)."""
    return str(path).split("://", 1)[0].lower() in ("http", "https") and is_url(path)


def local_store(path: str | os.PathLike[str], command: str) -> Path:
    """``path`` as a local path; a URL is refused, naming the ``command`` that needs a local
    store."""
    if is_url(path):
        raise UserInputError(
            f"{command} works on local stores, not {path} in object storage",
            "copy the store to a local folder first (e.g. aws s3 sync URL FOLDER)",
        )
    return Path(path)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once: os.umask is process-wide, and setting it per write would change it for a moment
#: under every other thread of a worker.
_UMASK = _read_umask()


@dataclass(frozen=True)
class Location:
    """A local path or a URL, joined with ``/`` and asked about like a :class:`~pathlib.Path`."""

    url: str

    @classmethod
    def of(cls, path: str | os.PathLike[str] | Location) -> Location:
        if isinstance(path, Location):
            return path
        if is_url(path):
            return cls(str(path).rstrip("/"))
        text = str(path)
        return cls(str(Path(text[len("file://") :] if text.startswith("file://") else text)))

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        """A local path's string; object storage has none (use :attr:`url`)."""
        if self.remote:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    def __truediv__(self, part: str) -> Location:
        if self.remote:
            return Location(f"{self.url}/{str(part).strip('/')}")
        return Location(str(Path(self.url) / part))

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1] if self.remote else Path(self.url).name

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def path(self) -> Path:
        """The local path (refused for object storage)."""
        return Path(os.fspath(self))

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        return fsspec.core.url_to_fs(self.url)

    def exists(self) -> bool:
        if not self.remote:
            return self.path.exists()
        fs, path = self._fs()
        fs.invalidate_cache(path)  # other processes (the workers) write here too
        return bool(fs.exists(path))

    def is_dir(self) -> bool:
        if not self.remote:
            return self.path.is_dir()
        fs, path = self._fs()
        fs.invalidate_cache(path)
        return bool(fs.isdir(path))

    def stamp(self) -> str:
        """What changes when the file is replaced: its modification time, or in object storage
        its ETag (or last modification)."""
        if not self.remote:
            return str(os.stat(self.path).st_mtime_ns)
        fs, path = self._fs()
        fs.invalidate_cache(path)
        info = fs.info(path)
        return str(info.get("ETag") or info.get("LastModified") or info.get("mtime") or "")

    def same_as(self, other: Location) -> bool:
        if self.remote or other.remote:
            return self.url.rstrip("/") == other.url.rstrip("/")
        return self.path.resolve() == other.path.resolve()

    def remove(self) -> None:
        """Remove the file or folder (store) here, if there is one."""
        if not self.remote:
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
            return
        fs, path = self._fs()
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def names(self) -> list[str]:
        """The names of the files and folders directly inside this folder ([] if none), as
        they are now (never from a listing cached before)."""
        if not self.remote:
            return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        fs, path = self._fs()
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def remove_files(self, names: list[str]) -> None:
        """Remove the files ``names`` of this folder (in one request in object storage)."""
        if not names:
            return
        if not self.remote:
            for name in names:
                (self.path / name).unlink(missing_ok=True)
            return
        fs, path = self._fs()
        fs.rm([f"{path}/{name}" for name in names])

    def read_bytes(self) -> bytes:
        if not self.remote:
            return self.path.read_bytes()
        fs, path = self._fs()
        return bytes(fs.cat_file(path))

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file at once: locally through a temporary file renamed into place,
        to object storage with one upload (atomic there), so a reader never sees part of it."""
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".partial-")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(data)
                os.chmod(temporary, 0o666 & ~_UMASK)  # as open() would have made it
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            return
        fs, path = self._fs()
        fs.pipe_file(path, data)
