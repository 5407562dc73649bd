"""Command-line parsing and request checks shared by `wan-generate` and `wan-benchmark`.

Each tool builds its parser (wan_triton.parser.OneLineParser) from the flag groups below, then
calls `parse_request(args, ...)`,
which makes every check that needs no model (task, device, attention backend, size, frames,
solver, steps, prompt) and the run's plan (wan_triton.plan: offload, CUDA-only flags, the
combinations its table refuses), and returns a `Request`. `run_main(prog, fn)` turns
the errors a run can end in into one line on stderr and an exit code.

Adding a flag group (e.g. LoRA, multi-GPU, block streaming) is one function here,
`add_<group>_flags(parser)`, called from both tools' `build_parser`, plus one entry in
`Request.extra` filled by `parse_request` (see `EXTRA_GROUPS`), with its checks in
`_check_<group>` raising CLIError.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from wan import attention as att
from wan.checkpoint import CheckpointError
from wan.configs import PRESETS as TASKS, get_config
from wan.footprint import build_footprint
from wan.hostmem import HOST_RAM_MODES
from wan.offload import OFFLOAD_MODES
from wan.parallel import ParallelError, ParallelRequest
from wan.parallel import check_request as check_parallel_request
from wan.requests import SOLVERS, InputError, check_request
from wan.video import OutputWriteError

from .accel import COMPILE_MODES, PRESET_CHOICES, find_preset, oom_hint, preset_help
from .errors import AccelError
from .flag_words import flag_words
from .fp8_attention import register
from .patch import PatchError
from .plan import DeviceInfo, Options, check_parallel, plan, resolve_offload

# the tiny demo's prompt fits its text encoder (32 byte tokens, </s> included: no truncation warning);
# the other tasks default to the official example prompt
DEMO_PROMPT = "two cats boxing on a stage"
EXAMPLE_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
DEVICES = ("cuda", "cuda:N", "cpu")

# Flag groups added by later features: name -> function(args) -> value stored in Request.extra[name].
# A group registers itself here next to its add_<group>_flags(); parse_request fills them in order.
EXTRA_GROUPS: dict[str, Callable] = {}
# Functions(args) that fill flags the user left unset (None), e.g. from --recipe; parse_request runs
# them first, so every check sees the filled values.
ARG_DEFAULTS: list[Callable] = []


class CLIError(Exception):
    """Bad command line or request: reported as one line with exit code 2."""


# Exit codes of both CLIs (README, "Exit codes"; --help's epilog)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = """exit codes:
  0    done
  1    the run failed: out of GPU or host memory (under torchrun, torchrun itself exits 1 whenever a worker fails)
  2    bad input or something unavailable (a flag, size, checkpoint file, a GPU for a GPU-only flag, ffmpeg),
       found before any model is built; nothing is written
  3    an output could not be written (disk full, ...); nothing is left half-written
  130  interrupted (Ctrl-C)"""


class CLIOutputError(CLIError):
    """An output file could not be written (disk full, ...): exit code 3 (EXIT_IO)."""


# ------------------------------------------------------------------ flag groups

def add_model_flags(p: argparse.ArgumentParser, task_help: str, ckpt_help: str) -> None:
    """What to build and where: --task, --ckpt_dir, --convert_model_dtype, --device, --t5_cpu."""

    a = p.add_argument
    a("--task", default=None, metavar="{" + ",".join(TASKS) + "}", help=task_help)
    a("--ckpt_dir", default=None, help=ckpt_help)
    a("--random-weights", dest="random_weights", action="store_true",
      help="no checkpoint: build the task at its real shapes with random weights (t2v-A14B: ~69 GB of host RAM "
           "on a CPU; without --ckpt_dir only the tiny demo is built without this flag)")
    a("--convert_model_dtype", action="store_true",
      help="with --ckpt_dir: store the DiT weights in bf16 (official flag; default: as stored, fp32)")
    a("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    a("--t5_cpu", action="store_true", help="run the text encoder on the CPU")


def add_request_flags(p: argparse.ArgumentParser, seed_default: int, seed_help: str, guidance: bool = True) -> None:
    """What to generate: prompt(s), size, frames, steps, solver, seed (+ shift and guidance)."""

    a = p.add_argument
    one = p.add_mutually_exclusive_group()
    one.add_argument("--prompt", default=None,
                     help="text prompt (default: the demo prompt; with t2v-A14B the official example). A prompt "
                          "starting with '-' works: --prompt -v or --prompt=-v")
    one.add_argument("--prompt_file", default=None, metavar="PATH",
                     help="read the prompt from a UTF-8 text file, instead of --prompt (default: none)")
    if guidance:
        a("--n_prompt", default="", help="negative prompt (default: the official one)")
    a("--size", default=None, help=f"WIDTH*HEIGHT, e.g. 1280*720 (default: the task's: {_per_task('default_size')})")
    a("--frame_num", type=int, default=None, help=f"number of frames, 4n+1 (default: {_per_task('frame_num')})")
    a("--sample_steps", type=int, default=None, help=f"denoising steps (default: {_per_task('sample_steps')})")
    if guidance:
        a("--sample_shift", type=float, default=None,
          help=f"flow shift of the noise schedule (default: {_per_task('sample_shift')})")
        a("--sample_guide_scale", type=float, default=None,
          help="classifier-free guidance scale, one value for both experts (default: (low-noise, high-noise) "
               f"{_per_task('sample_guide_scale')})")
    a("--sample_solver", default=None, help=f"flow solver: {', '.join(SOLVERS)} (default: unipc)")
    a("--base_seed", "--seed", dest="base_seed", type=int, default=seed_default, help=seed_help)


def _per_task(attr: str) -> str:
    """'t2v-A14B: 1280*720, tiny: 128*128' -- a config default per task, for --help."""

    return ", ".join(f"{n}: {getattr(c, attr)}" for n, c in TASKS.items())


def add_preset_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--preset", default=default, choices=PRESET_CHOICES,
                   help=f"hardware preset (default: {default}). auto: detect the GPU; none: no preset, only "
                        f"the flags (kernels where they run, official offloading); {preset_help()}")


def add_accel_flags(p: argparse.ArgumentParser, triton_help: str) -> None:
    """The opt-in switches shared by wan-generate and wan-benchmark."""

    att = attention_registry()
    exact = ", ".join(b.name for b in att.backends() if not b.lossy)
    lossy = "".join(f"; {b.name}: opt-in, LOSSY ({b.note})" for b in att.backends() if b.lossy).replace("%", "%%")

    a = p.add_argument
    a("--use_batched_cfg", action="store_true", help="cond and uncond in one batch-2 forward (default: two "
                                                     "batch-1 calls, official)")
    a("--tf32", action="store_true", help="allow TF32 in fp32 matmuls/convs (CUDA; default: off)")
    a("--compile", dest="compile", action="store_true", default=None,
      help="torch.compile each DiT block (CUDA; default: the preset's, off for every preset)")
    a("--no-compile", dest="compile", action="store_false", help="never torch.compile (overrides a preset that compiles)")
    a("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile mode, with --compile")
    a("--attention", default="auto", choices=att.backend_names(),
      help=f"attention backend; auto: the first available of {exact}{lossy} (docs/attention.md)")
    a("--no-triton", dest="no_triton", action="store_true",
      help=f"{triton_help} (default: the Triton kernels wherever they run: CUDA, or TRITON_INTERPRET=1)")
    a("--fp8", action="store_true", help="lossy: the DiT blocks' linears in fp8 e4m3 (per-channel weights, per-token "
                                         "activations; half the expert weight bytes; GPUs of compute capability "
                                         ">= 8.9; docs/fp8.md) (default: off, bf16 as official)")


def add_offload_flags(p: argparse.ArgumentParser) -> None:
    """--offload {none,model,blocks}: where the DiT weights wait (CUDA only). `model` is the
    official --offload_model True; `blocks` streams each block from pinned host memory
    (wan.streaming). Checked by `_check_offload` (Request.extra["offload"])."""

    p.add_argument("--offload", default=None, choices=OFFLOAD_MODES,
                   help="none: both experts on the GPU; model: the idle expert in CPU memory (= --offload_model "
                        "True); blocks: stream the DiT blocks from pinned CPU memory (fits 24 GB at 720p) "
                        "(CUDA only; default: the preset's)")
    p.add_argument("--host_ram", default=None, choices=HOST_RAM_MODES,
                   help="with --offload blocks: high keeps both experts' blocks in pinned CPU memory (~57 GB for "
                        "A14B in bf16); low keeps the active expert's only and re-reads the other from --ckpt_dir "
                        "at the expert switch; auto (default) picks low when the host is short (logged)")


def _check_offload(args) -> str | None:
    """--offload, --offload_model and --no-offload as one mode ('none', 'model', 'blocks'), or None
    when none of them is given (then the preset decides). Flags that disagree are a CLIError; the
    rest is the plan's (parse_request)."""

    g = lambda name: getattr(args, name, None)  # noqa: E731 - a tool may not have every flag
    try:
        return resolve_offload(g("offload"), g("offload_model"), bool(g("no_offload")))[0]
    except ValueError as err:
        raise CLIError(flag_words(str(err))) from None


