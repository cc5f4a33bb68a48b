"""cellulus-scale: unsupervised cell instance segmentation (Cellulus) for large OME-Zarr videos."""

__version__ = "0.1.0"
