"""The artifact cache: ONNX graphs and TensorRT engines made on first use, reused after.

Layout under one root (``CELLSAM_TRT_CACHE``, default the platform's user cache folder,
e.g. ``~/.cache/cellsam-trt`` on Linux)::

    root/onnx/<key>/      an export folder (manifest.json + graphs) + cache-entry.json
    root/engines/<key>/   an engine folder (engines.json + engines)  + cache-entry.json
    root/locks/<key>.lock one file lock per entry
    root/checkpoint-hashes.json   sha256 of checkpoint files, by path, size and mtime

An entry's key is a hash of everything that makes it valid: for graphs the checkpoint's
sha256, the requested model config, the opset, the manifest format and the versions of
cellsam-trt, torch and onnx; for engines the graphs' key plus the GPU name and compute
capability, the TensorRT version, the precision and the optimisation profiles. The
export manifest and ``engines.json`` stay the source of truth: an entry is used only if
its manifest checks out (every file's sha256, the checkpoint's sha256).

Building is safe under concurrency and crashes: processes (or dask workers) that ask for
the same entry take its file lock, so one builds and the others wait, then reuse it. A
build goes to a temporary folder that is renamed into place when complete; an entry that
fails its checks (a half-written or corrupted file) is reported, removed and rebuilt.
Exports and engine builds run in a child process (``cellsam-trt export`` /
``build-engines``): a ViT-B export needs about 8 GB of RAM for a minute, which the
calling process does not keep, and a child killed for memory is an error this process
can report and fall back from.

Set ``CELLSAM_TRT_NO_BUILD=1`` (or pass ``build=False``) to never export or build
implicitly, e.g. in a locked-down deployment where artifacts are made once beforehand.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_VERSION, load_manifest
from .base import BackendError

log = logging.getLogger(__name__)

CACHE_ENV = "CELLSAM_TRT_CACHE"
NO_BUILD_ENV = "CELLSAM_TRT_NO_BUILD"
# "0" turns off the progress bar of export and engine builds
PROGRESS_ENV = "CELLSAM_TRT_PROGRESS"
ENTRY_NAME = "cache-entry.json"
HASHES_NAME = "checkpoint-hashes.json"
KINDS = ("onnx", "engines")
# Bumped when the layout or the meaning of a key changes: old entries are then not found.
CACHE_FORMAT = 1


class CacheError(BackendError):
    """An artifact is not in the cache and cannot (or may not) be made."""


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``root`` if given, else ``$CELLSAM_TRT_CACHE``, else the user cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cellsam-trt", appauthor=False))


def building_allowed(build: bool | None = None) -> bool:
    """``build`` if given, else False when ``CELLSAM_TRT_NO_BUILD`` is set to a true value."""
    if build is not None:
        return bool(build)
    return os.environ.get(NO_BUILD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def _key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _versions(*modules: str) -> dict[str, str | None]:
    from ..version import __version__

    out: dict[str, str | None] = {"cellsam_trt": __version__}
    for name in modules:
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cache entry as ``cellsam-trt cache list`` shows it.

    Attributes:
        kind: "onnx" or "engines".
        key: the entry's folder name.
        folder: where it is.
        size_bytes: the files in it.
        made_from: the key material (checkpoint sha256 and path, config, versions, GPU...).
        created: ISO time it was made.
        build_seconds: how long making it took.
    """

    kind: str
    key: str
    folder: Path
    size_bytes: int
    made_from: dict[str, Any]
    created: str | None
    build_seconds: float | None


@dataclasses.dataclass(frozen=True)
class GraphRequest:
    """What an ONNX graph entry is made from.

    Attributes:
        checkpoint: the weights file (released format).
        config: architecture name passed to the export ("tiny", "cellsam-vit-b"), or None
            to infer it from the weights (then the weights alone decide it).
    """

    checkpoint: Path
    config: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """What a TensorRT engine entry is made from (beside its graphs).

    Attributes:
        gpu: {"name", "compute_capability"} of the target GPU.
        tensorrt_version: the installed TensorRT.
        precision: "fp16" or "fp32".
        max_batch: image batch profile max.
        max_boxes: decoder profile max.
        device: CUDA device index to build on.
    """

    gpu: dict[str, str]
    tensorrt_version: str
    precision: str = "fp16"
    max_batch: int = 8
    max_boxes: int = 1024
    device: int = 0


