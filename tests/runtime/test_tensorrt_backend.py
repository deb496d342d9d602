"""TensorRT: engine metadata checks and the --verify arithmetic run everywhere; building and
running engines needs tensorrt and a CUDA GPU and is skipped (with the reason) elsewhere."""
import copy
import importlib.util
import json
import logging

import numpy as np
import pytest
import torch
from export_shared import copy_export

from cellsam_trt import CellSAM
from cellsam_trt.cli import main as cli
from cellsam_trt.graphs.tensorrt_engines import compare_arrays, mask_agreement, verify_backend
from cellsam_trt.modeling.checkpoint import file_sha256, random_network, write_checkpoint
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime import BackendError, OnnxRuntimeBackend, TorchBackend, create_backend
from cellsam_trt.runtime.artifacts import GRAPH_NAMES
from cellsam_trt.runtime.tensorrt_backend import (
    TensorRTBackend,
    check_engine_metadata,
    engine_files,
    load_engine_metadata,
    require_tensorrt,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.tensorrt
no_trt = pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed; the missing-TensorRT message cannot be shown")


def metadata(checkpoint_sha="a" * 64):
    """engines.json as build_engines writes it (fields the checks read)."""
    return {
        "format": "cellsam-trt-engines", "version": 1,
        "tensorrt_version": "10.3.0.26",
        "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
        "checkpoint": {"path": "/w/cellsam_general.pt", "sha256": checkpoint_sha},
        "onnx_dir": "/w/onnx",
        "model_config": ModelConfig.tiny().to_dict(), "uses_model_cp": True,
        "engines": {g: {"file": f"{g}.engine", "sha256": "0" * 64} for g in GRAPH_NAMES},
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
    for graph in GRAPH_NAMES:
        (tmp_path / f"{graph}.engine").write_bytes(graph.encode())
        meta["engines"][graph]["sha256"] = file_sha256(tmp_path / f"{graph}.engine")
    assert engine_files(meta, tmp_path) == {g: tmp_path / f"{g}.engine" for g in GRAPH_NAMES}
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
    with pytest.raises(BackendError, match=r"TensorRT is not installed.*pip install 'tensorrt>=10,<12'"):
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
    with caplog.at_level(logging.INFO, logger="cellsam_trt.runtime"):
        backend = create_backend("auto", checkpoint=checkpoint, onnx_dir=folder, device="cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    # the log says why the engines were passed over
    assert "using onnxruntime" in caplog.text and "tensorrt: needs a CUDA GPU" in caplog.text


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
    from cellsam_trt.graphs.tensorrt_engines import build_engines

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
def test_fp16_engines_match_the_fp16_graphs_in_onnxruntime(exported, engines):
    """What the CPU measured for the mixed-precision graphs is what the engines compute."""
    backend = TensorRTBackend(engines, checkpoint=exported[0])
    assert backend.metadata["precision"]["mode"] == "fp16"
    rows = verify_backend(OnnxRuntimeBackend(exported[1], device="cpu", precision="fp16"), backend, num_boxes=64)
    for row in rows:
        print(row)
        assert row["max_rel"] < 0.02, row
    assert [r for r in rows if r["graph"] == "decoder"][0]["mean_iou"] > 0.98


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


# ---- TensorRT 11: strongly typed networks only, no removed API -----------------------

# Python APIs that TensorRT 11 removed (NVIDIA, "Migrating from TensorRT 10.x to 11.x",
# "Removed Python APIs and Replacements"), plus the binding-index API that 10 already
# removed. The TensorRT 11.4 Python bindings register none of these names (read from the
# tensorrt-cu13-bindings wheel), while they do register STRONGLY_TYPED, execute_async_v3,
# set_tensor_address, set_input_shape, get_tensor_profile_shape and device_memory_size_v2.
REMOVED_IN_TENSORRT_11 = (
    r"BuilderFlag\.(FP16|BF16|INT8|INT4|FP8|FP4|OBEY_PRECISION_CONSTRAINTS|PREFER_PRECISION_CONSTRAINTS|DIRECT_IO)\b",
    r"\bplatform_has_fast_(fp16|int8)\b", r"\bplatform_has_tf32\b",
    r"\.precision\s*=", r"\bset_output_type\b", r"\breset_precision\b", r"\breset_output_type\b",
    r"\bprecision_is_set\b", r"\boutput_type_is_set\b",
    r"\bint8_calibrator\b", r"\b(set|get)_calibration_profile\b", r"\b(set|get|clear)_quantization_flag\b",
    r"\bquantization_flags\b", r"\bIInt8\w*Calibrator\b", r"\balgorithm_selector\b", r"\bIAlgorithm\w*\b",
    r"\bdevice_memory_size\b(?!_)", r"\bget_device_memory_size_for_profile\b(?!_)",
    r"\bexecute_async_v2\b", r"\bexecute_async\b(?!_)", r"\bget_binding_\w+\b", r"\bnum_bindings\b",
    r"\bbinding_is_input\b", r"\bEXPLICIT_BATCH\b", r"\bmax_workspace_size\b", r"\.build_engine\(",
)


def removed_api_uses(text: str) -> list[str]:
    """Lines of ``text`` that use a removed TensorRT API (comments and docstrings included:
    naming a removed call in a comment is how such calls come back)."""
    import re

    pattern = re.compile("|".join(f"(?:{p})" for p in REMOVED_IN_TENSORRT_11))
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.search(line) and "no-removed-api-check" not in line:
            hits.append(f"{number}: {line.strip()}")
    return hits


def tensorrt_sources() -> list:
    """The project's Python files that use TensorRT: the engine builder, the backend, the
    build-engines command, anything importing tensorrt."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    package = root / "cellsam_trt"
    files = {package / "graphs" / "tensorrt_engines.py", package / "runtime" / "tensorrt_backend.py",
             package / "cli" / "build_engines.py"}
    imports = re.compile(r"^\s*(import tensorrt|from tensorrt\b)", re.M)
    for folder in ("cellsam_trt", "bench", "export"):
        for path in (root / folder).rglob("*.py"):
            if imports.search(path.read_text()):
                files.add(path)
    return sorted(files)


def test_the_removed_api_scan_finds_removed_calls():
    old_build = """
    config.set_flag(trt.BuilderFlag.FP16)
    if builder.platform_has_fast_fp16: pass
    layer.precision = trt.float32
    layer.set_output_type(0, trt.float32)
    size = engine.device_memory_size
    """
    assert len(removed_api_uses(old_build)) == 5
    assert removed_api_uses("engine.device_memory_size_v2; context.execute_async_v3(s); set_tensor_address(n, p)") == []


def test_tensorrt_code_uses_no_api_removed_in_tensorrt_11():
    sources = tensorrt_sources()
    assert any(p.name == "tensorrt_engines.py" for p in sources) and any(p.name == "tensorrt_backend.py" for p in sources)
    found = {str(p): removed_api_uses(p.read_text()) for p in sources}
    assert {k: v for k, v in found.items() if v} == {}


class FakeTensorRT:
    """Just the TensorRT 11 API that a strongly typed build uses; removed names are absent.

    The parser reads the real ONNX file and makes one layer per node, typed by ONNX shape
    inference, as TensorRT's parser types a strongly typed network.
    """

    __version__ = "11.4.0.106"

    def __init__(self):
        import enum
        import types

        self.float32, self.float16 = "float32", "float16"
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                         {"STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 2})
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {"DEBUG": 0, "TF32": 4, "STRIP_PLAN": 20})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.calls: list = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, severity=2):
                pass

        class Layer:
            __slots__ = ("_types",)  # no precision / set_output_type: assigning them fails

            def __init__(self, dtypes):
                self._types = dtypes

            @property
            def num_outputs(self):
                return len(self._types)

            def get_output(self, j):
                return types.SimpleNamespace(dtype=self._types[j])

        class Network:
            def __init__(self, flags):
                self.flags, self.layers = flags, []

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, i):
                return self.layers[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                model = onnx.shape_inference.infer_shapes(onnx.load(path))
                names = {onnx.TensorProto.FLOAT: fake.float32, onnx.TensorProto.FLOAT16: fake.float16}
                kinds = {v.name: names.get(v.type.tensor_type.elem_type, "other")
                         for v in list(model.graph.value_info) + list(model.graph.output)}
                self.network.layers = [Layer([kinds.get(o, "other") for o in n.output]) for n in model.graph.node]
                return True

        class Config:
            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))

            def create_timing_cache(self, data):
                return types.SimpleNamespace(serialize=lambda: b"timing")

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return f"engine of {network.num_layers} layers".encode()

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


import onnx  # noqa: E402  (the fake parser reads graphs with it)


@pytest.fixture
def fake_trt(monkeypatch):
    """build_engines with FakeTensorRT on a pretend GPU (no CUDA calls)."""
    import contextlib

    import cellsam_trt.graphs.tensorrt_engines as engines_module

    trt = FakeTensorRT()
    monkeypatch.setattr(engines_module, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(engines_module, "current_gpu", lambda device=None: {"name": "Fake GPU", "compute_capability": "9.0"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return trt


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engines_are_strongly_typed_networks_of_the_chosen_graphs(fake_trt, exported, tmp_path, precision):
    from cellsam_trt.graphs.tensorrt_engines import build_engines

    meta = build_engines(exported[1], tmp_path, max_batch=2, max_boxes=64, opt_boxes=16, precision=precision)
    strongly_typed = 1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert [c[1] for c in fake_trt.calls if c[0] == "create_network"] == [strongly_typed] * len(GRAPH_NAMES)
    assert [c for c in fake_trt.calls if c[0] == "set_flag"] == []  # precision comes from the graphs alone
    suffix = ".fp16.onnx" if precision == "fp16" else ".onnx"
    parsed = [c[1] for c in fake_trt.calls if c[0] == "parse"]
    assert parsed == [str(exported[1] / f"{g}{suffix}") for g in GRAPH_NAMES]
    manifest = json.loads((exported[1] / "manifest.json").read_text())
    assert meta["precision"]["mode"] == precision and meta["precision"]["strongly_typed"] is True
    assert json.loads((tmp_path / "engines.json").read_text()) == meta
    for graph, entry in meta["engines"].items():
        source = manifest["graphs"][graph] if precision == "fp32" else manifest["graphs"][graph]["fp16"]
        assert entry["onnx_file"] == source["file"] and entry["onnx_sha256"] == source["sha256"]
        assert (tmp_path / entry["file"]).read_bytes().startswith(b"engine of ")
        layers = entry["layer_precisions"]
        if precision == "fp16":
            assert layers["float16"] > layers["float32"] > 0  # FP16 with FP32 islands
        else:
            assert layers["float16"] == 0 and layers["float32"] > 0
    assert meta["engines"]["decoder"]["profile"]["boxes"] == {"min": [1, 4], "opt": [16, 4], "max": [64, 4]}
    assert meta["engines"]["mask_head"]["profile"]["hyper"] == {"min": [1, 4], "opt": [16, 4], "max": [64, 4]}
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"


def test_fp16_engines_need_the_fp16_graphs(fake_trt, exported, tmp_path):
    from cellsam_trt.graphs.onnx_export import export_checkpoint
    from cellsam_trt.graphs.tensorrt_engines import build_engines, strongly_typed_flags

    out = tmp_path / "fp32-only"
    export_checkpoint(exported[0], out, graphs=("decoder",), fp16=False)
    with pytest.raises(BackendError, match="no FP16 decoder graph .*cellsam-trt export"):
        build_engines(out, tmp_path / "e", graphs=("decoder",))
    build_engines(out, tmp_path / "e", graphs=("decoder",), precision="fp32")
    with pytest.raises(ValueError, match="precision: expected one of"):
        build_engines(out, tmp_path / "e", graphs=("decoder",), precision="int8")
    del fake_trt.NetworkDefinitionCreationFlag
    with pytest.raises(BackendError, match="no strongly typed networks"):
        strongly_typed_flags(fake_trt)
