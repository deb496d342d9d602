"""Reports of the benchmarks: the markdown tables and PNG plot of a ``cellsam-trt bench``
JSON report, the bench scripts' report writer, and the checkout's git commit that every
report records.

    python bench/report.py bench/results/<device>/<date>.json   # (re)write its .md and .png

The bench scripts run from this folder import it as ``report``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellsam_trt.bench.latency import FORMAT
from cellsam_trt.bench.machine import device_name, machine_info
from cellsam_trt.io import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def git_state() -> dict[str, Any] | None:
    """{"commit", "modified_files"} of the checkout holding this folder; None outside one."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified_files": bool(dirty)}


def machine_record(device: torch.device) -> dict[str, Any]:
    """``machine_info`` of ``device`` with the checkout's ``git_state`` under "git"."""
    return {**machine_info(device), "git": git_state()}


def save_report(report: dict[str, Any], out: str | Path | None, stem: str, device: torch.device, render) -> Path:
    """Write a bench script's JSON report and its markdown (``render(report)``) beside it.

    ``out``: the JSON path; None: ``bench/results/<device>/<stem>-<date>.json``. Prints the
    markdown; returns the JSON path.
    """
    path = Path(out) if out else RESULTS / device_name(device) / f"{stem}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    path.with_suffix(".md").write_text(text)
    print(text)
    print(f"report: {path}", file=sys.stderr)
    return path


STAGE_TITLES = {
    "preprocess": "preprocess (CPU)",
    "cellfinder": "CellFinder graph",
    "boxes": "box scoring + threshold",
    "encoder": "encoder graph",
    "decoder": "decoder graph (all chunks)",
    "masks": "mask postprocess + labels",
    "total": "total segment()",
    "paint": "mask upsampling + painting",
    "cleanup": "hole filling + small-label removal",
    "total_excl_clahe": "total minus median CLAHE time",
    "per_box": "per-box decoder + full-res upsampling + painting",
    "decoder_and_masks": "decoder + mask postprocess + labels",
}


