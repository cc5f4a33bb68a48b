"""Simulated nuclei time-lapses with ground truth."""
