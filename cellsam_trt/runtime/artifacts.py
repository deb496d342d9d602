"""The graph contract and the on-disk artefacts shared by export, ONNX Runtime and TensorRT.

An export folder holds ``encoder.onnx``, ``cellfinder.onnx``, ``decoder.onnx`` and
``manifest.json``; an engine folder holds ``<graph>.engine`` files and ``engines.json``.
Both JSON files tie the artefacts to the checkpoint they came from (its sha256) so that a
backend can refuse graphs made from other weights. This module imports neither onnx,
onnxruntime nor tensorrt: the runtime reads artefacts with only the library it runs on.

Graph contract (S = image size 1024, g = S/16 = 64, L = 4g = 256, C = SAM prompt width 256,
Q = CellFinder queries 3500; every tensor float32):

    encoder     image (B, 3, S, S)                       -> embedding (B, C, g, g)
    cellfinder  image (B, 3, S, S)                       -> logits (B, Q, 2), boxes (B, Q, 4) cxcywh in [0, 1]
    decoder     embedding (1, C, g, g), boxes (N, 4) xyxy -> mask_logits (N, 1, L, L), iou (N, 1)

B ("batch") and N ("num_boxes") are dynamic.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parsers read the constants here
    import torch
    from torch import Tensor

from ..modeling.config import ModelConfig
from .base import BackendError

# The graphs' identity, part of every manifest and of the artifact cache's keys.
OPSET = 17
# Recorded in the manifest and in the artifact cache's keys: another exporter, another graph.
EXPORTER = "torch.onnx.export(dynamo=False)"
# What the graphs compute, as opposed to which tool wrote them: bumped whenever a module's
# forward changes the operations it records (2: the decoder's reassociated cross attention;
# 3: the decoder split in two, the mask head a graph of its own that runs only for the boxes
# whose predicted IoU passes the filter), so that a cached export of an earlier formulation
# is not reused.
GRAPH_REVISION = 3

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cellsam-trt-onnx"
MANIFEST_VERSION = 1
ENGINE_METADATA_NAME = "engines.json"
ENGINE_METADATA_FORMAT = "cellsam-trt-engines"
ENGINE_METADATA_VERSION = 1
GRAPH_NAMES = ("encoder", "cellfinder", "decoder", "mask_head")
# the graphs whose first dimension is the number of boxes (the others: the image batch)
BOX_GRAPHS = ("decoder", "mask_head")
# TensorRT engine profiles by default: image batch up to 8, decoder calls up to 1024 boxes
# (256 the optimum); the runtime chunks larger calls
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_BOXES = 1024
DEFAULT_OPT_BOXES = 256
# fp32: the traced graphs; fp16: their mixed-precision versions (cellsam_trt.graphs.mixed_precision)
PRECISIONS = ("fp32", "fp16")
BATCH_DIM = "batch"
BOXES_DIM = "num_boxes"

Shape = tuple  # of int (static) and str (symbolic) dims


@dataclass(frozen=True)
class GraphSpec:
    """Names of one graph's inputs and outputs, in the order the graph declares them."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def onnx_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def engine_file(self) -> str:
        return f"{self.name}.engine"

    @property
    def fp16_onnx_file(self) -> str:
        """The mixed-precision version of the graph (float16 compute, float32 I/O)."""
        return f"{self.name}.fp16.onnx"


GRAPH_SPECS: dict[str, GraphSpec] = {
    "encoder": GraphSpec("encoder", ("image",), ("embedding",)),
    "cellfinder": GraphSpec("cellfinder", ("image",), ("logits", "boxes")),
    "decoder": GraphSpec("decoder", ("embedding", "boxes"), ("iou", "image_tokens", "hyper")),
    "mask_head": GraphSpec("mask_head", ("image_tokens", "hyper"), ("mask_logits",)),
}