def _ms(stats: dict[str, Any] | None, spread: bool = True) -> str:
    if not stats:
        return "-"
    med = stats["median"] * 1000
    fmt = (lambda v: f"{v:.3g}") if abs(med) < 100 else (lambda v: f"{v:.0f}")
    if not spread or stats["n"] < 2:
        return fmt(med)
    return f"{fmt(med)} ({fmt(stats['q1'] * 1000)}–{fmt(stats['q3'] * 1000)})"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The report's tables as markdown."""
    m, c = report["machine"], report["config"]
    gpu = m.get("gpu") or {}
    lines = [
        f"# CellSAM latency: {report['device_name']} ({report['created'][:10]})",
        "",
        f"Device **{m['device']}**" + (f": {gpu['name']}, driver {gpu.get('driver')}, CUDA {m['libraries'].get('torch_cuda')}"
                                        if gpu else f": CPU {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}")
        + f". torch {m['libraries'].get('torch')}, onnxruntime {m['libraries'].get('onnxruntime')}, "
          f"tensorrt {m['libraries'].get('tensorrt')}, scikit-image {m['libraries'].get('scikit-image')}.",
        f"Model **{c['model']}** ({c['weights'].get('weights')}); image {c['image_shape']} ({c['image']}); "
        f"masks: **{c['masks']}**; {c['warmup']} warm-up + {c['repeats']} timed calls per row "
        f"(baseline {c['baseline_repeats']}); decoder chunk {c['inference']['chunk_size']}; "
        f"bbox_threshold {c['inference']['bbox_threshold']}.",
        "",
    ]
    if c["masks"] == "cells":
        lines += ["Mask logits are box-inscribed ellipses (`--masks cells`): the decoder graph runs and is timed, "
                  "but random weights give image-wide masks that would make painting unrepresentative.", ""]
    if c.get("smoke"):
        lines += ["**Smoke run** (tiny config, few boxes, one repeat): checks that the bench works, not speed.", ""]
    lines += ["## Latency per stage", "",
              "Milliseconds, median (interquartile range). `masks` = mask upsampling + painting + hole filling; "
              "`total` = the whole `segment()` call (wall clock). Baseline = the released per-box loop "
              "(`reference.per_box_labels`) on the same device; speed-up = baseline / ours.", ""]
    header = ["backend", "boxes", "N", "kept", "preprocess", "CellFinder", "boxes sel.", "encoder", "decoder", "masks",
              "total", "total − CLAHE", "peak GPU GiB", "baseline total", "× total", "× dec+masks"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = {(b["boxes"], b["n"]): b for b in report["baseline"]}
    speed = {(s["backend"], s["boxes"], s["n"]): s for s in report.get("speedup", [])}
    for run in report["runs"]:
        s = run["stages"]
        b = base.get((run["boxes"], run["n"]))
        sp = speed.get((run["backend"], run["boxes"], run["n"]))
        row = [run["backend"], run["boxes"], str(run["n"]), str(run["kept"]), _ms(s.get("preprocess")),
               _ms(s.get("cellfinder")), _ms(s.get("boxes")), _ms(s.get("encoder")), _ms(s.get("decoder")),
               _ms(s.get("masks")), _ms(s.get("total")), _ms(s.get("total_excl_clahe"), False),
               _gib(run.get("peak_memory_bytes")), _ms(b["stages"]["total"]) if b else "-",
               f"{sp['total']:.1f}" if sp else "-",
               f"{sp['decoder_and_masks']:.1f}" if sp and sp["decoder_and_masks"] else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if report["baseline"]:
        lines += ["", "## Baseline (released per-box loop) per stage", "",
                  "| boxes | N | preprocess | CellFinder | boxes sel. | encoder | per-box loop | clean-up | total |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in report["baseline"]:
            s = b["stages"]
            lines.append("| " + " | ".join([b["boxes"], str(b["n"]), _ms(s.get("preprocess")), _ms(s.get("cellfinder")),
                                             _ms(s.get("boxes")), _ms(s.get("encoder")), _ms(s.get("per_box")),
                                             _ms(s.get("cleanup")), _ms(s.get("total"))]) + " |")
    if report.get("comparisons"):
        lines += ["", "Labels against the baseline (same boxes, last repeat): "
                  + "; ".join(f"{x['backend']} {x['boxes']} N={x['n']}: {x['differing_pixels']} px differ"
                              for x in report["comparisons"]) + "."]
    p = report.get("preprocess")
    if p:
        total = p["steps"]["total"]["median"]
        lines += ["", "## Preprocessing (CPU)", "",
                  f"Image {p['image_shape']}, CLAHE on {p['clahe_channels']} non-constant channel(s).", "",
                  "| step | ms | share |", "|---|---|---|"]
        for step, stats in p["steps"].items():
            lines.append(f"| {step} | {_ms(stats)} | {stats['median'] / total:.0%} |")
        if p.get("clahe_opencv"):
            cv, sk = p["clahe_opencv"]["median"], p["steps"]["clahe"]["median"]
            lines += ["", f"Option `normalize=\"opencv\"` (`--clahe opencv`): OpenCV's CLAHE takes {_ms(p['clahe_opencv'])} "
                      f"ms against scikit-image's {_ms(p['steps']['clahe'])} ms ({sk / cv:.1f}×); the preprocessing "
                      f"total would drop from {total * 1e3:.3g} to {(total - sk + cv) * 1e3:.3g} ms. It is not "
                      "bit-identical: absolute differences from scikit-image (non-constant channels):", "",
                      "| compared | max | mean | 99.9th pct |", "|---|---|---|---|"]
            for name, d in p["opencv_deviation"].items():
                lines.append(f"| {name} | {d['max']:.3g} | {d['mean']:.3g} | {d['p999']:.3g} |")
            lines += ["", "`normalized` is on the [0, 1] scale; `embedding_input` is in SAM's pixel-normalised "
                      "units and `cellfinder_input` in min-max [0, 1] units (both after the 1024² resize)."]
    painter = report.get("painter")
    if painter:
        lines += ["", "## Mask painting alone (synthetic cell masks, no model)", "",
                  f"{painter['low_res']}² logits → {painter['out_shape'][0]}×{painter['out_shape'][1]} labels on "
                  f"{painter['device']}. MaskPainter (windowed, batched) vs the released per-box upsampling on the CPU.",
                  "", "| N | MaskPainter ms | per-box ms | speed-up | identical labels |", "|---|---|---|---|---|"]
        for row in painter["rows"]:
            pb = row["per_box"]
            sp = f"{pb['median'] / row['painter']['median']:.1f}" if pb else "-"
            ident = "-" if row["identical"] is None else ("yes" if row["identical"] else "NO")
            lines.append(f"| {row['n']} | {_ms(row['painter'])} | {_ms(pb)} | {sp} | {ident} |")
    lines += precision_markdown(report.get("precision"))
    lines += throughput_markdown(report.get("throughput"))
    skipped = [f"- {k}: {v['reason']}" for k, v in report["backends"].items() if v["status"] != "ok"]
    skipped += [f"- {s['what']}" + (f" {s['boxes']} N={s.get('n')}" if "boxes" in s else "") + f": {s['reason']}"
                for s in report["skipped"]]
    if skipped:
        lines += ["", "## Not measured", ""] + skipped
    lines += ["", f"Bench wall time {report.get('bench_seconds', 0):.0f} s. Git: {(m.get('git') or {}).get('commit')}"
              f"{' (modified files)' if (m.get('git') or {}).get('modified_files') else ''}.", ""]
    return "\n".join(lines)


def precision_markdown(result: dict[str, Any] | None) -> list[str]:
    """The fp16-vs-fp32 accuracy section (nothing when it was not run)."""
    if not result:
        return []
    lines = ["", "## fp16 accuracy (torch autocast vs fp32, the model's own masks)", "",
             "Cells match at IoU > 0.5. The bar for reduced precision (docs/ARCHITECTURE.md): matched-cell F1 >= 0.99, per-cell IoU >= 0.97.", "",
             "| boxes | cells fp32 / fp16 | F1 | IoU mean | IoU p5 | IoU min | boxes matched (IoU >= 0.9) |",
             "|---|---|---|---|---|---|---|"]

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    for name, r in result.items():
        lab, box = r["labels"], r["boxes"]
        lines.append(f"| {name} | {lab['reference_cells']} / {lab['test_cells']} | {lab['f1']:.4f} | "
                     f"{num(lab['iou_mean'])} | {num(lab['iou_p5'])} | {num(lab['iou_min'])} | "
                     f"{box['matched']} of {box['reference_boxes']} |")
    return lines


def throughput_markdown(result: dict[str, Any] | None) -> list[str]:
    """The large-image section of the markdown report (nothing when it was not run)."""
    if not result:
        return []
    lines = ["", "## Large image: single process vs dask workers", ""]
    if "skipped" in result:
        return lines + [f"Not measured: {result['skipped']}"]
    img, st, single, dist = result["image"], result["settings"], result["single"], result["dask"]
    boxes = "CellFinder boxes" if st["cellfinder"] else f"{st['boxes']} given cell boxes"
    lines += [f"{img['height']}×{img['width']} synthetic slide ({img['megapixels']} MP), {result['tiles']} tiles of "
              f"{st['tile_size']} px (overlap {st['overlap']}, batch {st['batch_size']}), {st['backend']} on "
              f"{st['device']}, {boxes}; "
              f"weights: {st['weights']}. Model loading not included.", "",
              "| path | s | MP/s | cells | cells/s |", "|---|---|---|---|---|"]
    for name, r in (("single process", single), (f"dask, {dist['workers']} workers", dist)):
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['megapixels_per_s']:.3g} | {r['cells']} | {r['cells_per_s']:.3g} |")
    lines += ["", f"Speed-up {result['speedup']:.2f}×; labels identical: {'yes' if result['identical_labels'] else 'NO'}."]
    return lines


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Log-log latency against N per stage and backend, the baseline beside, and the speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    kinds = list(dict.fromkeys(r["backend"] for r in report["runs"]))
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}

    def series(records, stage):
        rows = sorted((r for r in records if r["boxes"] == "user" and stage in r["stages"]), key=lambda r: r["n"])
        n = np.array([r["n"] for r in rows], float)
        med = np.array([r["stages"][stage]["median"] for r in rows]) * 1000
        lo = np.array([r["stages"][stage]["q1"] for r in rows]) * 1000
        hi = np.array([r["stages"][stage]["q3"] for r in rows]) * 1000
        finder = [r for r in records if r["boxes"] == "cellfinder" and stage in r["stages"]]
        return n, med, lo, hi, finder

    def log_axes(ax, title, ylabel="ms (median, IQR band)"):
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("boxes N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)

    panels = [("decoder", axes[0, 0], None), ("masks", axes[0, 1], None),
              ("decoder_and_masks", axes[0, 2], "decoder_and_masks"), ("total", axes[1, 0], "total")]
    for stage, ax, base_stage in panels:
        for kind in kinds:
            n, med, lo, hi, finder = series([r for r in report["runs"] if r["backend"] == kind], stage)
            if len(n):
                ax.plot(n, med, "o-", color=colours[kind], label=kind)
                ax.fill_between(n, lo, hi, color=colours[kind], alpha=0.2)
            for r in finder:
                ax.plot([r["n"]], [r["stages"][stage]["median"] * 1000], "*", ms=12, color=colours[kind])
        if base_stage and report["baseline"]:
            n, med, lo, hi, finder = series(report["baseline"], base_stage)
            if len(n):
                ax.plot(n, med, "s--", color="k", label="baseline (released per-box loop)")
                ax.fill_between(n, lo, hi, color="k", alpha=0.1)
            for r in finder:
                ax.plot([r["n"]], [r["stages"][base_stage]["median"] * 1000], "*", ms=12, color="k")
        log_axes(ax, STAGE_TITLES[stage])

    # stages that do not depend on N: one bar group per backend (CellFinder run if any)
    ax = axes[1, 1]
    fixed = ("preprocess", "cellfinder", "boxes", "encoder")
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        runs = [r for r in report["runs"] if r["backend"] == kind]
        run = next((r for r in runs if r["boxes"] == "cellfinder"), runs[0])
        values = [run["stages"][s]["median"] * 1000 if s in run["stages"] else np.nan for s in fixed]
        ax.bar(np.arange(len(fixed)) + i * width, values, width, color=colours[kind], label=kind)
    ax.set_xticks(np.arange(len(fixed)) + width * (len(kinds) - 1) / 2)
    ax.set_xticklabels([STAGE_TITLES[s].replace(" + ", "\n+ ") for s in fixed], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title("stages independent of N")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if kinds:
        ax.legend(fontsize=8)

    ax = axes[1, 2]
    for kind in kinds:
        rows = sorted((s for s in report.get("speedup", []) if s["backend"] == kind and s["boxes"] == "user"),
                      key=lambda s: s["n"])
        if rows:
            ax.plot([s["n"] for s in rows], [s["total"] for s in rows], "o-", color=colours[kind], label=f"{kind} total")
            ax.plot([s["n"] for s in rows], [s["decoder_and_masks"] or np.nan for s in rows], "^:", color=colours[kind],
                    label=f"{kind} decoder + masks")
    log_axes(ax, "speed-up over the per-box baseline", "baseline / ours (medians)")
    c = report["config"]
    fig.suptitle(f"CellSAM {c['model']} on {report['device_name']} ({report['created'][:10]}); masks: {c['masks']}"
                 f"; ★ = CellFinder boxes" + ("; SMOKE RUN" if c.get("smoke") else ""), fontsize=11)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=72, format="png"))
    plt.close(fig)
    return path


def render_report(json_path: str | os.PathLike) -> tuple[Path, Path]:
    """(Re)write the markdown and PNG beside a report JSON; returns their paths."""
    json_path = Path(json_path)
    try:
        report = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"report: cannot read {json_path} as JSON ({err})") from None
    if report.get("format") != FORMAT:
        raise ValueError(f"report: {json_path} is not a {FORMAT} report")
    md = json_path.with_suffix(".md")
    text = markdown_report(report)
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    return md, plot_report(report, json_path.with_suffix(".png"))




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(Re)write the markdown tables and PNG plot beside "
                                                 "cellsam-trt bench JSON reports.")
    parser.add_argument("reports", nargs="+", metavar="JSON", help="report written by cellsam-trt bench")
    args = parser.parse_args(argv)
    for path in args.reports:
        try:
            md, png = render_report(path)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
