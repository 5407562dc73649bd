"""One attention dispatch for the DiT.

    o[b, i, h] = sum_j softmax_j( q[b, i, h] . k[b, j, h] / sqrt(D) ) v[b, j, h],   j < k_lens[b]

Built-in backends, tried in this order by `auto` on CUDA:

    fa4         FlashAttention-4 (`flash_attn.cute`, pip `flash-attn-4`), on sm90 / sm100
    fa3         FlashAttention-3 (`flash_attn_interface`, built from flash-attention/hopper), sm90
    fa2         FlashAttention-2 (`flash_attn.flash_attn_interface`, pip `flash-attn`), sm80+
    sdpa-cudnn  PyTorch SDPA, cuDNN first (sm90+)
    sdpa-flash  PyTorch SDPA, its flash kernel first
    sdpa        PyTorch SDPA, its own choice (any device)
    math        SDPA's math backend (any device)

A flash package counts as available only when it imports (FA2 and FA4 share the top-level name
`flash_attn`; each is detected by its own submodule). One that is installed but fails to import
is left out and the reason is logged once. Other packages can add backends with
`register_backend` (wan never imports them itself: `wan_triton.fp8_attention` registers `fp8`);
`auto` never picks a backend registered as lossy.

Inputs that are not fp16/bf16 are cast to bf16 as the official code does; softmax scale
1/sqrt(head_dim), no dropout, not causal; keys at positions >= k_lens[b] are masked and every
query is kept (the official varlen call). Where attention sits in the precision map:
docs/precision.md; the backends and their measurements: docs/attention.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("wan.attention")

BACKENDS = ("auto", "fa4", "fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa", "math")
FLASH = ("fa4", "fa3", "fa2")
# module that must import, and the compute-capability majors it runs on
_FLASH_MODULES = {"fa4": ("flash_attn.cute", (9, 10)), "fa3": ("flash_attn_interface", (9,)),
                  "fa2": ("flash_attn.flash_attn_interface", (8, 9, 10, 12))}
_INSTALL = {"fa4": "pip install flash-attn-4 (CUDA 13: pip install \"flash-attn-4[cu13]\")",
            "fa3": "build flash-attention/hopper (python setup.py install)",
            "fa2": "pip install flash-attn --no-build-isolation"}
_state = {"backend": "auto", "resolved": {}}
_probes: dict[str, tuple[bool, str]] = {}  # flash backend -> (imports, why not), once per process


@dataclass(frozen=True)
class ExternalBackend:
    """A backend another package registered: fn(q, k, v, k_lens) -> o, all [B, L, H, D]
    (q/k/v in fp16 or bf16; o is cast to q's dtype). available(device) -> (ok, reason)."""
    name: str
    fn: Callable
    available: Callable
    lossy: bool
    note: str


_registry: dict[str, ExternalBackend] = {}
_eager_fns: dict[str, Callable] = {}  # backend -> its call as a torch custom op (see _eager)


def register_backend(name: str, fn: Callable, *, available: Callable | None = None, lossy: bool = False,
                     note: str = "") -> None:
    """Add (or replace) backend `name`. `available(device) -> (ok, reason)` (default: always);
    `lossy` backends are used only when asked for by name, and logged as lossy with `note`."""
    if name in BACKENDS:
        raise ValueError(f"attention backend {name!r} is built in; register another name")
    _registry[name] = ExternalBackend(name, fn, available or (lambda device: (True, "")), lossy, note)
    _state["resolved"].clear()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (the choice falls back to 'auto' if it was the one set)."""
    if _registry.pop(name, None) is not None:
        if _state["backend"] == name:
            _state["backend"] = "auto"
        _state["resolved"].clear()


def backend_names() -> tuple[str, ...]:
    """Every name set_backend accepts: the built-ins and the registered backends."""
    return BACKENDS + tuple(_registry)


def is_lossy(name: str) -> bool:
    b = _registry.get(name)
    return bool(b and b.lossy)


def _find(mod: str) -> bool:
    """The module is installed (finding a submodule imports its parent: guarded)."""
    try:
        return importlib.util.find_spec(mod) is not None
    except Exception:  # noqa: BLE001 - a parent package that fails to import: not usable here
        return False


def _import(mod: str):
    return importlib.import_module(mod)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _cutlass_hint() -> str:
    """Where the cutlass DSL's own packages probably are when its .pth did not run (pip --target)."""
    import os
    import sys

    for p in sys.path:
        cand = os.path.join(p or ".", "nvidia_cutlass_dsl", "dsl_packages")
        if os.path.isdir(cand) and cand not in sys.path:
            return f"; the cutlass DSL's .pth did not run (pip --target?): add {cand} to PYTHONPATH"
    return ("; if nvidia-cutlass-dsl was installed with pip --target, its .pth does not run: add "
            "<target>/nvidia_cutlass_dsl/dsl_packages to PYTHONPATH")


def probe_flash(name: str) -> tuple[bool, str]:
    """(imports, why not) for fa4 / fa3 / fa2; the import is tried once per process and an
    installed package that fails to import is logged (warning) once."""
    got = _probes.get(name)
    if got is not None:
        return got
    mod, _ = _FLASH_MODULES[name]
    if not _find(mod):
        got = (False, f"{mod} is not installed ({_INSTALL[name]})")
    else:
        try:
            m = _import(mod)
            missing = [f for f in ("flash_attn_func", "flash_attn_varlen_func") if not hasattr(m, f)]
            got = (False, f"{mod} has no {', '.join(missing)}") if missing else (True, "")
        except Exception as err:  # noqa: BLE001 - any import failure means: not usable
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            why = f"{mod} is installed but does not import ({type(err).__name__}: {msg})"
            if name == "fa4":
                why += _cutlass_hint()
            got = (False, why)
        if not got[0]:
            log.warning("attention backend %s left out: %s", name, got[1])
    _probes[name] = got
    return got


def _reset_probes() -> None:
    """Forget the import probes (tests; or after installing a package in a running process)."""
    _probes.clear()
    _state["resolved"].clear()


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str:
    """'' when backend `name` runs on `device`, else one line saying why not."""
    device = _device(device)
    if name in _registry:
        ok, why = _registry[name].available(device)
        return "" if ok else (why or f"{name} is not available on {device}")
    if name not in BACKENDS or name == "auto":
        return f"unknown attention backend {name!r}; choose from {backend_names()}"
    if name in ("sdpa", "math"):
        return ""
    if device.type != "cuda":
        return f"{name} needs a CUDA device"
    major, minor = _capability(device)
    if name in FLASH:
        _, majors = _FLASH_MODULES[name]
        if major not in majors:
            return f"{name} does not run on sm{major}{minor} (runs on sm{', sm'.join(f'{m}x' for m in majors)})"
        ok, why = probe_flash(name)
        return "" if ok else why
    if name == "sdpa-cudnn" and not (major >= 9 and hasattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION")):
        return "sdpa-cudnn needs sm90+ and a torch with the cuDNN attention backend"
    return ""


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on `device` (default: cuda if present, else cpu), best first: the
    registered ones (in registration order), then the built-ins in `auto` order."""
    device = _device(device)
    order = list(_registry) + [b for b in BACKENDS if b != "auto"]
    return [b for b in order if not unavailable_reason(b, device)]


def set_backend(name: str) -> str:
    """Choose the backend by name ('auto' picks per device). Returns the previous choice."""
    if name not in backend_names():
        raise ValueError(f"unknown attention backend {name!r}; choose from {backend_names()}")
    prev = _state["backend"]
    _state["backend"] = name
    _state["resolved"].clear()
    return prev


def get_backend() -> str:
    return _state["backend"]


def resolve_backend(device: torch.device) -> str:
    """The concrete backend `auto` (or the set name) means on this device; logged once per device.
    `auto` takes the first available backend that is not lossy."""
    key = str(device)
    got = _state["resolved"].get(key)
    if got is None:
        name = _state["backend"]
        if name == "auto":  # lossy backends are not even probed
            order = [b for b in _registry if not is_lossy(b)] + [b for b in BACKENDS if b != "auto"]
            got = next(b for b in order if not unavailable_reason(b, device))
        elif not unavailable_reason(name, device):
            got = name
        else:
            why = unavailable_reason(name, device)
            raise RuntimeError(f"attention backend {name!r} is not available on {device} "
                               f"(available: {available_backends(device)}): {why}")
        _state["resolved"][key] = got
        if got in _registry or got == "fa4":
            _eager(got)
        if not _compiling():  # a log call inside a traced region would break the graph
            if is_lossy(got):
                log.warning("attention backend on %s: %s (LOSSY: %s)", device, got, _registry[got].note)
            else:
                log.info("attention backend on %s: %s", device, got)
    return got


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch without torch.compiler.is_compiling
        return False


def _eager(name: str) -> Callable:
    """The call of backend fa4 / a registered one as a torch custom op `wan_attention::<name>`
    (fake: an empty tensor like q), so torch.compile keeps it as one opaque node instead of
    tracing into kernels dynamo cannot follow. The op looks the backend up at call time, so
    re-registering a name reuses it. Made on first use, which resolve_backend makes happen
    outside any compiled region; without torch.library.custom_op, the plain call."""
    fn = _eager_fns.get(name)
    if fn is None:
        def call(q, k, v, k_lens):
            raw = _registry[name].fn if name in _registry else _fa4
            o = raw(q, k, v, k_lens)
            return o if o.dtype == q.dtype else o.to(q.dtype)

        fn = call
        custom_op = getattr(torch.library, "custom_op", None)
        if custom_op is not None:
            qual = "wan_attention::" + "".join(c if c.isalnum() else "_" for c in name)
            try:
                schema = "(Tensor q, Tensor k, Tensor v, Tensor? k_lens) -> Tensor"
                op = custom_op(qual, mutates_args=(), schema=schema)(call)
                op.register_fake(lambda q, k, v, k_lens: torch.empty_like(q))
                fn = op
            except RuntimeError:  # defined before (a registry entry replaced): the existing op
                fn = getattr(torch.ops.wan_attention, qual.split("::")[1], call)
        _eager_fns[name] = fn
    return fn


def _sdpa(q, k, v, mask, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # [B, H, L, D]
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        order = {
            "sdpa-cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "sdpa-flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH],
        }[backend]
        if mask is not None and backend != "math":
            order = order + [SDPBackend.MATH]
        try:
            ctx = sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch without set_priority
            ctx = sdpa_kernel(order)
        with ctx:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)


def _flash(q, k, v, k_lens, backend):
    """fa3 / fa2: the dense call, or with padding the varlen call over the kept keys only
    (cu_seqlens_q = [0, Lq, 2 Lq, ...]: every query kept; cu_seqlens_k = cumsum(k_lens))."""
    mod = _import(_FLASH_MODULES[backend][0])
    if k_lens is None:
        o = mod.flash_attn_func(q, k, v)
    else:
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        k_lens = k_lens.to(k.device)
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
        keep = torch.arange(Lk, device=k.device)[None, :] < k_lens[:, None]
        cu_k = F.pad(k_lens.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        o = mod.flash_attn_varlen_func(q.flatten(0, 1), k[keep], v[keep], cu_q, cu_k, Lq, int(k_lens.max()))
        o = (o[0] if isinstance(o, tuple) else o).unflatten(0, (B, Lq))
    return o[0] if isinstance(o, tuple) else o


def _fa4(q, k, v, k_lens):
    """FlashAttention-4: the dense call, or with padding the varlen call on the batched tensors
    with seqused_k = k_lens (keys >= k_lens[b] masked, all queries kept, no gather)."""
    mod = _import("flash_attn.cute")
    if k_lens is None:
        o = mod.flash_attn_func(q, k, v)
    else:
        used = k_lens.to(device=k.device, dtype=torch.int32).contiguous()
        o = mod.flash_attn_varlen_func(q, k, v, seqused_k=used)
    return o[0] if isinstance(o, tuple) else o  # (out, lse)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, L, H, D] inputs; keys >= k_lens[b] masked.

    Inputs not in {fp16, bf16} are cast to bf16 (official behaviour). Output in `out_dtype`
    (default: q's original dtype, like the official `flash_attention`).
    """
    out_dtype = out_dtype or q.dtype
    half = (torch.float16, torch.bfloat16)
    cd = q.dtype if q.dtype in half else torch.bfloat16
    q, k, v = (u if u.dtype == cd else u.to(cd) for u in (q, k, v))
    name = backend or resolve_backend(q.device)
    if name in _registry or name == "fa4":
        o = _eager(name)(q, k, v, k_lens)
    elif name in ("fa3", "fa2"):
        o = _flash(q, k, v, k_lens, name)
    else:
        mask = None
        if k_lens is not None:
            mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
        o = _sdpa(q, k, v, mask, name)
    return o.to(out_dtype)
