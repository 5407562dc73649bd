"""Magnitude ratios of a model, for the `mag` step-cache criterion (wan.step_cache).

For each step n of one schedule (solver, steps, shift) and each CFG branch:

    gamma_n = mean_tokens |r_n| / mean_tokens |r_{n-1}|      (gamma_0 = 1)

where r_n is the residual the block range added to the hidden states at step n (the same
residual the cache reuses). They are measured from the model itself, in one exact generation
(`wan.step_cache.calibrate`; its command line: docs/caching.md), and stored as JSON beside the
checkpoint: `<ckpt_dir>/mag_ratios/<solver>_<steps>steps_shift<shift>.json`, one file per
schedule. Nothing here is copied from elsewhere: a file names the model it was measured on
(a fingerprint of both experts' non-block weights), the schedule and the block range, and
`MagRatios.check` refuses it, in one line, for any other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .naming import Arg
from .requests import InputError

__all__ = ["CacheError", "MagRatios", "Calibration", "fingerprint", "ratios_dir", "ratios_file_name",
           "load_ratios", "find_ratios"]

SCHEMA = 1
KIND = "wan step-cache magnitude ratios"


class CacheError(InputError):
    """A step-cache request that cannot work (a bad setting, ratios of another model or schedule):
    one line naming the arguments as `name=value`."""


@dataclass(frozen=True)
class Calibration:
    """What the ratios were measured with (recorded; only the schedule and the model are checked)."""
    prompts: tuple = ()
    seeds: tuple = ()
    size: str = ""
    frame_num: int = 0
    guide_scale: tuple = ()


@dataclass(frozen=True)
class MagRatios:
    """One model's magnitude ratios for one schedule: `ratios[branch][n]` for step n, branch
    'cond' or 'uncond'."""
    model: str                  # the config's name, for messages
    fingerprint: str            # `fingerprint(pipe)` of the model measured
    solver: str
    steps: int
    shift: float
    blocks: tuple               # the block range (start, stop) whose residual was measured
    ratios: dict                # branch -> tuple of `steps` floats
    calibration: Calibration = Calibration()
    path: str = ""              # where it was read from (messages)

    def check(self, fingerprint_: str, blocks: tuple) -> None:
        """CacheError unless these ratios were measured on this model and block range."""
        where = self.path or "the magnitude ratios"
        if fingerprint_ != self.fingerprint:
            raise CacheError(f"{where} were measured on another model ({self.model}, {self.fingerprint[:19]}), not "
                             f"this one ({fingerprint_[:19]}): measure them on this model (docs/caching.md)")
        if tuple(blocks) != tuple(self.blocks):
            raise CacheError(f"{where} were measured over blocks {tuple(self.blocks)}, and the cache reuses blocks "
                             f"{tuple(blocks)}: measure them with the same block range")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("path")
        d["blocks"] = list(self.blocks)
        d["ratios"] = {b: list(v) for b, v in self.ratios.items()}
        return {"schema": SCHEMA, "kind": KIND, **d}

    @classmethod
    def from_json(cls, d: dict, path: str = "") -> "MagRatios":
        if not isinstance(d, dict) or d.get("kind") != KIND or d.get("schema") != SCHEMA:
            raise CacheError(f"{path}: not a magnitude-ratio file of this version (kind {KIND!r}, schema {SCHEMA})")
        try:
            ratios = {str(b): tuple(float(x) for x in v) for b, v in d["ratios"].items()}
            steps = int(d["steps"])
            if not ratios or any(len(v) != steps for v in ratios.values()):
                raise ValueError("one ratio per step and branch")
            cal = Calibration(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in d.get("calibration", {}).items()})
            return cls(model=str(d["model"]), fingerprint=str(d["fingerprint"]), solver=str(d["solver"]), steps=steps,
                       shift=float(d["shift"]), blocks=tuple(int(b) for b in d["blocks"]), ratios=ratios,
                       calibration=cal, path=path)
        except (KeyError, TypeError, ValueError) as err:
            raise CacheError(f"{path}: a malformed magnitude-ratio file ({err})") from None

    def save(self, path) -> Path:
        """Write the JSON (a temporary name, then renamed: never half-written)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
            tmp.replace(path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (an FSDP2 shard is gathered: every rank must call this)."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def fingerprint(pipe) -> str:
    """'sha256:<hex>' of both experts' non-block weights rounded to bf16 (patch embedding, head):
    the same for a checkpoint loaded in fp32 or bf16, streamed or not, with fp8 blocks or not."""
    h = hashlib.sha256()
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        for t in (m.patch_embedding.weight, m.head.head.weight, m.head.modulation):
            v = _full(t.detach()).to(torch.bfloat16).cpu().contiguous()
            h.update(str(tuple(v.shape)).encode())
            h.update(v.view(torch.int16).numpy().tobytes())
    return f"sha256:{h.hexdigest()}"


def ratios_dir(ckpt_dir) -> Path:
    return Path(ckpt_dir) / "mag_ratios"


def ratios_file_name(solver: str, steps: int, shift: float) -> str:
    return f"{solver}_{steps}steps_shift{shift:g}.json"


def load_ratios(path) -> tuple[MagRatios, ...]:
    """The ratios in a file, or in every *.json of a folder (one per schedule). CacheError when
    there are none or one is unreadable."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise CacheError(f"no magnitude ratios at {path}: measure them on this model (docs/caching.md)")
    out = []
    for f in files:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CacheError(f"{f}: cannot read magnitude ratios ({err})") from None
        out.append(MagRatios.from_json(d, str(f)))
    return tuple(out)


def find_ratios(found: tuple[MagRatios, ...], solver: str, steps: int, shift: float) -> MagRatios:
    """The ratios of this schedule among `found`; CacheError naming the schedules there are."""
    for r in found:
        if r.solver == solver and r.steps == steps and r.shift == float(shift):
            return r
    fields = dict(want=schedule_args(solver, steps, shift))
    have = []
    for i, r in enumerate(found):  # each schedule there is, its Args said as the caller says them
        fields[f"s{i}"], fields[f"f{i}"] = schedule_args(r.solver, r.steps, r.shift), Path(r.path).name
        have.append(f"{{s{i}}} ({{f{i}}})")
    raise CacheError(f"no magnitude ratios for {{want}} (there are: {'; '.join(have)}); the ratios depend on the "
                     "schedule: measure them for this one (docs/caching.md)", **fields)


def schedule_args(solver: str, steps: int, shift: float) -> tuple:
    """A schedule as the Args that name it: sample_solver, sampling_steps, shift."""
    return Arg("sample_solver", solver), Arg("sampling_steps", steps), Arg("shift", f"{float(shift):g}", literal=True)
