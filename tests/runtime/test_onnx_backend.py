"""ONNX Runtime backend: the pipeline on the exported graphs gives the torch labels; bad
artefacts and unavailable providers are refused with a message saying what to do."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from export_shared import copy_export

from cellsam_trt import CellSAM
from cellsam_trt.graphs.onnx_export import export_network
from cellsam_trt.modeling.checkpoint import random_network, write_checkpoint
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime import (
    BackendError,
    OnnxRuntimeBackend,
    TorchBackend,
    create_backend,
)

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ort_backend(exported):
    checkpoint, folder = exported
    return OnnxRuntimeBackend(folder, checkpoint=checkpoint, device="cpu")


@pytest.fixture(scope="module")
def torch_session(steered_tiny):
    return CellSAM.from_network(steered_tiny, device="cpu")


def user_boxes(n, height, width, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width - 40, n)
    y1 = rng.uniform(0, height - 40, n)
    return np.stack([x1, y1, x1 + rng.uniform(8, 40, n), y1 + rng.uniform(8, 40, n)], 1).astype(np.float32)


def test_backend_reads_the_manifest(ort_backend):
    assert ort_backend.name == "onnxruntime"
    assert ort_backend.config == ModelConfig.tiny()
    assert ort_backend.adapted_inputs is True
    assert ort_backend.device == torch.device("cpu")
    assert ort_backend.providers == ["CPUExecutionProvider"]
    assert ort_backend.max_decoder_boxes is None


def test_pipeline_with_cellfinder_boxes_equals_torch(ort_backend, torch_session, cell_image):
    want, want_details = torch_session.segment(cell_image, return_details=True)
    got, details = CellSAM(ort_backend).segment(cell_image, return_details=True)
    # the steered weights give the comparison content
    assert want_details.num_candidates > len(want_details.iou) > 10 and want.max() >= 5
    assert details.num_candidates == want_details.num_candidates
    np.testing.assert_allclose(details.scores, want_details.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(details.iou, want_details.iou, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got, want)


def test_pipeline_with_user_boxes_equals_torch(ort_backend, torch_session, cell_image):
    boxes = user_boxes(40, *cell_image.shape[:2])
    want = torch_session.segment(cell_image, boxes=boxes)
    assert want.max() >= 3
    np.testing.assert_array_equal(CellSAM(ort_backend).segment(cell_image, boxes=boxes), want)


def test_max_decoder_boxes_chunks_without_changing_labels(exported, torch_session, cell_image):
    checkpoint, folder = exported
    backend = OnnxRuntimeBackend(folder, device="cpu", max_decoder_boxes=6)
    boxes = user_boxes(20, *cell_image.shape[:2], seed=3)
    np.testing.assert_array_equal(CellSAM(backend).segment(cell_image, boxes=boxes),
                                  torch_session.segment(cell_image, boxes=boxes))
    embedding = torch.zeros(1, 32, 64, 64)
    with pytest.raises(ValueError, match="max_decoder_boxes"):
        backend.decoder(embedding, torch.tensor(boxes[:7] * 2))


def test_create_backend_kinds(exported, cell_image, tmp_path):
    checkpoint, folder = exported
    backend = create_backend("onnxruntime", checkpoint=checkpoint, onnx_dir=folder, device="cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    session = CellSAM.from_checkpoint(checkpoint, backend="onnxruntime", onnx_dir=folder, device="cpu", threads=1)
    assert session.backend.describe()["onnx_dir"] == str(folder)
    # auto: no engines here (and no TensorRT), so the export; without artefacts and with
    # building off, torch
    assert isinstance(create_backend("auto", checkpoint=checkpoint, onnx_dir=folder, device="cpu"), OnnxRuntimeBackend)
    assert isinstance(create_backend("auto", checkpoint=checkpoint, device="cpu", precision="fp32",
                                     cache=tmp_path, build=False), TorchBackend)
    with pytest.raises(BackendError, match="not in the cache.*building is turned off"):
        create_backend("onnxruntime", checkpoint=checkpoint, cache=tmp_path, build=False)
    with pytest.raises(ValueError, match="backend"):
        create_backend("openvino", checkpoint=checkpoint)


def test_auto_falls_back_to_torch_when_export_is_refused(exported, tmp_path, caplog):
    checkpoint, folder = exported
    other = write_checkpoint(random_network(ModelConfig.tiny(), seed=1), tmp_path / "other.pt")
    with caplog.at_level(logging.WARNING, logger="cellsam_trt.runtime"):
        backend = create_backend("auto", checkpoint=other, onnx_dir=folder, device="cpu")
    assert isinstance(backend, TorchBackend)
    assert "another checkpoint" in caplog.text


def test_graph_outputs_on_requested_device_and_shapes_checked(ort_backend):
    emb = ort_backend.encoder(torch.zeros(2, 3, 1024, 1024))
    assert emb.shape == (2, 32, 64, 64) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    with pytest.raises(ValueError, match=r"encoder image: expected shape \(batch, 3, 1024, 1024\)"):
        ort_backend.encoder(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError, match="decoder embedding"):
        ort_backend.decoder(torch.zeros(2, 32, 64, 64), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="decoder boxes"):
        ort_backend.decoder(torch.zeros(1, 32, 64, 64), torch.zeros(3, 5))


# ---- refusals ------------------------------------------------------------------------

def test_refuses_folder_without_manifest(tmp_path):
    with pytest.raises(BackendError, match="cellsam-trt export"):
        OnnxRuntimeBackend(tmp_path, device="cpu")
    with pytest.raises(BackendError, match="not a folder"):
        OnnxRuntimeBackend(tmp_path / "missing", device="cpu")


def test_refuses_missing_graph_file(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    (folder / "decoder.onnx").unlink()
    with pytest.raises(BackendError, match="decoder graph file .* is missing"):
        OnnxRuntimeBackend(folder, device="cpu")


def test_refuses_changed_graph_file(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    data = bytearray((folder / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BackendError, match="changed since it was exported"):
        OnnxRuntimeBackend(folder, device="cpu")


def test_refuses_corrupt_graph_even_with_matching_hash(exported, tmp_path):
    from cellsam_trt.modeling.checkpoint import file_sha256

    folder = copy_export(exported[1], tmp_path)
    (folder / "cellfinder.onnx").write_bytes(b"not a protobuf at all" * 100)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["cellfinder"]["sha256"] = file_sha256(folder / "cellfinder.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="ONNX Runtime cannot load .*cellfinder.onnx"):
        OnnxRuntimeBackend(folder, device="cpu")


def test_refuses_broken_or_foreign_manifest(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(BackendError, match="not readable JSON"):
        OnnxRuntimeBackend(folder, device="cpu")
    (folder / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(BackendError, match="not a cellsam-trt export manifest"):
        OnnxRuntimeBackend(folder, device="cpu")


def test_refuses_graphs_of_another_checkpoint(exported, tmp_path):
    checkpoint, folder = exported
    other = write_checkpoint(random_network(ModelConfig.tiny(), seed=1), tmp_path / "other.pt")
    with pytest.raises(BackendError, match="another checkpoint"):
        OnnxRuntimeBackend(folder, checkpoint=other, device="cpu")
    with pytest.raises(BackendError, match="no file"):
        OnnxRuntimeBackend(folder, checkpoint=tmp_path / "absent.pt", device="cpu")


def test_refuses_checkpoint_check_for_in_memory_export(tmp_path, exported):
    export_network(random_network(ModelConfig.tiny(), seed=2), tmp_path / "mem", graphs=("decoder",))
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    assert manifest["checkpoint"] == {"path": None, "sha256": None}
    from cellsam_trt.runtime.artifacts import load_manifest

    with pytest.raises(BackendError, match="in-memory weights"):
        load_manifest(tmp_path / "mem", graphs=("decoder",), checkpoint=exported[0])
    # the backend needs all three graphs
    with pytest.raises(BackendError, match="no encoder graph"):
        OnnxRuntimeBackend(tmp_path / "mem", device="cpu")


def test_refuses_unavailable_provider(exported):
    available = ort.get_available_providers()
    missing = [p for p, full in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
               if full not in available]
    if not missing:
        pytest.skip("this onnxruntime has both GPU providers; nothing to refuse")
    with pytest.raises(BackendError, match="not available") as info:
        OnnxRuntimeBackend(exported[1], providers=missing[0])
    assert "CPUExecutionProvider" in str(info.value)  # lists what is available
    with pytest.raises(ValueError, match="unknown provider"):
        OnnxRuntimeBackend(exported[1], providers=["cpu", "openvino-ish"])
    with pytest.raises(ValueError, match="max_decoder_boxes"):
        OnnxRuntimeBackend(exported[1], max_decoder_boxes=0)


def test_refuses_a_provider_that_onnxruntime_drops_at_load(exported, monkeypatch):
    """onnxruntime-gpu lists CUDA even when its libraries fail to load, then runs on the CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime really has the CUDA provider; the silent fallback cannot be staged")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own note about the provider
        with pytest.raises(BackendError, match="could not start CUDAExecutionProvider .*fell back to CPUExecutionProvider"):
            OnnxRuntimeBackend(exported[1], providers="cuda", device="cpu")


