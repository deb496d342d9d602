"""The torch backend: it leaves the caller's network alone, resolves devices once, and
classifies every kind of allocation failure as OutOfDeviceMemory (the pipeline retries)."""
import copy

import pytest
import torch

from cellsam_trt.dev.reference import reference_segment
from cellsam_trt.modeling.checkpoint import random_network
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime import BackendError, OutOfDeviceMemory, TorchBackend, resolve_device
from cellsam_trt.runtime.base import is_out_of_memory
from cellsam_trt.runtime.onnx_backend import _run_error
from cellsam_trt.runtime.torch_backend import inference_copy


@pytest.fixture()
def tiny():
    """A fresh tiny network (tests here change its mode and dtype)."""
    return random_network(ModelConfig.tiny(), seed=0)


def _tensors(module):
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()]}


def test_backend_on_another_device_leaves_the_callers_network_alone(tiny):
    before = _tensors(tiny)
    tiny.train()
    # the meta device stands in for a GPU: a real move, on any machine, without memory
    backend = TorchBackend(tiny, device="meta")
    after = _tensors(tiny)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor is before[name], name
        assert tensor.device.type == "cpu", name
    assert all(m.training for m in tiny.modules())  # the caller's training flag is the caller's
    used = [backend.image_encoder, backend.cellfinder_module, backend.box_decoder.prompt_encoder,
            backend.box_decoder.mask_decoder]
    for module in used:
        assert not module.training
        assert {t.device.type for t in _tensors(module).values()} == {"meta"}


def test_backend_on_the_same_device_shares_the_weights_without_copying(tiny):
    tiny.train()
    backend = TorchBackend(tiny, device="cpu")
    assert all(m.training for m in tiny.modules())
    assert not backend.image_encoder.training and backend.image_encoder is not tiny.sam.image_encoder
    mine = _tensors(tiny.sam.image_encoder)
    for name, tensor in _tensors(backend.image_encoder).items():
        assert tensor is mine[name], name  # same storage: no second copy of the weights


def test_backend_runs_float32_weights_of_a_double_network(tiny, cell_image):
    double = copy.deepcopy(tiny).double()
    backend = TorchBackend(double, device="cpu")
    assert all(t.dtype == torch.float64 for t in _tensors(double).values() if t.is_floating_point())
    weights = _tensors(backend.image_encoder)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    images = torch.zeros(1, 3, 1024, 1024)
    torch.testing.assert_close(backend.encoder(images), TorchBackend(tiny, device="cpu").encoder(images))


def test_inference_copy_keeps_tied_weights_tied():
    shared = torch.nn.Linear(2, 2)
    pair = torch.nn.ModuleDict({"a": shared, "b": shared})
    moved = inference_copy(pair, "meta")
    assert moved["a"] is moved["b"] and moved["a"].weight.device.type == "meta"
    assert shared.weight.device.type == "cpu"


def test_reference_leaves_the_callers_network_alone(tiny, cell_image):
    before = _tensors(tiny)
    tiny.train()
    boxes = [[10, 10, 40, 40]]
    reference_segment(tiny, cell_image, boxes=boxes, device="cpu")
    assert all(m.training for m in tiny.modules())
    assert all(t is before[name] for name, t in _tensors(tiny).items())


def test_cuda_without_index_is_resolved_to_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(BackendError, match="cuda:2 does not exist.*2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("err", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions."),
    RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer"),
    MemoryError(),
])
def test_allocation_failures_of_every_library_are_out_of_memory(err):
    assert is_out_of_memory(err)
    assert isinstance(_run_error("decoder", err, {"boxes": torch.zeros(3, 4)}), OutOfDeviceMemory)


def test_other_runtime_errors_are_not_out_of_memory():
    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x4)")
    assert not is_out_of_memory(err)
    assert not isinstance(_run_error("decoder", err, {"boxes": torch.zeros(3, 4)}), OutOfDeviceMemory)


