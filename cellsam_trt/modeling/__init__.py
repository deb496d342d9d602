"""PyTorch modules of CellSAM: SAM parts from segment-anything, CellFinder written here."""
from .cellfinder import CellFinder
from .decoder import BoxDecoder
from .network import CellSAMNetwork
from .sam import build_sam

__all__ = ["BoxDecoder", "CellFinder", "CellSAMNetwork", "build_sam"]
