"""API words -> flag words. `wan` names its arguments in errors as `name=value`
(`offload='blocks'`, `cfg_parallel=True`, `ulysses_size=3`) and never a command-line flag; the
CLIs report those errors with the flags a user types (`--offload blocks`, `--cfg_parallel`,
`--ulysses_size 3`). The table below is the one place that pairs the two.
"""
from __future__ import annotations

import re

__all__ = ["FLAGS", "LEADING", "flag_words"]

# wan argument -> (CLI flag, takes a value). A switch (no value) is said as the bare flag when True.
FLAGS = {
    "offload": ("--offload", True),
    "offload_model": ("--offload_model", True),
    "no_offload": ("--no-offload", False),
    "compile": ("--compile", False),
    "host_ram": ("--host_ram", True),
    "ulysses_size": ("--ulysses_size", True),
    "cfg_parallel": ("--cfg_parallel", False),
    "dit_fsdp": ("--dit_fsdp", False),
    "t5_fsdp": ("--t5_fsdp", False),
    "t5_cpu": ("--t5_cpu", False),
    "use_batched_cfg": ("--use_batched_cfg", False),
    "timeout": ("--dist_timeout", True),
    "tf32": ("--tf32", False),
    "fp8": ("--fp8", False),
    "preset": ("--preset", True),
    "ckpt_dir": ("--ckpt_dir", True),
}

# wan.requests names the argument it refuses at the start of its message ("shift must be > 0, got 0"):
# those arguments -> their flags, said when they lead a message.
LEADING = {"sampling_steps": "--sample_steps", "shift": "--sample_shift", "guide_scale": "--sample_guide_scale",
           "seed": "--base_seed", "timeout": "--dist_timeout", "frame_num": "--frame_num"}

_NAMED = re.compile(r"\b(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")=('[^']*'|[^\s,;:)/]+)")


def _say(m: re.Match) -> str:
    flag, valued = FLAGS[m.group(1)]
    value = m.group(2).strip("'")
    if valued:
        return f"{flag} {value}"
    return flag if value == "True" else m.group(0)


def flag_words(text: str) -> str:
    """`text` with every `name=value` of a wan argument that has a flag said as that flag:
    "offload='blocks' conflicts with offload_model=True" -> "--offload blocks conflicts with
    --offload_model True"; "compile=True" -> "--compile"; a leading request argument too: "shift must
    be > 0" -> "--sample_shift must be > 0". Other text is left as it is."""
    head, sep, rest = text.partition(" ")
    if head in LEADING:
        text = f"{LEADING[head]}{sep}{rest}"
    return _NAMED.sub(_say, text)
