"""The results store: the one variable table (schema) and atomic Zarr I/O."""
