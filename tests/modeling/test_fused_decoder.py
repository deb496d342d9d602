"""The fused Triton decoder against the eager BoxDecoder: here in Triton's interpreter (on the
CPU, float32 and float16 storage; the interpreter has no bfloat16 arithmetic), on a GPU for
real in every precision."""
import os

# tests/conftest.py turns Triton's interpreter on where there is no GPU driver (before triton is imported)
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it)")

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402

from cellsam_trt.dev.synthetic import cell_boxes  # noqa: E402
from cellsam_trt.modeling.decoder import BoxDecoder  # noqa: E402
from cellsam_trt.modeling.fused_decoder import (  # noqa: E402
    FusedBoxDecoder,
    fused_decoder_unavailable,
    self_check,
)


def box_decoder(width: int, heads: int, mlp: int, seed: int = 0) -> BoxDecoder:
    """SAM's prompt encoder and mask decoder at a given width, random weights (the decoder's
    arithmetic does not depend on their values)."""
    torch.manual_seed(seed)
    prompt = PromptEncoder(embed_dim=width, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=width,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=mlp, num_heads=heads))
    return BoxDecoder(prompt, decoder).eval()


def compare(eager: BoxDecoder, fused: FusedBoxDecoder, n: int, device: str = "cpu", seed: int = 1):
    """Max abs differences (keys, hyper, iou, masks) of fused against eager on n boxes."""
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn((1, eager.mask_decoder.transformer_dim, 64, 64), generator=g).to(device)
    boxes = torch.from_numpy(cell_boxes(n, 1024, 1024, seed=seed)).to(device)
    with torch.inference_mode():
        keys, hyper, iou = eager.decode_tokens(embedding, boxes)
        got_keys, got_hyper, got_iou = fused.decode_tokens(embedding, boxes)
        rows = torch.arange(0, n, 2, device=device)  # the mask head on kept rows only, as the pipeline runs it
        masks = eager.mask_head(keys[rows], hyper[rows])
        got_masks = fused.mask_head(got_keys[rows], got_hyper[rows])
    return [float((a.float() - b.float()).abs().max()) for a, b in
            ((keys, got_keys), (hyper, got_hyper), (iou, got_iou), (masks, got_masks))]


@pytest.mark.interpreter
def test_tiny_width_matches_the_eager_decoder_in_float32():
    eager = box_decoder(32, heads=2, mlp=64)
    errors = compare(eager, FusedBoxDecoder(eager), n=3)
    print("tiny fp32 keys, hyper, iou, masks:", errors)
    assert max(errors) < 1e-5


@pytest.mark.interpreter
@pytest.mark.slow
def test_vit_b_width_matches_the_eager_decoder_in_float32():
    """The released decoder's sizes (256 channels, 8 heads, 2048-wide MLP): tl.dot everywhere."""
    eager = box_decoder(256, heads=8, mlp=2048)
    errors = compare(eager, FusedBoxDecoder(eager), n=2)
    print("ViT-B fp32 keys, hyper, iou, masks:", errors)
    assert errors[0] < 1e-4 and errors[1] < 1e-5 and errors[2] < 1e-5 and errors[3] < 1e-5


@pytest.mark.interpreter
def test_float16_storage_stays_close_and_the_self_check_reports():
    eager = box_decoder(32, heads=2, mlp=64)
    fused = FusedBoxDecoder(eager, dtype=torch.float16)
    errors = compare(eager, fused, n=2)
    print("tiny fp16 storage keys, hyper, iou, masks:", errors)
    assert errors[0] < 0.05 and errors[2] < 0.01 and errors[3] < 0.01
    embedding = torch.randn(1, 32, 64, 64)
    boxes = torch.from_numpy(cell_boxes(2, 1024, 1024, seed=2))
    assert self_check(FusedBoxDecoder(eager), embedding, boxes) is None
    broken = FusedBoxDecoder(eager)
    broken.mask_head = lambda keys, hyper: torch.zeros(len(keys), 1, 256, 256)  # a wrong kernel
    assert "differs from the eager one" in self_check(broken, embedding, boxes)


def test_availability_names_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in fused_decoder_unavailable("cpu")
    with pytest.raises(ValueError, match="dtype"):
        FusedBoxDecoder(box_decoder(32, heads=2, mlp=64), dtype=torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, limits", [(torch.float32, (1e-3, 1e-4, 1e-4, 1e-3)),
                                           (torch.bfloat16, (0.3, 0.05, 0.05, 0.2)),
                                           (torch.float16, (0.05, 0.01, 0.01, 0.05))])
def test_fused_matches_eager_on_cuda(dtype, limits, no_tf32):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on in this process; the CUDA comparison needs compiled kernels "
                    "(run with TRITON_INTERPRET=0)")
    eager = box_decoder(256, heads=8, mlp=2048).cuda()
    errors = compare(eager, FusedBoxDecoder(eager, dtype=dtype), n=64, device="cuda")
    print(f"ViT-B {dtype} keys, hyper, iou, masks:", errors)
    assert all(e <= limit for e, limit in zip(errors, limits)), errors
