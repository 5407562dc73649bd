"""API words -> flag words. Errors name the options they refuse as `wan.naming.Arg`s (`offload=
'blocks'`, `cfg_parallel=True`, the bare `sampling_steps`), never as command-line flags; the CLIs
say each one as the flag a user types (`--offload blocks`, `--cfg_parallel`, `--sample_steps`).
The table below is the one place that pairs the two; no message text is rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass

from wan.naming import Arg, NamedError

__all__ = ["Flag", "FLAGS", "flag_of", "in_flags"]


@dataclass(frozen=True)
class Flag:
    """How the CLIs spell an API argument: `flag` takes a value (`valued`: '--offload blocks') or is
    a switch (said bare when the argument is True); `off`: the switch that sets it False."""
    flag: str
    valued: bool = False
    off: str = ""


FLAGS = {
    # the run's options (wan_triton.plan)
    "offload": Flag("--offload", valued=True),
    "offload_model": Flag("--offload_model", valued=True),
    "no_offload": Flag("--no-offload"),
    "host_ram": Flag("--host_ram", valued=True),
    "t5_cpu": Flag("--t5_cpu"),
    "triton": Flag("", off="--no-triton"),
    "compile": Flag("--compile", off="--no-compile"),
    "compile_mode": Flag("--compile_mode", valued=True),
    "tf32": Flag("--tf32"),
    "use_batched_cfg": Flag("--use_batched_cfg"),
    "attention": Flag("--attention", valued=True),
    "fp8": Flag("--fp8"),
    "preset": Flag("--preset", valued=True),
    "ckpt_dir": Flag("--ckpt_dir", valued=True),
    "convert_model_dtype": Flag("--convert_model_dtype"),
    # multi-GPU (wan.parallel)
    "ulysses_size": Flag("--ulysses_size", valued=True),
    "cfg_parallel": Flag("--cfg_parallel"),
    "dit_fsdp": Flag("--dit_fsdp"),
    "t5_fsdp": Flag("--t5_fsdp"),
    "timeout": Flag("--dist_timeout", valued=True),
    # the request (wan.requests): generate()'s argument names
    "sampling_steps": Flag("--sample_steps", valued=True),
    "shift": Flag("--sample_shift", valued=True),
    "guide_scale": Flag("--sample_guide_scale", valued=True),
    "seed": Flag("--base_seed", valued=True),
}


def flag_of(arg: Arg) -> str:
    """`arg` as a user types it: 'offload='blocks'' -> '--offload blocks', 'compile=True' ->
    '--compile', 'compile=False' -> '--no-compile', the bare 'sampling_steps' -> '--sample_steps'.
    An argument without a flag keeps its API words."""
    f = FLAGS.get(arg.name)
    if f is None or (not f.flag and not (arg.value is False and f.off)):
        return str(arg)
    if arg.bare:
        return f.flag
    if f.valued:
        return f"{f.flag} {arg.value}"
    if arg.value is True:
        return f.flag
    return f.off if arg.value is False and f.off else str(arg)


def in_flags(err: BaseException) -> str:
    """An error's one line as the CLIs say it: its named arguments as flags."""
    return err.say(flag_of) if isinstance(err, NamedError) else str(err)