def io_shapes(config: ModelConfig, graph: str) -> dict[str, Shape]:
    """The contract's shape of every input and output of ``graph`` for ``config``.

    Returns:
        {tensor name: shape}; inputs first, then outputs, in graph order. Dynamic dims are
        the strings ``"batch"`` (encoder, cellfinder) and ``"num_boxes"`` (decoder).
    """
    s = config.image_size
    grid = config.sam.encoder.grid_size
    chans = config.sam.encoder.out_chans
    low = config.sam.low_res_size
    finder = config.cellfinder
    queries = finder.num_queries * finder.num_patterns
    if graph == "encoder":
        return {"image": (BATCH_DIM, 3, s, s), "embedding": (BATCH_DIM, chans, grid, grid)}
    if graph == "cellfinder":
        return {
            "image": (BATCH_DIM, 3, s, s),
            "logits": (BATCH_DIM, queries, finder.num_classes),
            "boxes": (BATCH_DIM, queries, 4),
        }
    # the decoder works at the prompt width; its hypernetwork at an eighth of it
    tokens = (BOXES_DIM, grid * grid, config.sam.prompt_embed_dim)
    hyper = (BOXES_DIM, config.sam.prompt_embed_dim // 8)
    if graph == "decoder":
        return {
            "embedding": (1, chans, grid, grid),
            "boxes": (BOXES_DIM, 4),
            "iou": (BOXES_DIM, 1),
            "image_tokens": tokens,
            "hyper": hyper,
        }
    if graph == "mask_head":
        return {"image_tokens": tokens, "hyper": hyper, "mask_logits": (BOXES_DIM, 1, low, low)}
    raise ValueError(f"graph: expected one of {GRAPH_NAMES}, got {graph!r}")


def check_input(graph: str, name: str, tensor: Tensor, config: ModelConfig) -> None:
    """ValueError unless ``tensor`` fits the contract shape of input ``name`` of ``graph``."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{graph} {name}: expected a torch tensor, got {type(tensor).__name__}")
    expected = io_shapes(config, graph)[name]
    shape = tuple(tensor.shape)
    fits = len(shape) == len(expected) and all(
        (isinstance(e, str) and d >= 1) or d == e for d, e in zip(shape, expected)
    )
    if not fits:
        raise ValueError(f"{graph} {name}: expected shape {format_shape(expected)}, got {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"{graph} {name}: expected a floating point tensor, got {tensor.dtype}")


def resolve_shape(shape: Sequence[int | str], symbols: Mapping[str, int]) -> tuple[int, ...]:
    """Replace symbolic dims by their values (e.g. {"batch": 2})."""
    try:
        return tuple(int(symbols[d]) if isinstance(d, str) else int(d) for d in shape)
    except KeyError as err:
        raise BackendError(f"shape {format_shape(shape)}: no value for dynamic dim {err}") from None


def bind_symbols(shapes: Mapping[str, Sequence[int | str]], tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Values of the dynamic dims, read from the actual input tensors."""
    symbols: dict[str, int] = {}
    for name, tensor in tensors.items():
        for d, size in zip(shapes[name], tensor.shape):
            if isinstance(d, str):
                symbols[d] = int(size)
    return symbols


def format_shape(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def file_sha256(path: str | os.PathLike) -> str:
    from ..modeling.checkpoint import file_sha256 as sha

    return sha(path)


def checkpoint_sha256(checkpoint: str | os.PathLike) -> str:
    """sha256 of a checkpoint file; BackendError if it does not exist."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise BackendError(f"checkpoint: no file at {path}")
    return file_sha256(path)


def read_json(path: Path, what: str, hint: str) -> dict[str, Any]:
    """A JSON object from ``path``; BackendError saying what is wrong and ``hint`` how to fix it."""
    if not path.is_file():
        raise BackendError(f"{what}: no {path.name} in {path.parent}. {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BackendError(f"{what}: {path} is not readable JSON ({err}). {hint}") from None
    if not isinstance(data, dict):
        raise BackendError(f"{what}: {path} does not hold a JSON object. {hint}")
    return data


def read_record(folder: Path, name: str, what: str, hint: str, record: tuple[str, int], kind: str) -> dict[str, Any]:
    """The versioned JSON record ``folder / name`` (an export's manifest, an engine folder's
    metadata): BackendError when the folder or file is missing, unreadable, or of another
    ``record`` (format, version); ``kind`` says what it should have been."""
    if not folder.is_dir():
        raise BackendError(f"{what}: {folder} is not a folder. {hint}")
    data = read_json(folder / name, what, hint)
    if (data.get("format"), data.get("version")) != record:
        raise BackendError(
            f"{what}: {folder / name} is not {kind} (format {data.get('format')!r} version {data.get('version')!r}, "
            f"expected {record[0]!r} version {record[1]}). {hint}"
        )
    return data


def export_hint(folder: Path | str) -> str:
    return f"Export the graphs with: cellsam-trt export --checkpoint CHECKPOINT --out {folder}"


def build_hint(onnx_dir: Path | str | None, engine_dir: Path | str) -> str:
    source = onnx_dir if onnx_dir is not None else "ONNX_DIR"
    return f"Rebuild the engines on this machine with: cellsam-trt build-engines --onnx-dir {source} --out {engine_dir}"


@dataclass(frozen=True)
class ExportManifest:
    """A checked ``manifest.json`` of an export folder.

    Attributes:
        folder: the export folder.
        data: the parsed JSON.
        config: the architecture the graphs were exported with.
        uses_model_cp: the weights had ``model_cp.*`` (selects the released preprocessing).
        checkpoint_sha256: sha256 of the checkpoint file, or None for in-memory weights.
    """

    folder: Path
    data: dict[str, Any]
    config: ModelConfig
    uses_model_cp: bool
    checkpoint_sha256: str | None

    def graph(self, name: str) -> dict[str, Any]:
        return self.data["graphs"][name]

    def file_entry(self, name: str, precision: str = "fp32") -> dict[str, Any]:
        """The manifest entry of graph ``name``'s file in ``precision`` ("fp32" or "fp16")."""
        entry = self.graph(name)
        return entry if precision == "fp32" else entry["fp16"]

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        return self.folder / self.file_entry(name, precision)["file"]

    def has_precision(self, precision: str) -> bool:
        """Whether every graph of the manifest has a file in ``precision``."""
        return precision == "fp32" or all(isinstance(e.get("fp16"), dict) for e in self.data["graphs"].values())

    def shapes(self, name: str) -> dict[str, tuple]:
        """{tensor: shape} of graph ``name`` as recorded (inputs then outputs)."""
        entry = self.graph(name)
        return {t["name"]: tuple(t["shape"]) for t in entry["inputs"] + entry["outputs"]}


def load_manifest(
    folder: str | os.PathLike,
    *,
    graphs: Sequence[str] = GRAPH_NAMES,
    checkpoint: str | os.PathLike | None = None,
    verify_hashes: bool = True,
    precision: str = "fp32",
) -> ExportManifest:
    """Read and check an export folder's manifest.

    Args:
        folder: the export folder (``cellsam-trt export --out``).
        graphs: graphs that must be present.
        checkpoint: when given, the graphs must have been exported from this file (sha256).
        verify_hashes: compare every graph file with the sha256 the exporter recorded.
        precision: which files must be present and are checked: "fp32" (``<graph>.onnx``)
            or "fp16" (the mixed-precision ``<graph>.fp16.onnx``; exports made with
            ``--no-fp16`` or before FP16 graphs existed have none).

    Raises:
        BackendError: missing folder/manifest/graph, a graph changed since export (sha256),
            a manifest of another format, or graphs exported from another checkpoint.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    folder = Path(folder).expanduser()
    hint = export_hint(folder)
    data = read_record(folder, MANIFEST_NAME, "onnx_dir", hint, (MANIFEST_FORMAT, MANIFEST_VERSION),
                       "a cellsam-trt export manifest")
    try:
        config = ModelConfig.from_dict(data["model_config"])
        uses_model_cp = bool(data["uses_model_cp"])
        recorded_sha = data["checkpoint"]["sha256"]
        entries = data["graphs"]
    except (KeyError, TypeError, ValueError) as err:
        raise BackendError(f"onnx_dir: {folder / MANIFEST_NAME} lacks or mangles {err}. {hint}") from None
    manifest = ExportManifest(folder, data, config, uses_model_cp, recorded_sha)

    for name in graphs:
        spec = GRAPH_SPECS[name]
        entry = entries.get(name)
        if not isinstance(entry, dict):
            raise BackendError(f"onnx_dir: the manifest in {folder} has no {name} graph. {hint}")
        recorded_io = (
            tuple(t.get("name") for t in entry.get("inputs", [])),
            tuple(t.get("name") for t in entry.get("outputs", [])),
        )
        if recorded_io != (spec.inputs, spec.outputs):
            raise BackendError(
                f"onnx_dir: {name} graph has inputs/outputs {recorded_io}, expected "
                f"{(spec.inputs, spec.outputs)}. {hint}"
            )
        if precision == "fp16":
            if not isinstance(entry.get("fp16"), dict):
                raise BackendError(
                    f"onnx_dir: the export in {folder} has no FP16 {name} graph (exported with --no-fp16, or by a "
                    f"cellsam-trt without mixed-precision graphs). {hint}"
                )
            entry = entry["fp16"]
        for file_entry in [entry] + ([entry["external_data"]] if entry.get("external_data") else []):
            path = folder / file_entry["file"]
            if not path.is_file():
                raise BackendError(f"onnx_dir: {name} graph file {path} is missing. {hint}")
            if verify_hashes and file_sha256(path) != file_entry["sha256"]:
                raise BackendError(
                    f"onnx_dir: {path} changed since it was exported (sha256 differs from {MANIFEST_NAME}); "
                    f"the file is corrupt or from another export. {hint}"
                )
    if checkpoint is not None:
        check_checkpoint_hash(recorded_sha, checkpoint, f"the graphs in {folder}", hint)
    return manifest


def check_checkpoint_hash(recorded: str | None, checkpoint: str | os.PathLike, what: str, hint: str) -> None:
    """BackendError unless ``recorded`` is the sha256 of the ``checkpoint`` file."""
    requested = checkpoint_sha256(checkpoint)
    if recorded is None:
        raise BackendError(
            f"checkpoint: {what} were made from in-memory weights (no checkpoint hash recorded), so they "
            f"cannot be confirmed to come from {checkpoint}. {hint}"
        )
    if recorded != requested:
        raise BackendError(
            f"checkpoint: {what} were made from another checkpoint (sha256 {recorded[:12]}...) than "
            f"{checkpoint} (sha256 {requested[:12]}...). {hint}"
        )


def box_profile_shapes(config: ModelConfig, graph: str, max_boxes: int, opt_boxes: int = 256
                       ) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT (min, opt, max) shapes of the inputs of ``decoder`` or ``mask_head``: 1,
    ``opt_boxes`` and ``max_boxes`` boxes (rows of the mask head)."""
    if graph not in BOX_GRAPHS:
        raise ValueError(f"graph: expected one of {BOX_GRAPHS}, got {graph!r}")
    if max_boxes < 1:
        raise ValueError(f"max_boxes: expected a positive integer, got {max_boxes}")
    shapes = io_shapes(config, graph)
    opt = max(1, min(opt_boxes, max_boxes))
    return {name: tuple(tuple(n if d == BOXES_DIM else d for d in shapes[name]) for n in (1, opt, max_boxes))
            for name in GRAPH_SPECS[graph].inputs}


def image_profile_shapes(config: ModelConfig, graph: str, max_batch: int, opt_batch: int = 1) -> dict[str, tuple[tuple, tuple, tuple]]:
    """TensorRT (min, opt, max) shapes of the image input of ``encoder`` or ``cellfinder``."""
    if max_batch < 1:
        raise ValueError(f"max_batch: expected a positive integer, got {max_batch}")
    shape = io_shapes(config, graph)["image"]
    opt = max(1, min(opt_batch, max_batch))
    return {"image": (resolve_shape(shape, {BATCH_DIM: 1}), resolve_shape(shape, {BATCH_DIM: opt}),
                      resolve_shape(shape, {BATCH_DIM: max_batch}))}


def torch_dtype(name: str) -> torch.dtype:
    """numpy-style dtype name ("float32") -> torch dtype."""
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
             "bool": torch.bool}
    if name not in table:
        raise BackendError(f"unsupported tensor dtype {name!r} in an artefact")
    return table[name]
