"""Tracking: the objects of a video linked over time as stages of the blockwise engine, and the
exports of the tracks (GEFF, Cell Tracking Challenge)."""
