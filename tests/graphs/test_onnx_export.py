"""ONNX export: the graphs keep the I/O contract and compute what the torch modules compute."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from cellsam_trt.cli import main as cli
from cellsam_trt.dev.synthetic import cell_boxes
from cellsam_trt.graphs.onnx_export import (
    ExportError,
    export_graph,
    export_network,
    graph_modules,
)
from cellsam_trt.modeling import BoxDecoder
from cellsam_trt.modeling.checkpoint import file_sha256
from cellsam_trt.modeling.config import ModelConfig
from cellsam_trt.modeling.network import DecoderGraph, MaskHeadGraph
from cellsam_trt.modeling.sam import build_sam
from cellsam_trt.runtime.artifacts import GRAPH_SPECS, io_shapes

ort = pytest.importorskip("onnxruntime")

TIGHT = dict(rtol=1e-4, atol=1e-4)  # fp32, same operations in another runtime


@pytest.fixture(scope="module")
def modules(steered_tiny):
    return graph_modules(steered_tiny)


def session(folder, graph):
    return ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])


def images(batch, seed):
    return torch.randn((batch, 3, 1024, 1024), generator=torch.Generator().manual_seed(seed))


def test_manifest_records_checkpoint_config_and_files(exported, manifest):
    checkpoint, folder = exported
    assert manifest["checkpoint"]["sha256"] == file_sha256(checkpoint)
    assert ModelConfig.from_dict(manifest["model_config"]) == ModelConfig.tiny()
    assert manifest["uses_model_cp"] is True
    assert manifest["opset"] == 17
    assert manifest["tools"]["torch"] == torch.__version__
    assert manifest["tools"]["onnx"] == onnx.__version__
    assert manifest["tools"]["onnxruntime"] == ort.__version__
    assert set(manifest["graphs"]) == {"encoder", "cellfinder", "decoder", "mask_head"}
    for name, entry in manifest["graphs"].items():
        assert entry["file"] == f"{name}.onnx"
        assert entry["sha256"] == file_sha256(folder / entry["file"])
        assert entry["external_data"] is None  # tiny graphs are far below 2 GB
        expected = io_shapes(ModelConfig.tiny(), name)
        recorded = {t["name"]: tuple(t["shape"]) for t in entry["inputs"] + entry["outputs"]}
        assert recorded == expected
        assert [t["name"] for t in entry["inputs"]] == list(GRAPH_SPECS[name].inputs)
        assert all(t["dtype"] == "float32" for t in entry["inputs"] + entry["outputs"])


@pytest.mark.parametrize("graph", ["encoder", "cellfinder", "decoder", "mask_head"])
def test_graph_inputs_are_real_and_named(exported, manifest, graph):
    """The export trap (docs/ARCHITECTURE.md): a traced graph can bake its image in as a constant and keep no input."""
    model = onnx.load(str(exported[1] / f"{graph}.onnx"))
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    assert inputs == list(GRAPH_SPECS[graph].inputs)
    consumers = {name for node in model.graph.node for name in node.input}
    assert set(inputs) <= consumers
    assert [o.name for o in model.graph.output] == list(GRAPH_SPECS[graph].outputs)
    ops = {node.op_type for node in model.graph.node}
    if graph == "encoder":
        assert "LayerNormalization" in ops  # one op at opset 17, which TensorRT maps to its normalization layer
    sess = session(exported[1], graph)
    dims = {i.name: i.shape for i in sess.get_inputs()}
    symbolic = {n: [d for d in s if isinstance(d, str)] for n, s in dims.items()}
    assert symbolic == {"encoder": {"image": ["batch"]}, "cellfinder": {"image": ["batch"]},
                        "decoder": {"embedding": [], "boxes": ["num_boxes"]},
                        "mask_head": {"image_tokens": ["num_boxes"], "hyper": ["num_boxes"]}}[graph]


# The trace sample had B = 2 and N = 3: other sizes show that the dims really are dynamic.
@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_matches_torch(exported, modules, batch):
    x = images(batch, seed=batch)
    (got,) = session(exported[1], "encoder").run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = modules["encoder"](x).numpy()
    assert got.shape == (batch, 32, 64, 64)
    print(f"encoder B={batch}: max abs diff {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, **TIGHT)


@pytest.mark.parametrize("batch", [1, 3])
def test_cellfinder_matches_torch(exported, modules, batch):
    x = images(batch, seed=10 + batch)
    logits, boxes = session(exported[1], "cellfinder").run(None, {"image": x.numpy()})
    with torch.no_grad():
        want_logits, want_boxes = (t.numpy() for t in modules["cellfinder"](x))
    assert logits.shape == (batch, 200, 2) and boxes.shape == (batch, 200, 4)
    print(f"cellfinder B={batch}: max abs diff logits {np.abs(logits - want_logits).max():.3g}, "
          f"boxes {np.abs(boxes - want_boxes).max():.3g}")
    np.testing.assert_allclose(logits, want_logits, **TIGHT)
    np.testing.assert_allclose(boxes, want_boxes, **TIGHT)
    # the images differ, so a graph that ignored its input would fail here
    if batch > 1:
        assert not np.allclose(logits[0], logits[1])


@pytest.mark.parametrize("num_boxes", [1, 7, 300])
def test_decoder_matches_torch(exported, modules, num_boxes):
    g = torch.Generator().manual_seed(num_boxes)
    embedding = torch.randn((1, 32, 64, 64), generator=g)
    boxes = torch.from_numpy(cell_boxes(num_boxes, 1024, 1024, seed=num_boxes))
    iou, tokens, hyper = session(exported[1], "decoder").run(None, {"embedding": embedding.numpy(),
                                                                   "boxes": boxes.numpy()})
    # the mask head on a subset of the rows, as the pipeline runs it (the boxes that pass)
    rows = np.arange(0, num_boxes, 2)
    (masks,) = session(exported[1], "mask_head").run(None, {"image_tokens": tokens[rows], "hyper": hyper[rows]})
    with torch.no_grad():
        want_masks, want_iou = (t.numpy() for t in modules["decoder"].box_decoder(embedding, boxes))
    want_masks = want_masks[rows]
    assert masks.shape == (len(rows), 1, 256, 256) and iou.shape == (num_boxes, 1)
    print(f"decoder N={num_boxes}: max abs diff masks {np.abs(masks - want_masks).max():.3g}, "
          f"iou {np.abs(iou - want_iou).max():.3g}")
    np.testing.assert_allclose(masks, want_masks, **TIGHT)
    np.testing.assert_allclose(iou, want_iou, **TIGHT)


@pytest.mark.slow
def test_full_size_decoder_graph_matches_torch(tmp_path):
    """The released decoder size (256 channels, 2048-wide MLP) exported alone; it is small."""
    config = ModelConfig.cellsam()
    torch.manual_seed(0)
    sam = build_sam(config.sam)
    decoder = BoxDecoder(sam.prompt_encoder, sam.mask_decoder).eval()
    entry = export_graph(DecoderGraph(decoder), "decoder", config, tmp_path / "decoder.onnx")
    assert [t["shape"] for t in entry["outputs"]] == [["num_boxes", 1], ["num_boxes", 4096, 256], ["num_boxes", 32]]
    entry = export_graph(MaskHeadGraph(decoder), "mask_head", config, tmp_path / "mask_head.onnx")
    assert [t["shape"] for t in entry["outputs"]] == [["num_boxes", 1, 256, 256]]
    sess, head = session(tmp_path, "decoder"), session(tmp_path, "mask_head")
    g = torch.Generator().manual_seed(1)
    embedding = torch.randn((1, 256, 64, 64), generator=g)
    for n in (1, 5):
        boxes = torch.from_numpy(cell_boxes(n, 1024, 1024, seed=n))
        iou, tokens, hyper = sess.run(None, {"embedding": embedding.numpy(), "boxes": boxes.numpy()})
        (masks,) = head.run(None, {"image_tokens": tokens, "hyper": hyper})
        with torch.no_grad():
            want_masks, want_iou = (t.numpy() for t in decoder(embedding, boxes))
        print(f"full-size decoder N={n}: max abs diff masks {np.abs(masks - want_masks).max():.3g}, "
              f"iou {np.abs(iou - want_iou).max():.3g}")
        np.testing.assert_allclose(masks, want_masks, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(iou, want_iou, rtol=1e-4, atol=1e-5)


class _IgnoresImage(nn.Module):
    """Returns a fixed embedding whatever the image: the graph would have no live input."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(2, 32, 64, 64))

    def forward(self, image):
        return self.embedding * 1.0


