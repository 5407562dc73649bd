"""LoRA adapters for the Wan 2.2 DiT experts: the published file layouts, exact merge and unmerge.

A LoRA file changes some parameters of one expert (`WanModel`). For a linear weight W [out, in]
with up (B) [out, r] and down (A) [r, in] and strength `strength`:

    s     = strength * alpha / r        (alpha: the file's `.alpha` scalar; absent -> s = strength)
    W'    = cast_to(W.dtype)( float32(W) + s * (float32(B) @ float32(A)) )

computed in float32 on the compute device (the weight's device unless told otherwise), cast
once. A full-delta key D (`.diff` for a weight, `.diff_b` for a bias, `.diff_m` for a block's
modulation) adds `strength * float32(D)` the same way. Several contributions to one parameter
(several LoRAs merged together) are summed in float32 before the single cast.

Unmerge puts back the original tensors bit for bit: the first merge that touches a parameter
keeps a copy of it (`keep="cpu"`: in host memory, pinned when CUDA is available; `keep="device"`:
next to the weight; `keep="none"`: no copy, no unmerge - what the one-shot CLI uses).

File layouts read (see docs/lora.md): PEFT `lora_A`/`lora_B`, `lora_down`/`lora_up` (+ `.alpha`),
with or without the `diffusion_model.` / `transformer.` prefixes; kohya/musubi flattened names
(`lora_unet_blocks_0_self_attn_q`); diffusers module names (`attn1.to_q`, `ffn.net.0.proj`,
`condition_embedder.*`, `proj_out`, `scale_shift_table`, ...) mapped back to the official ones;
full-delta keys `.diff`, `.diff_b`, `.diff_m`.

Also here: the few-step distilled recipes (`RECIPES`: the sampling settings a distilled LoRA pair
was trained for; their flow Euler solver is `wan.schedulers.FlowEulerScheduler`), `check_loras`
(every file mapped against an architecture built on the meta device, before any real model
exists) and `apply_loras` (merge a list of `LoraSpec`s into both experts). The command-line flags
live in `wan_triton/lora_flags.py`.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .requests import InputError, check_finite

log = logging.getLogger("wan.lora")

__all__ = [
    "LoraError", "LoraSpec", "LoraMap", "map_lora", "merge_loras", "merge_lora", "unmerge_loras",
    "loaded_loras", "official_to_diffusers", "Recipe", "RECIPES", "check_loras", "apply_loras",
]

EXPERTS = ("both", "high", "low")
KEEP = ("cpu", "device", "none")


class LoraError(InputError):
    """A LoRA file that cannot be applied to this model: one line, reported by the CLIs (exit 2)."""


@dataclass(frozen=True)
class LoraSpec:
    """One requested LoRA: file, strength, and which expert(s) it goes to."""
    path: str
    strength: float = 1.0
    expert: str = "both"


# --------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------

# Official module name <-> diffusers module name ({i}: block index). diffusers swaps norm2/norm3
# (its norm2 is the official affine cross-attention norm `norm3`; the official norm2 has no params).
_NAME_PAIRS = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
] + [
    (f"blocks.{{i}}.{ours}.{a}", f"blocks.{{i}}.{theirs}.{b}")
    for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                 ("norm_q", "norm_q"), ("norm_k", "norm_k"))
]

# Substrings that only diffusers-named files contain (decides the norm2/norm3 swap per file).
_DIFFUSERS_MARKERS = ("attn1.", "attn2.", "ffn.net.", "condition_embedder.", "proj_out.", "scale_shift_table",
                      "to_out.")
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.diffusion_model.")
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# (suffix regex, role). Roles: down/up/alpha (low rank), diff (weight delta), diff_b (bias delta),
# diff_m (the module's `modulation` delta). The optional `.default` is PEFT's adapter name.
_ROLES = [
    (re.compile(r"\.lora_A(?:\.[A-Za-z_]\w*)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z_]\w*)?\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z_]\w*)?\.bias$"), "diff_b"),  # diffusers' spelling of diff_b
    (re.compile(r"\.diff$"), "diff"),
    (re.compile(r"\.diff_b$"), "diff_b"),
    (re.compile(r"\.diff_m$"), "diff_m"),
]
_UNSUPPORTED = (".dora_scale", ".lora_mid.", "hada_w", "lokr_w", ".oft_", ".glora_")


def official_to_diffusers(num_layers: int) -> dict[str, str]:
    """Official module name -> diffusers module name for a model with `num_layers` blocks."""
    out = {}
    for ours, theirs in _NAME_PAIRS:
        if "{i}" in ours:
            for i in range(num_layers):
                out[ours.format(i=i)] = theirs.format(i=i)
        else:
            out[ours] = theirs
    return out


def _split_role(key: str):
    for pat, role in _ROLES:
        m = pat.search(key)
        if m:
            return key[: m.start()], role
    return None, None


def _strip_prefix(mod: str) -> tuple[str, bool]:
    """-> (module path without a known prefix, flattened?)."""
    for p in _FLAT_PREFIXES:
        if mod.startswith(p):
            return mod[len(p):], True
    for p in _PREFIXES:
        if mod.startswith(p):
            return mod[len(p):], False
    return mod, False


class _Names:
    """The parameter names/shapes of one architecture and the lookups a LoRA key needs."""

    def __init__(self, shapes: dict[str, tuple], num_layers: int):
        self.shapes = shapes
        modules = {n.rsplit(".", 1)[0] for n in shapes if "." in n} | set(shapes)
        o2d = official_to_diffusers(num_layers)
        self.from_diffusers = {d: o for o, d in o2d.items()}
        self.flat = {m.replace(".", "_"): m for m in modules}
        for o, d in o2d.items():
            self.flat.setdefault(d.replace(".", "_"), o)

    def module(self, raw: str, diffusers: bool) -> str | None:
        mod, flat = _strip_prefix(raw)
        if flat:
            return self.flat.get(mod)
        if diffusers:
            mod = self.from_diffusers.get(mod, mod)
        return mod

    def param(self, mod: str, role: str) -> str | None:
        """The parameter a (module, role) pair changes, or None when the model has none."""
        if role == "diff_b":
            cand = [f"{mod}.bias"]
        elif role == "diff_m":
            cand = [f"{mod}.modulation"]
        else:  # down/up/diff: the module's weight, or the module path itself when it names a parameter
            cand = [f"{mod}.weight", mod]
        return next((c for c in cand if c in self.shapes), None)


def _names_of(model) -> _Names:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return _Names(shapes, len(model.blocks))


# --------------------------------------------------------------------------------------
# Plan: which parameter each tensor of the file changes (header only, no tensor data)
# --------------------------------------------------------------------------------------

@dataclass
class _Term:
    """One contribution to a parameter: low rank (up @ down) or a full delta."""
    kind: str                # "lowrank" or "diff"
    keys: tuple              # (up_key, down_key) or (diff_key,)
    scale: float             # alpha / rank for low rank (1 when no alpha), 1 for a delta
    rank: int = 0


@dataclass
class LoraMap:
    """What one file does to one architecture: parameter name -> terms (before strength)."""
    path: Path
    terms: dict = field(default_factory=dict)
    n_tensors: int = 0

    @property
    def modules(self) -> int:
        return len(self.terms)


def _check_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise LoraError(f"LoRA file not found: {p}")
    if not p.is_file():
        raise LoraError(f"LoRA path is not a file: {p}")
    return p


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError, OSError: not a safetensors file (or unreadable)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LoraError(f"{path} is not a readable safetensors file ({first})") from None


def map_lora(path, model) -> LoraMap:
    """Read the header of a LoRA file and map every tensor onto a parameter of `model` (a WanModel,
    real or on the meta device). Raises LoraError (one line) for: a missing or non-safetensors file,
    a key that maps to no parameter of this model, an unsupported adapter type, an incomplete
    low-rank pair, a shape that does not fit, or a file with nothing for this model."""
    path = _check_file(path)
    names = model if isinstance(model, _Names) else _names_of(model)
    with _open(path) as f:
        keys = list(f.keys())
        shape = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    lmap = LoraMap(path=path, n_tensors=len(keys))
    if not keys:
        raise LoraError(f"{path.name}: the file holds no tensors, nothing for this model")
    diffusers = any(m in k for k in keys for m in _DIFFUSERS_MARKERS)

    groups: dict[tuple, dict] = {}  # (param, kind-group) -> role -> key
    unmapped, roleless = [], []
    for k in keys:
        bad = next((u for u in _UNSUPPORTED if u in k), None)
        if bad:
            raise LoraError(f"{path.name}: key {k!r} is an adapter type this loader does not merge "
                            f"({bad.strip('._')}); only plain LoRA and full-delta keys are supported")
        raw, role = _split_role(k)
        if role is None:
            roleless.append(k)
            continue
        mod = names.module(raw, diffusers)
        if role == "alpha":
            param = names.param(mod, "down") if mod else None
        else:
            param = names.param(mod, role) if mod else None
        if param is None:
            unmapped.append(k)
            continue
        g = "lowrank" if role in ("down", "up", "alpha") else role
        slot = groups.setdefault((param, g), {})
        if role in slot:
            raise LoraError(f"{path.name}: keys {slot[role]!r} and {k!r} both set the {role} of {param}")
        slot[role] = k

    if not groups:
        sample = (unmapped or roleless)[0]
        raise LoraError(f"{path.name}: nothing for this model ({len(keys)} tensors, none maps onto a Wan DiT "
                        f"parameter; first key {sample!r})")
    if unmapped:
        raise LoraError(f"{path.name}: key {unmapped[0]!r} maps to no module of this model"
                        + (f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""))
    if roleless:
        raise LoraError(f"{path.name}: key {roleless[0]!r} is not a LoRA tensor (expected lora_A/lora_B, "
                        f"lora_down/lora_up, .alpha, .diff, .diff_b or .diff_m)")

    for (param, g), slot in sorted(groups.items()):
        want = names.shapes[param]
        if g == "lowrank":
            if "up" not in slot or "down" not in slot:
                have = next(iter(slot.values()))
                raise LoraError(f"{path.name}: {have!r} has no matching "
                                f"{'up/lora_B' if 'up' not in slot else 'down/lora_A'} tensor")
            up, down = shape[slot["up"]], shape[slot["down"]]
            rank = down[0] if down else 0
            fits = (len(up) >= 2 and len(down) >= 2 and len(want) >= 2 and up[0] == want[0]
                    and _numel(up[1:]) == rank and _numel(down[1:]) == _numel(want[1:]))
            if not fits:
                raise LoraError(f"{path.name}: {slot['up']!r} {list(up)} x {slot['down']!r} {list(down)} does not "
                                f"fit {param} {list(want)} (a LoRA for another model size?)")
            scale = 1.0
            if "alpha" in slot:
                a = alphas[slot["alpha"]]
                if a.numel() != 1:
                    raise LoraError(f"{path.name}: {slot['alpha']!r} should be a scalar, has shape {list(a.shape)}")
                scale = float(a.float().item()) / rank
            lmap.terms.setdefault(param, []).append(_Term("lowrank", (slot["up"], slot["down"]), scale, rank))
        else:
            d = shape[slot[g]]
            if _squeeze(d) != _squeeze(want):
                raise LoraError(f"{path.name}: {slot[g]!r} {list(d)} does not fit {param} {list(want)} "
                                f"(a LoRA for another model size?)")
            lmap.terms.setdefault(param, []).append(_Term("diff", (slot[g],), 1.0))
    return lmap


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _squeeze(shape) -> tuple:
    return tuple(s for s in shape if s != 1)


# --------------------------------------------------------------------------------------
# Merge / unmerge
# --------------------------------------------------------------------------------------

@dataclass
class _State:
    """Per-model LoRA bookkeeping, kept as `model._lora_state`."""
    originals: dict = field(default_factory=dict)   # param name -> original tensor (or None: keep="none")
    loaded: list = field(default_factory=list)      # (path, strength) in merge order
    keep: str = "cpu"


def _state(model) -> _State:
    st = getattr(model, "_lora_state", None)
    if st is None:
        st = _State()
        model._lora_state = st
    return st


def loaded_loras(model) -> list:
    """(path, strength) of the LoRAs merged into `model`, in order."""
    st = getattr(model, "_lora_state", None)
    return list(st.loaded) if st else []


class _NoTF32:
    """fp32 matmuls exact during a merge, whatever the global TF32 switch says."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _keep_copy(w: torch.Tensor, keep: str):
    if keep == "none":
        return None
    if keep == "device":
        return w.detach().clone()
    if w.device.type == "cpu":
        return w.detach().clone()
    out = torch.empty(w.shape, dtype=w.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(w.detach(), non_blocking=False)
    return out


@torch.no_grad()
def merge_loras(model, items, keep: str = "cpu", device=None, label: str = "") -> int:
    """Merge several LoRAs into `model` in one pass: items = [(path or LoraMap, strength), ...].

    Each touched parameter becomes cast(W32 + sum_i strength_i * scale_i * delta_i), float32 math on
    `device` (default: the parameter's own device), written in place (the Parameter object is
    kept). Every file is mapped (validated) before anything changes. Returns the number of
    parameters changed."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    for it, s in items:  # NaN/inf would turn every touched weight into NaN
        try:
            check_finite("LoRA strength", s)
        except InputError as err:
            raise LoraError(f"{err} ({getattr(it, 'path', it)})") from None
    names = _names_of(model)
    maps = [(it if isinstance(it, LoraMap) else map_lora(it, names), float(s)) for it, s in items]
    params = dict(model.named_parameters())
    st = _state(model)
    if st.loaded and st.keep != keep and "none" in (st.keep, keep):
        raise LoraError("cannot mix keep='none' with LoRAs merged under another keep setting")
    st.keep = keep
    t0 = time.perf_counter()
    touched: dict[str, list] = {}
    for lmap, s in maps:
        for pname, terms in lmap.terms.items():
            touched.setdefault(pname, []).extend((lmap, s, t) for t in terms)
    handles, p = {}, None
    try:
        for lmap, _ in maps:
            if lmap.path not in handles:
                handles[lmap.path] = _open(lmap.path).__enter__()
        with _NoTF32():
            for pname in sorted(touched):
                p = params[pname]
                dev = torch.device(device) if device is not None else p.device
                if pname not in st.originals:
                    st.originals[pname] = _keep_copy(p.data, keep)
                acc = p.data.to(device=dev, dtype=torch.float32, copy=True)
                for lmap, s, term in touched[pname]:
                    f = handles[lmap.path]
                    if term.kind == "lowrank":
                        up = f.get_tensor(term.keys[0]).to(device=dev, dtype=torch.float32)
                        down = f.get_tensor(term.keys[1]).to(device=dev, dtype=torch.float32)
                        delta = torch.mm(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
                    else:
                        delta = f.get_tensor(term.keys[0]).to(device=dev, dtype=torch.float32)
                    delta.mul_(s * term.scale)
                    acc.add_(delta.reshape(acc.shape))
                p.data.copy_(acc.to(p.dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    dt = time.perf_counter() - t0
    for lmap, s in maps:
        st.loaded.append((str(lmap.path), s))
        log.info("LoRA %s -> %s: %d modules changed (strength %g%s)", lmap.path.name, label or "model",
                 lmap.modules, s, _scale_note(lmap))
    log.info("merged %d LoRA(s) into %s in %.2f s (%d parameters, originals kept: %s)", len(maps),
             label or "model", dt, len(touched), keep)
    return len(touched)


def _scale_note(lmap: LoraMap) -> str:
    scales = {round(t.scale, 6) for ts in lmap.terms.values() for t in ts if t.kind == "lowrank"}
    ranks = {t.rank for ts in lmap.terms.values() for t in ts if t.kind == "lowrank"}
    if not scales:
        return ", full deltas"
    return f", rank {'/'.join(map(str, sorted(ranks)))}, alpha/rank {'/'.join(f'{x:g}' for x in sorted(scales))}"


def merge_lora(model, path, strength: float = 1.0, keep: str = "cpu", device=None, label: str = "") -> int:
    """Merge one LoRA file into `model` (see merge_loras)."""
    return merge_loras(model, [(path, strength)], keep=keep, device=device, label=label)


@torch.no_grad()
def unmerge_loras(model) -> int:
    """Put back every parameter a LoRA changed, bit for bit; returns how many were restored."""
    st = getattr(model, "_lora_state", None)
    if st is None or not st.originals:
        return 0
    if st.keep == "none":
        raise LoraError("these LoRAs were merged with keep='none': the original weights were not kept")
    params = dict(model.named_parameters())
    for name, orig in st.originals.items():
        p = params[name]
        if p.shape != orig.shape or p.dtype != orig.dtype:
            raise LoraError(f"cannot unmerge {name}: it changed shape or dtype since the merge "
                            f"({list(orig.shape)} {orig.dtype} -> {list(p.shape)} {p.dtype})")
        p.data.copy_(orig)
    n = len(st.originals)
    model._lora_state = None
    log.info("unloaded LoRAs: %d parameters restored", n)
    return n


def load_lora_into_pipeline(pipe, path, strength: float = 1.0, expert: str = "both", keep: str = "cpu",
                            device=None) -> dict:
    """`WanT2V.load_lora`: merge one file into the chosen expert(s). Returns {expert: params changed}."""
    if expert not in EXPERTS:
        raise LoraError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
    targets = [("high", pipe.high_noise_model), ("low", pipe.low_noise_model)]
    targets = [t for t in targets if expert in ("both", t[0])]
    lmap = map_lora(path, targets[0][1])  # both experts share one architecture
    return {name: merge_loras(m, [(lmap, strength)], keep=keep, device=device, label=f"{name}-noise expert")
            for name, m in targets}


def unload_from_pipeline(pipe) -> int:
    return sum(unmerge_loras(m) for m in (pipe.high_noise_model, pipe.low_noise_model))


# --------------------------------------------------------------------------------------
# Few-step distilled recipes
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """Sampling settings a step-distilled LoRA pair was trained for (explicit flags still win)."""
    name: str
    steps: int
    shift: float
    guide_scale: float
    solver: str
    note: str = ""


RECIPES = {r.name: r for r in (
    Recipe("lightning-4step", steps=4, shift=5.0, guide_scale=1.0, solver="euler",
           note="Wan2.2-Lightning / lightx2v 4-step distill LoRAs: flow Euler on sigmas "
                "shift(1, .75, .5, .25) = 1, .9375, .8333, .625; steps 1-2 high-noise, 3-4 low-noise expert"),
)}


# --------------------------------------------------------------------------------------
# Lists of LoRAs (what the command-line flags ask for)
# --------------------------------------------------------------------------------------

def check_loras(specs, dit_config=None) -> None:
    """Check LoRA files before any model is built: each exists and is safetensors; with `dit_config`
    (a wan.configs.DiTConfig), every key and shape is mapped onto that architecture (a model on
    the meta device, no memory). Raises LoraError (one line)."""
    names = None
    if dit_config is not None and specs:
        from .dit import WanModel

        with torch.device("meta"):
            names = _names_of(WanModel(dit_config))
    for sp in specs:
        p = _check_file(sp.path)
        if names is None:
            with _open(p):
                pass
        else:
            map_lora(p, names)


def apply_loras(pipe, specs, keep: str = "none") -> None:
    """Merge the CLI's LoRAs: one float32 pass per expert over all its LoRAs (cast once). The CLI
    keeps no originals (keep='none'): the merge lasts for the process. The math runs on the
    pipeline's CUDA device even while an expert waits in CPU memory."""
    if not specs:
        return
    device = pipe.device if pipe.device.type == "cuda" else None
    for name, model in (("high", pipe.high_noise_model), ("low", pipe.low_noise_model)):
        items = [(sp.path, sp.strength) for sp in specs if sp.expert in ("both", name)]
        if items:
            merge_loras(model, items, keep=keep, device=device, label=f"{name}-noise expert")
