"""Opt-in fp8 (e4m3) linear layers for the DiT blocks (docs/fp8.md).

    from wan_triton import fp8
    fp8.quantize_model(model)                     # the 40 blocks' 400 linears -> Fp8Linear, in place
    fp8.quantize_model(model, keep_original=True) # ... and keep the bf16 layers on the CPU
    fp8.dequantize_model(model)                   # the kept layers back: the exact bf16 path
    fp8.save_fp8(model, folder); model = fp8.load_fp8(folder, device="cuda")

What is quantized: in every block, self-attention q/k/v/o, cross-attention q/k/v/o, ffn.0 and
ffn.2 (10 linears x 40 blocks). Patch/text/time embeddings, time projection and head keep
their official precision.

The math (W [N, K] a linear's weight, x [M, K] its input rows):

    weights, per output channel:  sw[n] = max(max_k |W[n, k]|, 1e-12) / 448,  Wq = e4m3(W / sw)
    activations, per token:       sa[m] = max(max_k |x[m, k]|, 1e-12) / 448,  xq = e4m3(x / sa)
    y[m, n] = sa[m] * sw[n] * sum_k xq[m, k] * Wq[n, k]  +  b[n]          (fp32 accumulate)

e4m3 = float8_e4m3fn, round to nearest even, saturated at +-448. The product runs as
`torch._scaled_mm` with row-wise scales (bf16 out, bias in the epilogue) on GPUs that have fp8
(compute capability >= 8.9 and a torch whose _scaled_mm takes row-wise scales: probed once per
device). Elsewhere (CPU, older GPUs, older torch) the same formula runs emulated (dequantize,
then an fp32 matmul on the CPU or a bf16 one on a GPU), and one log line says so.

Activation quantization comes from Triton kernels that already read those tensors:
`kernels.modulate_quant_fp8` (adaLN modulation -> q/k/v input and ffn.0 input, once per shared
input), `kernels.gelu_quant_fp8` (ffn.0 output -> ffn.2 input); other inputs (attention outputs
into `o`, the cross-attention input and the text context) go through `kernels.quant_fp8` inside
the layer. Where a kernel does not cover a call, the torch formulas below run instead (counted
in `fp8_stats()` by the dispatcher `wan_triton.patch` uses too; strict mode, WAN_TRITON_STRICT=1
or patch(strict=True), turns that into an error). The e4m3 constants are the kernels'
(`wan_triton.kernels.quant_fp8`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from wan import dit

from wan.checkpoint import (CONFIG_NAME, CheckpointError, dit_weight_files, load_weights_into, read_dit_config,
                            save_dit)
from wan.configs import DiTConfig

from .dispatch import DISPATCH
from .errors import AccelError
from .kernels.gelu_quant_fp8 import gelu_quant_fp8, gelu_quant_fp8_supports
from .kernels.modulate_quant_fp8 import modulate_quant_fp8, modulate_quant_fp8_supports
from .kernels.quant_fp8 import AMAX_FLOOR, E4M3_MAX, FP8_DTYPE, quant_fp8, quant_fp8_supports

log = logging.getLogger("wan_triton")

__all__ = ["Fp8Linear", "GeluQuantFp8", "QuantizedInput", "Fp8Error", "Fp8Summary", "LOSSY_NOTE", "BLOCK_LINEARS",
           "quantize_model", "dequantize_model", "is_quantized", "quantized_bytes", "save_fp8", "load_fp8", "fp8_support",
           "check_fp8_device",
           "quantize_rows_reference", "quantize_weight", "fp8_stats", "reset_fp8_stats"]

LOSSY_NOTE = "fp8 linears: lossy (e4m3, per-channel weights, per-token activations)"
# the 10 linears of a block that run in fp8 (paths inside WanAttentionBlock)
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
FORMAT_NAME = "wan-triton-fp8"
FORMAT_VERSION = 1


class Fp8Error(AccelError):
    """fp8 cannot be switched on or off as asked (reported as one line by the CLIs)."""


# ------------------------------------------------------------------ torch formulas (the reference)

def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 in torch ops: (q float8_e4m3fn [..., K], scale fp32 [..., 1]); the formula the
    kernels implement (fp32 math, IEEE division, round to nearest even)."""
    x32 = x.float()
    # divide by a tensor: CUDA divides by a Python scalar through its reciprocal (1/448 is inexact in fp32),
    # which would make GPU and CPU (and the kernels' IEEE division) differ in the last bit
    s = x32.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR) / torch.full((), E4M3_MAX, device=x32.device)
    return (x32 / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), s


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [N, K] -> (e4m3 [N, K], fp32 per-output-channel scale [N, 1])."""
    return quantize_rows_reference(w)


# ------------------------------------------------------------------ activation quantization

# op -> (Triton kernel, its support check); the choice per call is counted by wan_triton.dispatch
_KERNELS = {"quant_fp8": (quant_fp8, quant_fp8_supports),
            "gelu_quant_fp8": (gelu_quant_fp8, gelu_quant_fp8_supports),
            "modulate_quant_fp8": (modulate_quant_fp8, modulate_quant_fp8_supports)}
FP8_OPS = tuple(_KERNELS)


def fp8_stats() -> dict:
    """Per activation-quantization op: kernel launches, torch fallbacks, the last fallback's reason."""
    return DISPATCH.snapshot(FP8_OPS)