EXTRA_GROUPS["offload"] = _check_offload


def _check_host_ram(args) -> str | None:
    """--host_ram {auto,high,low} (block streaming's host memory mode), or None. The plan's rules
    hold: it needs block streaming (asked, or the preset's); low needs checkpoint files
    (--ckpt_dir) to re-read an expert from, and undoes --fp8."""
    mode = getattr(args, "host_ram", None)
    if mode is not None:
        plan_request(args, check_device(getattr(args, "device", None)), getattr(args, "preset", None) or "none")
    return mode


EXTRA_GROUPS["host_ram"] = _check_host_ram


# ------------------------------------------------------------------ the request

@dataclass(frozen=True)
class Request:
    """A checked command line: what to build, what to generate, how to accelerate it."""
    task: str
    config: object                   # wan.configs.T2VConfig
    device: object                   # torch.device
    size: str                        # 'W*H'
    frame_num: int
    steps: int
    solver: str
    seed: int
    prompt: str
    prompt_given: bool               # False: the demo prompt stands in
    n_prompt: str = ""
    shift: float | None = None
    guide_scale: float | None = None
    ckpt_dir: str | None = None
    convert_model_dtype: bool = False
    t5_cpu: bool = False             # the flag; a preset may add it
    preset: str = "none"
    offload_model: bool | None = None
    quiet: bool = False
    extra: dict = field(default_factory=dict)  # flag groups of later features, see EXTRA_GROUPS
    plan: object = None              # wan_triton.plan.RunPlan: every decision of the run (.options: the flags)

    def summary(self, seed: int | None = None) -> str:
        """What will be generated, for the start-up log: size, frames, steps, solver, shift, guidance
        (the config's when not given) and `seed` (the one that will be used, never -1)."""
        c = self.config
        shift = c.sample_shift if self.shift is None else self.shift
        g = c.sample_guide_scale if self.guide_scale is None else self.guide_scale
        guide = f"{g:g}" if isinstance(g, (int, float)) else f"{g[0]:g} (low-noise) / {g[1]:g} (high-noise)"
        seed = self.seed if seed is None else seed
        return (f"{self.size}, {self.frame_num} frames, {self.steps} steps, solver {self.solver}, shift {shift:g}, "
                f"guidance {guide}, seed {seed}")

    @property
    def width_height(self) -> tuple[int, int]:
        w, h = self.size.split("*")
        return int(w), int(h)

    def generate_kwargs(self) -> dict:
        """Keyword arguments of WanT2V.generate (offload_model and progress are the caller's)."""
        return dict(size=self.size, frame_num=self.frame_num, shift=self.shift, sample_solver=self.solver,
                    sampling_steps=self.steps, guide_scale=self.guide_scale, n_prompt=self.n_prompt,
                    seed=self.seed)


