"""The CellSAM module tree, with the released checkpoint's key layout.

``model``      SAM (image encoder, prompt encoder, mask decoder)
``model_cp``   a second SAM; when a checkpoint has ``model_cp.*`` keys, the image
               embedding, prompt encoder and mask decoder come from it
``cellfinder`` ``decode_head`` = CellFinder (its own ViT trunk + Anchor DETR)
"""
from __future__ import annotations

from torch import nn

from .cellfinder import CellFinderWrapper
from .config import ModelConfig
from .sam import build_sam


class CellSAMNetwork(nn.Module):
    """Weights only: the graphs that run are taken from it by ``graphs()``."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig.cellsam()
        self.model = build_sam(self.config.sam)
        self.model_cp = build_sam(self.config.sam)
        self.cellfinder = CellFinderWrapper(self.config.cellfinder)
        # Set by the checkpoint loader: False when the checkpoint had no model_cp.* keys,
        # in which case the released code skips two preprocessing steps too.
        self.uses_model_cp = True

    @property
    def sam(self) -> nn.Module:
        """The SAM whose encoder and decoder make the masks."""
        return self.model_cp if self.uses_model_cp else self.model

    def graphs(self) -> dict[str, nn.Module]:
        """The three graphs that run, by graph name (the ONNX export's and every backend's):

        ``encoder``     image (B, 3, S, S) -> embedding (B, C, G, G)
        ``cellfinder``  image (B, 3, S, S) -> logits (B, Q, 2), boxes (B, Q, 4) cxcywh in [0, 1]
        ``decoder``     embedding (1, C, G, G), boxes (N, 4) xyxy in model pixels ->
                        mask logits (N, 1, 4G, 4G), IoU (N, 1)  (``BoxDecoder``)

        The modules are this network's own (no copy; their training flag is left alone).
        """
        from .decoder import BoxDecoder

        sam = self.sam
        return {
            "encoder": sam.image_encoder,
            "cellfinder": self.cellfinder.decode_head,
            "decoder": BoxDecoder(sam.prompt_encoder, sam.mask_decoder),
        }
