"""``cellsam-trt cache list|clear``: what the artifact cache holds, and removing it."""
from __future__ import annotations

from ..runtime.cache import CACHE_ENV, KINDS, ArtifactCache, CacheEntry


def describe_entry(entry: CacheEntry) -> str:
    """One line for ``cellsam-trt cache list``."""
    made = entry.made_from
    parts = [f"{entry.kind:<7}", entry.key, f"{entry.size_bytes / 2**20:9.1f} MiB",
             f"checkpoint {str(made.get('checkpoint_sha256', '?'))[:12]}"]
    if entry.kind == "onnx":
        parts.append(f"config {made.get('config')}, opset {made.get('opset')}")
    else:
        gpu = made.get("gpu", {})
        parts.append(f"{gpu.get('name')} sm {gpu.get('compute_capability')}, TensorRT {made.get('tensorrt')}, "
                     f"{made.get('precision')}, profiles {made.get('profiles')}")
    versions = made.get("versions", {})
    parts.append(", ".join(f"{k} {v}" for k, v in versions.items()))
    if entry.created:
        parts.append(f"made {entry.created}" + (f" in {entry.build_seconds:.0f} s" if entry.build_seconds else ""))
    return "  ".join(parts)


def run_list(args) -> int:
    cache = ArtifactCache(args.cache_dir)
    entries = cache.entries()
    print(f"cache: {cache.root}")
    if not entries:
        print("  (empty)")
        return 0
    for entry in entries:
        print("  " + describe_entry(entry))
    total = sum(e.size_bytes for e in entries)
    print(f"{len(entries)} entries, {total / 2**30:.2f} GiB")
    return 0


def run_clear(args) -> int:
    cache = ArtifactCache(args.cache_dir)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    freed = cache.clear(kinds)
    print(f"cache: removed {freed / 2**20:.1f} MiB from {cache.root}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="list or clear the cached ONNX graphs and TensorRT engines")
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="entries, sizes and what each was made from")
    listing.set_defaults(func=run_list)
    clear = sub.add_parser("clear", help="remove cached entries")
    clear.add_argument("--kind", choices=["all", *KINDS], default="all", help="what to remove (default: all)")
    clear.set_defaults(func=run_clear)
    for q in (listing, clear):
        q.add_argument("--cache-dir", help=f"cache folder (default: ${CACHE_ENV} or the user cache folder)")