@pytest.mark.parametrize("message, retried", [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("expected scalar type Float but found Half", False),
])
def test_torch_decoder_turns_allocation_failures_into_out_of_device_memory(tiny, message, retried):
    backend = TorchBackend(tiny, device="cpu")

    def failing(*args, **kwargs):
        raise RuntimeError(message)

    backend.box_decoder.decode_tokens = failing
    grid = tiny.config.sam.encoder.grid_size
    embedding = torch.zeros(1, tiny.config.sam.prompt_embed_dim, grid, grid)
    expected = OutOfDeviceMemory if retried else RuntimeError
    with pytest.raises(expected) as info:
        backend.decoder(embedding, torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    assert isinstance(info.value, OutOfDeviceMemory) == retried


needs_cuda = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_graphs_on_the_cpu_are_refused_with_the_alternative(tiny):
    with pytest.raises(BackendError, match="cuda_graphs=True needs a CUDA device.*leave cuda_graphs off"):
        TorchBackend(tiny, device="cpu", cuda_graphs=True)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_replays_give_the_decoders_outputs(steered_tiny, cell_image, no_tf32, precision):
    from cellsam_trt import CellSAM

    plain = TorchBackend(steered_tiny, device="cuda", precision=precision)
    graphs = TorchBackend(steered_tiny, device="cuda", precision=precision, cuda_graphs=True)
    embedding = plain.encoder(torch.randn(1, 3, *[steered_tiny.config.image_size] * 2, device="cuda"))
    rng = torch.Generator().manual_seed(0)
    for n in (5, 16, 40, 3):  # padded to 16, 16, 64, 16: one graph is replayed with new boxes
        corner = torch.rand(n, 2, generator=rng) * 0.7 * steered_tiny.config.image_size
        boxes = torch.cat([corner, corner + 20 + 80 * torch.rand(n, 2, generator=rng)], 1)
        want = plain.decoder(embedding, boxes)
        got = graphs.decoder(embedding, boxes)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            tolerance = 1e-4 if precision == "fp32" else 2e-2
            assert torch.allclose(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item()), (n, (a - b).abs().max())
    assert sorted(size for size, _ in graphs.captured_decoder.graphs) == [16, 64]
    # the padded calls may take other GEMM algorithms: cells compared, not bits
    from cellsam_trt.dev.accuracy import label_agreement

    out = label_agreement(CellSAM(plain).segment(cell_image), CellSAM(graphs).segment(cell_image))
    assert out["reference_cells"] >= 5 and out["f1"] >= 0.99 and out["foreground_agreement"] >= 0.9999, out


@needs_cuda
def test_fused_attention_matches_eager_on_cuda(steered_tiny, no_tf32):
    images = torch.randn(2, 3, *[steered_tiny.config.image_size] * 2, device="cuda")
    fused = TorchBackend(steered_tiny, device="cuda").encoder(images)
    eager = TorchBackend(steered_tiny, device="cuda", attention="eager").encoder(images)
    assert (fused - eager).abs().max().item() <= 1e-4 * max(1.0, eager.abs().max().item())


def test_the_decoder_choice_is_checked_and_said(tiny, caplog, monkeypatch, cell_image, steered_tiny):
    import logging

    with pytest.raises(ValueError, match="decoder"):
        TorchBackend(tiny, device="cpu", decoder="triton")
    with caplog.at_level(logging.INFO, logger="cellsam_trt.runtime.torch_backend"):
        assert TorchBackend(tiny, device="cpu").describe()["decoder"] == "eager"
    assert "eager decoder runs on cpu" in caplog.text
    import cellsam_trt.modeling.fused_decoder  # noqa: F401  (its kernels are defined at import, as the environment says)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="decoder='fused'"):
        TorchBackend(tiny, device="cpu", decoder="fused")


@pytest.mark.slow
@pytest.mark.interpreter
def test_the_fused_decoder_gives_the_eager_labels(steered_tiny, cell_image):
    """The whole pipeline with the Triton kernels in Triton's interpreter against the eager
    decoder, user boxes on the test image (on a GPU: tests/modeling/test_fused_decoder.py)."""
    pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it)")
    from cellsam_trt import CellSAM
    from cellsam_trt.dev.synthetic import cell_boxes

    boxes = cell_boxes(6, *cell_image.shape[:2], seed=2)
    fused = CellSAM(TorchBackend(steered_tiny, device="cpu", decoder="fused"))
    assert fused.backend.describe()["decoder"] == "fused"
    eager = CellSAM(TorchBackend(steered_tiny, device="cpu", decoder="eager"))
    got, want = fused.segment(cell_image, boxes=boxes), eager.segment(cell_image, boxes=boxes)
    assert want.max() >= 2
    assert (got == want).mean() > 0.999  # float32 rounding may move a boundary pixel