def check_device(spec: str | None):
    """--device -> torch.device: cpu, cuda or cuda:N that exists here; CLIError otherwise."""

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {spec!r} is not a device; use {', '.join(DEVICES)}") from None
    if dev.type not in ("cuda", "cpu"):
        raise CLIError(f"--device {spec}: wan-triton runs on CUDA GPUs or the CPU; use {', '.join(DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {spec}: no CUDA device is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def attention_registry():
    """wan.attention with wan_triton's own backend (fp8, lossy and opt-in) registered: the CLIs
    offer every registered backend by name."""

    register()
    return att


def check_attention(name: str | None, device) -> None:
    if name in (None, "auto"):
        return
    att = attention_registry()
    why = att.unavailable_reason(name, device)
    if why:
        avail = att.available_backends(device, lossy=False)  # lossy ones are not probed unless asked for
        raise CLIError(f"--attention {name} is not available on {device} (available: {', '.join(avail)}): {why}")


def check_prompt(prompt: str | None, flag: str = "--prompt") -> None:
    if prompt is not None and not prompt.strip():
        raise CLIError(f"{flag} is empty; give a prompt, or leave {flag} out for the demo prompt")


def read_prompt_file(path: str) -> str:
    """--prompt_file: the file's text, stripped; CLIError when it cannot be read or holds no prompt."""

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"--prompt_file {path}: not UTF-8 text") from None
    except OSError as err:
        raise CLIError(f"--prompt_file {path}: cannot read it ({err.strerror or err})") from None
    if not text.strip():
        raise CLIError(f"--prompt_file {path} is empty; write the prompt into it")
    return text.strip()


