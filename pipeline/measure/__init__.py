"""Stage measure: per (run, layer, row block) streaming tasks on a Dask cluster, their graph,
the layer cache and the measured dataset."""
