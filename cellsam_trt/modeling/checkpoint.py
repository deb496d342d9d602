"""Load the released CellSAM checkpoint format; write random weights in that layout.

The released file is a ``torch.save``-d dict of tensors (sometimes wrapped in
``{"state_dict": ...}``) with keys ``model.*`` (SAM), optionally ``model_cp.*`` (a second
SAM that then supplies the embedding, prompt encoder and mask decoder) and
``cellfinder.decode_head.*``. Loading never unpickles code: ``weights_only=True``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..progress import progress_bar
from . import CellSAMNetwork
from .config import ModelConfig

log = logging.getLogger(__name__)

MODEL_VERSION = "1.2"
DEFAULT_MODEL = "cellsam_general"
ASSET_DIR = Path.home() / ".deepcell" / "models"
DEFAULT_CHECKPOINT = ASSET_DIR / f"cellsam_v{MODEL_VERSION}" / f"{DEFAULT_MODEL}.pt"
# Where the released code downloads its weights from (a token is needed).
DEEPCELL_API = "https://users.deepcell.org/api/getData/"
MODEL_ASSETS = {"1.2": ("models/cellsam-models_v1.2.tar.gz", "f41e6899c49fc8ce12f77a8d25594604")}


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not match the CellSAM layout."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else the released default location; raises if missing."""
    candidate = Path(path).expanduser() if path is not None else DEFAULT_CHECKPOINT
    if not candidate.is_file():
        hint = (
            "" if path is not None else
            " Download the released weights with `cellsam-trt download` (needs DEEPCELL_ACCESS_TOKEN from "
            "users.deepcell.org) or pass checkpoint=PATH."
        )
        raise CheckpointError(f"checkpoint: no file at {candidate}.{hint}")
    return candidate


def locate_checkpoint(path: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """``find_checkpoint``, after fetching the released weights when ``path`` is None, they
    are absent and ``download`` is set."""
    if path is None and download and not DEFAULT_CHECKPOINT.is_file():
        download_weights()
    return find_checkpoint(path)


def read_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{key: tensor}`` dict, safely.

    Args:
        mmap: map the tensors from the file instead of reading them (torch's zip format;
            for checking a file's layout without holding its weights in memory).

    Raises:
        CheckpointError: empty, truncated or unreadable file, not a torch checkpoint, a
            pickle that would run code, or no tensor dict; the message says which.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes); copy or download it again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        detail = _unpickler_reason(str(err))
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"checkpoint {path}: refused to load; unpickling it would run code ({detail}). "
                "Only plain weight files (dicts of tensors) are accepted."
            ) from None
        raise CheckpointError(f"checkpoint {path}: cannot be read as a torch checkpoint: {_unreadable(path, detail)}"
                              ) from None
    except Exception as err:  # torch's unpickler fails in many ways on bytes that are not a checkpoint
        raise CheckpointError(f"checkpoint {path}: cannot be read as a torch checkpoint: {_unreadable(path, err)}"
                              ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and not any(str(k).startswith("model.") for k in obj):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: entries that are not named tensors: {bad[:10]}")
    return dict(obj)


def _unreadable(path: Path, err: Exception | str) -> str:
    """Why torch could not read ``path``, from the file's first bytes: torch.save writes a zip
    archive (older versions a pickle, whose first byte is 0x80)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (f"the file is truncated or damaged ({size} bytes of a zip archive, as torch.save writes, "
                    "without its end); copy or download it again")
        return f"a damaged archive ({_describe(err)})"
    if head[:1] == b"\x80":
        return (f"a pickle that torch cannot read as weights ({_describe(err)}): truncated or damaged, or not a "
                "torch checkpoint; copy or download it again")
    return (f"it starts with {head!r}, not with the zip archive that torch.save writes; pass the .pt "
            "weights file of CellSAM")


def _describe(err: Exception | str) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return first if isinstance(err, str) else f"{type(err).__name__}: {first}"


def _unpickler_reason(message: str) -> str:
    """The specific reason inside torch's long weights-only error message."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported operand" in ln or "Unsupported class" in ln:
            return ln
    return lines[-1] if lines else message


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The built-in config whose layout the weights match (released ViT-B or tiny), else the
    one they come closest to (fewest missing, unexpected and mis-shaped keys), so that a
    damaged file is reported against the layout its own keys imply."""
    configs = (ModelConfig.cellsam(), ModelConfig.tiny())
    mismatches = [sum(len(keys) for keys in _mismatch(state_dict, config)) for config in configs]
    return configs[mismatches.index(min(mismatches))]


@functools.lru_cache(maxsize=4)
def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of ``config``'s layout with its shape (the empty network is built once per config)."""
    return {k: tuple(v.shape) for k, v in _empty_network(config).state_dict().items()}


def _mismatch(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``state_dict`` against ``config``'s layout."""
    expected = _expected_shapes(config)
    given = dict(state_dict)
    if not any(k.startswith("model_cp.") for k in given):
        expected = {k: s for k, s in expected.items() if not k.startswith("model_cp.")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(given[k].shape) != expected[k])
    return missing, unexpected, shapes


def layout_problems(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> list[str]:
    """Human-readable list of missing, unexpected and mis-shaped keys against ``config``."""
    expected = _expected_shapes(config)
    given = dict(state_dict)
    missing, unexpected, shapes = _mismatch(state_dict, config)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:12]) + (" ..." if len(unexpected) > 12 else "")
        )
    if shapes:
        problems.append(
            f"{len(shapes)} with another shape: "
            + ", ".join(f"{k} {tuple(given[k].shape)} != {expected[k]}" for k in shapes[:12])
        )
    return problems


