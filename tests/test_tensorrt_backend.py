"""TensorRT: engine metadata checks and the --verify arithmetic run everywhere; building and
running engines needs tensorrt and a CUDA GPU and is skipped (with the reason) elsewhere."""
import copy
import importlib.util
import json
import logging

import numpy as np
import pytest
import torch

from cellsam_trt import CellSAM, cli
from cellsam_trt.checkpoint import file_sha256, random_network, write_checkpoint
from cellsam_trt.config import ModelConfig
from cellsam_trt.engines import compare_arrays, mask_agreement, verify_backend
from cellsam_trt.runtime import BackendError, OnnxRuntimeBackend, TorchBackend, create_backend
from cellsam_trt.runtime.tensorrt_backend import (
    TensorRTBackend,
    check_engine_metadata,
    engine_files,
    load_engine_metadata,
    require_tensorrt,
)
from export_shared import copy_export, tiny_export

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs the tensorrt package and a CUDA GPU",
)
no_trt = pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed; the missing-TensorRT message cannot be shown")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, steered_tiny):
    return tiny_export(tmp_path_factory, steered_tiny)


def metadata(checkpoint_sha="a" * 64):
    """engines.json as build_engines writes it (fields the checks read)."""
    return {
        "format": "cellsam-trt-engines", "version": 1,
        "tensorrt_version": "10.3.0.26",
        "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
        "checkpoint": {"path": "/w/cellsam_general.pt", "sha256": checkpoint_sha},
        "onnx_dir": "/w/onnx",
        "model_config": ModelConfig.tiny().to_dict(), "uses_model_cp": True,
        "engines": {g: {"file": f"{g}.engine", "sha256": "0" * 64} for g in ("encoder", "cellfinder", "decoder")},
    }


HERE = dict(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0", tensorrt_version="10.3.0.26")


def test_metadata_of_this_machine_is_accepted():
    check_engine_metadata(metadata(), **HERE)


@pytest.mark.parametrize("field,value,message", [
    ("compute_capability", "8.9", r"compute capability 8.0 \(NVIDIA A100-SXM4-80GB\) but this GPU is 8.9"),
    ("gpu_name", "NVIDIA A100-PCIE-40GB", "GPU 'NVIDIA A100-SXM4-80GB' but this GPU is 'NVIDIA A100-PCIE-40GB'"),
    ("tensorrt_version", "10.4.0.26", "TensorRT 10.3.0.26 but this TensorRT is 10.4.0.26"),
])
def test_metadata_of_another_machine_is_refused_with_rebuild_command(field, value, message):
    here = dict(HERE, **{field: value})
    with pytest.raises(BackendError, match=message) as info:
        check_engine_metadata(metadata(), engine_dir="/w/engines", **here)
    assert "cellsam-trt build-engines --onnx-dir /w/onnx --out /w/engines" in str(info.value)


def test_metadata_of_another_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"some weights")
    check_engine_metadata(metadata(file_sha256(ckpt)), checkpoint=ckpt, **HERE)
    with pytest.raises(BackendError, match="another checkpoint"):
        check_engine_metadata(metadata("b" * 64), checkpoint=ckpt, **HERE)


def test_engine_metadata_file_problems(tmp_path):
    with pytest.raises(BackendError, match="no engines.json .*build-engines"):
        load_engine_metadata(tmp_path)
    (tmp_path / "engines.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BackendError, match="not cellsam-trt engine metadata"):
        load_engine_metadata(tmp_path)
    meta = metadata()
    del meta["engines"]["decoder"]
    (tmp_path / "engines.json").write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="no decoder engine"):
        load_engine_metadata(tmp_path)
    meta = metadata()
    del meta["gpu"]
    (tmp_path / "engines.json").write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="lacks 'gpu'"):
        load_engine_metadata(tmp_path)


def test_missing_changed_or_unnamed_engine_files_are_refused(tmp_path):
    meta = metadata()
    for graph in ("encoder", "cellfinder", "decoder"):
        (tmp_path / f"{graph}.engine").write_bytes(graph.encode())
        meta["engines"][graph]["sha256"] = file_sha256(tmp_path / f"{graph}.engine")
    assert engine_files(meta, tmp_path) == {g: tmp_path / f"{g}.engine" for g in ("encoder", "cellfinder", "decoder")}
    (tmp_path / "cellfinder.engine").write_bytes(b"tampered")
    with pytest.raises(BackendError, match="cellfinder.engine changed since it was built.*build-engines"):
        engine_files(meta, tmp_path)
    assert engine_files(meta, tmp_path, verify_hashes=False)["cellfinder"].read_bytes() == b"tampered"
    (tmp_path / "decoder.engine").unlink()
    with pytest.raises(BackendError, match="decoder engine .*decoder.engine is missing.*build-engines"):
        engine_files(meta, tmp_path, verify_hashes=False)
    del meta["engines"]["encoder"]["file"]
    with pytest.raises(BackendError, match="encoder entry .* names no file"):
        engine_files(meta, tmp_path)


