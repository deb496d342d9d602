"""The CellSAM module tree, with the released checkpoint's key layout.

``model``      SAM (image encoder, prompt encoder, mask decoder)
``model_cp``   a second SAM; when a checkpoint has ``model_cp.*`` keys, the image
               embedding, prompt encoder and mask decoder come from it
``cellfinder`` ``decode_head`` = CellFinder (its own ViT trunk + Anchor DETR)
"""
from __future__ import annotations

from torch import Tensor, nn

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
        """The four graphs that run, by graph name (the ONNX export's and every backend's):

        ``encoder``     image (B, 3, S, S) -> embedding (B, C, G, G)
        ``cellfinder``  image (B, 3, S, S) -> logits (B, Q, 2), boxes (B, Q, 4) cxcywh in [0, 1]
        ``decoder``     embedding (1, C, G, G), boxes (N, 4) xyxy in model pixels ->
                        IoU (N, 1), image tokens (N, G*G, C), hyper (N, C/8)  (``DecoderGraph``)
        ``mask_head``   image tokens (K, G*G, C), hyper (K, C/8) -> mask logits (K, 1, 4G, 4G)
                        (``MaskHeadGraph``), run for the boxes whose IoU passes the filter

        The modules are this network's own (no copy; their training flag is left alone); the
        two decoder graphs share one ``BoxDecoder``.
        """
        from .decoder import BoxDecoder

        sam = self.sam
        box_decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder)
        return {
            "encoder": sam.image_encoder,
            "cellfinder": self.cellfinder.decode_head,
            "decoder": DecoderGraph(box_decoder),
            "mask_head": MaskHeadGraph(box_decoder),
        }


class DecoderGraph(nn.Module):
    """The ``decoder`` graph: ``BoxDecoder.decode_tokens`` with its outputs in the graph's order,
    (embedding (1, C, G, G), boxes (N, 4)) -> (iou (N, 1), image tokens (N, G*G, C), hyper (N, C/8))."""

    def __init__(self, box_decoder: nn.Module) -> None:
        super().__init__()
        self.box_decoder = box_decoder

    def forward(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image_tokens, hyper, iou = self.box_decoder.decode_tokens(embedding, boxes)
        return iou, image_tokens, hyper


class MaskHeadGraph(nn.Module):
    """The ``mask_head`` graph: ``BoxDecoder.mask_head``, (image tokens (K, G*G, C), hyper (K, C/8))
    -> mask logits (K, 1, 4G, 4G)."""

    def __init__(self, box_decoder: nn.Module) -> None:
        super().__init__()
        self.box_decoder = box_decoder

    def forward(self, image_tokens: Tensor, hyper: Tensor) -> Tensor:
        return self.box_decoder.mask_head(image_tokens, hyper)
