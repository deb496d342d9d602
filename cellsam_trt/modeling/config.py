"""Model hyper-parameters and inference thresholds.

``ModelConfig.cellsam()`` is the released CellSAM architecture (SAM ViT-B plus the
CellFinder Anchor DETR head); ``ModelConfig.tiny()`` keeps every code path but shrinks
widths, depths and the query count so tests run in seconds on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ViTConfig:
    """A SAM-style ViT image encoder (patch embedding, windowed + global blocks)."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256

    @property
    def grid_size(self) -> int:
        """Side of the token grid, 64 for a 1024 input with 16 px patches."""
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class SAMConfig:
    """SAM = image encoder (with neck) + prompt encoder + mask decoder."""

    encoder: ViTConfig = field(default_factory=ViTConfig)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (4x the embedding grid: 256)."""
        return 4 * self.encoder.grid_size


@dataclass(frozen=True)
class CellFinderConfig:
    """CellFinder: its own ViT trunk (no neck) + Anchor DETR with row-column attention."""

    trunk: ViTConfig = field(default_factory=ViTConfig)
    d_model: int = 256
    nhead: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    num_queries: int = 3500
    num_patterns: int = 1
    num_classes: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """The whole CellSAM network."""

    sam: SAMConfig = field(default_factory=SAMConfig)
    cellfinder: CellFinderConfig = field(default_factory=CellFinderConfig)
    name: str = "cellsam-vit-b"

    @property
    def image_size(self) -> int:
        """Side of the square both model inputs are squashed to (1024)."""
        return self.sam.encoder.img_size

    @classmethod
    def cellsam(cls) -> ModelConfig:
        """The released CellSAM v1.2 architecture."""
        return cls()

    @classmethod
    def tiny(cls) -> ModelConfig:
        """Same graph structure with small widths; for tests and smoke benchmarks."""
        vit = ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), out_chans=32)
        sam = SAMConfig(
            encoder=vit, prompt_embed_dim=32, decoder_mlp_dim=64, decoder_heads=2,
            iou_head_hidden_dim=32,
        )
        finder = CellFinderConfig(
            trunk=ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
            d_model=32, nhead=2, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries=200,
        )
        return cls(sam=sam, cellfinder=finder, name="tiny")

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """``"cellsam-vit-b"`` (alias ``"cellsam"``) or ``"tiny"``."""
        if name in ("cellsam", "cellsam-vit-b"):
            return cls.cellsam()
        if name == "tiny":
            return cls.tiny()
        raise ValueError(f"unknown model config {name!r}; expected 'cellsam-vit-b' or 'tiny'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        sam = dict(d["sam"])
        sam["encoder"] = _vit(sam["encoder"])
        finder = dict(d["cellfinder"])
        finder["trunk"] = _vit(finder["trunk"])
        return cls(sam=SAMConfig(**sam), cellfinder=CellFinderConfig(**finder), name=d.get("name", "custom"))


def _vit(d: dict[str, Any]) -> ViTConfig:
    d = dict(d)
    d["global_attn_indexes"] = tuple(d["global_attn_indexes"])
    return ViTConfig(**d)


@dataclass(frozen=True)
class InferenceConfig:
    """Thresholds of the released inference code, and our batching knobs.

    bbox_threshold: weight of the fixed part of CellFinder's dynamic score threshold.
    iou_threshold: masks whose predicted IoU is below this are dropped.
    mask_threshold: a pixel is foreground where sigmoid(mask logit) > this.
    min_size: labels smaller than this many pixels (after hole filling) are dropped.
    chunk_size: boxes per decoder call.
    """

    bbox_threshold: float = 0.4
    iou_threshold: float = 0.5
    mask_threshold: float = 0.4
    min_size: int = 25
    chunk_size: int = 256
