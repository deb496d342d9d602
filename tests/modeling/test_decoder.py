"""The batched decoder that computes the box-independent work once equals SAM's own calls."""
import pytest
import torch

from cellsam_trt.modeling import BoxDecoder
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig


@pytest.mark.parametrize("config", [ModelConfig.tiny(), pytest.param(ModelConfig.cellsam(), marks=pytest.mark.slow)],
                         ids=["tiny", "vit-b"])
def test_shared_image_work_gives_sams_outputs(config):
    sam = random_network(config, seed=3).eval().sam
    decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder)
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, config.sam.prompt_embed_dim, 64, 64, generator=g)
    corner = torch.rand(5, 2, generator=g) * 900
    boxes = torch.cat([corner, corner + 8 + torch.rand(5, 2, generator=g) * 100], 1)
    with torch.inference_mode():
        masks, iou = decoder(embedding, boxes)
        batched = decoder.forward_per_box_repeat(embedding, boxes)
        single = [sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=s, dense_prompt_embeddings=d, multimask_output=False)
                  for s, d in (sam.prompt_encoder(points=None, boxes=b[None, None], masks=None) for b in boxes)]
    assert masks.shape == (5, 1, 256, 256) and iou.shape == (5, 1)
    torch.testing.assert_close(masks, batched[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(iou, batched[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(masks, torch.cat([m for m, _ in single]), rtol=0, atol=1e-5)
    torch.testing.assert_close(iou, torch.cat([i for _, i in single]), rtol=0, atol=1e-6)
    assert masks.std() > 0.01 and (masks[0] - masks[1]).abs().max() > 1e-3  # boxes give different masks
