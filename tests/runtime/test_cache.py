"""The artifact cache: graphs exported once per checkpoint, shared by processes, checked
before use, rebuilt when damaged; backend="auto" falls back with a logged reason."""
import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import cellsam_trt
from cellsam_trt import CellSAM
from cellsam_trt.cli.main import main as cli_main
from cellsam_trt.dev.accuracy import label_agreement
from cellsam_trt.modeling.checkpoint import write_checkpoint
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.runtime import BackendError, OnnxRuntimeBackend, TorchBackend, create_backend
from cellsam_trt.runtime.cache import ENTRY_NAME, NO_BUILD_ENV, ArtifactCache, CacheError, cache_root

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, steered_tiny):
    return write_checkpoint(steered_tiny, tmp_path_factory.mktemp("cache_ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def filled(tmp_path_factory, checkpoint):
    """(cache root, entry folder) with the tiny checkpoint's graphs; treat as read-only."""
    root = tmp_path_factory.mktemp("cache_filled")
    return root, ArtifactCache(root, progress=False).onnx_dir(checkpoint)


def copy_cache(filled, tmp_path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(filled[0], root)
    return root


def no_export(*args, **kwargs):
    raise AssertionError("the cache exported although the entry was there")


@pytest.fixture
def copying_export(filled, monkeypatch):
    """Make the cache's export child a copy of the real export in ``filled`` (rebuilds in
    seconds; the real child runs in ``filled`` and the two-process test). Returns the calls."""
    calls = []

    def run(self, command, what):
        out = Path(command[command.index("--out") + 1])
        for f in filled[1].iterdir():
            if f.name != ENTRY_NAME:
                shutil.copy(f, out / f.name)
        calls.append(command)

    monkeypatch.setattr(ArtifactCache, "_run_child", run)
    return calls


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLSAM_TRT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("CELLSAM_TRT_CACHE")
    assert "cellsam-trt" in str(cache_root())


def test_entry_is_a_checked_export_with_its_inputs(filled, checkpoint):
    root, folder = filled
    assert folder.parent == root / "onnx"
    entry = json.loads((folder / ENTRY_NAME).read_text())
    assert entry["made_from"]["checkpoint_sha256"] == ArtifactCache(root).checkpoint_sha256(checkpoint)
    assert entry["made_from"]["opset"] == 17
    assert entry["build_seconds"] > 0
    backend = OnnxRuntimeBackend(folder, checkpoint=checkpoint, device="cpu")  # full manifest check
    assert backend.config == ModelConfig.tiny()
    # no staging folders left behind
    assert [p.name for p in (root / "onnx").iterdir()] == [folder.name]


def test_hit_does_not_export(filled, checkpoint, tmp_path, monkeypatch):
    root = copy_cache(filled, tmp_path)
    monkeypatch.setattr(ArtifactCache, "_run_child", no_export)
    assert ArtifactCache(root).onnx_dir(checkpoint) == root / "onnx" / filled[1].name


def test_two_processes_starting_cold_export_once(checkpoint, tmp_path):
    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from cellsam_trt.runtime.cache import ArtifactCache
        print(ArtifactCache({str(root)!r}, progress=False).onnx_dir({str(checkpoint)!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(cellsam_trt.__file__).parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    folders = {r[0].strip() for r in results}
    assert len(folders) == 1
    logs = "".join(r[1] for r in results)
    assert logs.count("running ") == 1, logs  # one export child in all
    assert logs.count("made by another process") == 1, logs
    assert len(list((root / "onnx").iterdir())) == 1


def test_corrupt_file_is_detected_and_rebuilt(filled, checkpoint, tmp_path, caplog, copying_export):
    root = copy_cache(filled, tmp_path)
    graph = root / "onnx" / filled[1].name / "decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cellsam_trt.runtime.cache"):
        folder = ArtifactCache(root, progress=False).onnx_dir(checkpoint)
    assert "not usable" in caplog.text and "changed since it was exported" in caplog.text
    assert len(copying_export) == 1
    OnnxRuntimeBackend(folder, checkpoint=checkpoint, device="cpu")  # hashes match again


def test_half_written_entry_and_killed_build_are_rebuilt(filled, checkpoint, tmp_path, caplog, copying_export):
    root = copy_cache(filled, tmp_path)
    folder = root / "onnx" / filled[1].name
    (folder / ENTRY_NAME).unlink()  # as if the process died before the entry was complete
    stale = folder.parent / f".{folder.name}.deadbeef.tmp"
    stale.mkdir()
    with caplog.at_level(logging.INFO, logger="cellsam_trt.runtime.cache"):
        again = ArtifactCache(root, progress=False).onnx_dir(checkpoint)
    assert again == folder and (folder / ENTRY_NAME).is_file()
    assert not stale.exists()
    assert "not usable" in caplog.text and len(copying_export) == 1


def test_another_checkpoint_never_uses_the_entry(filled, checkpoint, tmp_path, steered_tiny, cell_image):
    root = copy_cache(filled, tmp_path)
    changed = copy.deepcopy(steered_tiny)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)  # other weights, same layout
    other = write_checkpoint(changed, tmp_path / "other.pt")
    cache = ArtifactCache(root, progress=False)
    mine = root / "onnx" / filled[1].name
    # Put the first checkpoint's graphs where the second one's entry belongs: refused, re-exported.
    key_folder = root / "onnx" / "planted"
    shutil.copytree(mine, key_folder)
    material = cache.graph_material(cache_request(other))
    entry = json.loads((key_folder / ENTRY_NAME).read_text())
    entry["made_from"] = material
    (key_folder / ENTRY_NAME).write_text(json.dumps(entry))
    from cellsam_trt.runtime import cache as cache_module

    target = root / "onnx" / cache_module._key(material)
    key_folder.rename(target)
    folder = cache.onnx_dir(other)
    assert folder == target
    from cellsam_trt.runtime.artifacts import load_manifest

    assert load_manifest(folder, checkpoint=other).checkpoint_sha256 == cache.checkpoint_sha256(other)
    assert load_manifest(mine, checkpoint=checkpoint)  # the first entry is untouched


def cache_request(path):
    from cellsam_trt.runtime.cache import GraphRequest

    return GraphRequest(Path(path).resolve())


def test_checkpoint_hash_is_remembered_until_the_file_changes(checkpoint, tmp_path):
    path = tmp_path / "w.pt"
    shutil.copy(checkpoint, path)
    cache = ArtifactCache(tmp_path / "cache")
    first = cache.checkpoint_sha256(path)
    memo = json.loads((tmp_path / "cache" / "checkpoint-hashes.json").read_text())
    assert memo[str(path.resolve())]["sha256"] == first
    with open(path, "ab") as fh:
        fh.write(b"x")
    assert cache.checkpoint_sha256(path) != first


def test_building_off_is_a_clear_error(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(NO_BUILD_ENV, "1")
    with pytest.raises(CacheError, match="building is turned off.*cellsam-trt export"):
        ArtifactCache(tmp_path / "cache").onnx_dir(checkpoint)
    with pytest.raises(CacheError, match="building is turned off"):
        ArtifactCache(tmp_path / "cache", build=False).onnx_dir(checkpoint)


def test_failed_export_names_its_cause(checkpoint, tmp_path, monkeypatch):
    import cellsam_trt.runtime.cache as cache_module

    monkeypatch.setattr(cache_module.sys, "executable", shutil.which("false"))
    with pytest.raises(CacheError, match="exited with status 1"):
        ArtifactCache(tmp_path / "cache", progress=False).onnx_dir(checkpoint)
    assert not [p for p in (tmp_path / "cache" / "onnx").iterdir()]  # nothing half-made stays


def test_auto_falls_back_to_torch_with_a_logged_reason(checkpoint, tmp_path, monkeypatch, caplog):
    def fail(self, command, what):
        raise CacheError(f"the {what} failed: it was killed, most likely for lack of memory (simulated)")

    monkeypatch.setattr(ArtifactCache, "_run_child", fail)
    with caplog.at_level(logging.INFO, logger="cellsam_trt.runtime"):
        backend = create_backend("auto", checkpoint=checkpoint, device="cpu", cache=tmp_path / "cache")
    assert isinstance(backend, TorchBackend)
    assert "onnxruntime not used" in caplog.text and "simulated" in caplog.text
    assert "using torch" in caplog.text
    # an explicit backend raises instead, naming the cause
    with pytest.raises(BackendError, match="lack of memory"):
        create_backend("onnxruntime", checkpoint=checkpoint, device="cpu", cache=tmp_path / "cache")


@pytest.mark.parametrize("name, content, match", [
    ("notes.pt", b"not weights at all\n", "not with the zip archive"),
    ("empty.pt", b"", "empty"),
    ("half.pt", None, "truncated"),
])
def test_auto_with_a_bad_checkpoint_fails_before_starting_an_export(checkpoint, tmp_path, monkeypatch, name, content,
                                                                    match):
    """backend="auto" checks the weights in this process first: one CheckpointError, no export child."""
    from cellsam_trt.modeling.checkpoint import CheckpointError

    def child(self, command, what):
        pytest.fail(f"started {what} for a file that is no checkpoint")

    monkeypatch.setattr(ArtifactCache, "_run_child", child)
    data = Path(checkpoint).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2] if content is None else content)
    with pytest.raises(CheckpointError, match=match):
        create_backend("auto", checkpoint=tmp_path / name, device="cpu", cache=tmp_path / "cache")


def test_auto_on_the_cpu_takes_onnxruntime_from_the_cache(filled, checkpoint, tmp_path, monkeypatch):
    root = copy_cache(filled, tmp_path)
    monkeypatch.setattr(ArtifactCache, "_run_child", no_export)
    backend = create_backend("auto", checkpoint=checkpoint, device="cpu", cache=root)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.folder == root / "onnx" / filled[1].name


def test_default_segment_uses_the_cache_and_agrees_with_torch(filled, checkpoint, tmp_path, monkeypatch,
                                                              steered_tiny, cell_image):
    root = copy_cache(filled, tmp_path)
    monkeypatch.setenv("CELLSAM_TRT_CACHE", str(root))
    monkeypatch.setattr(ArtifactCache, "_run_child", no_export)
    torch_session = CellSAM.from_network(steered_tiny, device="cpu")
    boxes = np.array([[20, 30, 60, 70], [100, 40, 150, 90], [200, 150, 260, 200]], np.float32)
    try:
        for user_boxes in (None, boxes):
            got, details = cellsam_trt.segment(cell_image, checkpoint=checkpoint, device="cpu", boxes=user_boxes,
                                               return_details=True)
            want = torch_session.segment(cell_image, boxes=user_boxes)
            assert details.backend == "onnxruntime"
            agreement = label_agreement(want, got)
            assert agreement["foreground_agreement"] >= 0.999
            assert agreement["f1"] == 1.0
        # the session is kept: a second call loads nothing
        first = cellsam_trt.api._LAST_SESSION["session"]
        cellsam_trt.segment(cell_image, checkpoint=checkpoint, device="cpu", boxes=boxes)
        assert cellsam_trt.api._LAST_SESSION["session"] is first
    finally:
        cellsam_trt.unload()
    assert not cellsam_trt.api._LAST_SESSION


def test_module_level_segment_takes_onnx_dir(filled, checkpoint, cell_image):
    try:
        labels, details = cellsam_trt.segment(cell_image, checkpoint=checkpoint, backend="onnxruntime",
                                              onnx_dir=filled[1], device="cpu", return_details=True)
    finally:
        cellsam_trt.unload()
    assert details.backend == "onnxruntime" and labels.max() > 0


def test_cli_cache_list_and_clear(filled, tmp_path, capsys):
    root = copy_cache(filled, tmp_path)
    assert cli_main(["cache", "list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert filled[1].name in out and "opset 17" in out and "1 entries" in out
    assert cli_main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert "removed" in capsys.readouterr().out
    assert not list((root / "onnx").iterdir())
    assert cli_main(["cache", "list", "--cache-dir", str(root)]) == 0
    assert "(empty)" in capsys.readouterr().out


def test_cli_export_without_out_fills_the_cache(filled, checkpoint, tmp_path, monkeypatch, capsys):
    root = copy_cache(filled, tmp_path)
    monkeypatch.setattr(ArtifactCache, "_run_child", no_export)
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--cache-dir", str(root)]) == 0
    assert str(root / "onnx" / filled[1].name) in capsys.readouterr().out
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--opset", "18"]) == 1
    assert "only with --out" in capsys.readouterr().err


def test_cli_build_engines_without_out_targets_the_cache(checkpoint, tmp_path, capsys):
    args = ["build-engines", "--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "cache")]
    if importlib.util.find_spec("tensorrt") is None:
        assert cli_main(args) == 1
        assert "TensorRT is not installed" in capsys.readouterr().err
    assert cli_main(["build-engines", "--out", str(tmp_path / "e")]) == 1
    assert "--onnx-dir: needed with --out" in capsys.readouterr().err


def test_engine_keys_name_gpu_tensorrt_precision_and_profiles(checkpoint, tmp_path):
    from cellsam_trt.runtime.cache import EngineRequest, GraphRequest, _key

    cache = ArtifactCache(tmp_path / "cache")
    graphs = cache.graph_material(GraphRequest(Path(checkpoint).resolve()))
    base = EngineRequest(gpu={"name": "NVIDIA H100", "compute_capability": "9.0"}, tensorrt_version="11.4.0")
    variants = [base,
                EngineRequest(gpu={"name": "NVIDIA H200", "compute_capability": "9.0"}, tensorrt_version="11.4.0"),
                EngineRequest(gpu=base.gpu, tensorrt_version="10.13.0"),
                EngineRequest(gpu=base.gpu, tensorrt_version="11.4.0", precision="fp32"),
                EngineRequest(gpu=base.gpu, tensorrt_version="11.4.0", max_boxes=512)]
    keys = {_key(cache.engine_material(graphs, v)) for v in variants}
    assert len(keys) == len(variants)
    assert cache.engine_material(graphs, base)["checkpoint_sha256"] == graphs["checkpoint_sha256"]
