"""Export CellSAM's three graphs to ONNX (``cellsam-trt export``).

checkpoint -> out/encoder.onnx, out/cellfinder.onnx, out/decoder.onnx, out/manifest.json
              (+ out/<graph>.fp16.onnx: mixed precision, float32 I/O; ``--no-fp16`` skips them)

The graphs are exactly the modules the torch backend runs (``sam.image_encoder``,
``cellfinder.decode_head``, ``BoxDecoder(sam.prompt_encoder, sam.mask_decoder)``), traced in
eval mode by the TorchScript-based exporter (``dynamo=False``) at opset 17, where
LayerNorm is one ``LayerNormalization`` node. The I/O contract is in
``cellsam_trt.runtime.artifacts``. Each graph is checked before it is published:
``onnx.checker``, strict shape inference, exactly the contract's named inputs, each of
them consumed by the graph (a traced graph can silently bake its input in as a constant),
and the contract's output names. Files are written atomically and the manifest last, so a
folder with a manifest is complete.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..dev.synthetic import cell_boxes
from ..io import atomic_write, write_public
from ..modeling import CellSAMNetwork
from ..modeling.config import ModelConfig
from ..progress import progress_bar
from ..runtime.artifacts import (
    BOX_GRAPHS,
    EXPORTER,
    GRAPH_NAMES,
    GRAPH_REVISION,
    GRAPH_SPECS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    OPSET,
    file_sha256,
    format_shape,
    io_shapes,
    resolve_shape,
)
from .mixed_precision import ConversionError, convert_graph

log = logging.getLogger(__name__)

# ONNX's protobuf limit: larger graphs keep their weights in a side file.
PROTOBUF_LIMIT = 2 ** 31 - 1


class ExportError(RuntimeError):
    """A graph could not be exported or failed its checks."""


def graph_modules(network: CellSAMNetwork) -> dict[str, nn.Module]:
    """The modules to export (``CellSAMNetwork.graphs``, as the torch backend runs them), in eval mode."""
    network.eval()
    return {name: module.eval() for name, module in network.graphs().items()}


def sample_inputs(config: ModelConfig, graph: str, *, batch: int = 2, num_boxes: int = 3, seed: int = 0) -> tuple[Tensor, ...]:
    """Random float32 inputs in the contract's shapes (images ~N(0,1), boxes valid xyxy).

    The exporter traces with ``batch`` / ``num_boxes`` > 1 so that no size-1 special case
    gets recorded; tests then run other sizes.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = io_shapes(config, graph)
    symbols = {"batch": batch, "num_boxes": num_boxes}
    out = []
    for name in GRAPH_SPECS[graph].inputs:
        shape = resolve_shape(shapes[name], symbols)
        if name == "boxes":
            out.append(torch.from_numpy(cell_boxes(shape[0], config.image_size, config.image_size, seed=seed)))
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)