def check_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None) -> ModelConfig:
    """Check that ``path`` is a readable checkpoint in the CellSAM layout without loading it
    into a network (tensors memory-mapped where the format allows); returns its config.

    Raises:
        CheckpointError: as ``load_checkpoint``.
    """
    path = Path(path)
    state_dict = read_state_dict(path, mmap=True)
    config = config or infer_config(state_dict)
    _raise_layout_problems(path, state_dict, config)
    return config


def _raise_layout_problems(path: Path, state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    problems = layout_problems(state_dict, config)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match the CellSAM layout ({config.name}):\n  " + "\n  ".join(problems)
        )


def _empty_network(config: ModelConfig) -> CellSAMNetwork:
    # Building on the meta device costs no memory or init time; used for key/shape listings.
    with torch.device("meta"):
        return CellSAMNetwork(config)


def load_checkpoint(
    path: str | os.PathLike | None = None, *, config: ModelConfig | None = None, download: bool = False,
) -> CellSAMNetwork:
    """Load released-format CellSAM weights into a ``CellSAMNetwork`` (CPU, eval mode).

    Args:
        path: checkpoint file; None looks in ``~/.deepcell/models/cellsam_v1.2/``.
        config: architecture; None picks the built-in one matching the weights.
        download: fetch the released weights first when ``path`` is None and they are absent.

    Raises:
        CheckpointError: missing file, unsafe or unreadable file, or a layout mismatch
            (the message lists the missing, unexpected and mis-shaped keys).
    """
    path = locate_checkpoint(path, download=download)
    state_dict = read_state_dict(path)
    config = config or infer_config(state_dict)
    _raise_layout_problems(path, state_dict, config)
    has_model_cp = any(k.startswith("model_cp.") for k in state_dict)
    if not has_model_cp:
        # The released loader then copies model.* into model_cp and runs the plain path.
        state_dict.update({"model_cp." + k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")})
    network = CellSAMNetwork(config)
    network.load_state_dict(state_dict, strict=True)
    network.uses_model_cp = has_model_cp
    network.checkpoint_path = str(path)
    return network.eval()


def random_network(config: ModelConfig | None = None, seed: int = 0) -> CellSAMNetwork:
    """A network with seeded random weights (module default initialisation)."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        network = CellSAMNetwork(config or ModelConfig.cellsam())
    finally:
        torch.random.set_rng_state(generator_state)
    return network.eval()


def write_checkpoint(network: CellSAMNetwork, path: str | os.PathLike) -> Path:
    """Save ``network`` in the released layout (plain dict: model.*, model_cp.*, cellfinder.*)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(network.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def write_random_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None, seed: int = 0) -> Path:
    """Write seeded random weights in exactly the official checkpoint layout."""
    return write_checkpoint(random_network(config, seed), path)


def download_weights(version: str = MODEL_VERSION, token: str | None = None, dest: Path = ASSET_DIR) -> Path:
    """Download and unpack the released CellSAM weights (the released code's source).

    Needs ``DEEPCELL_ACCESS_TOKEN`` (create one at users.deepcell.org). The archive's md5
    is checked against the released value before it is unpacked.
    """
    if version not in MODEL_ASSETS:
        raise ValueError(f"version: unknown model version {version!r}; known: {sorted(MODEL_ASSETS)}")
    token = token or os.environ.get("DEEPCELL_ACCESS_TOKEN")
    if not token:
        raise CheckpointError(
            "downloading the released weights needs an access token: create one at "
            "https://users.deepcell.org and export DEEPCELL_ACCESS_TOKEN=<token>"
        )
    asset_key, md5 = MODEL_ASSETS[version]
    body = urllib.parse.urlencode({"s3_key": asset_key}).encode()
    request = urllib.request.Request(DEEPCELL_API, data=body, headers={"X-Api-Key": token})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            url = json.loads(resp.read())["url"]
    except urllib.error.HTTPError as err:
        raise CheckpointError(f"users.deepcell.org refused the download ({err.code}: {err.reason}); check the token") from None
    except (urllib.error.URLError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot reach users.deepcell.org for the weights ({err})") from None
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / asset_key.rsplit("/", 1)[-1]
    _download(url, archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != md5:
        archive.unlink()
        raise CheckpointError(f"downloaded archive has md5 {digest}, expected {md5}; removed it, try again")
    _safe_extract(archive, dest)
    return dest / f"cellsam_v{version}"


def _safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar archive refusing members that would land outside ``dest`` or be links."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        # Python < 3.10.12 / 3.11.4 has no extraction filters: check the members ourselves
        root = dest.resolve()
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise CheckpointError(f"{archive}: refusing archive member {member.name!r} (link or outside {dest})")
        tar.extractall(dest)


def _download(url: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with progress_bar(total, target.name, "B", unit_scale=True) as bar:
            for block in iter(lambda: resp.read(1 << 20), b""):
                tmp.write(block)
                bar.update(len(block))
    os.replace(tmp.name, target)
