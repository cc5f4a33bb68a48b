"""Pure kernels: numpy or torch in, numpy out, for one block or crop. No Dask, no zarr."""
