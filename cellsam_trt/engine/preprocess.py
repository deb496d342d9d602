"""Image formatting and the two model inputs, exactly as the released CellSAM code makes them.

Data flow (H, W are the user's image size, S = 1024 the model input side):

    image (H,W) | (H,W,C<=3), any real dtype
      -> format_image      (H,W,3) float64, the C channels in the LAST C slots
      -> normalize_image   per channel: clip at the 99.9th percentile of non-zero values,
                           rescale to [0,1], CLAHE (kernel 128); constant channels -> 0
                           (CLAHE by scikit-image as released, or optionally by OpenCV)
      -> to_tensor         (1,3,H,W) float32
      -> embedding_input   (1,3,S,S) float32, what SAM's image encoder sees
      -> cellfinder_input  (1,3,S,S) float32, what CellFinder sees

Both inputs squash the image to SxS (aspect ratio not kept).  Every step uses the same
library call (numpy, scikit-image, torchvision) as the released code so that results are
bit-identical on the CPU; the one exception is the opt-in ``normalize="opencv"``.
"""
from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from skimage.exposure import equalize_adapthist, rescale_intensity
from skimage.exposure._adapthist import NR_OF_GRAY, _clahe
from skimage.util import img_as_uint
from torch import Tensor

from ..modeling.sam import PIXEL_MEAN, PIXEL_STD

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHANNEL_NAMES = ("blank", "nuclear", "whole-cell")

# the released call: equalize_adapthist(plane, kernel_size=128) with its default clip limit and bins
CLAHE_KERNEL = 128
CLAHE_CLIP_LIMIT = 0.01
CLAHE_NBINS = 256
# "torch": scikit-image's algorithm ported to torch, on the model's device (device_preprocess)
CLAHE_METHODS = ("skimage", "opencv", "torch")


def format_image(image: Any, channel_axis: int | None = None) -> np.ndarray:
    """Validate an image and place its channels as CellSAM expects (``checked_channels``,
    then ``place_channels``).

    Args:
        image: array-like (H, W) or (H, W, C) / (C, H, W) with C <= 3, any integer, bool or
            float dtype, finite values.
        channel_axis: axis holding the channels of a 3-D image. ``None`` follows the released
            code: the smallest axis (the first one on ties).

    Returns:
        (H, W, 3) float64. C channels fill the last C slots, in the order
        (blank, nuclear, whole-cell); a 2-D image becomes the whole-cell channel.

    Raises:
        ValueError: on anything else, naming the problem.
    """
    return place_channels(checked_channels(image, channel_axis))


def place_channels(channels: np.ndarray) -> np.ndarray:
    """(H, W, C) from ``checked_channels`` -> (H, W, 3) float64, the C channels in the last C slots."""
    h, w, c = channels.shape
    out = np.zeros((h, w, 3))
    out[:, :, 3 - c:] = channels
    return out