class ArtifactCache:
    """ONNX exports and TensorRT engines, made once per key and reused.

    Args:
        root: cache folder (default ``cache_root()``).
        build: allow exporting / building missing entries (default: unless
            ``CELLSAM_TRT_NO_BUILD`` is set).
        progress: show the child process's progress bar while it exports or builds.

    >>> cache = ArtifactCache()                                   # doctest: +SKIP
    >>> onnx_dir = cache.onnx_dir("cellsam_general.pt")          # exports on first use
    """

    def __init__(self, root: str | os.PathLike | None = None, *, build: bool | None = None,
                 progress: bool = True) -> None:
        self.root = cache_root(root)
        self.build = building_allowed(build)
        self.progress = progress

    # -- keys ---------------------------------------------------------------------------

    def checkpoint_sha256(self, checkpoint: str | os.PathLike) -> str:
        """sha256 of ``checkpoint``, remembered by (path, size, mtime) so a 1 GB file is hashed once.

        Raises:
            CacheError: the file does not exist.
        """
        from ..modeling.checkpoint import file_sha256

        path = Path(checkpoint).expanduser().resolve()
        try:
            stat = path.stat()
        except OSError as err:
            raise CacheError(f"checkpoint: cannot read {path} ({err.strerror})") from None
        if not path.is_file():
            raise CacheError(f"checkpoint: {path} is not a file")
        stamp = [stat.st_size, stat.st_mtime_ns]
        memo_path = self.root / HASHES_NAME
        try:
            memo = json.loads(memo_path.read_text())
            if not isinstance(memo, dict):
                memo = {}
        except (OSError, ValueError):
            memo = {}
        known = memo.get(str(path))
        if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
        digest = file_sha256(path)
        memo[str(path)] = {"stamp": stamp, "sha256": digest}
        try:
            from ..io import write_public

            write_public(memo_path, json.dumps(memo, indent=1).encode())
        except OSError as err:  # a read-only cache still works, it only hashes again
            log.debug("cannot remember the checkpoint hash in %s: %s", memo_path, err)
        return digest

    def graph_material(self, request: GraphRequest) -> dict[str, Any]:
        from .artifacts import EXPORTER, GRAPH_REVISION, OPSET

        return {
            "format": CACHE_FORMAT, "kind": "onnx",
            "checkpoint_sha256": self.checkpoint_sha256(request.checkpoint),
            "config": request.config or "inferred from the weights",
            "opset": OPSET, "manifest_version": MANIFEST_VERSION, "exporter": EXPORTER,
            "graph_revision": GRAPH_REVISION, "versions": _versions("torch", "onnx"),
        }

    def engine_material(self, graphs: dict[str, Any], request: EngineRequest) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT, "kind": "engines", "graphs_key": _key(graphs),
            "checkpoint_sha256": graphs["checkpoint_sha256"],
            "gpu": dict(request.gpu), "tensorrt": request.tensorrt_version, "precision": request.precision,
            "profiles": {"max_batch": request.max_batch, "max_boxes": request.max_boxes},
            "versions": _versions(),
        }

    # -- entries ------------------------------------------------------------------------

    def onnx_dir(self, checkpoint: str | os.PathLike, *, config: str | None = None) -> Path:
        """The export folder of ``checkpoint``'s graphs, exported into the cache if missing.

        Returns:
            A folder for ``OnnxRuntimeBackend`` / ``build-engines`` whose manifest has been
            checked (file hashes and the checkpoint's sha256).

        Raises:
            CacheError: not cached and building is off, or the export failed (the message
                says why: out of memory, a missing package, ...).
        """
        request = GraphRequest(Path(checkpoint).expanduser().resolve(), config)
        material = self.graph_material(request)
        argv = [sys.executable, "-m", "cellsam_trt.cli", "export", "--checkpoint", str(request.checkpoint)]
        if config:
            argv += ["--config", config]

        def check_weights() -> None:
            # a file that is no checkpoint (or not in the CellSAM layout) fails here, in a second
            # and with one CheckpointError, not after starting an export process that fails
            from ..modeling.checkpoint import check_checkpoint
            from ..modeling.config import ModelConfig

            check_checkpoint(request.checkpoint, ModelConfig.named(config) if config else None)

        return self._entry("onnx", material, lambda out: [*argv, "--out", str(out)],
                           f"ONNX export of {request.checkpoint.name}", self._check_graphs, before_making=check_weights)

    def engine_dir(self, checkpoint: str | os.PathLike, request: EngineRequest, *, config: str | None = None) -> Path:
        """The engine folder for ``checkpoint`` on ``request.gpu``, built into the cache if missing
        (exporting the graphs first if they are missing too).

        Raises:
            CacheError: as ``onnx_dir``, or the engine build failed.
        """
        onnx = self.onnx_dir(checkpoint, config=config)
        graphs = self.graph_material(GraphRequest(Path(checkpoint).expanduser().resolve(), config))
        material = self.engine_material(graphs, request)

        def engine_argv(out: Path) -> list[str]:
            cmd = [sys.executable, "-m", "cellsam_trt.cli", "build-engines", "--onnx-dir", str(onnx),
                   "--out", str(out), "--max-batch", str(request.max_batch), "--max-boxes", str(request.max_boxes),
                   "--device", f"cuda:{request.device}"]
            return cmd + (["--fp32"] if request.precision == "fp32" else [])

        return self._entry("engines", material, engine_argv, f"TensorRT engines for {request.gpu.get('name')}",
                           self._check_engines)

    def _check_graphs(self, folder: Path, material: dict[str, Any]) -> None:
        manifest = load_manifest(folder)
        if manifest.checkpoint_sha256 != material["checkpoint_sha256"]:
            raise BackendError(f"its manifest names checkpoint sha256 {str(manifest.checkpoint_sha256)[:12]}..., "
                               f"the key {material['checkpoint_sha256'][:12]}...")

    def _check_engines(self, folder: Path, material: dict[str, Any]) -> None:
        from .tensorrt_backend import engine_files, load_engine_metadata

        meta = load_engine_metadata(folder)
        engine_files(meta, folder, verify_hashes=True)
        if meta.get("checkpoint", {}).get("sha256") != material["checkpoint_sha256"]:
            raise BackendError("its engines.json names another checkpoint")

    def _entry(self, kind: str, material: dict[str, Any], argv_for, what: str, check,
               before_making: Callable[[], None] | None = None) -> Path:
        from filelock import FileLock, Timeout

        key = _key(material)
        folder = self.root / kind / key
        problem = self._validate(folder, material, check)
        if problem is None:
            log.debug("cache hit: %s in %s", what, folder)
            return folder
        locks = self.root / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cache: cannot create {locks} ({err.strerror}); set {CACHE_ENV} to a writable folder") from None
        lock = FileLock(str(locks / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process making the %s in %s", what, folder)
            lock.acquire()
        try:
            # Another process may have finished while we waited.
            problem = self._validate(folder, material, check)
            if problem is None:
                log.info("reusing the %s made by another process in %s", what, folder)
                return folder
            if folder.exists():
                log.warning("cache entry %s is not usable (%s); removing it and making it again", folder, problem)
                shutil.rmtree(folder, ignore_errors=True)
            self._remove_stale(folder)
            if not self.build:
                raise CacheError(
                    f"the {what} is not in the cache ({self.root}) and building is turned off "
                    f"({NO_BUILD_ENV}, build=False, or --no-build on the command line); make it beforehand with "
                    f"`cellsam-trt {'export' if kind == 'onnx' else 'build-engines'}` without --out "
                    f"(with {CACHE_ENV} pointing at this cache), or pass onnx_dir= / engine_dir="
                )
            if before_making is not None:
                before_making()
            return self._make(kind, key, folder, material, argv_for, what, check)
        finally:
            lock.release()

    def _validate(self, folder: Path, material: dict[str, Any], check) -> str | None:
        """None when ``folder`` is a complete entry for ``material``, else why not."""
        if not folder.is_dir():
            return "missing"
        try:
            recorded = json.loads((folder / ENTRY_NAME).read_text())
        except (OSError, ValueError) as err:
            return f"no readable {ENTRY_NAME} ({err})"
        if recorded.get("made_from") != material:
            return f"{ENTRY_NAME} records other inputs than its key"
        try:
            check(folder, material)
        except BackendError as err:
            return str(err)
        return None

    def _remove_stale(self, folder: Path) -> None:
        # Temporary folders of this key left by killed builds (we hold the key's lock).
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
            log.info("removing the unfinished build %s of a killed process", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _make(self, kind: str, key: str, folder: Path, material: dict[str, Any], argv_for, what: str, check) -> Path:
        staging = folder.parent / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir(parents=True)
        try:
            self._say(f"making the {what} (first use; it will be cached in {folder})")
            t0 = time.perf_counter()
            self._run_child(argv_for(staging), what)
            seconds = time.perf_counter() - t0
            try:
                check(staging, material)
            except BackendError as err:
                raise CacheError(f"the {what} was made but fails its checks: {err}") from None
            import datetime

            from ..io import write_public

            entry = {"made_from": material, "kind": kind,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "build_seconds": round(seconds, 1)}
            write_public(staging / ENTRY_NAME, (json.dumps(entry, indent=2) + "\n").encode())
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._say(f"{what} made in {seconds:.0f} s: {folder_size(folder) / 2**20:.0f} MiB in {folder}")
        return folder

    def _say(self, message: str) -> None:
        # A first-use export takes a minute: say so even where logging is not configured.
        log.info(message)
        if self.progress:
            print(f"cellsam-trt: {message}", file=sys.stderr, flush=True)

    def _run_child(self, argv: Sequence[str], what: str) -> None:
        """Run the export / build child; CacheError with its last output when it fails.

        The child's stderr (its progress bar, warnings, error line) is passed through to
        ours as it comes (when ``progress``) and its end kept for the error message.
        """
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env[PROGRESS_ENV] = "1" if self.progress else "0"
        log.info("running %s", " ".join(argv))
        proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        tail = b""
        assert proc.stderr is not None
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break
            tail = (tail + chunk)[-4000:]
            if self.progress:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
        proc.stderr.close()
        code = proc.wait()
        if code == 0:
            return
        lines = [line for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
        if code in (-9, 137):
            cause = "it was killed, most likely for lack of memory (a ViT-B export needs about 8 GB of RAM)"
        else:
            cause = f"it exited with status {code}"
        last = "; ".join(lines[-3:]) or "no output"
        raise CacheError(f"the {what} failed: {cause} ({last}). Command: {' '.join(argv)}")

    # -- listing ------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every complete entry (those with a ``cache-entry.json``), oldest first."""
        out = []
        for kind in KINDS:
            base = self.root / kind
            if not base.is_dir():
                continue
            for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
                try:
                    recorded = json.loads((folder / ENTRY_NAME).read_text())
                except (OSError, ValueError):
                    recorded = {}
                out.append(CacheEntry(kind, folder.name, folder, folder_size(folder), recorded.get("made_from", {}),
                                      recorded.get("created"), recorded.get("build_seconds")))
        return sorted(out, key=lambda e: e.created or "")

    def clear(self, kinds: Sequence[str] = KINDS) -> int:
        """Remove the entries of ``kinds`` (and unfinished builds); returns the bytes freed.

        An entry another process is making right now (its lock is held) is left alone.
        """
        from filelock import FileLock, Timeout

        freed = 0
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"kinds: expected names from {KINDS}, got {kind!r}")
            base = self.root / kind
            if not base.is_dir():
                continue
            for folder in base.iterdir():
                key = folder.name.lstrip(".").split(".")[0]
                lock = FileLock(str(self.root / "locks" / f"{key}.lock"))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    log.warning("cache: %s is being made by another process; left alone", folder)
                    continue
                try:
                    freed += folder_size(folder) if folder.is_dir() else folder.stat().st_size
                    shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
                finally:
                    lock.release()
        memo = self.root / HASHES_NAME
        if memo.exists() and set(kinds) == set(KINDS):
            memo.unlink()
        return freed
