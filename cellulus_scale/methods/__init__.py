"""Segmentation methods as plug-ins of the blockwise engine; none imports another."""
