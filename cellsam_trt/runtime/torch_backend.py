"""PyTorch backend: the reference modules, eager."""
from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..modeling import CellSAMNetwork, fused_attention
from ..modeling.cellfinder import CellFinder
from ..modeling.network import DecoderGraph, MaskHeadGraph
from .base import Backend, BackendError, OutOfDeviceMemory, is_out_of_memory, masks_of_kept, release_cached_memory

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU; validates explicit choices.

    A CUDA device without an index gets torch's current device's index, once, here: torch
    allocates "cuda" tensors on the current device, while libraries given a device id
    (ONNX Runtime's IO binding and providers) would default to GPU 0, and the current
    device may change later (``torch.cuda.set_device``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError("device: CUDA was requested but torch sees no CUDA GPU; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        count = torch.cuda.device_count()
        if device.index >= count:
            raise BackendError(f"device: {device} does not exist here; torch sees {count} CUDA GPU(s), "
                               f"cuda:0 to cuda:{count - 1} (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return device


def inference_copy(module: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   keep_float32: Callable[[str], bool] | None = None) -> nn.Module:
    """``module`` for inference on ``device``, leaving the caller's module untouched.

    A new module tree in eval mode whose float parameters and buffers are ``dtype`` on
    ``device`` (float32 by default; those whose qualified name ``keep_float32`` accepts stay
    float32). Tensors that already are on ``device`` in their target dtype are shared, not
    copied (no memory cost, and later in-place weight updates of the caller show through);
    the others are copied there once each (tied weights stay tied). The caller's tensors keep
    their device, dtype and identity, and its modules keep their training flag: ``.to()``
    and ``.eval()`` on the caller's module would change both behind its back.
    """
    device = torch.device(device)
    names = {id(t): name for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                                        module.named_buffers(remove_duplicate=False))}
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in memo:
            continue
        target = tensor.dtype
        if tensor.is_floating_point():
            target = torch.float32 if keep_float32 is not None and keep_float32(names[id(tensor)]) else dtype
        if tensor.device == device and tensor.dtype == target:
            memo[id(tensor)] = tensor  # shared
            continue
        moved = tensor.detach().to(device=device, dtype=target)
        memo[id(tensor)] = nn.Parameter(moved, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(module, memo).eval()


PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTIONS = ("sdpa", "flash", "eager")
DECODERS = ("auto", "fused", "eager")
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(Backend):
    """Runs the PyTorch modules of a ``CellSAMNetwork``.

    Args:
        network: loaded weights; left as it is (the parts that run are used through
            ``inference_copy``: shared when already in the precision's type on ``device``,
            else copied).
        device: torch device (default: CUDA if available).
        precision: "fp32" (default); "bf16" (bfloat16, CPU or a CUDA GPU that supports it) or
            "fp16" (CUDA only) for speed at an accuracy cost that ``cellsam-trt bench``
            measures (``accuracy.precision_agreement``). The image encoder and CellFinder then
            run end to end in that type: their copies' weights are converted once, the images
            enter in it and the outputs leave as float32 (CellFinder's anchors and box
            arithmetic stay float32); the eager decoder runs under autocast, the fused one
            in its own storage type.
        attention: "sdpa" (default) runs the image encoders' attention on PyTorch's fused
            ``scaled_dot_product_attention`` with the relative-position term as its additive
            mask (``modeling.attention``); "flash": the Triton kernel that adds the term
            inside its key loop (``modeling.fused_attention``, CUDA; a BackendError says why
            where it cannot run or fails its start-up check against SDPA), so no (heads, L,
            L) tensor is stored; "eager" keeps SAM's written-out softmax. Same labels.
        compile: ``torch.compile`` the three modules (opt-in: the first call of each shape
            pays the compilation; ``cellsam-trt bench`` reports that cost).
        cuda_graphs: replay the box decoder from CUDA graphs (opt-in, CUDA only): one graph
            per padded chunk size, captured on first use, so a chunk costs one launch instead
            of the decoder's few hundred kernel launches (``CapturedDecoder``).
        decoder: "auto" (default): the fused Triton decoder (``modeling.fused_decoder``) on a
            CUDA device where triton imports and a start-up self-check against the eager
            decoder passes, else the eager ``BoxDecoder`` (one INFO line says why);
            "fused": the Triton decoder or a BackendError saying why not (on the CPU only
            under Triton's interpreter, ``TRITON_INTERPRET=1``, for tests); "eager": the
            reference. The fused decoder keeps the image tokens in the backend's precision
            (float32, bfloat16 or float16) with float32 accumulation.
    """

    name = "torch"

    def __init__(self, network: CellSAMNetwork, device: str | torch.device | None = None, precision: str = "fp32",
                 attention: str = "sdpa", compile: bool = False, cuda_graphs: bool = False,
                 decoder: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendError(
                "precision='fp16' needs a CUDA device: PyTorch's CPU kernels compute float16 slowly or not at "
                "all; on the CPU use precision='bf16' (bfloat16, fast on CPUs with AVX512-BF16 or AMX) or 'fp32'"
            )
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BackendError(f"precision='bf16': {torch.cuda.get_device_name(self.device)} has no bfloat16 support; "
                               "use precision='fp16' or 'fp32'")
        if cuda_graphs and self.device.type != "cuda":
            raise BackendError(f"cuda_graphs=True needs a CUDA device, not {self.device}: CUDA graphs replay GPU "
                               "kernel launches; leave cuda_graphs off on the CPU")
        self.precision = precision
        self.attention = attention
        self.config = network.config
        self.adapted_inputs = network.uses_model_cp
        self.compute_dtype = STORAGE_DTYPES[precision]  # the encoders' weights, the fused decoder's storage
        # only the graphs that run go to the device: with model_cp, ``network.model``'s SAM
        # (a whole ViT, 0.37 GB at ViT-B size) is never used
        graphs = network.graphs()
        self.image_encoder = inference_copy(graphs["encoder"], self.device, self.compute_dtype)
        self.cellfinder_module = inference_copy(graphs["cellfinder"], self.device, self.compute_dtype,
                                                keep_float32=CellFinder.FLOAT32_PARAMETERS.__contains__)
        # the two decoder graphs share one BoxDecoder: one copy of both keeps it shared
        parts = inference_copy(nn.ModuleDict({k: graphs[k] for k in ("decoder", "mask_head")}), self.device)
        if attention != "eager":  # our copies' trees: the caller's modules keep SAM's attention
            if attention == "flash":
                self._check_flash_attention()
            for encoder in (self.image_encoder, self.cellfinder_module):
                fused_attention.use_fused_attention(encoder, attention)
        self.box_decoder = parts["decoder"].box_decoder  # the BoxDecoder both decoder graphs run
        self.decoder_graph, self.mask_head_graph = parts["decoder"], parts["mask_head"]
        self.fused_decoder = self._fused_decoder(decoder)
        if self.fused_decoder is not None:
            self.decoder_graph, self.mask_head_graph = DecoderGraph(self.fused_decoder), MaskHeadGraph(self.fused_decoder)
        self.compiled = bool(compile)
        if compile:
            self.image_encoder = torch.compile(self.image_encoder)
            self.cellfinder_module = torch.compile(self.cellfinder_module)
            if self.fused_decoder is None:  # the fused decoder is its own kernels already
                self.decoder_graph = torch.compile(self.decoder_graph)
                self.mask_head_graph = torch.compile(self.mask_head_graph)
        # CUDA graphs replay the part with shapes known from the boxes alone; the mask head's
        # rows depend on the IoU, so it runs as it is
        self.captured_decoder = CapturedDecoder(self.decoder_graph, self._context, self.device) if cuda_graphs else None
        # Measured, ViT-B decoder in torch on 2 CPU cores: 39-43 ms per box in calls of 2-4
        # boxes, 54 ms in calls of 8-16 (the activations of a large call leave the caches).
        # Accelerators want large calls.
        self.default_chunk_size = 4 if self.device.type == "cpu" else 256

    def _fused_decoder(self, choice: str):
        """The ``FusedBoxDecoder`` to run (``decoder`` in the class docstring), or None for the eager one."""
        if choice == "eager":
            return None
        if choice == "auto" and self.device.type != "cuda":
            log.info("decoder: the eager decoder runs on %s (the fused Triton kernels are for CUDA GPUs)", self.device)
            return None
        from ..modeling.fused_decoder import FusedBoxDecoder, fused_decoder_unavailable, self_check

        reason = fused_decoder_unavailable(self.device)
        fused = None
        if reason is None:
            fused = FusedBoxDecoder(self.box_decoder, dtype=self.compute_dtype)
            grid = self.config.sam.encoder.grid_size
            probe = torch.Generator().manual_seed(0)
            embedding = torch.randn((1, self.config.sam.prompt_embed_dim, grid, grid), generator=probe).to(self.device)
            size = self.config.image_size
            boxes = torch.tensor([[0.1, 0.1, 0.3, 0.25], [0.5, 0.4, 0.9, 0.8]], device=self.device) * size
            reason = self_check(fused, embedding, boxes)
        if reason is None:
            log.info("decoder: the fused Triton decoder (%s storage)", self.precision)
            return fused
        if choice == "fused":
            raise BackendError(f"decoder='fused': {reason}; use decoder='eager' (or 'auto')")
        log.info("decoder: the eager decoder runs, because %s", reason)
        return None

    def _check_flash_attention(self) -> None:
        vit = self.config.sam.encoder
        reason = fused_attention.flash_attention_unavailable(self.device) or fused_attention.self_check(
            self.device, self.compute_dtype, vit.embed_dim, vit.num_heads)
        if reason is not None:
            raise BackendError(f"attention='flash': {reason}; use attention='sdpa' (the default)")

    def _context(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # the encoders run in their copies' type, end to end: no autocast around them
    @torch.inference_mode()
    def encoder(self, images: Tensor) -> Tensor:
        return self.image_encoder(images.to(self.device, self.compute_dtype)).float()

    @torch.inference_mode()
    def cellfinder(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, boxes = self.cellfinder_module(images.to(self.device, self.compute_dtype))
        return logits.float(), boxes.float()

    @torch.inference_mode()
    def decoder(self, embedding: Tensor, boxes: Tensor, *, keep_iou: float | None = None,
                last_call: bool = False) -> tuple[Tensor, Tensor]:
        try:
            embedding, boxes = embedding.to(self.device), boxes.to(self.device, torch.float32)
            # the fused decoder keeps its own storage type: no autocast around its kernels
            with self._context() if self.fused_decoder is None else contextlib.nullcontext():
                if self.captured_decoder is not None:
                    iou, image_tokens, hyper = self.captured_decoder(embedding, boxes)
                else:
                    iou, image_tokens, hyper = self.decoder_graph(embedding, boxes)
                iou = iou.float().clone()  # a captured graph's outputs are overwritten by its next replay
                masks = masks_of_kept(self.mask_head_graph, image_tokens, hyper, iou, keep_iou,
                                      self.config.sam.low_res_size)
            return masks, iou
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError, and cuBLAS/cuDNN allocation failures
            if not is_out_of_memory(err):
                raise
            message = f"decoder with {len(boxes)} boxes: {type(err).__name__}: {err}"
        # here the failed call's traceback, which holds its activations, is gone: they can
        # be given back before the caller retries with fewer boxes
        release_cached_memory()
        raise OutOfDeviceMemory(message)

    def weights_identity(self) -> str:
        """sha256 of the encoder's and decoder's weights and of the precision (computed once:
        ViT-B is about 0.4 GB to hash)."""
        if getattr(self, "_weights_identity", None) is None:
            import hashlib

            digest = hashlib.sha256(f"{self.precision}".encode())
            for module in (self.image_encoder, self.box_decoder):
                for name, tensor in module.state_dict().items():
                    digest.update(name.encode())
                    digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._weights_identity = digest.hexdigest()
        return self._weights_identity

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "precision": self.precision,
                "attention": self.attention, "compiled": self.compiled,
                "cuda_graphs": self.captured_decoder is not None,
                "decoder": "eager" if self.fused_decoder is None else "fused"}


class CapturedDecoder:
    """The ``decoder`` graph replayed from CUDA graphs.

    Calls are padded to the next power of two (at least 16 boxes), so the pipeline's fixed
    chunks and its one shorter last chunk use a handful of graphs, each captured the first
    time its size is seen (after two warm-up runs on a side stream, as CUDA graph capture
    requires) and sharing one memory pool. Padding rows repeat the first box and are
    dropped from the outputs.

    Args:
        decoder: the module, called as ``decoder(embedding, boxes)`` -> a tuple of tensors
            whose first dimension is the box.
        context: returns the autocast context the decoder runs under.
        device: the CUDA device.

    Call: ``(embedding (1, C, h, w) float32, boxes (N, 4) float32)`` on ``device`` -> the
    decoder's outputs for the N boxes: views of the graph's static outputs, valid until the
    next call (the caller copies what it keeps; a copy of the image tokens would cost as
    much memory traffic as a decoder block).
    """

    MIN_BOXES = 16

    def __init__(self, decoder: nn.Module, context, device: torch.device) -> None:
        self.decoder = decoder
        self.context = context
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, static embedding, static boxes, outputs)

    def __call__(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, ...]:
        n = len(boxes)
        size = max(self.MIN_BOXES, 1 << (n - 1).bit_length())
        key = (size, tuple(embedding.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, embedding)
        graph, static_embedding, static_boxes, outputs = self.graphs[key]
        static_embedding.copy_(embedding)
        static_boxes[:n].copy_(boxes)
        static_boxes[n:].copy_(boxes[:1].expand(size - n, -1))
        graph.replay()
        return tuple(out[:n] for out in outputs)

    def _capture(self, size: int, embedding: Tensor) -> tuple:
        static_embedding = embedding.clone()
        static_boxes = torch.zeros(size, 4, device=self.device)
        static_boxes[:, 2:] = 1.0  # a valid box until real ones are copied in

        def run():
            with self.context():
                return self.decoder(static_embedding, static_boxes)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = run()
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise
            raise BackendError(f"cuda_graphs: the decoder could not be captured in a CUDA graph "
                               f"({size} boxes): {err}; use cuda_graphs=False") from err
        return graph, static_embedding, static_boxes, outputs