DEMO_TASK = "tiny"  # the one task built with random weights without --random-weights (no --ckpt_dir)


def implied_task(args) -> str:
    """Both tools' default --task: t2v-A14B with --ckpt_dir or --random-weights, else the tiny demo."""
    return "t2v-A14B" if getattr(args, "ckpt_dir", None) or getattr(args, "random_weights", False) else DEMO_TASK


def check_weights(args, config, device) -> None:
    """Where the weights come from: --ckpt_dir, or random (the tiny demo; any other task only with
    --random-weights, which is never implied: an A14B built by mistake fills the host RAM)."""
    g = lambda name: getattr(args, name, None)  # noqa: E731
    if g("ckpt_dir") and g("random_weights"):
        raise CLIError("--ckpt_dir and --random-weights exclude each other")
    if not g("ckpt_dir") and not g("random_weights") and config.name != DEMO_TASK:

        need = build_footprint(config, device).total
        raise CLIError(f"--task {config.name} needs its weights: give --ckpt_dir (the official release), or "
                       f"--random-weights to build it with random weights (~{need / 1e9:.0f} GB of memory on "
                       f"{device})")
    if g("convert_model_dtype") and not g("ckpt_dir"):
        logging.warning("--convert_model_dtype applies to checkpoint weights (--ckpt_dir); random weights are "
                        "built in %s already: the flag changes nothing", str(config.param_dtype).replace("torch.", ""))


# wan.requests names the generate() arguments; the CLIs name their flags
def parse_request(args: argparse.Namespace, default_task: str) -> Request:
    """Every check that needs no model, in the order a user fixes them; raises CLIError.
    `args` comes from a parser built with the flag groups above (missing groups read as unset)."""

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - flags a tool may not have
    for fill in ARG_DEFAULTS:
        fill(args)
    solver = g("sample_solver") or "unipc"
    try:
        config = get_config(g("task") or default_task)
    except KeyError as err:
        raise CLIError(str(err.args[0])) from None
    device = check_device(g("device"))
    check_weights(args, config, device)
    check_attention(g("attention"), device)
    size = g("size") or config.default_size
    frame_num = config.frame_num if g("frame_num") is None else g("frame_num")
    steps = config.sample_steps if g("sample_steps") is None else g("sample_steps")
    seed = g("base_seed", -1)
    try:
        w, h = check_request(config, size, frame_num, solver, steps, shift=g("sample_shift"),
                             guide_scale=g("sample_guide_scale"), seed=seed)
    except InputError as err:
        raise CLIError(flag_words(str(err))) from None
    check_prompt(g("prompt"))
    prompt = read_prompt_file(g("prompt_file")) if g("prompt_file") is not None else g("prompt")
    preset = g("preset") or "none"
    run = plan_request(args, device, preset)
    return Request(task=config.name, config=config, device=device, size=f"{w}*{h}", frame_num=frame_num,
                   steps=steps, solver=solver, seed=seed,
                   prompt=prompt or (DEMO_PROMPT if config.name == DEMO_TASK else EXAMPLE_PROMPT),
                   prompt_given=prompt is not None,
                   n_prompt=g("n_prompt", "") or "", shift=g("sample_shift"), guide_scale=g("sample_guide_scale"),
                   ckpt_dir=g("ckpt_dir"), convert_model_dtype=bool(g("convert_model_dtype")),
                   t5_cpu=bool(g("t5_cpu")), preset=preset, offload_model=g("offload_model"),
                   quiet=bool(g("quiet")), extra={name: fn(args) for name, fn in EXTRA_GROUPS.items()}, plan=run)


