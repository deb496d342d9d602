"""The released CellSAM package's entry points, served by cellsam-trt.

A script written against the released package moves by changing its import line::

    from cellSAM import cellsam_pipeline, get_model, segment_cellular_image   # before
    from cellsam_trt.compat import cellsam_pipeline, get_model, segment_cellular_image   # after

(``format_image_shape`` and ``normalize_image``, which the released tutorial imports from
``cellSAM.utils``, are here too.) The functions take the released argument names and
defaults and return the released structures; the work runs through ``CellSAM`` sessions, so
labels equal what ``CellSAM.segment`` gives for the same image and boxes.

Deliberate differences, where the released code crashes or is clearly wrong:

* No cells: ``segment_cellular_image`` returns an (H, W) int32 zero mask; the released one
  returns a (3, H, W) array (it takes the shape of its internal channels-first tensor).
* ``segment_cellular_image(img)`` without a model loads ``get_model()``; the released
  function requires ``model`` although its README calls it without one.
* ``cellsam_pipeline``'s min-max step works on the channel axis found as for the model input
  (the smallest axis); the released loop indexes the last axis 0..2, which for a 2-D image
  rescales three pixel columns and for fewer than three channels fails.
* ``low_contrast_enhancement``: the released code raises ``NameError`` in the branches that
  pick stronger CLAHE settings (they assign a bounding-box threshold to an undefined
  ``model``); here those settings are applied and the threshold assignment is dropped (the
  released pipeline would have overwritten it with ``bbox_threshold`` anyway).
* ``cellsam_pipeline(use_wsi=False)`` honours ``bbox_threshold``; the released one does
  not pass it on and always uses 0.4.
* ``model.predict`` with several images raises; the released method returns after the
  first image and ignores the rest.
* With ``normalize=False`` the image must lie in [0, 1] (the released code accepts any
  range and feeds it to the model unchecked).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .api import CellSAM
from .engine import postprocess as post
from .engine import preprocess as pre
from .engine.core import NoCellsWarning, Timer
from .engine.options import SegmentOptions
from .modeling import checkpoint as ckpt
from .modeling.config import InferenceConfig

log = logging.getLogger(__name__)

# Backend for get_model / get_local_model when none is named: engines or an ONNX export
# when available, PyTorch otherwise (see cellsam_trt.runtime.create_backend).
DEFAULT_BACKEND = "auto"
# cellsam_pipeline(gauge_cell_size=True): a median cell area below this fraction of the
# image counts as small cells, which the tiled result serves (the released value).
SMALL_CELL_FRACTION = 0.002


class CompatCellSAM(CellSAM):
    """A ``CellSAM`` session that also answers what scripts ask of the released model object.

    ``eval()``, ``to(device)``, the ``bbox_threshold`` attribute and ``predict(...)``
    behave as on the released ``nn.Module``; everything else is the session's (``segment``,
    ``segment_batch``, ``cellsam_trt.large.tiling.segment_large``).
    """

    @property
    def bbox_threshold(self) -> float:
        """CellFinder confidence weight used by ``predict`` (and ``segment`` by default)."""
        return self.inference.bbox_threshold

    @bbox_threshold.setter
    def bbox_threshold(self, value: float) -> None:
        self.inference = replace(self.inference, bbox_threshold=SegmentOptions(bbox_threshold=value).bbox_threshold)

    def eval(self) -> CompatCellSAM:
        """No-op (inference only); returns the session, as ``nn.Module.eval`` returns the module."""
        return self

    def to(self, device: str | torch.device) -> CompatCellSAM:
        """Return the session if it already runs on ``device``.

        A session cannot move between devices (ONNX Runtime and TensorRT sessions are tied
        to theirs); load it where it should run with ``get_model(device=...)``.
        """
        wanted = torch.device(device)
        have = torch.device(self.backend.device)
        if wanted.type != have.type or (wanted.index is not None and wanted.index != have.index):
            raise ValueError(
                f"device: this session runs on {have}; load it on {wanted} instead with "
                f"get_model(device={str(wanted)!r}) or get_local_model(path, device={str(wanted)!r})"
            )
        return self

    def predict(self, images: Any, coords_per_heatmap: Any = None, boxes_per_heatmap: Any = None) -> tuple:
        """The released model's ``predict`` on ONE already normalised image.

        Args:
            images: (1, 3, H, W) numpy array or tensor with values in [0, 1] (e.g. the
                tutorial's ``normalize_image`` output, transposed and batched).
            coords_per_heatmap: ignored (the released method ignores it too).
            boxes_per_heatmap: None (CellFinder finds the cells) or a one-element list
                holding the image's (N, 4) boxes x1, y1, x2, y2 in image pixels.

        Returns:
            ``(labels, masks, embedding, boxes)``: labels (H, W) int64, mask k painted with
            k+1 (higher wins), before hole filling and size filtering; masks (K, H, W)
            uint8, one binary mask per kept box; embedding (1, C, 64, 64) float32 tensor on
            the session's device; boxes (K, 4) float32 in image pixels. ``(None,) * 4``
            when no mask passes the IoU filter.
        """
        batch = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"images: expected shape (1, 3, H, W), got {batch.shape}")
        if batch.shape[0] != 1:
            raise ValueError(
                f"images: predict segments one image, got {batch.shape[0]}; call it per image or use "
                "segment_batch for several"
            )
        user_boxes = None
        if boxes_per_heatmap is not None:
            if len(boxes_per_heatmap) != 1:
                raise ValueError("boxes_per_heatmap: expected a one-element list with the image's (N, 4) boxes")
            user_boxes = np.asarray(boxes_per_heatmap[0], dtype=np.float64)
        opts = self.thresholds(SegmentOptions())
        item = self.core.prepare(np.moveaxis(batch[0], 0, -1), user_boxes, None, -1)
        timer = Timer(self.backend)
        with self._device_lock:
            self.core.embed([item], [timer])
            decoded = self.core.decode(item, opts, timer, False)
            if len(decoded.kept) == 0:
                return None, None, None, None
            kept_boxes = decoded.boxes_model[torch.from_numpy(decoded.kept).to(decoded.boxes_model.device)]
            masks = self._binary_masks(item.embedding, kept_boxes, (item.height, item.width), opts)
        labels = decoded.painter.result().cpu().numpy().astype(np.int64)
        boxes = self.core.image_boxes(item, decoded.boxes_model, decoded.kept)
        return labels, masks, item.embedding, boxes.astype(np.float32)

    def _binary_masks(self, embedding, boxes_model, out_shape: tuple[int, int], opts: InferenceConfig) -> np.ndarray:
        """(K, H, W) uint8: each box's mask alone. The painted label image keeps only the top
        mask per pixel, so the kept boxes are decoded once more and painted one by one."""
        backend = self.backend
        out = np.zeros((len(boxes_model), *out_shape), dtype=np.uint8)
        for start in range(0, len(boxes_model), opts.chunk_size):
            logits, _ = backend.decoder(embedding, boxes_model[start:start + opts.chunk_size],
                                        last_call=start + opts.chunk_size >= len(boxes_model))
            for offset in range(len(logits)):
                painter = post.MaskPainter(
                    out_shape, low_res=backend.config.sam.low_res_size, model_size=backend.config.image_size,
                    mask_threshold=opts.mask_threshold, device=backend.device,
                )
                painter.paint(logits[offset:offset + 1, 0], 1)
                out[start + offset] = painter.result().cpu().numpy()
        return out


def get_local_model(model_path: Any, *, backend: str | None = None, device: str | torch.device | None = None,
                    **backend_options: Any) -> CompatCellSAM:
    """Load a released-format weights file as a session usable as ``model=``.

    Args:
        model_path: the ``.pt`` file, unchanged from the release.
        backend: cellsam-trt backend (default ``DEFAULT_BACKEND``, "auto"); "torch",
            "onnxruntime" or "tensorrt" to choose one (see ``cellsam_trt.runtime``).
        device: where the session runs (default: CUDA when available; the released loader
            returns a CPU module that ``segment_cellular_image(device="cuda")`` moves).
        **backend_options: passed to the backend (``onnx_dir``, ``engine_dir``, ...).
    """
    return CompatCellSAM.from_checkpoint(
        model_path, backend=backend or DEFAULT_BACKEND, device=device, **backend_options,
    )


def get_model(model: str = "cellsam_general", version: str | None = None, *, backend: str | None = None,
              device: str | torch.device | None = None, **backend_options: Any) -> CompatCellSAM:
    """The released weights by name, downloaded to ``~/.deepcell/models`` when absent.

    Args:
        model: file stem in the version folder: "cellsam_general" (the publication's
            training data) or "cellsam_extra" (more data, for domains beyond the paper's).
        version: weights release, default the latest ("1.2").
        backend, device, backend_options: as ``get_local_model``.

    The download needs ``DEEPCELL_ACCESS_TOKEN`` (``cellsam-trt download`` explains).
    """
    version = ckpt.MODEL_VERSION if version is None else version
    if version not in ckpt.MODEL_ASSETS:
        raise ValueError(f"version: model version {version!r} is not known; expected one of {sorted(ckpt.MODEL_ASSETS)}")
    folder = ckpt.ASSET_DIR / f"cellsam_v{version}"
    if not folder.exists():
        # as released: a missing version folder means the archive was never fetched
        ckpt.download_weights(version, dest=ckpt.ASSET_DIR)
    return get_local_model(folder / f"{model}.pt", backend=backend, device=device, **backend_options)


def format_image_shape(img: Any) -> np.ndarray:
    """(H, W) or (H, W, C) / (C, H, W), C <= 3 -> (H, W, 3) float64, channels in the last slots."""
    return pre.format_image(_as_array(img))


def normalize_image(image: Any) -> np.ndarray:
    """Format as ``format_image_shape``, then the model's normalisation (per channel: clip at
    the 99.9th percentile of non-zero values, rescale, CLAHE) -> (H, W, 3) float64 in [0, 1]."""
    return pre.normalize_image(format_image_shape(image))


def _as_array(img: Any) -> Any:
    """numpy and torch inputs as they are; other array-likes (dask, zarr) read into numpy."""
    if isinstance(img, (np.ndarray, torch.Tensor, list, tuple)):
        return img
    if hasattr(img, "__array__"):
        return np.asarray(img)
    return img


def _session(model: Any) -> CellSAM:
    from .modeling import CellSAMNetwork

    if model is None:
        return get_model()
    if isinstance(model, CellSAM):
        return model
    if isinstance(model, CellSAMNetwork):
        return CompatCellSAM.from_network(model)
    raise TypeError(
        f"model: expected a session from cellsam_trt.compat.get_model / get_local_model, got "
        f"{type(model).__name__} (a released cellSAM module cannot run here; load its weights file "
        "with get_local_model(path))"
    )


def _check_device(device: Any, session: CellSAM | None = None) -> None:
    """The released meaning: "cuda" asks for the GPU (an error without one); "cpu" moves nothing.
    With a session, also warn when "cuda" is asked of a session loaded elsewhere."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if "cuda" in str(device):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' was requested but torch sees no CUDA GPU; pass device='cpu'")
        if session is not None and torch.device(session.backend.device).type != "cuda":
            warnings.warn(
                f"device='cuda': the session was loaded on {session.backend.device} and runs there; "
                "load it with get_model(device='cuda') to use the GPU", stacklevel=3,
            )


