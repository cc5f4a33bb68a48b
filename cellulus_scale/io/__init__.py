"""OME-Zarr input and output."""