def reset_fp8_stats() -> None:
    DISPATCH.reset(FP8_OPS)


def _kernel(name: str, *args):
    """The Triton op `name` when its support check covers `args`, else None (counted, each reason
    logged once; strict mode raises KernelFallback)."""
    op, supports = _KERNELS[name]
    ok, why = supports(*args)
    return op if DISPATCH.use_kernel(name, ok, why, warn=True) else None


@dataclass
class QuantizedInput:
    """An activation already quantized for Fp8Linear: data e4m3 [..., K], scale fp32 [..., 1];
    `dtype` is the dtype the unquantized tensor had (it decides the output dtype outside autocast).
    Only Fp8Linear consumes it; the block hands one to q/k/v (shared) and to ffn.0 / ffn.2."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self):
        return self.data.shape

    @property
    def device(self):
        return self.data.device

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() * self.scale).to(self.dtype)


def quantize_input(x: torch.Tensor) -> QuantizedInput:
    """Per-token e4m3 of x [..., K]: the Triton kernel where it runs, else the torch formula."""
    op = _kernel("quant_fp8", x)
    q, s = op(x) if op is not None else quantize_rows_reference(x)
    return QuantizedInput(q, s, x.dtype)


# ------------------------------------------------------------------ the product

_native: dict = {}  # device key -> (ok, reason)


def fp8_support(device=None) -> tuple[bool, str]:
    """(True, '') when `device` runs e4m3 matrix products natively (`torch._scaled_mm` with row-wise
    scales, probed once per device), else (False, why): then Fp8Linear emulates."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return False, f"device {device}: fp8 matrix products need an NVIDIA GPU of compute capability >= 8.9"
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = f"cuda:{idx}"
    if key not in _native:
        cap = torch.cuda.get_device_capability(idx)
        if cap < (8, 9):
            _native[key] = (False, f"{torch.cuda.get_device_name(idx)} is compute capability {cap[0]}.{cap[1]}; "
                                   "fp8 matrix products need >= 8.9 (Ada, Hopper or newer)")
        else:
            _native[key] = _probe(torch.device(key))
    return _native[key]


def check_fp8_device(device) -> None:
    """The one rule for switching fp8 linears on (`optimize(pipe, fp8=True)` and --fp8): the
    pipeline's device runs e4m3 products natively (`fp8_support`). Raises Fp8Error(why)."""
    ok, why = fp8_support(device)
    if not ok:
        raise Fp8Error(why)


_bias_epilogue: dict = {}  # device key -> whether _scaled_mm takes the bias with row-wise scales


def _probe(dev) -> tuple[bool, str]:
    """One 32x32 row-wise-scaled product (with the bias in the epilogue, else without)."""
    a = torch.ones(32, 32, device=dev).to(FP8_DTYPE)
    kw = dict(scale_a=torch.ones(32, 1, device=dev), scale_b=torch.ones(1, 32, device=dev), out_dtype=torch.bfloat16)
    err = None
    for bias in (torch.zeros(32, device=dev, dtype=torch.bfloat16), None):
        try:
            torch._scaled_mm(a, a.t(), bias=bias, **kw)
            _bias_epilogue[str(dev)] = bias is not None
            return True, ""
        except (RuntimeError, TypeError) as e:
            err = err or e
    msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return False, f"torch {torch.__version__}: _scaled_mm with row-wise scales failed ({msg})"