@no_trt
def test_missing_tensorrt_is_one_clear_error(tmp_path, exported, capsys):
    with pytest.raises(BackendError, match=r"TensorRT is not installed.*pip install 'tensorrt>=10'"):
        require_tensorrt()
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        TensorRTBackend(tmp_path)
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        create_backend("tensorrt", engine_dir=tmp_path)
    assert cli.main(["build-engines", "--onnx-dir", str(exported[1]), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "engines.json").exists()


@no_trt
def test_auto_skips_engines_it_cannot_load(exported, tmp_path, caplog):
    checkpoint, folder = exported
    folder = copy_export(folder, tmp_path)
    (folder / "engines.json").write_text(json.dumps(metadata(file_sha256(checkpoint))))
    with caplog.at_level(logging.WARNING, logger="cellsam_trt.runtime"):
        backend = create_backend("auto", checkpoint=checkpoint, onnx_dir=folder, device="cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert "TensorRT is not installed" in caplog.text


def test_compare_arrays_numbers():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    test = np.array([[1.5, -4.0], [2.0, -0.25]])
    stats = compare_arrays(ref, torch.tensor(test))
    assert stats == {"max_abs": 0.5, "max_rel": 0.125, "mean_abs": 0.1875}
    assert compare_arrays(ref, ref)["max_abs"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        compare_arrays(ref, test[:1])


def test_mask_agreement_numbers():
    ref = np.full((2, 1, 4, 4), -5.0)
    ref[0, 0, :2, :2] = 5.0        # mask 0: 4 pixels
    test = ref.copy()
    test[0, 0, 0, 2] = 5.0         # one extra pixel: IoU 4/5
    test[1, 0, 3, 3] = 5.0         # mask 1 empty in ref, one pixel in test: IoU 0
    stats = mask_agreement(ref, test)
    assert stats == {"mean_iou": pytest.approx(0.4), "min_iou": 0.0}
    assert mask_agreement(ref, ref) == {"mean_iou": 1.0, "min_iou": 1.0}
    # threshold is on probabilities: logit 0 is p=0.5 > 0.4, foreground
    assert mask_agreement(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), -1.0))["mean_iou"] == 0.0


def test_verify_report_onnxruntime_against_torch(exported, steered_tiny):
    """The --verify comparison, run on two backends that exist here."""
    rows = verify_backend(TorchBackend(steered_tiny, device="cpu"), OnnxRuntimeBackend(exported[1], device="cpu"),
                          num_boxes=16)
    by = {(r["graph"], r["output"]): r for r in rows}
    assert set(by) == {("encoder", "embedding"), ("cellfinder", "logits"), ("cellfinder", "boxes"),
                       ("decoder", "mask_logits"), ("decoder", "iou")}
    for key, row in by.items():
        print(key, {k: f"{v:.3g}" for k, v in row.items() if isinstance(v, float)})
        assert row["max_rel"] < 1e-4
    assert by[("decoder", "mask_logits")]["min_iou"] > 0.99


# ---- on a machine with TensorRT and a GPU ------------------------------------------

@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    from cellsam_trt.engines import build_engines

    folder = tmp_path_factory.mktemp("engines")
    build_engines(exported[1], folder, max_batch=2, max_boxes=64, opt_boxes=16)
    return folder


@needs_trt
def test_engines_match_onnxruntime(exported, engines):
    backend = TensorRTBackend(engines, checkpoint=exported[0])
    assert backend.max_decoder_boxes == 64 and backend.max_batch == 2
    rows = verify_backend(OnnxRuntimeBackend(exported[1], device="cpu"), backend, num_boxes=64, batch=3)
    for row in rows:
        print(row)
        assert row["max_rel"] < 0.05, row
    assert [r for r in rows if r["graph"] == "decoder"][0]["mean_iou"] > 0.97


@needs_trt
def test_pipeline_with_engines_is_close_to_torch(exported, engines, steered_tiny, cell_image):
    want = CellSAM.from_network(steered_tiny, device="cuda").segment(cell_image)
    got = CellSAM.from_checkpoint(exported[0], backend="tensorrt", engine_dir=engines).segment(cell_image)
    assert want.max() >= 5
    overlap = np.logical_and(got > 0, want > 0).sum() / max(1, np.logical_or(got > 0, want > 0).sum())
    assert overlap > 0.95


@needs_trt
def test_engines_refused_after_tampering(exported, engines, tmp_path):
    import shutil

    folder = tmp_path / "e"
    shutil.copytree(engines, folder)
    meta = json.loads((folder / "engines.json").read_text())
    bad = copy.deepcopy(meta)
    bad["tensorrt_version"] = "9.0.0"
    (folder / "engines.json").write_text(json.dumps(bad))
    with pytest.raises(BackendError, match="TensorRT 9.0.0 but this TensorRT is"):
        TensorRTBackend(folder)
    (folder / "engines.json").write_text(json.dumps(meta))
    other = write_checkpoint(random_network(ModelConfig.tiny(), seed=1), tmp_path / "other.pt")
    with pytest.raises(BackendError, match="another checkpoint"):
        TensorRTBackend(folder, checkpoint=other)
    (folder / "decoder.engine").write_bytes(b"garbage")
    with pytest.raises(BackendError, match="changed since it was built"):
        TensorRTBackend(folder)
    with pytest.raises(BackendError, match="cannot deserialize"):
        TensorRTBackend(folder, verify_hashes=False)