def export_graph(
    module: nn.Module,
    graph: str,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    batch: int = 2,
    num_boxes: int = 3,
) -> dict[str, Any]:
    """Trace ``module`` to ``path`` (an .onnx file) with the contract's names and dynamic dims.

    Args:
        module: the torch module of ``graph`` (see ``graph_modules``).
        graph: one of ``GRAPH_NAMES`` (encoder, cellfinder, decoder, mask_head).
        config: architecture (gives the contract shapes).
        path: destination; written atomically (with ``<name>.data`` beside it above 2 GB).
        opset: ONNX opset (>= 17 keeps LayerNorm as one node).
        batch, num_boxes: sizes of the trace sample.

    Returns:
        The graph's manifest entry: file, sha256, size, external data, inputs and outputs
        (name, shape with symbolic dims, dtype), export seconds.

    Raises:
        ExportError: tracing failed or the graph failed its checks.
    """
    if graph not in GRAPH_SPECS:
        raise ValueError(f"graph: expected one of {GRAPH_NAMES}, got {graph!r}")
    if opset < 17:
        raise ValueError(f"opset: expected >= 17 (LayerNormalization as one op), got {opset}")
    spec = GRAPH_SPECS[graph]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = io_shapes(config, graph)
    dynamic_axes = {
        name: {axis: dim for axis, dim in enumerate(shape) if isinstance(dim, str)}
        for name, shape in shapes.items()
    }
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    sample = sample_inputs(config, graph, batch=batch, num_boxes=num_boxes)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}-export-"))
    try:
        traced = staging / path.name
        t0 = time.perf_counter()
        was_training = module.training
        module.eval()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    module, sample, str(traced), input_names=list(spec.inputs), output_names=list(spec.outputs),
                    dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
                )
            except Exception as err:  # the exporter raises many types; report one
                raise ExportError(f"{graph}: torch.onnx.export failed: {type(err).__name__}: {err}") from err
            finally:
                module.train(was_training)
        seconds = time.perf_counter() - t0
        tracer = sorted({str(w.message).split(".")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
        if tracer:
            # Expected for SAM's window padding (sizes are static at 1024); dynamic dims are
            # tested by running other B / N than the trace sample.
            log.debug("%s: tracer warnings: %s", graph, tracer)
        data_name = f"{path.name}.data"
        entry = finalize_graph(traced, graph, config, data_name)
        # Publish: weights side file first, then the graph that references it.
        published = []
        if entry["external_data"]:
            published.append((staging / data_name, path.parent / data_name))
        published.append((traced, path))
        for source, target in published:
            atomic_write(target, lambda tmp, source=source: os.replace(source, tmp))
        stale = path.parent / data_name
        if not entry["external_data"] and stale.exists():
            stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry["file"] = path.name
    entry["sha256"] = file_sha256(path)
    entry["size_bytes"] = path.stat().st_size
    if entry["external_data"]:
        data_path = path.parent / entry["external_data"]["file"]
        entry["external_data"].update(sha256=file_sha256(data_path), size_bytes=data_path.stat().st_size)
    entry["export_seconds"] = round(seconds, 3)
    entry["trace_sample"] = {"num_boxes": num_boxes} if graph in BOX_GRAPHS else {"batch": batch}
    return entry


def finalize_graph(path: Path, graph: str, config: ModelConfig, data_name: str) -> dict[str, Any]:
    """Check a freshly traced graph, declare the contract's output shapes, and re-save it.

    The exporter leaves some output dims as anonymous symbols (e.g. the query count
    after CellFinder's dynamic ``repeat``); they are set to the contract's values, then
    strict shape inference must accept the graph. Weights go to one side file
    ``data_name`` only when the graph exceeds the 2 GB protobuf limit.

    Returns:
        {"inputs": [...], "outputs": [...], "external_data": None | {"file": ...}, "opset": int}.
    """
    import onnx

    spec = GRAPH_SPECS[graph]
    shapes = io_shapes(config, graph)
    folder = path.parent
    model = onnx.load(str(path), load_external_data=True)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    input_names = tuple(i.name for i in inputs)
    if input_names != spec.inputs:
        raise ExportError(
            f"{graph}: graph inputs are {input_names}, expected {spec.inputs}; an input that the trace "
            "folded into a constant is missing (the module must compute from its arguments)"
        )
    consumed = {name for node in model.graph.node for name in node.input}
    unused = [name for name in spec.inputs if name not in consumed]
    if unused:
        raise ExportError(f"{graph}: inputs {unused} are declared but no node reads them (baked in as constants)")
    output_names = tuple(o.name for o in model.graph.output)
    if output_names != spec.outputs:
        raise ExportError(f"{graph}: graph outputs are {output_names}, expected {spec.outputs}")

    for value in list(inputs) + list(model.graph.output):
        _declare_shape(value, shapes[value.name], graph)

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as err:
        raise ExportError(f"{graph}: ONNX shape inference rejects the graph: {err}") from err
    del inferred

    for f in folder.iterdir():
        if f != path:
            f.unlink()  # per-tensor files of the exporter; rewritten below if needed
    big = model.ByteSize() > PROTOBUF_LIMIT if _can_measure(model) else True
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:
        raise ExportError(f"{graph}: onnx.checker rejects the graph: {err}") from err
    return {
        "inputs": [_describe(i, graph) for i in inputs],
        "outputs": [_describe(o, graph) for o in model.graph.output],
        "external_data": {"file": data_name} if big else None,
        "opset": _opset(model),
    }


def _can_measure(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB on some builds
        return False


def _opset(model) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _declare_shape(value, shape: tuple, graph: str) -> None:
    """Set ``value``'s declared dims to the contract; ExportError on a static conflict."""
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ExportError(f"{graph}: {value.name} has rank {len(dims)}, expected shape {format_shape(shape)}")
    for dim, want in zip(dims, shape):
        if dim.HasField("dim_value") and not isinstance(want, str) and dim.dim_value != want:
            raise ExportError(
                f"{graph}: {value.name} has static dim {dim.dim_value} where the contract has {want} "
                f"(contract shape {format_shape(shape)})"
            )
        if dim.HasField("dim_value") and isinstance(want, str):
            raise ExportError(f"{graph}: {value.name} dim '{want}' was traced as the constant {dim.dim_value}")
        if isinstance(want, str):
            dim.dim_param = want
        else:
            dim.dim_value = int(want)


def _describe(value, graph: str) -> dict[str, Any]:
    import onnx

    elem = value.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
    if dtype != "float32":
        raise ExportError(f"{graph}: {value.name} is {dtype}, expected float32")
    dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": dtype}


def tool_versions() -> dict[str, str | None]:
    """Versions that shaped the export (and later the engines)."""
    from ..version import __version__

    versions: dict[str, str | None] = {"cellsam_trt": __version__, "python": platform.python_version(),
                                       "torch": torch.__version__}
    for module in ("onnx", "onnxruntime"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return versions


def export_network(
    network: CellSAMNetwork,
    out_dir: str | os.PathLike,
    *,
    graphs: Sequence[str] = GRAPH_NAMES,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_sha256: str | None = None,
    opset: int = OPSET,
    batch: int = 2,
    num_boxes: int = 3,
    fp16: bool = True,
) -> dict[str, Any]:
    """Export ``network``'s graphs into ``out_dir`` and write ``manifest.json`` last.

    Args:
        network: weights (a loaded checkpoint or in-memory).
        out_dir: folder to write (created).
        graphs: subset of ``GRAPH_NAMES``.
        checkpoint: the file the weights came from (default: ``network.checkpoint_path``,
            set by ``load_checkpoint``); its sha256 goes into the manifest.
        checkpoint_sha256: the hash, if already computed.
        opset, batch, num_boxes: see ``export_graph``.
        fp16: also write each graph's mixed-precision version ``<graph>.fp16.onnx``
            (``cellsam_trt.graphs.mixed_precision``; what FP16 TensorRT engines are built from and
            what ``OnnxRuntimeBackend(precision="fp16")`` runs), recorded under the graph's
            ``"fp16"`` key of the manifest with its sha256.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    graphs = tuple(graphs)
    bad = [g for g in graphs if g not in GRAPH_SPECS]
    if bad or not graphs or len(set(graphs)) != len(graphs):
        raise ValueError(f"graphs: expected distinct names from {GRAPH_NAMES}, got {graphs}")
    if not isinstance(network, CellSAMNetwork):
        raise ValueError(f"network: expected a CellSAMNetwork, got {type(network).__name__}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint if checkpoint is not None else getattr(network, "checkpoint_path", None)
    if checkpoint is not None and checkpoint_sha256 is None:
        checkpoint_sha256 = file_sha256(checkpoint)
    # A previous manifest would describe files we are about to replace.
    old_manifest = out / MANIFEST_NAME
    if old_manifest.exists():
        old_manifest.unlink()

    modules = graph_modules(network)
    entries = {}
    bar = _graph_progress(graphs)
    for name in graphs:
        log.info("exporting %s", name)
        if bar is not None:
            bar.set_postfix_str(name)
        entries[name] = export_graph(modules[name], name, network.config, out / GRAPH_SPECS[name].onnx_file,
                                     opset=opset, batch=batch, num_boxes=num_boxes)
        fp16_path = out / GRAPH_SPECS[name].fp16_onnx_file
        if fp16:
            log.info("converting %s to mixed precision", name)
            try:
                entries[name]["fp16"] = convert_graph(out / GRAPH_SPECS[name].onnx_file, fp16_path)
            except ConversionError as err:
                raise ExportError(f"{name}: {err}") from err
        elif fp16_path.exists():
            fp16_path.unlink()  # an earlier export's, not from these weights
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": str(checkpoint) if checkpoint is not None else None, "sha256": checkpoint_sha256},
        "model_config": network.config.to_dict(),
        "uses_model_cp": bool(network.uses_model_cp),
        "opset": opset,
        "exporter": EXPORTER,
        "graph_revision": GRAPH_REVISION,
        "precisions": ["fp32", "fp16"] if fp16 else ["fp32"],
        "graphs": entries,
        "tools": tool_versions(),
    }
    write_manifest(out, manifest)
    return manifest


def _graph_progress(graphs: Sequence[str]):
    """A progress bar over the graphs when ``CELLSAM_TRT_PROGRESS=1`` (set by the artifact cache,
    whose export child would otherwise be silent for a minute), else None."""
    if os.environ.get("CELLSAM_TRT_PROGRESS") != "1":
        return None
    return progress_bar(len(graphs), "exporting ONNX graphs", "graph", file=sys.stderr)


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    import json

    return write_public(Path(out_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def export_checkpoint(
    checkpoint: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    config: ModelConfig | None = None,
    download: bool = False,
    **export_options: Any,
) -> dict[str, Any]:
    """Load a released-format checkpoint and export it (see ``export_network``)."""
    from ..modeling.checkpoint import load_checkpoint

    network = load_checkpoint(checkpoint, config=config, download=download)
    return export_network(network, out_dir, checkpoint=network.checkpoint_path, **export_options)
