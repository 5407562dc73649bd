"""Opt-in fp8 attention on Hopper: `--attention fp8`, `patch(attention="fp8")`. LOSSY.

    q8, k8, v8 = e4m3(q * s_q), e4m3((k - mean_l k) * s_k), e4m3(v * s_v)     (kernels.attn_quant_fp8)
    o          = cuDNN fp8 SDPA(q8, k8, v8; descale_q/k/v, scale_s, descale_s, scale_o)

Per-tensor scales s = 448 / amax (computed on the GPU; no host sync). The k mean (per batch
entry and channel, over all tokens) is exact under softmax (a per-query constant; see
wan_triton/kernels/attn_quant_fp8.py) and on by default. Inside cuDNN the probabilities P (unnormalised,
in [0, 1]) are stored in e4m3 with `scale_s` (default 448: P = 1 -> 448; small P fall to e4m3's
subnormals, the main error term at long sequences) before the P V matmul.

Output: bf16 (or fp16) straight from cuDNN where it builds such a graph (Blackwell with cuDNN
>= 9.13 only; on Hopper cuDNN declines it, so only the e4m3 output is tried there); otherwise e4m3 O
with scale_o = s_v, safe because softmax weights sum to 1 so |o| <= max|v| = 448 / s_v, and
o = O * (1 / s_v) in bf16. Which one was built is logged once per shape. The e4m3 output is the
floor of the error on Hopper: one rounding to 3 mantissa bits is up to 2^-4 relative, about 3.6 %
RMS (2^-4 / sqrt 3), whatever the scale, as long as O stays in e4m3's normal range.

Why opt-in: every other backend matches the exact result to ~2e-3; this one measured 6.1e-2
relative error at the 720p shape on an H200 with random inputs (bench/bench_attention.py,
bench/RESULTS.md), which changes the video. `auto` never picks it: it is registered with
wan.attention as a lossy record (`register`; the CLIs register it to offer it as a choice).

Graphs are built once per (shape, padding, output type, device) and cached with their
workspace. Padded keys: cuDNN's padding mask with seq_len_kv = k_lens, seq_len_q = Lq (every
query kept), the official semantics. Needs: a CUDA sm90 GPU (sm100 is allowed too), Triton, and
`nvidia-cudnn-frontend` (python module `cudnn`) over a cuDNN backend with fp8 SDPA (9.x);
`availability()` builds and runs a tiny graph once and says in one line why not otherwise.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

log = logging.getLogger("wan_triton.fp8_attention")

NAME = "fp8"
NOTE = "fp8 e4m3 q/k/v, P and (on Hopper) O through cuDNN fp8 SDPA; rel err ~6e-2 vs exact attention"
P_SCALE = 448.0
OUT_TYPES = ("bf16", "fp16", "fp8")   # tried in this order when a graph is built


@dataclass
class Settings:
    subtract_k_mean: bool = True
    p_scale: float = P_SCALE
    out_types: tuple = OUT_TYPES


settings = Settings()


def _cudnn():
    """The cudnn frontend module, with the process's cuDNN library loaded first through torch
    (so the frontend finds the same libcudnn that torch uses)."""
    torch.backends.cudnn.version()
    import cudnn

    return cudnn


@dataclass
class _Graph:
    graph: object
    workspace: torch.Tensor
    out_type: str
    uids: dict = field(default_factory=dict)


_graphs: dict[tuple, _Graph] = {}
_handles: dict[int, object] = {}
_avail: dict[str, tuple[bool, str]] = {}


def _handle(device: torch.device):
    cudnn = _cudnn()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    h = _handles.get(idx)
    if h is None:
        with torch.cuda.device(idx):
            h = _handles[idx] = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(idx).cuda_stream)
    return h


_UID = dict(q=1, k=2, v=3, o=4, dq=5, dk=6, dv=7, ds=8, ss=9, so=10, amax_s=11, amax_o=12, sq=13, skv=14)


def _build(B, H, Lq, Lk, D, padded, out_type, device) -> _Graph:
    cudnn = _cudnn()
    dt = cudnn.data_type
    otype = {"bf16": dt.BFLOAT16, "fp16": dt.HALF, "fp8": dt.FP8_E4M3}[out_type]
    g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                      handle=_handle(device))

    def bshd(uid, L):  # [B, L, H, D] memory seen as (B, H, L, D)
        return g.tensor(uid=uid, dim=(B, H, L, D), stride=(L * H * D, D, H * D, 1), data_type=dt.FP8_E4M3)

    def scalar(uid, dtype=dt.FLOAT):
        return g.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dtype)

    q, k, v = bshd(_UID["q"], Lq), bshd(_UID["k"], Lk), bshd(_UID["v"], Lk)
    kw = dict(q=q, k=k, v=v, descale_q=scalar(_UID["dq"]), descale_k=scalar(_UID["dk"]),
              descale_v=scalar(_UID["dv"]), descale_s=scalar(_UID["ds"]), scale_s=scalar(_UID["ss"]),
              scale_o=scalar(_UID["so"]), attn_scale=1.0 / math.sqrt(D), use_causal_mask=False)
    if padded:
        kw.update(use_padding_mask=True,
                  seq_len_q=g.tensor(uid=_UID["sq"], dim=(B, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.INT32),
                  seq_len_kv=g.tensor(uid=_UID["skv"], dim=(B, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.INT32))
    try:
        o, stats, amax_s, amax_o = g.sdpa_fp8(generate_stats=False, **kw)
    except TypeError:  # frontends before generate_stats
        o, stats, amax_s, amax_o = g.sdpa_fp8(is_inference=True, **kw)
    o.set_uid(_UID["o"]).set_output(True).set_dim((B, H, Lq, D)).set_stride((Lq * H * D, D, H * D, 1)) \
        .set_data_type(otype)
    for t, uid in ((amax_s, "amax_s"), (amax_o, "amax_o")):
        t.set_uid(_UID[uid]).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=device)
    return _Graph(g, ws, out_type)


def _graph(B, H, Lq, Lk, D, padded, device, s: Settings) -> _Graph:
    key = (B, H, Lq, Lk, D, padded, str(device), s.out_types)  # scales are runtime tensors: not in the key
    got = _graphs.get(key)
    if got is None:
        errors = []
        out_types = s.out_types
        if torch.cuda.get_device_capability(device)[0] < 10 and "fp8" in out_types:
            out_types = ("fp8",)  # cuDNN builds bf16/fp16 outputs of fp8 SDPA on Blackwell only
        for ot in out_types:
            try:
                got = _build(B, H, Lq, Lk, D, padded, ot, device)
                break
            except Exception as err:  # noqa: BLE001 - try the next output type, report all
                errors.append(f"{ot} output: {type(err).__name__}: {_line(err)}")
        if got is None:
            raise RuntimeError("cuDNN fp8 SDPA: no graph builds here (" + "; ".join(errors) + ")")
        _graphs[key] = got
        log.info("fp8 attention: cuDNN fp8 SDPA graph for B=%d H=%d Lq=%d Lk=%d D=%d%s, %s output%s", B, H, Lq, Lk,
                 D, " padded" if padded else "", got.out_type,
                 f" ({'; '.join(errors)})" if errors else "")
    return got


def _line(err: BaseException) -> str:
    s = str(err).strip()
    return s.splitlines()[0][:300] if s else ""


def quantize(q, k, v, subtract_k_mean: bool = True):
    """(q8, k8, v8) as kernels.attn_quant_fp8.QuantFP8 tuples."""
    from wan_triton.kernels.attn_quant_fp8 import quantize_fp8

    return (quantize_fp8(q), quantize_fp8(k, subtract_mean=subtract_k_mean), quantize_fp8(v))


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None,
                  settings_: Settings | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v through fp8 (see the module docstring); [B, L, H, D] in,
    [B, Lq, H, D] out in q's dtype."""
    s = settings_ or settings
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    qq, kq, vq = quantize(q, k, v, s.subtract_k_mean)
    g = _graph(B, H, Lq, Lk, D, k_lens is not None, q.device, s)
    dev = q.device
    p_scale = torch.full((1,), s.p_scale, dtype=torch.float32, device=dev)
    o_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[g.out_type]
    o = torch.empty(B, Lq, H, D, dtype=o_dtype, device=dev)
    amax = torch.empty(2, dtype=torch.float32, device=dev)
    scale_o = vq.scale if g.out_type == "fp8" else torch.ones(1, dtype=torch.float32, device=dev)
    pack = {_UID["q"]: qq.data, _UID["k"]: kq.data, _UID["v"]: vq.data, _UID["o"]: o,
            _UID["dq"]: qq.descale, _UID["dk"]: kq.descale, _UID["dv"]: vq.descale,
            _UID["ds"]: 1.0 / p_scale, _UID["ss"]: p_scale, _UID["so"]: scale_o,
            _UID["amax_s"]: amax[0:1], _UID["amax_o"]: amax[1:2]}
    if k_lens is not None:
        pack[_UID["sq"]] = torch.full((B, 1, 1, 1), Lq, dtype=torch.int32, device=dev)
        pack[_UID["skv"]] = k_lens.to(device=dev, dtype=torch.int32).reshape(B, 1, 1, 1).contiguous()
    g.graph.execute(pack, g.workspace, handle=_handle(dev))
    if g.out_type == "fp8":
        return (o.float() * vq.descale).to(q.dtype)
    return o if o.dtype == q.dtype else o.to(q.dtype)