class Fp8Linear(nn.Module):
    """y = x W^T + b with W stored in e4m3 (per-output-channel fp32 scales) and x quantized per
    token; takes a tensor or a QuantizedInput. Output dtype: the autocast dtype when autocast is
    on, else the input's dtype (as nn.Linear). `original` (not a submodule: state_dict and .to()
    never see it) is the replaced nn.Linear kept on the CPU, or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype=torch.float32, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fast_accum = in_features, out_features, fast_accum
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self._kept: list = []  # [the replaced nn.Linear on the CPU] or []: a list, so never a submodule

    @property
    def original(self) -> nn.Linear | None:
        return self._kept[0] if self._kept else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_original: bool = False, fast_accum: bool = False,
                    compute_device=None) -> "Fp8Linear":
        """Quantize `linear` (on `compute_device` when given, e.g. a GPU for CPU-resident weights;
        the result lives where the weight lives)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                bias_dtype=w.dtype, fast_accum=fast_accum)
        q, s = quantize_weight(w if compute_device is None else w.to(compute_device))
        m.weight = nn.Parameter(q.to(w.device), requires_grad=False)
        m.weight_scale = nn.Parameter(s.to(w.device), requires_grad=False)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if keep_original:
            m._kept = [linear.to("cpu")]
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, e4m3 per-channel{', fast accum' if self.fast_accum else ''}")

    def _apply(self, fn, recurse=True):
        """.to(device) moves everything; a dtype conversion (model.to(bf16)) leaves the e4m3
        weight and its fp32 scales alone."""
        keep = {id(self.weight), id(self.weight_scale)}

        def guarded(t):
            r = fn(t)
            if id(t) in keep and r.dtype != t.dtype:
                return t.to(device=r.device)
            return r
        return super()._apply(guarded, recurse)

    # the block asks its first consumer to build the modulated input (wan.dit.modulate_into)
    def modulate_input(self, x, shift, scale, eps, out_dtype=None) -> QuantizedInput:
        """adaLN modulation quantized per token in one kernel (kernels.modulate_quant_fp8), else
        wan.dit.modulate (the bound op: patched or reference) then the quantization."""
        op = _kernel("modulate_quant_fp8", x, shift, scale, eps)
        if op is not None:
            q, s = op(x, shift, scale, eps)
            return QuantizedInput(q, s, out_dtype or torch.float32)
        qi = quantize_input(dit.modulate(x, shift, scale, eps))
        return QuantizedInput(qi.data, qi.scale, out_dtype or torch.float32)

    def forward(self, x):
        qi = x if isinstance(x, QuantizedInput) else quantize_input(x)
        if qi.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear expects {self.in_features} input features, got {tuple(qi.shape)}")
        lead = qi.shape[:-1]
        a = qi.data.reshape(-1, self.in_features)
        sa = qi.scale.reshape(-1, 1)
        out_dtype = dit.autocast_dtype(a.device.type) or qi.dtype
        if fp8_support(a.device)[0]:
            y = self._scaled_mm(a, sa, out_dtype)
        else:
            y = self._emulated(a, sa, out_dtype)
        return y.reshape(*lead, self.out_features)

    def _scaled_mm(self, a, sa, out_dtype):
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        dev = a.device if a.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        if out_dtype != torch.bfloat16 or (bias is not None and not _bias_epilogue.get(str(dev), True)):
            y = torch._scaled_mm(a, self.weight.t(), scale_a=sa, scale_b=self.weight_scale.view(1, -1),
                                 out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum).to(out_dtype)
            return y if self.bias is None else y + self.bias.to(out_dtype)
        return torch._scaled_mm(a, self.weight.t(), scale_a=sa, scale_b=self.weight_scale.view(1, -1), bias=bias,
                                out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)

    def _emulated(self, a, sa, out_dtype):
        """The same formula without fp8 hardware: exact e4m3 values, fp32 (CPU) or bf16 (GPU)
        matmul, then the scales and the bias in fp32."""
        cdt = torch.float32 if a.device.type == "cpu" else torch.bfloat16
        with torch.autocast(device_type=a.device.type, enabled=False):
            acc = (a.to(cdt) @ self.weight.to(cdt).t()).float()
            y = acc * sa * self.weight_scale.view(1, -1)
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(out_dtype)


