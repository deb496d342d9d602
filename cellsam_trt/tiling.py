"""``cellsam_trt.tiling``: the documented import path of the tiled run (``segment_large``)
and of lazy image reading (``open_image``), kept for scripts written against it; the code
is in ``cellsam_trt.large.tiling`` and ``cellsam_trt.engine.source``."""
from .engine.source import open_image
from .large.tiling import segment_large

__all__ = ["open_image", "segment_large"]