def request_options(args):
    """The flags as wan_triton.plan.Options (what was asked; None: the preset decides)."""

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - flags a tool may not have
    return Options(offload=g("offload"), offload_model=g("offload_model"), no_offload=bool(g("no_offload")),
                   host_ram=g("host_ram"), t5_cpu=bool(g("t5_cpu")), triton=False if g("no_triton") else None,
                   compile=g("compile"), compile_mode=g("compile_mode", "default"),
                   tf32=True if g("tf32") else None, use_batched_cfg=True if g("use_batched_cfg") else None,
                   attention=g("attention"), fp8=True if g("fp8") else None, parallel=parallel_request(args),
                   loras=any(g(name) for name in ("lora", "lora_high", "lora_low")), checkpoint=bool(g("ckpt_dir")),
                   dit_models=task_dit_models(args))


def task_dit_models(args) -> int:
    """DiT models of the asked task: 2 experts, or 1 (ti2v-5B); 2 for a task that does not exist
    (refused by parse_request)."""
    cfg = TASKS.get(getattr(args, "task", None) or implied_task(args))
    return 2 if cfg is None else len(cfg.dit_folders)


def plan_request(args, device, preset: str):
    """The run's plan (wan_triton.plan.plan) from the flags, the preset and the device's facts; the
    plan's errors said in flag words (CLIError)."""

    options = request_options(args)
    info = DeviceInfo.of(device, fp8=bool(options.fp8))
    try:
        return plan(options, find_preset(preset, info), info)
    except AccelError as err:
        raise CLIError(flag_words(str(err))) from None


# ------------------------------------------------------------------ multi-GPU (wan.parallel)

def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """--ulysses_size, --cfg_parallel, --dit_fsdp, --t5_fsdp, --dist_timeout (official names, plus
    --cfg_parallel; under torchrun). Checked by `_check_parallel` (Request.extra["parallel"])."""
    g = p.add_argument_group("multi-GPU (under torchrun --nproc_per_node N)")
    g.add_argument("--ulysses_size", type=int, default=1,
                   help="Ulysses sequence-parallel degree U (divides the 40 heads)")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="cond and uncond branches on two halves of the ranks (N = 2 x U)")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiT experts' weights over all ranks (FSDP2)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder's weights over all ranks (FSDP2)")
    g.add_argument("--dist_timeout", type=float, default=600.0,
                   help="seconds a collective may wait before every rank fails (default 600)")


def parallel_request(args):
    """The multi-GPU flags as a wan.parallel.ParallelRequest (unchecked)."""

    g = lambda name, default: getattr(args, name, default)  # noqa: E731 - a tool may not have every flag
    return ParallelRequest(g("ulysses_size", 1), g("cfg_parallel", False), g("dit_fsdp", False),
                           g("t5_fsdp", False), g("dist_timeout", 600.0))


def check_parallel_args(args, num_heads: int, device, offload_model=None, t5_cpu: bool = False, env=None):
    """The multi-GPU flags -> wan.parallel.ParallelRequest, checked against torchrun's environment
    and the model's heads (wan.parallel.check_request) and against the other flags (the plan's
    table, wan_triton.plan.check_parallel), before anything is built. Raises ParallelError with
    one line in flag words."""

    req = parallel_request(args)
    try:
        check_parallel_request(req, num_heads, device, env=env)
        check_parallel(req, bool(offload_model), t5_cpu, bool(getattr(args, "use_batched_cfg", False)))
    except ValueError as err:  # ParallelError, PlanError
        raise ParallelError(flag_words(str(err))) from None
    return req


