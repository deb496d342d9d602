"""Mixed-precision graphs: the export writes them (hashes, float32 I/O, FP32 islands) and
ONNX Runtime runs them through the normal pipeline with precision="fp16"."""
import json

import numpy as np
import onnx
import pytest
from export_shared import copy_export
from onnx import TensorProto, helper

from cellsam_trt import CellSAM
from cellsam_trt.cli import main as cli
from cellsam_trt.dev.accuracy import label_agreement
from cellsam_trt.graphs.mixed_precision import FP32_ISLAND_OPS, ConversionError, describe_precision, sort_nodes
from cellsam_trt.graphs.tensorrt_engines import verify_backend
from cellsam_trt.modeling.checkpoint import file_sha256
from cellsam_trt.runtime import BackendError, OnnxRuntimeBackend
from cellsam_trt.runtime.artifacts import GRAPH_SPECS, load_manifest

pytest.importorskip("onnxruntime")


def elem_types(values):
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize("graph", ["encoder", "cellfinder", "decoder"])
def test_export_writes_fp16_graph_with_hash_and_float32_io(exported, manifest, graph):
    folder = exported[1]
    entry = manifest["graphs"][graph]["fp16"]
    assert manifest["precisions"] == ["fp32", "fp16"]
    assert entry["file"] == GRAPH_SPECS[graph].fp16_onnx_file
    assert entry["sha256"] == file_sha256(folder / entry["file"])
    assert entry["fp32_ops"] == list(FP32_ISLAND_OPS)
    model = onnx.load(str(folder / entry["file"]))
    onnx.checker.check_model(model)  # includes: nodes in topological order
    spec = GRAPH_SPECS[graph]
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == list(spec.inputs)
    assert [o.name for o in model.graph.output] == list(spec.outputs)
    assert set(elem_types(inputs).values()) == {TensorProto.FLOAT}
    assert set(elem_types(model.graph.output).values()) == {TensorProto.FLOAT}
    # the weights are float16 ...
    weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert sum(t.data_type == TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)
    assert entry["fp32_initializer_bytes"] <= 0.1 * entry["fp16_initializer_bytes"]
    # ... matrix multiplies compute in float16, the islands in float32
    counts = describe_precision(model)
    assert counts == {k: entry[k] for k in counts}
    assert "MatMul" not in counts["fp32_nodes"]
    assert counts["fp32_nodes"].get("LayerNormalization", 0) > 0 and counts["fp32_nodes"].get("Softmax", 0) > 0
    inferred = onnx.shape_inference.infer_shapes(model)
    types = elem_types(list(inferred.graph.value_info) + list(inferred.graph.output))
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.output[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "MatMul":
            assert types[node.output[0]] == TensorProto.FLOAT16, node.name


def test_load_manifest_checks_the_fp16_files(exported, tmp_path):
    folder = copy_export(exported[1], tmp_path)
    assert load_manifest(folder, precision="fp16").graph_path("decoder", "fp16") == folder / "decoder.fp16.onnx"
    (folder / "decoder.fp16.onnx").write_bytes(b"other bytes")
    with pytest.raises(BackendError, match=r"decoder.fp16.onnx changed since it was exported.*cellsam-trt export"):
        load_manifest(folder, precision="fp16")
    load_manifest(folder)  # the FP32 graphs are intact and still load
    with pytest.raises(ValueError, match="precision: expected one of"):
        load_manifest(folder, precision="int8")


def test_onnxruntime_runs_fp16_graphs_close_to_fp32(exported):
    fp32 = OnnxRuntimeBackend(exported[1])
    fp16 = OnnxRuntimeBackend(exported[1], precision="fp16")
    assert fp16.describe()["precision"] == "fp16"
    rows = {(r["graph"], r["output"]): r for r in verify_backend(fp32, fp16, num_boxes=32)}
    for key, row in rows.items():
        print(key, {k: f"{v:.3g}" for k, v in row.items() if isinstance(v, float)})
        assert 0 < row["max_abs"], key  # really another computation
        assert row["max_rel"] < 0.02, key
    assert rows[("decoder", "mask_logits")]["mean_iou"] > 0.99


def test_segment_with_fp16_graphs(exported, cell_image):
    """The whole pipeline on the fp16 graphs; user boxes around the image's own cells."""
    from skimage.measure import label, regionprops

    session = CellSAM.from_checkpoint(exported[0], backend="onnxruntime", onnx_dir=exported[1], precision="fp16")
    assert session.backend.describe()["precision"] == "fp16"
    assert session.segment(cell_image).max() >= 5  # CellFinder path
    cells = regionprops(label(cell_image[..., 1] > 1000))
    boxes = np.array([[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]] for r in cells], np.float32)
    want = CellSAM.from_checkpoint(exported[0], backend="onnxruntime", onnx_dir=exported[1]).segment(cell_image, boxes=boxes)
    got = session.segment(cell_image, boxes=boxes)
    stats = label_agreement(want, got)
    print(len(boxes), stats)
    assert stats["reference_cells"] >= 5
    assert stats["f1"] >= 0.9 and stats["iou_mean"] >= 0.9


def test_fp16_refused_for_an_export_without_it(exported, tmp_path, capsys):
    out = copy_export(exported[1], tmp_path)  # holds an earlier export's decoder.fp16.onnx
    assert cli.main(["export", "--checkpoint", str(exported[0]), "--out", str(out), "--graphs", "decoder",
                     "--no-fp16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32"] and "fp16" not in manifest["graphs"]["decoder"]
    assert not (out / "decoder.fp16.onnx").exists()  # stale: removed, not left beside the new graph
    with pytest.raises(BackendError, match=r"no FP16 decoder graph \(exported with --no-fp16.*cellsam-trt export"):
        load_manifest(out, graphs=("decoder",), precision="fp16")


def test_backend_precision_argument_is_checked(exported):
    with pytest.raises(ValueError, match="precision: expected one of"):
        OnnxRuntimeBackend(exported[1], precision="half")


def _chain(order):
    """x -> a -> b -> c -> y as nodes listed in ``order``."""
    nodes = {
        "a": helper.make_node("Relu", ["x"], ["a"], name="a"),
        "b": helper.make_node("Neg", ["a"], ["b"], name="b"),
        "c": helper.make_node("Add", ["b", "w"], ["y"], name="c"),
    }
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    return helper.make_graph([nodes[n] for n in order], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])


def test_sort_nodes_puts_producers_first():
    graph = _chain("cab")
    sort_nodes(graph)
    assert [n.name for n in graph.node] == ["a", "b", "c"]
    graph = _chain("abc")
    graph.node[0].input[0] = "y"  # a reads c's output: a cycle
    with pytest.raises(ConversionError, match="cycle"):
        sort_nodes(graph)
    graph = _chain("abc")
    graph.node[1].input[0] = "nowhere"
    with pytest.raises(ConversionError, match="'nowhere', which nothing produces"):
        sort_nodes(graph)

