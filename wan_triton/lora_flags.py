"""The LoRA / few-step recipe flag group of wan-generate and wan-benchmark (docs/lora.md).

    --lora PATH[:STRENGTH]        merged into both experts (repeatable)
    --lora_high / --lora_low      one expert only (repeatable)
    --recipe lightning-4step      steps 4, shift 5, guidance 1, euler, for the flags left unset

wan_triton.request.parse_request calls `apply_recipe` first (so the recipe's values pass the
same checks as typed ones) and `parse_lora_flags` (each file found and readable as safetensors):
`Request.loras` holds the `LoraSpec`s. `lora_specs(req)` then maps every key and shape onto the
task's architecture (on the meta device), still before any model is built. The LoRA math is in
wan/lora.py.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from wan.lora import RECIPES, LoraSpec, check_loras
from wan.pipeline import schedule_experts

from .exits import CLIError

__all__ = ["parse_lora_arg", "add_lora_flags", "apply_recipe", "parse_lora_flags", "lora_specs", "warn_unreached"]

_LORA_FLAGS = (("both", "lora"), ("high", "lora_high"), ("low", "lora_low"))


def parse_lora_arg(text: str, expert: str = "both"):
    """'PATH[:STRENGTH]' -> LoraSpec. The strength is taken after the last ':' only when it parses as a
    float, so 'C:\\loras\\a.safetensors' and 'dir:with:colons/a.safetensors' stay whole paths. A tail that
    is not a number after a .safetensors name (or an existing file), and a strength that is not finite,
    are CLIErrors naming the strength."""

    flag = "--lora" if expert == "both" else f"--lora_{expert}"
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            if not Path(text).exists() and (head.lower().endswith(".safetensors") or Path(head).is_file()):
                raise CLIError(f"{flag} {text}: the strength {tail!r} after ':' is not a number "
                               f"(PATH[:STRENGTH], e.g. {head}:0.8)") from None
    if not math.isfinite(strength):
        raise CLIError(f"{flag} {text}: the strength must be a finite number, got {tail}")
    return LoraSpec(path=path, strength=strength, expert=expert)


def add_lora_flags(parser) -> None:
    """--lora / --lora_high / --lora_low (repeatable) and --recipe."""

    g = parser.add_argument_group("LoRA and few-step recipes")
    a = g.add_argument
    a("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
      help="LoRA .safetensors merged into both experts (repeatable)")
    a("--lora_high", action="append", default=[], metavar="PATH[:STRENGTH]",
      help="LoRA for the high-noise expert only (repeatable)")
    a("--lora_low", action="append", default=[], metavar="PATH[:STRENGTH]",
      help="LoRA for the low-noise expert only (repeatable)")
    a("--recipe", default=None, choices=sorted(RECIPES),
      help="few-step distilled setting: " + "; ".join(
          f"{r.name} = {r.steps} steps, shift {r.shift:g}, guidance {r.guide_scale:g}, {r.solver}"
          for r in RECIPES.values()) + " (explicit --sample_* flags win; default: none)")


def apply_recipe(args) -> None:
    """Fill the sampling flags the user left unset (None) from --recipe. A tool without a flag
    (wan-benchmark has no --sample_shift) still gets the recipe's value."""

    r = RECIPES.get(getattr(args, "recipe", None) or "")
    if r is None:
        return
    set_, kept = [], []
    for attr, val in (("sample_steps", r.steps), ("sample_shift", r.shift),
                      ("sample_guide_scale", r.guide_scale), ("sample_solver", r.solver)):
        if getattr(args, attr, None) is None:
            setattr(args, attr, val)
            set_.append(f"--{attr} {val:g}" if isinstance(val, float) else f"--{attr} {val}")
        else:
            kept.append(f"--{attr} {getattr(args, attr)}")
    logging.info("recipe %s sets %s%s", r.name, ", ".join(set_) or "nothing",
                 f" (given, kept: {', '.join(kept)})" if kept else "")


def parse_lora_flags(args) -> list:
    """The LoRA flags -> [LoraSpec]; each file exists and is safetensors (LoraError, one line)."""

    specs = [parse_lora_arg(t, e) for e, flag in _LORA_FLAGS for t in (getattr(args, flag, None) or [])]
    check_loras(specs)
    return specs


def lora_specs(req) -> list:
    """Request.loras with every key and shape checked against the task's DiT (meta device, no
    memory): call before building models. Raises LoraError (one line)."""

    specs = list(req.loras)
    check_loras(specs, req.config.dit)
    warn_unreached(req, specs)
    return specs


def warn_unreached(req, specs) -> None:
    """A warning for each LoRA of one expert that the request's schedule never runs (e.g. --lora_low
    with 1 step: every step is a high-noise one), which would otherwise be a silent no-op."""

    one = [sp for sp in specs if sp.expert != "both"]
    if not one:
        return
    used = set(schedule_experts(req.config, req.solver, req.steps, req.shift))
    for sp in one:
        if sp.expert not in used:
            shift = req.config.sample_shift if req.shift is None else req.shift
            logging.warning("--lora_%s %s: the %s-noise expert never runs in this schedule (%d %s step(s), shift "
                            "%g: the expert switch at t = %g is never reached): this LoRA changes nothing",
                            sp.expert, sp.path, sp.expert, req.steps, req.solver, shift,
                            req.config.boundary * req.config.num_train_timesteps)