def availability(device) -> tuple[bool, str]:
    """(ok, one-line reason) for the fp8 backend on `device`; the check builds and runs a tiny
    graph once per device and is cached."""
    device = torch.device(device)
    key = str(device)
    if key in _avail:
        return _avail[key]
    got = _check(device)
    if device.type == "cuda":
        _avail[key] = got
        if not got[0]:
            log.warning("attention backend fp8 left out: %s", got[1])
    return got


def _check(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "fp8 attention needs a CUDA GPU (Hopper)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"fp8 attention needs Hopper (sm90) or newer; this GPU is sm{major}{minor}"
    from wan_triton import kernels

    if not kernels.triton_available():
        return False, "fp8 attention needs Triton (for the quantization kernel)"
    try:
        cudnn = _cudnn()
    except Exception as err:  # noqa: BLE001
        return False, (f"fp8 attention needs nvidia-cudnn-frontend (pip install nvidia-cudnn-frontend): "
                       f"import cudnn failed ({type(err).__name__}: {_line(err)})")
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(3, 1, 256, 2, 128, device=device, generator=gen).to(torch.bfloat16)  # the DiT head dim
        o = attention_fp8(x[0], x[1], x[2])
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in x)).transpose(1, 2)
        err = ((o.float() - ref).norm() / ref.norm()).item()
        if not err < 0.1:
            return False, f"cuDNN fp8 SDPA runs but its test error is {err:.3g} (cudnn {_versions(cudnn)})"
    except Exception as err:  # noqa: BLE001
        return False, f"cuDNN fp8 SDPA does not run here (cudnn {_versions(cudnn)}): {type(err).__name__}: {_line(err)}"
    return True, ""


def _versions(cudnn) -> str:
    fe = getattr(cudnn, "__version__", "?")
    try:
        be = cudnn.backend_version()
    except Exception:  # noqa: BLE001
        be = "?"
    return f"frontend {fe}, backend {be}"


def register() -> None:
    """Register `fp8` with wan.attention (idempotent): lossy (never `auto`), opaque under
    torch.compile (a custom op: dynamo does not trace the cuDNN frontend); nothing is imported
    or probed yet."""
    from wan import attention as att

    if NAME not in att.backend_names():
        att.register_backend(NAME, attention_fp8, available=availability, lossy=True, opaque=True, note=NOTE)


def ensure_registered(name: str | None) -> None:
    """Register the backend when `name` asks for it (patch / optimize / the CLI call this)."""
    if name == NAME:
        register()