def segment_cellular_image(
    img: Any,
    model: Any = None,
    normalize: bool = True,
    postprocess: bool = False,
    remove_boundaries: bool = False,
    bounding_boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    bbox_threshold: float = 0.4,
    fast: bool = False,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Segment one image with the released signature and return structure.

    Args:
        img: (H, W) or (H, W, C) / (C, H, W) with C <= 3 (channels: blank, nuclear,
            whole-cell, filled from the last slot); numpy, torch or any array-like.
        model: a session from ``get_model`` / ``get_local_model`` (any ``CellSAM`` or
            in-memory ``CellSAMNetwork`` works). None loads ``get_model()``.
        normalize: percentile clip + CLAHE first; with False the image must lie in [0, 1].
        postprocess: the released morphological clean-up of each mask.
        remove_boundaries: zero a one-pixel outline around each cell.
        bounding_boxes: (N, 4) x1, y1, x2, y2 in image pixels; skips CellFinder.
        bbox_threshold: CellFinder confidence weight.
        fast: ignored. The released flag selects a batched decoder (and its own code never
            reads it); cellsam-trt always decodes boxes in batches with unchanged results.
        device: "cpu" or "cuda" as released: "cuda" without a GPU is an error. The session
            runs on the device it was loaded on (``get_model`` picks CUDA when available).

    Returns:
        ``(mask, embedding, boxes)``: mask (H, W) int64, 0 background, cells 1..K;
        embedding (1, C, 64, 64) float32 numpy (C = 256 for the released model); boxes
        (K, 4) float32 x1, y1, x2, y2 in image pixels, one per mask that passed the IoU
        filter, in label order before clean-up (the released dtype varies with the box
        source and NumPy version). When no mask passes, ``(zeros (H, W) int32, None, None)``
        with a ``NoCellsWarning``.
    """
    _check_device(device)
    session = _session(model)
    _check_device(device, session)
    if not isinstance(fast, (bool, np.bool_)):
        raise ValueError(f"fast: expected True or False, got {fast!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize: expected True or False, got {normalize!r}")
    with warnings.catch_warnings():
        # the released function warns only when no mask survives the IoU filter (below)
        warnings.simplefilter("ignore", NoCellsWarning)
        labels, details = session.segment(
            _as_array(img), boxes=bounding_boxes, bbox_threshold=bbox_threshold, normalize=bool(normalize),
            postprocess=postprocess, remove_boundaries=remove_boundaries, return_details=True,
            tile_size=None,  # the released function resizes any image into one model input
        )
    if len(details.boxes) == 0:
        warnings.warn("No cells detected in the image.", NoCellsWarning, stacklevel=2)
        return np.zeros(labels.shape, dtype=np.int32), None, None
    return labels.astype(np.int64), details.embedding, details.boxes.astype(np.float32)


def min_max_channels(image: np.ndarray) -> np.ndarray:
    """Per channel of an (H, W, 3) image: rescale to [0, 1] as float32; constant channels -> 0.

    The released pipeline leaves a constant channel's value unchanged; its normalisation
    later maps such a channel to 0 anyway, and the ``normalize=False`` paths need [0, 1].
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for chan in range(image.shape[-1]):
        plane = image[..., chan].astype(np.float32)
        low, high = plane.min(), plane.max()
        if high > low:
            out[..., chan] = (plane - low) / (high - low)
    return out


def contrast_change(image: np.ndarray) -> tuple[float, float] | None:
    """Median and standard deviation of the non-zero absolute changes that CLAHE (kernel
    256) makes to the (H, W, 3) image; None when it changes nothing."""
    from skimage.exposure import equalize_adapthist

    change = np.abs(image - equalize_adapthist(image, kernel_size=256))
    change = change[change > 0]
    if change.size == 0:
        return None
    return float(np.median(change)), float(np.std(change))


def low_contrast_settings(median: float, spread: float) -> tuple[float, int, float] | None:
    """(CLAHE clip limit, CLAHE kernel size, gamma) for the released low-contrast step, or
    None when the image does not count as low contrast.

    ``median`` and ``spread`` come from ``contrast_change``. A median change between 0.05
    and 0.1 means low contrast. Then CLAHE 0.01 / 256 px / gamma 2 by default; when the
    spread is below 0.05, 0.02 / 384 px / gamma 1.2, with clip 0.05 if also median > 0.065;
    clip 0.01 when median > 0.065 and 0.035 < spread < 0.04. (The released extra rule for
    a median below 0.05, a blank nuclear channel, can never fire: low contrast already
    needs a median above 0.05.)
    """
    if not 0.05 < median < 0.1:
        return None
    clip, kernel, gamma = 0.01, 256, 2.0
    if spread < 0.05:
        clip, kernel, gamma = 0.02, 384, 1.2
        if median > 0.065:
            clip = 0.05
    if median > 0.065 and 0.035 < spread < 0.04:
        clip = 0.01
    return clip, kernel, gamma


def enhance_low_contrast(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> the same image, or a CLAHE + gamma enhanced float64 copy when
    the released low-contrast heuristic (``low_contrast_settings``) says so."""
    from skimage.exposure import adjust_gamma, equalize_adapthist

    change = contrast_change(image)
    settings = None if change is None else low_contrast_settings(*change)
    log.info("low-contrast check: median change, spread %s -> CLAHE clip, kernel, gamma %s", change, settings)
    if settings is None:
        return image
    clip, kernel, gamma = settings
    return adjust_gamma(equalize_adapthist(image, kernel_size=kernel, clip_limit=clip), gamma=gamma)


def median_cell_fraction(labels: np.ndarray) -> float:
    """Median cell area as a fraction of the image area; NaN without cells."""
    areas = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return float(np.median(areas) / labels.size) if areas.size else float("nan")


def cellsam_pipeline(
    img: Any,
    chunks: int = 256,
    model_path: Any = None,
    bbox_threshold: float = 0.4,
    low_contrast_enhancement: bool = False,
    swap_channels: bool = False,
    use_wsi: bool = True,
    gauge_cell_size: bool = False,
    block_size: int = 400,
    overlap: int = 56,
    iou_depth: int = 56,
    iou_threshold: float = 0.5,
    *,
    model: CellSAM | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """Segment an image of any size with the released pipeline's signature.

    Steps: per-channel min-max to [0, 1] (float32), optionally the released low-contrast
    enhancement, then either the whole image through ``segment_cellular_image``
    (``use_wsi=False``) or tiles through ``cellsam_trt.large.tiling.segment_large``.

    Tiling: the released code cuts ``block_size`` blocks, widens each by ``overlap`` on every
    side (neighbours share 2 x overlap pixels; image edges are padded periodically, i.e. with
    pixels of the opposite edge), normalises and segments each tile on its own and merges
    labels whose IoU in the shared strip reaches ``iou_threshold`` (dask-image label graph).
    Here the same tiles (side ``block_size + 2 * overlap``, neighbours sharing
    ``2 * overlap``) are cut, but: the whole image is normalised once (tiles agree on
    contrast in their overlap); edges are not wrapped (a cell at the left edge never sees the
    right edge); and each cell is taken whole from the one tile where it lies most central
    instead of merging partial views, so no threshold can chain neighbouring cells into one
    label and stitching needs no global label graph. Cells wider than about 2 x overlap
    may be cut (logged). Label ids can therefore differ from the released ones even where
    the cells agree.

    Args:
        img: (H, W) or (H, W, C) / (C, H, W), C <= 3 (blank, nuclear, whole-cell).
        chunks: ignored (the released code rechunks to ``block_size`` before use).
        model_path: weights file; None loads ``get_model()``.
        bbox_threshold: CellFinder confidence weight (honoured in both paths).
        low_contrast_enhancement: apply the released low-contrast CLAHE + gamma step.
        swap_channels: ignored (the released code accepts it and never reads it).
        use_wsi: tile the image (see above); False segments it in one pass.
        gauge_cell_size: with ``use_wsi``, first a tiled pass without normalisation; if the
            median cell covers under 0.2 % of the image its labels are returned, else the
            image is segmented whole without normalisation (as released).
        block_size: tile core side; tiles are ``block_size + 2 * overlap`` pixels.
        overlap: margin added on each side of a block.
        iou_depth, iou_threshold: ignored: parameters of the released IoU merge, which
            cellsam-trt's stitching does not use.
        model: a session to reuse (cellsam-trt extension; the released function loads the
            weights on every call). Not together with ``model_path``.
        backend: backend for loading (cellsam-trt extension; default "auto").

    Returns:
        labels (H, W): 0 background, cells 1..K; int64 when segmented whole, int32 when
        tiled (uint32 above 65535 cells).
    """
    from .engine.options import check_tiling
    from .large.tiling import segment_large

    del chunks, swap_channels, iou_depth, iou_threshold  # accepted for compatibility, unused (docstring)
    for name, value in (("block_size", block_size), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive integer, got {block_size!r}")
    tile_size, tile_overlap = int(block_size) + 2 * int(overlap), 2 * int(overlap)
    check_tiling(tile_size, tile_overlap)
    if model is not None and model_path is not None:
        raise ValueError("pass either model= or model_path=, not both")
    if model is None:
        model = get_local_model(model_path, backend=backend) if model_path is not None else get_model(backend=backend)
    session = _session(model)

    image = min_max_channels(pre.format_image(_as_array(img)))
    if low_contrast_enhancement:
        image = enhance_low_contrast(image)
    tiles = dict(tile_size=tile_size, overlap=tile_overlap, bbox_threshold=bbox_threshold, channel_axis=-1)
    if not use_wsi:
        return segment_cellular_image(image, session, normalize=True, bbox_threshold=bbox_threshold,
                                      device=str(session.backend.device))[0]
    if not gauge_cell_size:
        return segment_large(session, image, normalize=True, **tiles)
    labels = segment_large(session, image, normalize=False, **tiles)
    fraction = median_cell_fraction(labels)
    log.info("median cell size: %.4f of the image", fraction)
    if fraction < SMALL_CELL_FRACTION:
        # the released code segments the same tiles again here, with the same result
        return labels
    return segment_cellular_image(image, session, normalize=False, bbox_threshold=bbox_threshold,
                                  device=str(session.backend.device))[0]