class GeluQuantFp8(nn.Module):
    """Stands in for ffn.1 (GELU, tanh) when ffn.2 is an Fp8Linear: GELU and the per-token
    quantization in one kernel (kernels.gelu_quant_fp8), handing ffn.2 a QuantizedInput."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        self.original = [original]  # a list: not a submodule (state_dict is unchanged)

    def forward(self, x):
        op = _kernel("gelu_quant_fp8", x)
        if op is not None:
            q, s = op(x)
        else:
            q, s = quantize_rows_reference(F.gelu(x.float(), approximate="tanh"))
        return QuantizedInput(q, s, x.dtype)


# ------------------------------------------------------------------ model-level switch

@dataclass
class Fp8Summary:
    """What quantize_model did."""
    layers: int = 0
    bytes_before: int = 0        # the replaced linears' weights + biases before
    bytes_after: int = 0         # ... after (e4m3 weights + fp32 scales + biases)
    seconds: float = 0.0
    native: bool = False         # _scaled_mm on this device (else emulated)
    reason: str = ""             # why emulated
    kept_original: bool = False
    extra: dict = field(default_factory=dict)

    models: int = 1

    def line(self) -> str:
        how = "torch._scaled_mm" if self.native else f"EMULATED (dequantize + matmul: {self.reason})"
        who = f"{self.models} models, " if self.models > 1 else ""
        return (f"{LOSSY_NOTE}: {who}{self.layers} linears, {self.bytes_before / 1e6:.1f} -> "
                f"{self.bytes_after / 1e6:.1f} MB in {self.seconds:.1f} s; products via {how}")

    @staticmethod
    def total(summaries: list) -> "Fp8Summary":
        """Several models' summaries as one (for one log line)."""
        out = Fp8Summary(native=all(s.native for s in summaries), models=len(summaries),
                         reason=next((s.reason for s in summaries if not s.native), ""),
                         kept_original=all(s.kept_original for s in summaries))
        for s in summaries:
            out.layers += s.layers
            out.bytes_before += s.bytes_before
            out.bytes_after += s.bytes_after
            out.seconds += s.seconds
        return out


def _block_targets(model):
    """(block, parent module, attribute, path) for the 10 linears of every block."""
    for i, blk in enumerate(model.blocks):
        for path in BLOCK_LINEARS:
            parent_path, attr = path.rsplit(".", 1)
            parent = blk.get_submodule(parent_path)
            yield blk, parent, attr, f"blocks.{i}.{path}"


def _nbytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def quantized_bytes(model, dtype=None) -> int:
    """The bytes of `model`'s parameters once `quantize_model` has run (a model on the meta device
    is fine): each block linear's weight in e4m3 plus its fp32 scales, the rest as it is (in
    `dtype` when given: the dtype the weights will be loaded in)."""
    size = lambda p: p.numel() * (p.element_size() if dtype is None else dtype.itemsize)  # noqa: E731
    total = sum(size(p) for p in model.parameters())
    for _blk, parent, attr, _path in _block_targets(model):
        lin = getattr(parent, attr)
        if type(lin) is nn.Linear:
            total += lin.weight.numel() + 4 * lin.out_features - size(lin.weight)
    return total


def is_quantized(model) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def _set_child(parent: nn.Module, attr: str, mod: nn.Module) -> None:
    setattr(parent, attr, mod)  # nn.Sequential children are attributes "0", "1", ... too