def checked_channels(image: Any, channel_axis: int | None = None) -> np.ndarray:
    """``format_image``'s checks, without the conversion: (H, W, C) with C <= 3 in the
    image's own dtype (the channel axis moved last, a view where it can be), so that the
    device path uploads the image as it is (a uint16 image is a quarter of its float64
    form). Arguments and errors as ``format_image``; a 2-D image gets a channel axis (C = 1).
    """
    if channel_axis is not None and (isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral)):
        raise ValueError(f"channel_axis: expected an integer axis (0, 1, 2 or negative) or None, got {channel_axis!r}")
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.double()  # numpy has no bfloat16 (nor torch's other small floats)
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        if isinstance(image, (list, tuple)):
            try:
                image = np.asarray(image)
            except ValueError as err:
                raise ValueError(f"image: a nested sequence that is not rectangular ({err})") from None
        else:
            raise ValueError(f"image: expected a numpy array (H, W) or (H, W, C), got {type(image).__name__}")
    if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise ValueError(f"image: expected a real numeric dtype, got {image.dtype}")
    if np.iscomplexobj(image):
        raise ValueError("image: complex values are not supported")
    if image.ndim not in (2, 3):
        raise ValueError(f"image: expected 2 dimensions (H, W) or 3 (H, W, C), got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image: is empty (shape {image.shape})")
    if image.ndim == 2:
        if channel_axis is not None:
            raise ValueError(f"channel_axis: given ({channel_axis}) but the image is 2-D {image.shape}, without channels")
        image = image[..., None]
    else:
        axis = int(np.argmin(image.shape)) if channel_axis is None else int(channel_axis)
        if not -3 <= axis <= 2:
            raise ValueError(f"channel_axis: must be 0, 1, 2 or negative, got {channel_axis}")
        image = np.moveaxis(image, axis, -1)
    h, w, c = image.shape
    if c > 3:
        raise ValueError(
            f"image: at most 3 channels (blank, nuclear, whole-cell) are supported, got {c} "
            f"(shape after moving the channel axis last: {image.shape})"
        )
    if h < 2 or w < 2:
        raise ValueError(f"image: needs at least 2x2 pixels, got {h}x{w}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image: contains NaN or infinite values")
        # normalisation subtracts the minimum: a range past float64's would overflow to inf
        low, high = float(image.min()), float(image.max())
        with np.errstate(over="ignore"):
            if not np.isfinite(high - low):
                raise ValueError(f"image: value range [{low:g}, {high:g}] is too wide to normalise in float64")
    return image


def _map_channels(fn, image: np.ndarray) -> list:
    """[fn(image[..., c]) for every channel c], the channels in threads.

    The channels are independent and numpy / scikit-image release the GIL in their array
    work, so this is the sequential result, sooner (CLAHE 1.8x for 2 channels on 2 cores).
    """
    planes = [image[..., chan] for chan in range(image.shape[-1])]
    if len(planes) < 2:
        return [fn(plane) for plane in planes]
    with ThreadPoolExecutor(max_workers=min(len(planes), os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, planes))


def percentile_clip(image: np.ndarray, percentile: float = 99.9) -> np.ndarray:
    """Per channel, clip values above the given percentile of its non-zero values.

    (H, W, 3) float -> (H, W, 3) same dtype; all-zero channels stay zero.
    """
    def clip(plane: np.ndarray) -> np.ndarray | None:
        nonzero = plane[plane != 0]  # the values of plane[np.nonzero(plane)], in the same order, 3-4x faster
        if len(nonzero) == 0:
            return None
        return np.minimum(plane, np.percentile(nonzero, percentile))

    out = np.zeros_like(image)
    for chan, plane in enumerate(_map_channels(clip, image)):
        if plane is not None:
            out[..., chan] = plane
    return out


def clahe_method(normalize: Any) -> str | None:
    """The CLAHE implementation a ``normalize`` argument asks for: None (no normalisation),
    "skimage" (True: the released behaviour; a session on CUDA runs it as "torch" once its
    start-up check passes, ``engine.core.GraphCore.normalization``), "opencv" or "torch".

    Raises:
        ValueError: for anything else.
    """
    if isinstance(normalize, (bool, np.bool_)):
        return "skimage" if normalize else None
    if isinstance(normalize, str) and normalize in CLAHE_METHODS:
        return normalize
    raise ValueError(f"normalize: expected True, False or one of {CLAHE_METHODS}, got {normalize!r}")


def quantize_for_clahe(plane: np.ndarray, in_range: Any = "image") -> np.ndarray:
    """scikit-image's CLAHE input step: [0, 1] float -> uint16 -> stretched to its 14-bit grey levels.

    Args:
        plane: (H, W) float in [0, 1].
        in_range: the uint16 range to stretch ("image": the plane's own min-max, as
            ``equalize_adapthist`` does; tiles pass the whole image's).

    Returns:
        (H, W) uint16 in [0, NR_OF_GRAY - 1].
    """
    scaled = rescale_intensity(img_as_uint(plane), in_range=in_range, out_range=(0, NR_OF_GRAY - 1))
    return np.round(scaled).astype(np.min_scalar_type(NR_OF_GRAY))