def test_cuda_device_id_follows_torchs_current_device(exported, monkeypatch):
    """device="cuda" means torch's current device; ONNX Runtime's provider options and IO
    binding must name that GPU too, not GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    backend = OnnxRuntimeBackend(exported[1], device="cuda")  # CPU provider: loads without a GPU
    assert backend.device == torch.device("cuda", 1)
    backend.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda_options = dict(backend._provider_list("decoder", exported[1] / "cache", 8)[0][1])
    assert cuda_options["device_id"] == 1


def test_image_batches_above_max_batch_are_split(exported):
    backend = OnnxRuntimeBackend(exported[1])
    images = torch.randn(3, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    whole = backend.encoder(images), *backend.cellfinder(images)
    backend.max_batch = 2  # as with the TensorRT provider's profile
    split = backend.encoder(images), *backend.cellfinder(images)
    for a, b in zip(whole, split):
        assert a.shape == b.shape and a.shape[0] == 3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # batch size changes the float sums


def test_segment_command_runs_the_onnx_graphs(exported, torch_session, cell_image, tmp_path, capsys):
    import tifffile

    from cellsam_trt.cli.main import main

    checkpoint, folder = exported
    np.save(tmp_path / "cells.npy", cell_image)
    args = ["segment", str(tmp_path / "cells.npy"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
            "--device", "cpu", "--no-progress", "--backend", "onnxruntime"]
    refused = main(args + ["--no-build", "--cache-dir", str(tmp_path / "empty-cache")])
    assert refused == 1 and "building is turned off" in capsys.readouterr().err  # says what is missing
    assert main(args + ["--onnx-dir", str(folder)]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "cells_labels.tif"),
                                  torch_session.segment(cell_image))


def test_cpu_memory_arena_only_for_the_decoder(exported):
    checkpoint, folder = exported
    backend = OnnxRuntimeBackend(folder, device="cpu", verify_hashes=False)
    arenas = {g: s.get_session_options().enable_cpu_mem_arena for g, s in backend.sessions.items()}
    # the arena keeps each graph's peak: gigabytes for the image graphs, little for decoder chunks
    assert arenas == {"encoder": False, "cellfinder": False, "decoder": True, "mask_head": True}
    assert backend.default_chunk_size == 8
    everywhere = OnnxRuntimeBackend(folder, device="cpu", verify_hashes=False, cpu_arena=True)
    assert all(s.get_session_options().enable_cpu_mem_arena for s in everywhere.sessions.values())


def test_decoder_arena_given_back_after_each_images_last_call(exported, torch_session, cell_image):
    checkpoint, folder = exported
    backend = OnnxRuntimeBackend(folder, device="cpu", verify_hashes=False)
    session = backend.sessions["decoder"]
    run, shrink = session.run, []

    def recording_run(outputs, feeds, run_options=None):
        entry = run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") if run_options else None
        shrink.append(entry)
        return run(outputs, feeds, run_options)

    session.run = recording_run
    boxes = user_boxes(10, *cell_image.shape[:2], seed=2)
    labels = CellSAM(backend).segment(cell_image, boxes=boxes, chunk_size=4)
    # three calls (4 + 4 + 2 boxes): only the last asks ONNX Runtime to give the arena back
    assert shrink == [None, None, "cpu:0"]
    np.testing.assert_array_equal(labels, torch_session.segment(cell_image, boxes=boxes))
    no_arena = OnnxRuntimeBackend(folder, device="cpu", verify_hashes=False, cpu_arena=False)
    assert no_arena._decoder_arena is False  # nothing to give back


@pytest.mark.parametrize("kind", ["onnxruntime", "torch"])
def test_the_mask_head_runs_only_for_the_boxes_that_pass(ort_backend, torch_session, cell_image, kind):
    """``keep_iou``: IoU for every box, masks for the kept ones only, equal to those rows of the
    full call; the mask head sees only the kept rows; none kept gives no masks."""
    from cellsam_trt.dev.synthetic import cell_boxes
    from cellsam_trt.graphs.tensorrt_engines import verification_inputs

    backend = ort_backend if kind == "onnxruntime" else torch_session.backend
    embedding = backend.encoder(verification_inputs(backend.config, backend.adapted_inputs, image=cell_image)[0])
    boxes = torch.from_numpy(cell_boxes(24, 1024, 1024, seed=5))
    every, iou = backend.decoder(embedding, boxes)
    threshold = float(iou[:, 0].median())
    rows = iou[:, 0] >= threshold
    assert 0 < int(rows.sum()) < len(boxes)
    head_rows = []
    if kind == "onnxruntime":
        run = backend._run

        def recording(graph, inputs, *args):
            if graph == "mask_head":
                head_rows.append(len(inputs["hyper"]))
            return run(graph, inputs, *args)
        backend._run = recording
    else:
        head = backend.mask_head_graph
        backend.mask_head_graph = lambda tokens, hyper: head_rows.append(len(hyper)) or head(tokens, hyper)
    try:
        kept, kept_iou = backend.decoder(embedding, boxes, keep_iou=threshold)
        none, _ = backend.decoder(embedding, boxes, keep_iou=float(iou.max()) + 1)
    finally:
        backend.__dict__.pop("_run" if kind == "onnxruntime" else "mask_head_graph")
    torch.testing.assert_close(kept_iou, iou, rtol=0, atol=1e-6)
    assert kept.shape == (int(rows.sum()), 1, 256, 256)
    torch.testing.assert_close(kept, every[rows], rtol=1e-5, atol=1e-5)
    assert head_rows[0] == int(rows.sum())
    assert none.shape == (0, 1, 256, 256)