def quantize_model(model, progress: bool = True, keep_original: bool = False, fast_accum: bool = False,
                   compute_device=None, log_line: bool = True) -> Fp8Summary:
    """Replace the 10 linears of every DiT block with Fp8Linear in place (and ffn.1 with
    GeluQuantFp8). The bf16 weights are freed unless `keep_original` (then they wait on the CPU,
    for dequantize_model, which restores the exact bf16 path). Quantizing is per-row torch math on
    `compute_device` (default: the GPU when the weights wait on the CPU and CUDA is there, else
    the weights' device; the bits are the same). Logs the lossy note and whether products are
    native or emulated (`log_line=False`: the caller logs `summary.line()` itself).
    `fast_accum`: _scaled_mm's faster, less exact accumulation (off by default)."""
    if FP8_DTYPE is None:
        raise Fp8Error(f"torch {torch.__version__} has no float8_e4m3fn")
    if getattr(model, "_block_streamer", None) is not None:
        raise Fp8Error("quantize before block streaming is enabled (the streamer holds the bf16 blocks)")
    if any(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks):
        raise Fp8Error("quantize before torch.compile (the compiled blocks captured the bf16 layers)")
    targets = [t for t in _block_targets(model) if type(getattr(t[1], t[2])) is nn.Linear]
    summ = Fp8Summary(kept_original=keep_original)
    dev = next(model.parameters()).device
    if compute_device is None and dev.type == "cpu" and torch.cuda.is_available():
        compute_device = "cuda"
    # an expert waiting on the CPU runs on the GPU: report the products where they will run
    summ.native, summ.reason = fp8_support("cuda" if dev.type == "cpu" and torch.cuda.is_available() else dev)
    t0 = time.perf_counter()
    bar = None
    if progress and targets:
        bar = tqdm(total=len(targets), desc="fp8 quantize", unit="layer", leave=False, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for blk, parent, attr, _path in targets:
                lin = getattr(parent, attr)
                summ.bytes_before += _nbytes(lin)
                q = Fp8Linear.from_linear(lin, keep_original=keep_original, fast_accum=fast_accum,
                                          compute_device=compute_device)
                _set_child(parent, attr, q)
                summ.bytes_after += _nbytes(q)
                summ.layers += 1
                if attr == "2" and isinstance(blk.ffn[1], nn.GELU):
                    blk.ffn[1] = GeluQuantFp8(blk.ffn[1])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summ.seconds = time.perf_counter() - t0
    if summ.layers and log_line:
        log.warning("%s", summ.line())
    return summ


def dequantize_model(model) -> int:
    """Put back the nn.Linear layers quantize_model(keep_original=True) kept (on the model's
    device, bit for bit) and the GELU; returns how many. Fp8Error when the originals were freed
    (reload the model, or quantize with keep_original=True)."""
    mods = [(t, getattr(t[1], t[2])) for t in _block_targets(model)]
    fp8 = [(t, m) for t, m in mods if isinstance(m, Fp8Linear)]
    missing = [t[3] for t, m in fp8 if m.original is None]
    if missing:
        raise Fp8Error(f"{len(missing)} fp8 layers (e.g. {missing[0]}) no longer have their bf16 weights: reload "
                       "the model, or quantize with keep_original=True to switch fp8 off in place")
    for (blk, parent, attr, _), m in fp8:
        dev = m.weight.device
        _set_child(parent, attr, m.original.to(dev))
        m._kept = []
    for blk in model.blocks:
        if isinstance(blk.ffn[1], GeluQuantFp8):
            blk.ffn[1] = blk.ffn[1].original[0]
    if fp8:
        log.info("wan_triton fp8: %d linears back in bf16 (exact)", len(fp8))
    return len(fp8)


# ------------------------------------------------------------------ pre-quantized checkpoints

def save_fp8(model, folder, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write a quantized expert: the official layout (config.json + safetensors, sharded with an
    index over `max_shard_bytes`) where each fp8 linear has `<name>.weight` (F8_E4M3 [N, K]),
    `<name>.weight_scale` (F32 [N, 1]) and `<name>.bias`; config.json gains a "quantization" entry."""
    if not is_quantized(model):
        raise Fp8Error("save_fp8 needs a quantized model (quantize_model first)")
    folder = Path(folder)
    save_dit(model, folder, max_shard_bytes=max_shard_bytes)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["quantization"] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "float8_e4m3fn",
                           "weights": "per-output-channel fp32 scale: <name>.weight_scale [N, 1]",
                           "activations": "per-token, dynamic", "layers": [f"blocks.*.{p}" for p in BLOCK_LINEARS]}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def _fp8_shells(model) -> None:
    """Meta-built model -> the quantized module structure (empty Fp8Linear on meta)."""
    for blk, parent, attr, _ in list(_block_targets(model)):
        lin = getattr(parent, attr)
        shell = Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        _set_child(parent, attr, shell)
        if attr == "2" and isinstance(blk.ffn[1], nn.GELU):
            blk.ffn[1] = GeluQuantFp8(blk.ffn[1])


def load_fp8(folder, device="cpu", progress: bool = False):
    """A quantized WanModel from save_fp8's folder, bit-identical to what was saved."""
    folder = Path(folder)
    raw = read_dit_config(folder)
    qc = raw.get("quantization") or {}
    if qc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder} is not a wan-triton fp8 checkpoint (config.json has no "
                              f"quantization.format = {FORMAT_NAME!r}); load it with WanModel.from_pretrained")
    if int(qc.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: fp8 format version {qc.get('version')} is newer than this code's "
                              f"({FORMAT_VERSION})")
    with torch.device("meta"):
        model = dit.WanModel(DiTConfig.from_dict(raw))
    _fp8_shells(model)
    return load_weights_into(model, folder, dit_weight_files(folder), device, None, progress)
