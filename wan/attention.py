"""One attention dispatch for the DiT, over one registry of backends.

    o[b, i, h] = sum_j softmax_j( q[b, i, h] . k[b, j, h] / sqrt(D) ) v[b, j, h],   j < k_lens[b]

Every backend is one `Backend` record: its call, its availability check, whether it is lossy,
whether it runs as an opaque torch custom op, and its priority. `auto` takes the available
backend of highest priority among the exact (not lossy) ones. The built-in records, highest
priority first:

    fa4         FlashAttention-4 (`flash_attn.cute`, pip `flash-attn-4`), on sm90 / sm100
    fa3         FlashAttention-3 (`flash_attn_interface`, built from flash-attention/hopper), sm90
    fa2         FlashAttention-2 (`flash_attn.flash_attn_interface`, pip `flash-attn`), sm80+
    sdpa-cudnn  PyTorch SDPA, cuDNN first (sm90+)
    sdpa-flash  PyTorch SDPA, its flash kernel first
    sdpa        PyTorch SDPA, its own choice (any device)
    math        SDPA's math backend (any device)

A flash package counts as available only when it imports (FA2 and FA4 share the top-level name
`flash_attn`; each is detected by its own submodule). One that is installed but fails to import
is left out and the reason is logged once. Other packages add records with `register_backend`
(wan never imports them itself: `wan_triton.fp8_attention` registers the lossy `fp8`); unless
they say otherwise they come before the built-ins and run as custom ops.

Inputs that are not fp16/bf16 are cast to bf16 as the official code does; softmax scale
1/sqrt(head_dim), no dropout, not causal; keys at positions >= k_lens[b] are masked and every
query is kept (the official varlen call). Where attention sits in the precision map:
docs/precision.md; the backends, the registry and their measurements: docs/attention.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("wan.attention")

AUTO = "auto"
REGISTERED_PRIORITY = 100  # register_backend's default: before every built-in (fa4 is 70)


@dataclass(frozen=True)
class Backend:
    """One attention backend.

    fn(q, k, v, k_lens) -> o over [B, L, H, D] (q/k/v in fp16 or bf16, k_lens None or [B]; o is
    cast to the caller's dtype); available(device) -> (ok, one-line reason); lossy: used only
    when asked for by name, logged with `note`; opaque: called as the torch custom op
    `wan_attention::<name>`, which torch.compile keeps as one node (for kernels dynamo cannot
    trace); priority: `auto` (and available_backends) try higher first, ties in registry order."""
    name: str
    fn: Callable
    available: Callable
    priority: int
    lossy: bool = False
    opaque: bool = False
    note: str = ""


@dataclass(frozen=True)
class FlashPackage:
    """Where a flash backend comes from: the module that must import, the compute-capability
    majors it runs on, how to install it."""
    module: str
    majors: tuple[int, ...]
    install: str


_FLASH = {"fa4": FlashPackage("flash_attn.cute", (9, 10),
                              "pip install flash-attn-4 (CUDA 13: pip install \"flash-attn-4[cu13]\")"),
          "fa3": FlashPackage("flash_attn_interface", (9,), "build flash-attention/hopper (python setup.py install)"),
          "fa2": FlashPackage("flash_attn.flash_attn_interface", (8, 9, 10, 12),
                              "pip install flash-attn --no-build-isolation")}

# registry state: the records registered from outside (the built-ins are BUILTINS, below), the
# chosen name and what it resolved to per device, the flash import probes, the custom ops made
_registry: dict[str, Backend] = {}
_state = {"backend": AUTO, "resolved": {}}
_probes: dict[str, tuple[bool, str]] = {}  # flash backend -> (imports, why not), once per process
_eager_fns: dict[str, Callable] = {}  # opaque backend -> its call as a torch custom op (see _eager)


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
    pkg = _FLASH[name]
    mod = pkg.module
    if not _find(mod):
        got = (False, f"{mod} is not installed ({pkg.install})")
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


# --- availability checks of the built-ins: (ok, reason) ---------------------------------------------

def _anywhere(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _on_cuda(name: str, device: torch.device) -> tuple[bool, str]:
    return (True, "") if device.type == "cuda" else (False, f"{name} needs a CUDA device")


def _cudnn_sdpa_available(device: torch.device) -> tuple[bool, str]:
    ok, why = _on_cuda("sdpa-cudnn", device)
    if ok and not (_capability(device)[0] >= 9 and hasattr(SDPBackend, "CUDNN_ATTENTION")):
        return False, "sdpa-cudnn needs sm90+ and a torch with the cuDNN attention backend"
    return ok, why


def _flash_available(name: str, device: torch.device) -> tuple[bool, str]:
    ok, why = _on_cuda(name, device)
    if not ok:
        return ok, why
    major, minor = _capability(device)
    majors = _FLASH[name].majors
    if major not in majors:
        return False, f"{name} does not run on sm{major}{minor} (runs on sm{', sm'.join(f'{m}x' for m in majors)})"
    return probe_flash(name)


# --- the registry ------------------------------------------------------------------------------------

def _record(name: str) -> Backend | None:
    return _registry.get(name) or _BUILTIN_BY_NAME.get(name)


def backends() -> tuple[Backend, ...]:
    """Every record, built-in or registered, highest priority first (ties: built-ins first,
    then registration order): the order `auto` tries the exact ones in."""
    return tuple(sorted([*BUILTINS, *_registry.values()], key=lambda b: -b.priority))


def register_backend(name: str, fn: Callable, *, available: Callable | None = None, lossy: bool = False,
                     note: str = "", priority: int = REGISTERED_PRIORITY, opaque: bool = True) -> None:
    """Add (or replace) backend `name` (see `Backend`). `available(device) -> (ok, reason)`
    (default: always); `lossy` backends are used only when asked for by name, and logged as
    lossy with `note`; `opaque=False` lets torch.compile trace into `fn` (pure torch code only)."""
    if name == AUTO or name in _BUILTIN_BY_NAME:
        raise ValueError(f"attention backend {name!r} is built in; register another name")
    _registry[name] = Backend(name, fn, available or _anywhere, priority, lossy, opaque, note)
    _state["resolved"].clear()


def unregister_backend(name: str) -> None:
    """Remove a registered backend (the choice falls back to 'auto' if it was the one set)."""
    if _registry.pop(name, None) is not None:
        if _state["backend"] == name:
            _state["backend"] = AUTO
        _state["resolved"].clear()


def backend_names() -> tuple[str, ...]:
    """Every name set_backend accepts: 'auto', the built-ins, then the registered backends."""
    return (AUTO, *(b.name for b in BUILTINS), *_registry)


def is_lossy(name: str) -> bool:
    b = _record(name)
    return bool(b and b.lossy)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str:
    """'' when backend `name` runs on `device`, else one line saying why not."""
    device = _device(device)
    b = _record(name)
    if b is None:
        return f"unknown attention backend {name!r}; choose from {backend_names()}"
    ok, why = b.available(device)
    return "" if ok else (why or f"{name} is not available on {device}")


def _usable(device: torch.device, lossy: bool):
    """Names usable on `device`, best first, checked one at a time (a later one is not probed
    until asked for); lossy=False leaves the lossy ones out without probing them."""
    for b in backends():
        if (lossy or not b.lossy) and not unavailable_reason(b.name, device):
            yield b.name


def available_backends(device: torch.device | str | None = None, *, lossy: bool = True) -> list[str]:
    """Backends usable on `device` (default: cuda if present, else cpu), best first (priority
    order); lossy=False: the exact ones only (the lossy ones are not even probed)."""
    return list(_usable(_device(device), lossy))


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
    `auto` takes the first available backend that is not lossy (lossy ones are not even probed)."""
    key = str(device)
    got = _state["resolved"].get(key)
    if got is None:
        name = _state["backend"]
        if name == AUTO:
            got = next(_usable(device, lossy=False))  # math runs anywhere
        else:
            why = unavailable_reason(name, device)
            if why:
                raise RuntimeError(f"attention backend {name!r} is not available on {device} "
                                   f"(available: {available_backends(device)}): {why}")
            got = name
        _state["resolved"][key] = got
        b = _record(got)
        if b.opaque:
            _eager(got)
        if not torch.compiler.is_compiling():  # a log call inside a traced region would break the graph
            if b.lossy:
                log.warning("attention backend on %s: %s (LOSSY: %s)", device, got, b.note)
            else:
                log.info("attention backend on %s: %s", device, got)
    return got


def _eager(name: str) -> Callable:
    """The call of an opaque backend as a torch custom op `wan_attention::<name>` (fake: an
    empty tensor like q), so torch.compile keeps it as one node instead of tracing into kernels
    dynamo cannot follow. The op looks the record up at call time, so re-registering a name
    reuses it. Made on first use, which resolve_backend makes happen outside any compiled
    region; without torch.library.custom_op, the plain call."""
    fn = _eager_fns.get(name)
    if fn is None:
        def call(q, k, v, k_lens):
            o = _record(name).fn(q, k, v, k_lens)
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


# --- the built-in calls ------------------------------------------------------------------------------

def _sdpa(q, k, v, k_lens, backend):
    """PyTorch SDPA with its kernel order for `backend`; padded keys as a boolean key mask."""
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
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
    mod = _import(_FLASH[backend].module)
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
    mod = _import(_FLASH["fa4"].module)
    if k_lens is None:
        o = mod.flash_attn_func(q, k, v)
    else:
        used = k_lens.to(device=k.device, dtype=torch.int32).contiguous()
        o = mod.flash_attn_varlen_func(q, k, v, seqused_k=used)
    return o[0] if isinstance(o, tuple) else o  # (out, lse)


BUILTINS = (
    Backend("fa4", _fa4, partial(_flash_available, "fa4"), 70, opaque=True),  # CuTe DSL: dynamo cannot trace it
    Backend("fa3", partial(_flash, backend="fa3"), partial(_flash_available, "fa3"), 60),
    Backend("fa2", partial(_flash, backend="fa2"), partial(_flash_available, "fa2"), 50),
    Backend("sdpa-cudnn", partial(_sdpa, backend="sdpa-cudnn"), _cudnn_sdpa_available, 40),
    Backend("sdpa-flash", partial(_sdpa, backend="sdpa-flash"), partial(_on_cuda, "sdpa-flash"), 30),
    Backend("sdpa", partial(_sdpa, backend="sdpa"), _anywhere, 20),
    Backend("math", partial(_sdpa, backend="math"), _anywhere, 10),
)
_BUILTIN_BY_NAME = {b.name: b for b in BUILTINS}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, L, H, D] inputs; keys >= k_lens[b] masked.

    Inputs not in {fp16, bf16} are cast to bf16 (official behaviour). Output in `out_dtype`
    (default: q's original dtype, like the official `flash_attention`). `backend`: a name from
    backend_names() other than 'auto' (default: resolve_backend for q's device).
    """
    out_dtype = out_dtype or q.dtype
    half = (torch.float16, torch.bfloat16)
    cd = q.dtype if q.dtype in half else torch.bfloat16
    q, k, v = (u if u.dtype == cd else u.to(cd) for u in (q, k, v))
    name = backend or resolve_backend(q.device)
    b = _record(name)
    if b is None:
        raise ValueError(f"unknown attention backend {name!r}; choose from {backend_names()[1:]}")
    o = (_eager(name) if b.opaque else b.fn)(q, k, v, k_lens)
    return o.to(out_dtype)
