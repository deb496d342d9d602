"""``cellsam_trt.scale.segment_dask``: the documented import path of the dask run, kept for
scripts written against it; the code is in ``cellsam_trt.large.dask``."""
from .large.dask import segment_dask

__all__ = ["segment_dask"]
