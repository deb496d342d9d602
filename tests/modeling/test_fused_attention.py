"""The Triton flash attention with SAM's relative-position term inside, against SAM's attention:
here in Triton's interpreter (float32 and float16 storage, small grids), on a GPU for real
(every precision, ViT-B's grids, whole encoders)."""
import os

# tests/conftest.py turns Triton's interpreter on where there is no GPU driver (before triton is imported)
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it)")

from segment_anything.modeling.image_encoder import Attention  # noqa: E402

from cellsam_trt.modeling.attention import SDPAttention  # noqa: E402
from cellsam_trt.modeling.fused_attention import (  # noqa: E402
    FlashRelPosAttention,
    flash_attention_unavailable,
    self_check,
    use_fused_attention,
)
from cellsam_trt.runtime import BackendError, TorchBackend  # noqa: E402


def sam_attention(dim: int, heads: int, size: tuple[int, int], seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    sam = Attention(dim, num_heads=heads, use_rel_pos=True, input_size=size).eval()
    with torch.no_grad():  # SAM initialises the relative positions at zero: give them weight
        sam.rel_pos_h.normal_(std=0.5)
        sam.rel_pos_w.normal_(std=0.5)
    return sam


# key blocks of whole grid rows (16 and 32 wide), gathered terms (14 x 14 windows, a 12-wide
# grid), and a head width that is no power of two (20, padded to 32 in the kernel)
GRIDS = [((16, 16), 32, 2), ((14, 14), 32, 2), ((8, 12), 48, 3), ((16, 32), 64, 1), ((6, 10), 40, 2)]


@pytest.mark.interpreter
@pytest.mark.parametrize("size, dim, heads", GRIDS, ids=["rows16", "window14", "gather12", "rows32", "head20"])
def test_flash_equals_sams_attention_in_float32(size, dim, heads):
    sam = sam_attention(dim, heads, size)
    x = torch.randn(2, *size, dim)
    with torch.inference_mode():
        expected, out = sam(x), FlashRelPosAttention(sam)(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert FlashRelPosAttention(sam).state_dict().keys() == sam.state_dict().keys()


@pytest.mark.interpreter
def test_float16_storage_stays_close_and_the_self_check_reports(monkeypatch):
    sam = sam_attention(32, 2, (14, 14))
    x = torch.randn(2, 14, 14, 32)
    with torch.inference_mode():
        expected = sam(x)
        half = FlashRelPosAttention(sam.half())(x.half())
    assert half.dtype == torch.float16
    error = (half.float() - expected).abs().max().item()
    assert 0 < error < 5e-3  # float16 operands ran, and stayed close
    assert self_check(torch.device("cpu"), torch.float32, 32, 2) is None
    # a wrong kernel is reported, not used
    monkeypatch.setattr(FlashRelPosAttention, "forward", lambda self, x: torch.zeros_like(x))
    assert "differs from SDPA" in self_check(torch.device("cpu"), torch.float32, 32, 2)


@pytest.mark.interpreter
def test_backend_runs_flash_in_both_encoders(steered_tiny):
    backend = TorchBackend(steered_tiny, device="cpu", attention="flash")  # its start-up check passed
    for encoder in (backend.image_encoder, backend.cellfinder_module):
        assert any(isinstance(m, FlashRelPosAttention) for m in encoder.modules())
        assert not any(isinstance(m, (Attention, SDPAttention)) for m in encoder.modules())
    assert backend.describe()["attention"] == "flash"
    assert use_fused_attention(backend.image_encoder, "flash") == 0


def test_flash_is_refused_with_the_reason(monkeypatch, steered_tiny):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in flash_attention_unavailable("cpu")
    with pytest.raises(BackendError, match="attention='flash'.*CUDA.*attention='sdpa'"):
        TorchBackend(steered_tiny, device="cpu", attention="flash")
    with pytest.raises(ValueError, match="relative positions"):
        FlashRelPosAttention(Attention(32, num_heads=2))
    with pytest.raises(ValueError, match="kind"):
        use_fused_attention(torch.nn.Linear(2, 2), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-4), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_flash_matches_sdpa_on_cuda_at_vit_b_size(dtype, limit, no_tf32):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on in this process; the CUDA comparison needs compiled kernels "
                    "(run with TRITON_INTERPRET=0)")
    for size in ((64, 64), (14, 14)):  # ViT-B's global grid and its windows
        sam = sam_attention(768, 12, size).cuda().to(dtype)
        x = torch.randn(2, *size, 768, device="cuda", dtype=dtype)
        with torch.inference_mode():
            error = (FlashRelPosAttention(sam)(x).float() - SDPAttention(sam)(x).float()).abs().max().item()
        print(f"ViT-B attention {size} {dtype}: max abs difference {error:.3g}")
        assert error <= limit
