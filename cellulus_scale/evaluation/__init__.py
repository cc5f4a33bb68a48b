"""Scoring instance labels against ground truth."""
