"""The image encoders' attention on PyTorch's fused kernel: same outputs and labels as SAM's."""
import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from cellsam_trt import CellSAM
from cellsam_trt.modeling.attention import SDPAttention
from cellsam_trt.modeling.fused_attention import use_fused_attention
from cellsam_trt.runtime import BackendError, TorchBackend


@pytest.mark.parametrize("size", [(14, 14), (16, 16)], ids=["window", "global"])
def test_fused_attention_equals_sams(size):
    torch.manual_seed(0)
    sam = Attention(64, num_heads=4, use_rel_pos=True, input_size=size).eval()
    with torch.no_grad():  # SAM initialises the relative positions at zero: give them weight
        sam.rel_pos_h.normal_(std=0.5)
        sam.rel_pos_w.normal_(std=0.5)
    fused = SDPAttention(sam)
    x = torch.randn(3, *size, 64)
    with torch.inference_mode():
        expected, out = sam(x), fused(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert fused.state_dict().keys() == sam.state_dict().keys()  # same names: checkpoints load


def test_backend_swaps_only_its_own_copy(steered_tiny):
    backend = TorchBackend(steered_tiny, device="cpu")
    encoders = [steered_tiny.sam.image_encoder, steered_tiny.cellfinder.decode_head]
    assert all(isinstance(b.attn, Attention) for e in encoders for b in e.modules() if hasattr(b, "attn"))
    fused = [m for m in backend.image_encoder.modules() if isinstance(m, SDPAttention)]
    assert len(fused) == len(steered_tiny.sam.image_encoder.blocks)
    assert any(isinstance(m, SDPAttention) for m in backend.cellfinder_module.modules())
    assert use_fused_attention(backend.image_encoder) == 0  # nothing left to replace
    assert backend.describe()["attention"] == "sdpa"


def test_fused_attention_gives_the_eager_labels(steered_tiny, cell_image):
    fused = CellSAM(TorchBackend(steered_tiny, device="cpu"))
    eager = CellSAM(TorchBackend(steered_tiny, device="cpu", attention="eager"))
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused.backend.encoder(image), eager.backend.encoder(image), rtol=0, atol=1e-4)
    fused_logits, _ = fused.backend.cellfinder(image)
    eager_logits, _ = eager.backend.cellfinder(image)
    torch.testing.assert_close(fused_logits, eager_logits, rtol=0, atol=1e-4)
    labels = fused.segment(cell_image)
    assert labels.max() > 5
    np.testing.assert_array_equal(labels, eager.segment(cell_image))
    rng = np.random.default_rng(4)
    corner = rng.uniform(0, [360, 260], size=(12, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(10, 40, size=(12, 2))], 1)
    np.testing.assert_array_equal(fused.segment(cell_image, boxes=boxes), eager.segment(cell_image, boxes=boxes))


def test_precision_choices(steered_tiny):
    with pytest.raises(BackendError, match="fp16.*CUDA.*bf16"):
        TorchBackend(steered_tiny, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        TorchBackend(steered_tiny, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="attention"):
        TorchBackend(steered_tiny, device="cpu", attention="triton")
    bf16 = TorchBackend(steered_tiny, device="cpu", precision="bf16")
    fp32 = TorchBackend(steered_tiny, device="cpu")
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    low, ref = bf16.encoder(image), fp32.encoder(image)
    assert low.dtype == torch.float32  # the contract's dtype, whatever the compute
    error = (low - ref).abs().max() / ref.abs().max()
    assert 0 < error < 0.05  # bfloat16 arithmetic ran (8 bits of mantissa), and stayed close


def test_reduced_precision_runs_the_encoders_end_to_end(steered_tiny):
    bf16 = TorchBackend(steered_tiny, device="cpu", precision="bf16")
    fp32 = TorchBackend(steered_tiny, device="cpu")
    # the copies' weights are bfloat16 (no autocast casts per op), but CellFinder's anchors
    for name, p in bf16.cellfinder_module.named_parameters():
        assert p.dtype == (torch.float32 if name == "transformer.position.weight" else torch.bfloat16), name
    assert all(p.dtype == torch.bfloat16 for p in bf16.image_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in steered_tiny.parameters())  # the caller's network is untouched
    assert all(p.dtype == torch.float32 for p in bf16.box_decoder.parameters())
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    (low_logits, low_boxes), (logits, boxes) = bf16.cellfinder(image), fp32.cellfinder(image)
    assert low_boxes.dtype == low_logits.dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa through every layer: on these steered random weights
    # the logits move by 12 % of their range (autocast: 7 %), the boxes by 3e-4 of the side
    assert 0 < (low_logits - logits).abs().max() < 0.2 * logits.abs().max()
    assert (low_boxes - boxes).abs().max() < 0.01  # a hundredth of the image side