def test_export_refuses_graph_that_drops_its_input(tmp_path):
    with pytest.raises(ExportError, match="input"):
        export_graph(_IgnoresImage(), "encoder", ModelConfig.tiny(), tmp_path / "encoder.onnx")
    assert not (tmp_path / "encoder.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging leftovers


def test_export_arguments_are_checked(tmp_path, steered_tiny):
    with pytest.raises(ValueError, match="graphs"):
        export_network(steered_tiny, tmp_path, graphs=("decoder", "box_head"))
    with pytest.raises(ValueError, match="opset"):
        export_graph(nn.Identity(), "encoder", ModelConfig.tiny(), tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="network"):
        export_network(object(), tmp_path)


def test_cli_export_writes_manifest(tmp_path, exported, capsys):
    checkpoint, _ = exported
    out = tmp_path / "cli"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--graphs", "decoder"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["decoder"]
    assert manifest["checkpoint"]["sha256"] == file_sha256(checkpoint)
    assert "decoder" in capsys.readouterr().out


def test_cli_export_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no file at" in err and "Traceback" not in err


def test_large_graph_keeps_weights_in_one_side_file(tmp_path, monkeypatch, modules):
    """Above the 2 GB protobuf limit the weights go to <graph>.onnx.data; simulated with a tiny limit."""
    import cellsam_trt.graphs.onnx_export as export_module

    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", 10_000)
    entry = export_graph(modules["decoder"], "decoder", ModelConfig.tiny(), tmp_path / "decoder.onnx")
    data = tmp_path / "decoder.onnx.data"
    assert entry["external_data"]["file"] == data.name
    assert entry["external_data"]["sha256"] == file_sha256(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert data.stat().st_size > 100_000  # the weights above 1 kB moved out of the graph file
    g = torch.Generator().manual_seed(0)
    embedding, boxes = torch.randn((1, 32, 64, 64), generator=g), torch.from_numpy(cell_boxes(4, 1024, 1024))
    outputs = session(tmp_path, "decoder").run(None, {"embedding": embedding.numpy(), "boxes": boxes.numpy()})
    with torch.no_grad():
        expected = modules["decoder"](embedding, boxes)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), **TIGHT)
