"""One attention dispatch for the DiT.

Backends, tried in this order by `auto`: flash-attn 3 (`flash_attn_interface`), flash-attn 2
(`flash_attn`), PyTorch SDPA with the cuDNN backend first (Hopper: measured fastest here),
default SDPA. `math` is SDPA's math backend (any device). Inputs that are not fp16/bf16
are cast to bf16 as the official code does; softmax scale 1/sqrt(head_dim), no dropout,
not causal; keys at positions >= k_lens[b] are masked (the official varlen call).
Where attention sits in the precision map: docs/precision.md.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("wan.attention")

BACKENDS = ("auto", "fa3", "fa2", "sdpa-cudnn", "sdpa-flash", "sdpa", "math")
_state = {"backend": "auto", "resolved": {}}


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on `device` (default: cuda if present, else cpu), best first."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    if device.type == "cuda":
        if _has("flash_attn_interface"):
            out.append("fa3")
        if _has("flash_attn"):
            out.append("fa2")
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 9 and hasattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION"):
            out.append("sdpa-cudnn")
        out.append("sdpa-flash")
    out += ["sdpa", "math"]
    return out


def set_backend(name: str) -> str:
    """Choose the backend by name ('auto' picks per device). Returns the previous choice."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    prev = _state["backend"]
    _state["backend"] = name
    _state["resolved"].clear()
    return prev


def get_backend() -> str:
    return _state["backend"]


def resolve_backend(device: torch.device) -> str:
    """The concrete backend `auto` (or the set name) means on this device; logged once per device."""
    key = str(device)
    got = _state["resolved"].get(key)
    if got is None:
        name = _state["backend"]
        avail = available_backends(device)
        if name == "auto":
            got = avail[0]
        elif name in avail:
            got = name
        else:
            raise RuntimeError(f"attention backend {name!r} is not available on {device} (available: {avail})")
        _state["resolved"][key] = got
        if not _compiling():  # a log call inside a traced region would break the graph
            log.info("attention backend on %s: %s", device, got)
    return got


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch without torch.compiler.is_compiling
        return False


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
    if backend == "fa3":
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    else:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    if k_lens is None:
        o = flash_attn_func(q, k, v)
    else:  # varlen: all queries, keys truncated per sample
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
        keep = torch.arange(Lk, device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        cu_k = F.pad(k_lens.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        o = flash_attn_varlen_func(q.flatten(0, 1), k[keep], v[keep], cu_q, cu_k.to(q.device), Lq,
                                   int(k_lens.max()))
        o = o.unflatten(0, (B, Lq))
    return o[0] if isinstance(o, tuple) else o


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
    if name in ("fa3", "fa2"):
        o = _flash(q, k, v, k_lens, name)
    else:
        mask = None
        if k_lens is not None:
            mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
        o = _sdpa(q, k, v, mask, name)
    return o.to(out_dtype)
