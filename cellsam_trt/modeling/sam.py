"""SAM parts, built from the segment-anything package with our config."""
from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from .config import SAMConfig, ViTConfig

# SAM's pixel statistics (0..255 scale); the released CellSAM code divides them by 255.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def build_image_encoder(vit: ViTConfig) -> ImageEncoderViT:
    """SAM's ViT with relative positions and the 256-channel neck."""
    return ImageEncoderViT(
        depth=vit.depth,
        embed_dim=vit.embed_dim,
        img_size=vit.img_size,
        mlp_ratio=vit.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=vit.num_heads,
        patch_size=vit.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=vit.global_attn_indexes,
        window_size=vit.window_size,
        out_chans=vit.out_chans,
    )


def build_sam(cfg: SAMConfig) -> Sam:
    """A SAM module with the key layout of ``sam_model_registry["vit_b"]``."""
    grid = cfg.encoder.grid_size
    dim = cfg.prompt_embed_dim
    return Sam(
        image_encoder=build_image_encoder(cfg.encoder),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.encoder.img_size, cfg.encoder.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