def _check_parallel(args):
    """The multi-GPU flags against torchrun's environment, the task's attention heads and the
    other flags -> wan.parallel.ParallelRequest (world 1 without them); CLIError otherwise."""

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - a tool may not have every flag
    task = g("task") or implied_task(args)
    try:
        offload = g("offload_model") or g("offload") in ("model", "blocks")
        return check_parallel_args(args, get_config(task).dit.num_heads, check_device(g("device")), offload,
                                   bool(g("t5_cpu")))
    except ParallelError as err:
        raise CLIError(str(err)) from None


EXTRA_GROUPS["parallel"] = _check_parallel


# ------------------------------------------------------------------ outputs

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_len: int = 50, fallback: str = "video") -> str:
    """`text` reduced to [A-Za-z0-9._-] (other runs -> '_'), at most `max_len` characters,
    never empty, never hidden (no leading '.')."""
    s = _UNSAFE.sub("_", text).strip("._-")[:max_len].strip("._-")
    return s or fallback


def default_output_name(task: str, size: str, prompt: str, when: datetime | None = None, ulysses: int = 1) -> str:
    """'<task>_<W>x<H>_<ulysses>_<prompt>_<YYYYmmdd_HHMMSS>.mp4' from a safe character set (the official
    pattern, with '*' -> 'x' and the prompt cut to 50 safe characters); at most ~100 characters."""
    stamp = (when or datetime.now()).strftime("%Y%m%d_%H%M%S")
    return (f"{safe_name(task, 20)}_{safe_name(size.replace('*', 'x'), 12)}_{int(ulysses)}_{safe_name(prompt)}_"
            f"{stamp}.mp4")


# ------------------------------------------------------------------ running

GPU_OOM_HINT = "try --preset auto, --offload blocks or --t5_cpu"  # when the GPU cannot be asked
HOST_OOM_HINT = ("the models are built in CPU memory first (an A14B expert takes 28.6 GB in bf16); "
                 "close other programs or use a machine with more RAM")


def gpu_oom_hint() -> str:
    """The preset (and flags) that fit this GPU, else block streaming (accel.oom_hint)."""

    try:
        return oom_hint()
    except Exception:  # noqa: BLE001 - a hint must never hide the error it explains
        return GPU_OOM_HINT


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_host_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, MemoryError) or "DefaultCPUAllocator" in text or "can't allocate memory" in text


def run_main(prog: str, fn: Callable[[], object]) -> int:
    """Run `fn()` and map how it ends to an exit code (EXIT_*), errors as one line on stderr:
    bad input 2, an output that could not be written 3, out of (GPU or host) memory 1, Ctrl-C 130,
    success 0. Under torchrun only rank 0 reports bad input (every rank makes the same checks and
    exits with the same code); a failure of one rank's own is reported by that rank."""

    rank = process_rank()

    def fail(msg: str, code: int) -> int:
        if rank == 0 or code != EXIT_BAD_INPUT:
            print(f"{prog}: error{f' (rank {rank})' if rank else ''}: {msg}", file=sys.stderr)
        return code

    try:
        fn()
    except (CLIOutputError, OutputWriteError) as err:
        return fail(str(err), EXIT_IO)
    except (CLIError, InputError, CheckpointError, AccelError, PatchError, ParallelError) as err:
        return fail(flag_words(str(err)), EXIT_BAD_INPUT)  # wan names its arguments; the user typed flags
    except getattr(torch.distributed, "DistError", ()) as err:  # torchrun: a peer failed or a collective timed out
        return fail(f"distributed run failed: {_first_line(err)[:300]}", EXIT_FAILED)
    except torch.cuda.OutOfMemoryError:
        return fail(f"out of GPU memory; {gpu_oom_hint()}", EXIT_FAILED)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as err:
        if is_host_oom(err):
            return fail(f"out of host memory (RAM): {_first_line(err)}; {HOST_OOM_HINT}", EXIT_FAILED)
        if "out of memory" in str(err).lower():
            return fail(f"out of GPU memory: {_first_line(err)}; {gpu_oom_hint()}", EXIT_FAILED)
        raise
    return EXIT_OK


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""

    return int(os.environ.get("RANK", 0) or 0)


def setup_logging() -> None:
    """INFO on stderr; under torchrun only rank 0 logs INFO and warnings (every rank would say the
    same: a prompt cut to text_len, a lossy option); the others log errors only."""
    logging.basicConfig(level=logging.INFO if process_rank() == 0 else logging.ERROR,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
