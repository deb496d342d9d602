"""PyTorch modules of CellSAM: SAM parts from segment-anything, CellFinder written here.

The names below are imported on first use (``cellsam_trt.lazy``): the configs
(``modeling.config``) load without torch.
"""
from typing import TYPE_CHECKING

from ..lazy import lazy_names

_WHERE = {"BoxDecoder": ".decoder", "CellFinder": ".cellfinder", "CellSAMNetwork": ".network", "build_sam": ".sam"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)

if TYPE_CHECKING:
    from .cellfinder import CellFinder
    from .decoder import BoxDecoder
    from .network import CellSAMNetwork
    from .sam import build_sam
