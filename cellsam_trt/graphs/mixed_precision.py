"""Mixed-precision (FP16 with FP32 islands) versions of the exported ONNX graphs.

    out/<graph>.onnx  (float32)  ->  out/<graph>.fp16.onnx  (float16 compute, float32 I/O)

TensorRT 11 builds only strongly typed networks: every layer runs in the type its ONNX
tensors have, and the builder no longer chooses FP16 kernels by itself (the FP16 builder
flag and per-layer precision constraints are gone). An FP16 engine therefore needs an
FP16 graph. The conversion is ONNX Runtime's float16 converter
(``onnxruntime.transformers.float16``): initializers and activations become float16
except in the ops of ``FP32_ISLAND_OPS``, around which it inserts Cast nodes; graph
inputs and outputs stay float32 (``keep_io_types``), so the runtime contract of
``cellsam_trt.runtime.artifacts`` is the same for both precisions. onnxconverter-common's
older copy of that converter leaves the Identity nodes that the exporter puts on shared
weights in a type conflict (ONNX Runtime refuses the graph); ONNX Runtime's copy does not.

The islands, and why FP16 is fragile there:

- LayerNormalization, InstanceNormalization, ReduceMean, Pow, Sqrt: a variance computed
  in FP16 (10-bit mantissa) cancels catastrophically for channels with a large mean, and
  squares overflow above 256; SAM's LayerNorm2d (neck, mask upscaling) is written as
  ReduceMean / Sub / Pow / ReduceMean / Sqrt, and CellFinder averages over rows/columns;
- Softmax: the sum runs over up to 4096 keys (SAM's global attention).

Which islands are needed was decided by measurement (``bench/bench_fp16.py``, the table
in ``bench/NOTES.md``), not only by this reasoning.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FP32_ISLAND_OPS: tuple[str, ...] = (
    "LayerNormalization", "InstanceNormalization", "ReduceMean", "Pow", "Sqrt", "Softmax",
)
CONVERTER = "onnxruntime.transformers.float16"
PROTOBUF_LIMIT = 2 ** 31 - 1


class ConversionError(RuntimeError):
    """A graph could not be converted to mixed precision, or the result failed its checks."""


def _float16_module():
    try:
        from onnxruntime.transformers import float16
    except ImportError as err:
        raise ConversionError(
            f"the FP16 graphs are made with ONNX Runtime's float16 converter, which is not importable ({err}); "
            "install it with `pip install onnxruntime` (or `pip install -e '.[onnx]'`), or export with --no-fp16"
        ) from None
    return float16


def convert_model(model, fp32_ops: Sequence[str] = FP32_ISLAND_OPS):
    """FP16 copy of an ONNX ``ModelProto`` with ``fp32_ops`` kept in float32 and float32 I/O.

    Returns:
        The converted ModelProto, nodes in topological order (the converter appends its Cast
        nodes at the end; the ONNX spec and TensorRT's parser want producers first).
    """
    float16 = _float16_module()
    blocked = list(dict.fromkeys(list(float16.DEFAULT_OP_BLOCK_LIST) + list(fp32_ops)))
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    sort_nodes(converted.graph)
    return converted


def sort_nodes(graph) -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs.

    Stable (Kahn's algorithm over the original order). Raises ConversionError on a cycle or
    an input that nothing produces.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    producers = {out: idx for idx, node in enumerate(nodes) for out in node.output}
    waiting = collections.Counter()
    consumers: dict[int, list[int]] = collections.defaultdict(list)
    for idx, node in enumerate(nodes):
        needed = {name for name in _node_inputs(node) if name not in available}
        for name in needed:
            if name not in producers:
                raise ConversionError(f"node {node.name or node.op_type} reads {name!r}, which nothing produces")
            consumers[producers[name]].append(idx)
        waiting[idx] = len(needed)
    ready = collections.deque(idx for idx in range(len(nodes)) if waiting[idx] == 0)
    order = []
    while ready:
        idx = ready.popleft()
        order.append(idx)
        for after in consumers[idx]:
            waiting[after] -= 1
            if waiting[after] == 0:
                ready.append(after)
    if len(order) != len(nodes):
        raise ConversionError(f"the graph has a cycle ({len(nodes) - len(order)} nodes never become ready)")
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def _node_inputs(node) -> set[str]:
    """Names a node reads, including the outer-scope names its subgraphs read."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                names |= {name for name in _node_inputs(n) if name not in inner}
    return names


def describe_precision(model) -> dict[str, Any]:
    """Counts that say what the converter did: nodes computing in float32, casts, fp16 weights.

    Returns:
        {"nodes", "fp32_nodes" (op type -> count of nodes with float32 outputs, shape
        arithmetic excluded), "casts", "fp16_initializer_bytes", "fp32_initializer_bytes"}.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    fp32 = collections.Counter(
        n.op_type for n in model.graph.node
        if n.op_type not in ("Cast", "Constant", "Shape") and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output)
    )
    sizes = collections.Counter()
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            count = 1
            for d in t.dims:
                count *= d
            sizes[t.data_type] += count * (4 if t.data_type == onnx.TensorProto.FLOAT else 2)
    return {"nodes": len(model.graph.node), "fp32_nodes": dict(sorted(fp32.items())),
            "casts": sum(n.op_type == "Cast" for n in model.graph.node),
            "fp16_initializer_bytes": int(sizes[onnx.TensorProto.FLOAT16]),
            "fp32_initializer_bytes": int(sizes[onnx.TensorProto.FLOAT])}


def convert_graph(source: str | os.PathLike, target: str | os.PathLike, *,
                  fp32_ops: Sequence[str] = FP32_ISLAND_OPS) -> dict[str, Any]:
    """Write the mixed-precision version of the ONNX graph ``source`` to ``target`` (atomically).

    The result is checked before it is published: same input and output names, all of them
    float32; ``onnx.checker``; strict shape inference.

    Returns:
        Its manifest entry: file, sha256, size_bytes, external_data (None unless over 2 GB),
        converter, fp32_ops, the counts of ``describe_precision``, convert_seconds.

    Raises:
        ConversionError: the converter is missing, fails, or its result fails a check.
    """
    import onnx

    from ..io import write_public
    from ..runtime.artifacts import file_sha256

    source, target = Path(source), Path(target)
    t0 = time.perf_counter()
    model = onnx.load(str(source), load_external_data=True)
    io_before = _io_types(model)
    try:
        converted = convert_model(model, fp32_ops)
    except ConversionError:
        raise
    except Exception as err:  # the converter raises assertion and value errors of its own
        raise ConversionError(f"{source.name}: float16 conversion failed: {type(err).__name__}: {err}") from err
    del model
    io_after = _io_types(converted)
    if io_after != io_before:
        raise ConversionError(f"{source.name}: the FP16 graph's inputs/outputs {io_after} differ from {io_before}")
    try:
        onnx.checker.check_model(converted, full_check=False)
        onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True, data_prop=True)
    except Exception as err:
        raise ConversionError(f"{source.name}: the FP16 graph fails the ONNX checks: {err}") from err
    counts = describe_precision(converted)
    data_name = f"{target.name}.data"
    stale = target.parent / data_name
    if converted.ByteSize() > PROTOBUF_LIMIT:
        raise ConversionError(f"{source.name}: the FP16 graph exceeds ONNX's 2 GB protobuf limit")
    write_public(target, converted.SerializeToString())
    if stale.exists():
        stale.unlink()
    return {
        "file": target.name, "sha256": file_sha256(target), "size_bytes": target.stat().st_size,
        "external_data": None, "converter": CONVERTER, "fp32_ops": list(fp32_ops), **counts,
        "convert_seconds": round(time.perf_counter() - t0, 3),
    }


def _io_types(model) -> dict[str, list]:
    import onnx

    initializers = {t.name for t in model.graph.initializer}

    def describe(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name)
                for v in values if v.name not in initializers]

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
