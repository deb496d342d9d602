"""What ``cellsam-trt bench`` measures: ``BenchOptions``, whose fields are also the command's
options (one source of defaults and help: ``add_arguments`` builds the parser from the
fields), and the smoke preset."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_NS = (1, 10, 100, 500, 1000, 2000, 3500)
SMOKE_NS = (1, 10)
# torch-<precision> runs the torch backend as it chooses its decoder (fused on CUDA);
# torch-fp32-eager keeps the eager decoder, for the side-by-side of the two
BACKEND_KINDS = ("torch-fp32", "torch-bf16", "torch-fp16", "torch-fp32-eager", "onnxruntime", "tensorrt")
# opt-in: torch-<precision>-flash runs the encoders' attention on the Triton flash kernel
# (CUDA; on a CPU it would run in Triton's interpreter, if at all)
FLASH_KINDS = ("torch-fp32-flash", "torch-bf16-flash", "torch-fp16-flash")
KNOWN_KINDS = BACKEND_KINDS + FLASH_KINDS
MASK_SOURCES = ("auto", "model", "cells")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _cap(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if name not in ("baseline",) + KNOWN_KINDS or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=N with NAME in baseline, {', '.join(KNOWN_KINDS)}; got {text!r}")
    return name, int(value)


def _option(default: Any = None, help: str | None = None, *, flag: str | None = None, parse=None,
            choices: tuple | None = None, metavar: str | None = None, repeat: bool = False, factory=None):
    """A ``BenchOptions`` field and its command-line option. ``help`` None: not an option
    (set by presets and callers only). A bool field is a switch that turns its default
    around (``flag`` names it: ``--no-...`` for a True default). ``repeat``: the option may
    be given several times, each value parsed by ``parse`` into a (key, value) pair."""
    metadata = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar, "repeat": repeat}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class BenchOptions:
    """What ``run_bench`` measures; each field with help text is an option of ``cellsam-trt bench``.

    caps: largest N per measured thing ("baseline", or a backend kind); larger N are
        skipped and listed in the report.
    masks: "auto" (cells for random weights, model for a checkpoint), "model" or "cells".
    """

    smoke: bool = _option(False, "seconds-long check on the CPU (tiny config, N=1,10, one repeat)")
    config: str | None = _option(None, "architecture of random weights (default: cellsam-vit-b on CUDA, tiny on the CPU)",
                                 choices=("tiny", "cellsam-vit-b"))
    checkpoint: str | None = _option(None, "real CellSAM weights (default: random weights steered on the bench image)")
    device: str | None = _option(None, "torch device (default: cuda if available)")
    ns: tuple[int, ...] = _option(DEFAULT_NS, "user-box counts, comma-separated", flag="--n", parse=_int_list,
                                  metavar="N")
    cellfinder: bool = _option(True, "skip the run with CellFinder's boxes", flag="--no-cellfinder")
    backends: tuple[str, ...] = _option(BACKEND_KINDS, f"comma-separated names from {','.join(KNOWN_KINDS)} "
                                        f"(default: {','.join(BACKEND_KINDS)}); unavailable ones are skipped with "
                                        "the reason", parse=_name_list)
    onnx_dir: str | None = _option(None, "ONNX export (cellsam-trt export) of the same weights, for onnxruntime")
    export_onnx: str | None = _option(None, "export the bench weights to DIR and bench onnxruntime on them",
                                      metavar="DIR")
    ort_providers: tuple[str, ...] | None = _option(
        None, "onnxruntime providers, comma-separated (default: cuda when available, else cpu)", parse=_name_list)
    engine_dir: str | None = _option(None, "TensorRT engines (cellsam-trt build-engines) of the same weights")
    warmup: int = _option(1, "untimed calls per configuration", parse=int)
    repeats: int = _option(5, "timed calls per configuration", parse=int)
    baseline_repeats: int = _option(3, "timed calls of the per-box baseline", parse=int)
    baseline: bool = _option(True, "skip the released per-box loop", flag="--no-baseline")
    caps: dict[str, int] = _option(help="largest N for baseline or a backend kind, e.g. --cap baseline=1000 "
                                   "(repeatable)", flag="--cap", parse=_cap, metavar="NAME=N", repeat=True,
                                   factory=dict)
    chunk_size: int | None = _option(None, "boxes per decoder call (default 256)", parse=int)
    bbox_threshold: float = _option(0.4, "CellFinder threshold weight (as released)", parse=float)
    masks: str = _option("auto", "mask logits painted: the model's, or box-inscribed ellipses "
                         "(auto: cells for random weights)", choices=MASK_SOURCES)
    image_size: int = _option(1024, "side of the generated image", parse=int)
    cells: int = _option(800, "cells drawn in the generated image", parse=int)
    seed: int = _option(0, "seed of the image, the boxes and random weights", parse=int)
    painter: bool = _option(False, "also time the mask painter alone against per-box upsampling")
    throughput: int | None = _option(None, "also measure a SIDE x SIDE synthetic slide: single process vs "
                                     "2 dask workers (MP/s, cells/s)", parse=int, metavar="SIDE")
    out_dir: str = _option("bench/results", "reports go to OUT_DIR/<device-name>/")
    name: str | None = _option(None, "device folder name (default: GPU name, or cpu-<CPU name>)")
    painter_ns: tuple[int, ...] = _option(DEFAULT_NS)
    preprocess_repeats: int = _option(3)
    throughput_options: dict[str, Any] = _option(factory=dict)

    def validate(self) -> None:
        if not self.ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns):
            raise ValueError(f"n: expected positive box counts, got {self.ns}")
        if self.warmup < 0 or self.repeats < 1 or self.baseline_repeats < 1:
            raise ValueError("warmup/repeats: expected warmup >= 0 and repeats >= 1")
        bad = [b for b in self.backends if b not in KNOWN_KINDS]
        if bad or not self.backends:
            raise ValueError(f"backends: expected names from {KNOWN_KINDS}, got {self.backends}")
        if self.masks not in ("auto", "model", "cells"):
            raise ValueError(f"masks: expected 'auto', 'model' or 'cells', got {self.masks!r}")
        for key, cap in self.caps.items():
            if key not in ("baseline",) + KNOWN_KINDS or cap < 0:
                raise ValueError(f"cap: expected NAME=N with NAME in baseline, {', '.join(KNOWN_KINDS)}, got {key}={cap}")
        if not 0 <= self.bbox_threshold <= 1:
            raise ValueError(f"bbox_threshold: expected a number in [0, 1], got {self.bbox_threshold}")
        if self.onnx_dir and self.export_onnx:
            raise ValueError("onnx_dir/export_onnx: give one of them, not both")
        if self.throughput is not None and self.throughput < 64:
            raise ValueError(f"throughput: expected the side of the large image (>= 64 px), got {self.throughput}")


def smoke_options(out_dir: str = "bench/results", **changes: Any) -> BenchOptions:
    """Seconds on a CPU: tiny config, N <= 10, one repeat, no warm-up, a 256x256 image.

    No CellFinder run: with steered tiny weights CellFinder keeps a hundred boxes or more,
    which alone would take seconds to decode on a CPU.
    """
    preset = dict(config="tiny", device="cpu", ns=SMOKE_NS, warmup=0, repeats=1, baseline_repeats=1,
                  cellfinder=False, image_size=256, cells=40, preprocess_repeats=1, smoke=True, painter=True,
                  painter_ns=SMOKE_NS, throughput=640,
                  throughput_options=dict(tile_size=384, overlap=64, batch_size=2, box_limit=12))
    return BenchOptions(**{**preset, "out_dir": out_dir, **changes})


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``BenchOptions`` field with help text, its default the field's."""
    for f in fields(BenchOptions):
        meta = f.metadata
        if meta.get("help") is None:
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        help_text = meta["help"]
        if not isinstance(default, bool) and default not in (None, {}) and "default" not in help_text:
            help_text += f" (default {_shown(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if isinstance(default, bool):
            kwargs.update(action="store_false" if default else "store_true", default=default)
        elif meta["repeat"]:
            kwargs.update(action="append", type=meta["parse"], default=None)
        else:
            kwargs.update(default=default, type=meta["parse"], choices=meta["choices"])
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The options of a parsed command line (``--smoke``: the smoke preset, on ``--device`` if given)."""
    if args.smoke:
        return smoke_options(args.out_dir, **({"device": args.device} if args.device else {}))
    values = {f.name: getattr(args, f.name) for f in fields(BenchOptions) if f.metadata.get("help") is not None}
    values["caps"] = dict(values["caps"] or [])
    return BenchOptions(**values)