def equalize_levels(levels: np.ndarray, method: str = "skimage") -> np.ndarray:
    """CLAHE (kernel 128, clip 0.01, 256 bins) on ``quantize_for_clahe`` output, before the final min-max.

    "skimage" is scikit-image's own ``_clahe`` (what ``equalize_adapthist`` runs; its torch
    port, the same numbers, is ``device_preprocess.equalize_levels``). "opencv"
    runs ``cv2.createCLAHE`` on the same 8-bit histogram bins, tiles and clip level
    (in counts); the two differ in how clipped counts are redistributed and in OpenCV's
    8-bit output (the deviation is measured by ``cellsam-trt bench``).

    Returns:
        (H, W) uint16 (skimage, levels 0..16383) or uint8 (opencv, 0..255); the scale does
        not matter to callers, which min-max the result.
    """
    k = CLAHE_KERNEL
    if method == "skimage":
        return _clahe(levels, [k, k], CLAHE_CLIP_LIMIT, CLAHE_NBINS)
    if method != "opencv":
        raise ValueError(f"method: expected 'skimage' or 'opencv', got {method!r}")
    import cv2

    bins = (levels // (1 + NR_OF_GRAY // CLAHE_NBINS)).astype(np.uint8)  # scikit-image's bins, 0..252
    height, width = bins.shape
    # pad as scikit-image does, so the tiles (and their centres) are the same: a grid of
    # k x k tiles from the top-left corner, reflected past the bottom and right edges
    padded = np.pad(bins, [(0, -height % k), (0, -width % k)], mode="reflect")
    counts = max(int(CLAHE_CLIP_LIMIT * k * k), 1)
    # OpenCV's clip level is relative: int(limit * tile pixels / 256) counts per bin; the
    # half count keeps that truncation on `counts`
    limit = (counts + 0.5) * 256 / (k * k)
    equalizer = cv2.createCLAHE(clipLimit=limit, tileGridSize=(padded.shape[1] // k, padded.shape[0] // k))
    return equalizer.apply(padded)[:height, :width]


def clahe(image: np.ndarray, kernel_size: int = CLAHE_KERNEL, method: str = "skimage") -> np.ndarray:
    """Per channel: constant -> 0, else rescale to [0, 1] and CLAHE. In place, returned.

    Args:
        image: (H, W, 3) float64.
        kernel_size: CLAHE tile side (``method="skimage"`` only; the released 128 otherwise).
        method: "skimage" (``equalize_adapthist``, as released) or "opencv" (``equalize_levels``);
            "torch" is ``device_preprocess.clahe``.
    """
    if method not in ("skimage", "opencv"):
        raise ValueError(f"method: expected 'skimage' or 'opencv', got {method!r}")
    if method == "opencv" and kernel_size != CLAHE_KERNEL:
        raise ValueError(f"kernel_size: the opencv method uses {CLAHE_KERNEL}, got {kernel_size}")

    def equalize(plane: np.ndarray) -> np.ndarray | None:
        if (plane == plane[0, 0]).all():
            return None
        plane = rescale_intensity(plane, out_range=(0.0, 1.0))
        if method == "skimage":
            return equalize_adapthist(plane, kernel_size=kernel_size)
        return rescale_intensity(equalize_levels(quantize_for_clahe(plane), method).astype(np.float64))

    for chan, plane in enumerate(_map_channels(equalize, image)):
        image[:, :, chan] = 0 if plane is None else plane
    return image


def normalize_image(image: np.ndarray, clahe_method: str = "skimage") -> np.ndarray:
    """The released ``normalize=True`` step on a formatted (H, W, 3) image -> (H, W, 3) float64 in [0, 1].

    ``clahe_method="opencv"`` swaps in OpenCV's CLAHE (faster, not bit-identical).
    """
    return clahe(percentile_clip(image), method=clahe_method)


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) -> (1, 3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().unsqueeze(0)


def _resize(image: Tensor, size: int) -> Tensor:
    # torchvision v2 Resize on a plain tensor: bilinear, antialias on.
    return TF.resize(image, [size, size])


def _min_max(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel min-max to [0, 1] over H, W (kornia.enhance.normalize_min_max)."""
    flat = x.flatten(start_dim=-2)
    lo = flat.min(-1, keepdim=True)[0]
    hi = flat.max(-1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo + eps)).reshape(x.shape)


def _percentile_rescale(image: Tensor, lower: float = 0.0, upper: float = 99.5) -> Tensor:
    """Rescale the whole (3, S, S) tensor from its [lower, upper] percentiles of non-zero values."""
    arr = image.numpy()
    nonzero = arr[arr != 0]  # as in percentile_clip
    if len(nonzero) == 0:
        return image
    lo, hi = np.percentile(nonzero, [lower, upper])
    return torch.Tensor(rescale_intensity(arr, in_range=(lo, hi), out_range="float32"))


def _fill_blank_channels(image: Tensor) -> Tensor:
    """Copy whole-cell into an empty nuclear channel and vice versa (chosen on the tensor's
    device: no host synchronisation)."""
    image[1] = torch.where(torch.max(image[1]) == 0, image[2], image[1])
    image[2] = torch.where(torch.max(image[2]) == 0, image[1], image[2])
    return image


def embedding_input(image: Tensor, size: int = 1024, adapted: bool = True,
                    rescale: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Input of SAM's image encoder, on the device of ``image``.

    Args:
        image: (1, 3, H, W) float32 (output of ``to_tensor``).
        size: model input side.
        adapted: the checkpoint has ``model_cp`` weights; the released code then also applies
            ImageNet normalisation and per-channel min-max before SAM's pixel normalisation.
        rescale: the percentile rescale of the resized (3, S, S) image: numpy's, as
            released (None, CPU tensors), or ``device_preprocess.rescale_by_percentiles``.

    Returns:
        (1, 3, size, size) float32.
    """
    x = (rescale or _percentile_rescale)(_resize(image[0], size))
    if adapted:
        x = _min_max(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)).squeeze(0)
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(-1, 1, 1) / 255
    std = torch.tensor(PIXEL_STD, device=x.device).view(-1, 1, 1) / 255
    return ((x - mean) / std).unsqueeze(0)


def cellfinder_input(image: Tensor, size: int = 1024, adapted: bool = True) -> Tensor:
    """Input of CellFinder, on the device of ``image``.

    The released code round-trips the resized image through an 8-bit PIL image
    (``x * 255`` truncated to uint8), applies SAM's pixel normalisation on the 0..255 scale,
    then (``adapted``) ImageNet normalisation, per-channel min-max and blank-channel filling.

    Args:
        image: (1, 3, H, W) float32 in [0, 1] (output of ``to_tensor`` on a normalised image).

    Returns:
        (1, 3, size, size) float32.
    """
    x = _resize(image[0], size).mul(255).byte()
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(-1, 1, 1)
    x = (x - mean) / torch.tensor(PIXEL_STD, device=x.device).view(-1, 1, 1)
    if adapted:
        x = _min_max(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD).unsqueeze(0)).squeeze(0)
        x = _fill_blank_channels(x)
    return x.unsqueeze(0)


def is_real_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def boxes_to_model(boxes: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 in pixels of an (height, width) image -> float32 in the pixels of
    the (size, size) model input it is squashed into (the aspect ratio is not kept)."""
    return np.asarray(boxes, dtype=np.float32) * np.array([size / width, size / height] * 2, dtype=np.float32)


def boxes_to_image(boxes_model: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """The inverse of ``boxes_to_model``: (N, 4) model-input pixels -> float32 image pixels."""
    return np.asarray(boxes_model, dtype=np.float32) * np.array([width / size, height / size] * 2, dtype=np.float32)
