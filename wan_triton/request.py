"""From a command line to a checked request and its plan, before any model is built.

`parse_request(args, default_task, modes)` makes every check that needs no model, in the order a
user fixes them (task, device, weights, size, frames, solver, steps, prompt, --image), turns the
acceleration flags into wan_triton.plan.Options and makes the run's one plan (offload, T5
placement, kernels, the step cache, the combinations the plan's table refuses), checks a mag step
cache's ratio file, the LoRA files and torchrun's world, and returns a
`Request`: typed fields, the LoRAs and the RunPlan included. Everything after it (build, apply,
generate) carries the plan out. Errors are CLIErrors in flag words (wan_triton.flag_words).
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from wan.checkpoint import checkpoint_problems, is_diffusers_layout
from wan.configs import DEMO_CKPT_DIR, get_config
from wan.demo_captions import DEMO_PROMPT, parse_caption, vocabulary
from wan.dit import WanModel
from wan.footprint import build_footprint, text_encoder_bytes
from wan.hostmem import stored_block_dtype
from wan.mag_ratios import CacheError, find_ratios, load_ratios, ratios_dir
from wan.image import load_image
from wan.naming import Arg
from wan.parallel import ParallelError, ParallelRequest
from wan.parallel import check_request as check_parallel_request
from wan.requests import InputError, check_request
from wan.tasks import image_input, image_tasks

from . import fp8 as _fp8
from .accel import find_preset
from .errors import AccelError
from .exits import CLIError
from .flag_words import flag_of, in_flags
from .lora_flags import apply_recipe, parse_lora_flags
from .plan import DeviceInfo, Options, RunPlan, cache_policy, plan

__all__ = ["Request", "parse_request", "flag_options", "offload_from_flags", "parallel_request", "check_device",
           "check_weights", "weights_source", "check_cache_ratios", "check_prompt", "read_prompt_file", "check_image",
           "implied_task", "default_output_name", "safe_name", "default_prompt",
           "DEMO_TASK", "SMOKE_TASK", "DEMO_PROMPT", "TINY_PROMPT", "EXAMPLE_PROMPT"]

# Without --ckpt_dir and --random-weights: the demo model, whose trained weights ship in the package
# (wan.configs.DEMO_CKPT_DIR; a toy trained on coloured shapes, not Wan's weights) ...
DEMO_TASK = "demo"
# ... and `tiny`, the smoke-test task, built with random weights (its video is noise; it costs nothing).
# Every other task needs --ckpt_dir or --random-weights (never implied: an A14B built by mistake fills
# the host RAM).
SMOKE_TASK = "tiny"
# each task's prompt when none is given: the demo's is a caption of its training set (wan.demo_captions);
# tiny's fits its text encoder (32 byte tokens, </s> included: no truncation warning); the others take
# the official example prompt
TINY_PROMPT = "two cats boxing on a stage"
EXAMPLE_PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
DEVICES = ("cuda", "cuda:N", "cpu")


@dataclass(frozen=True)
class Request:
    """A checked command line: what to build, what to generate, and the run's plan (how)."""
    task: str
    config: object                   # wan.configs.T2VConfig, or TI2VConfig (ti2v-5B)
    device: object                   # torch.device
    size: str                        # 'W*H'
    frame_num: int
    steps: int
    solver: str
    seed: int
    prompt: str
    prompt_given: bool               # False: the task's default prompt stands in (default_prompt)
    plan: RunPlan                    # every decision of the run (.options: the flags as asked)
    n_prompt: str = ""
    shift: float | None = None
    guide_scale: float | None = None
    ckpt_dir: str | None = None      # where the weights are read from (the demo's: the package's folder); None: random
    weights: str = "random"          # weights_source: 'checkpoint' (--ckpt_dir), 'built-in' (the demo's), 'random'
    fp8_dir: str | None = None       # fp8 expert files written from ckpt_dir's experts (wan_triton.fp8_files)
    convert_model_dtype: bool = False
    loras: tuple = ()                # wan.lora.LoraSpec of --lora / --lora_high / --lora_low, files checked
    image: object = None             # --image, read and decoded (PIL, RGB); None: none given
    quiet: bool = False

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
        """Keyword arguments of WanT2V.generate (progress is the caller's; the offload mode is the
        pipeline's, set by the build and the plan)."""
        return dict(size=self.size, frame_num=self.frame_num, shift=self.shift, sample_solver=self.solver,
                    sampling_steps=self.steps, guide_scale=self.guide_scale, n_prompt=self.n_prompt,
                    seed=self.seed, **self.image_kwargs())

    def image_kwargs(self) -> dict:
        """{'image': the image} for a task that takes one, else {} (WanT2V.generate has no image)."""
        return {} if image_input(self.config) == "none" else {"image": self.image}


# ------------------------------------------------------------------ checks

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


def check_prompt(prompt: str | None, flag: str = "--prompt") -> None:
    if prompt is not None and not prompt.strip():
        raise CLIError(f"{flag} is empty; give a prompt, or leave {flag} out for the task's default prompt")


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


def check_image(path: str | None, config):
    """--image against the task: the image (PIL, RGB) or None; CLIError when the task needs one and
    none is given, when the task takes none, or when the file is not a readable image."""
    mode = image_input(config)
    if path is None:
        if mode == "required":
            raise CLIError(f"--task {config.name} needs --image PATH (the video's first frame)")
        return None
    if mode == "none":
        raise CLIError(f"--task {config.name} takes no --image (image tasks: {image_tasks()})")
    try:
        return load_image(path)
    except InputError as err:
        raise CLIError(f"--image: {err}") from None


def implied_task(args) -> str:
    """Both tools' default --task: t2v-A14B with --ckpt_dir or --random-weights, else the demo."""
    return "t2v-A14B" if getattr(args, "ckpt_dir", None) or getattr(args, "random_weights", False) else DEMO_TASK


def weights_source(args, config) -> tuple[str, str | None]:
    """(source, folder) of the weights: ('checkpoint', --ckpt_dir); ('built-in', the package's demo
    folder) for the demo task without --ckpt_dir and --random-weights; else ('random', None)."""
    if getattr(args, "ckpt_dir", None):
        return "checkpoint", args.ckpt_dir
    if config.name == DEMO_TASK and not getattr(args, "random_weights", False):
        return "built-in", str(DEMO_CKPT_DIR)
    return "random", None


def check_weights(args, config, device) -> None:
    """Where the weights come from (weights_source): --ckpt_dir (and --fp8_dir, fp8 files written
    from it), the demo's shipped folder (it must be there), or random (the smoke task; any other
    task only with --random-weights)."""
    g = lambda name: getattr(args, name, None)  # noqa: E731
    if g("ckpt_dir") and g("random_weights"):
        raise CLIError("--ckpt_dir and --random-weights exclude each other")
    source, folder = weights_source(args, config)
    if source == "built-in":
        check_builtin_weights(folder, config)
    if source == "random" and not g("random_weights") and config.name != SMOKE_TASK:
        need = build_footprint(config, device).total
        raise CLIError(f"--task {config.name} needs its weights: give --ckpt_dir (the official release), or "
                       f"--random-weights to build it with random weights (~{need / 1e9:.0f} GB of memory on "
                       f"{device})")
    if g("fp8_dir") is not None and not g("ckpt_dir"):
        raise CLIError("--fp8_dir holds fp8 files written from --ckpt_dir's experts: give --ckpt_dir (random "
                       "weights have no files)")
    if g("convert_model_dtype") and source == "random":
        logging.warning("--convert_model_dtype applies to checkpoint weights (--ckpt_dir); random weights are "
                        "built in %s already: the flag changes nothing", str(config.param_dtype).replace("torch.", ""))


def check_builtin_weights(folder: str, config) -> None:
    """The demo model's shipped folder holds every file it needs (a broken install: one line)."""
    problems = checkpoint_problems(folder, config)
    if problems:
        raise CLIError(f"the demo model's weights are not installed ({'; '.join(problems)}): reinstall wan-triton "
                       f"(pip install .), or give --ckpt_dir, or --random-weights for the demo model with random "
                       f"weights")


def default_prompt(config) -> str:
    """The prompt when none is given: the demo's caption, tiny's short prompt, else the official example."""
    return {DEMO_TASK: DEMO_PROMPT, SMOKE_TASK: TINY_PROMPT}.get(config.name, EXAMPLE_PROMPT)


def check_demo_prompt(config, prompt: str | None) -> None:
    """A warning (not an error) when the demo model is given a prompt outside its training captions."""
    if config.name != DEMO_TASK or prompt is None:
        return
    try:
        parse_caption(prompt)
    except ValueError:
        logging.warning("the demo model is a toy that only knows captions %s; other prompts give an arbitrary "
                        "shape", vocabulary())


def check_cache_ratios(cache, ckpt_dir: str | None, solver: str, steps: int, shift: float) -> None:
    """--cache mag: the magnitude ratios of this schedule (solver, steps, shift) are there and read
    (--cache_ratios, else <ckpt_dir>/mag_ratios), before any model is built; whether they were
    measured on this model is checked once it is built (wan.step_cache.enable_step_cache). CLIError."""
    source = None if cache is None or cache.criterion != "mag" else (
        cache.ratios_file or (ratios_dir(ckpt_dir) if ckpt_dir else None))
    if source is None:  # no cache, not mag, or random weights without a ratio file (the plan's row says it)
        return
    try:
        find_ratios(load_ratios(source), solver, steps, shift)
    except CacheError as err:
        raise CLIError(in_flags(err)) from None


# ------------------------------------------------------------------ the flags as the plan's options

def parallel_request(args) -> ParallelRequest:
    """The multi-GPU flags as a wan.parallel.ParallelRequest (unchecked)."""

    g = lambda name, default: getattr(args, name, default)  # noqa: E731 - a tool may not have every flag
    return ParallelRequest(g("ulysses_size", 1), g("cfg_parallel", False), g("dit_fsdp", False),
                           g("t5_fsdp", False), g("dist_timeout", 600.0))


def offload_from_flags(args) -> tuple:
    """(mode, Arg) of --offload, --offload_model (True: 'model', False: 'none') and --no-offload
    ('none'), three ways of asking for one thing; (None, None) when none is given (the preset
    decides). Flags that disagree are a CLIError."""

    g = lambda name: getattr(args, name, None)  # noqa: E731 - a tool may not have every flag
    asked = []
    if g("offload") is not None:
        asked.append((Arg("offload", g("offload")), g("offload")))
    if g("offload_model") is not None:
        asked.append((Arg("offload_model", g("offload_model")), "model" if g("offload_model") else "none"))
    if g("no_offload"):
        asked.append((Arg("no_offload", True), "none"))
    for arg, mode in asked[1:]:
        if mode != asked[0][1]:
            raise CLIError(f"{flag_of(asked[0][0])} conflicts with {flag_of(arg)}: give one of them")
    return (asked[0][1], asked[0][0]) if asked else (None, None)


def _weights(config, ckpt_dir, convert: bool, fp8: bool) -> dict:
    """The Options fields about the weights: the DiT models' GB on the GPU (both experts, or
    ti2v-5B's one; in the dtype they will have: the checkpoint's unless converted, fp8 when asked;
    unknown when the files cannot be read now) and the text encoder's."""
    dtype = config.param_dtype
    folders = config.dit_folders
    if ckpt_dir and not convert:
        dtype = None if is_diffusers_layout(ckpt_dir) else stored_block_dtype(Path(ckpt_dir) / folders[0])
    facts = dict(t5_gb=text_encoder_bytes(config) / 1e9, dit_models=len(folders))
    if dtype is None:
        return facts
    with torch.device("meta"):
        expert = WanModel(config.dit)
    one = _fp8.quantized_bytes(expert, dtype) if fp8 else sum(p.numel() for p in expert.parameters()) * dtype.itemsize
    return dict(facts, experts_gb=len(folders) * one / 1e9, weights_dtype=str(dtype).replace("torch.", ""))


def flag_options(args, config, parallel: ParallelRequest, modes: tuple = ("optimized",)) -> Options:
    """The flags as wan_triton.plan.Options (what was asked; None: the preset decides), with the
    facts about the weights the plan needs (read from weights_source's folder)."""

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - flags a tool may not have
    ckpt_dir = weights_source(args, config)[1]
    offload, offload_as = offload_from_flags(args)
    fp8 = bool(g("fp8") or g("fp8_dir"))  # --fp8_dir implies --fp8
    return Options(offload=offload, offload_as=offload_as, host_ram=g("host_ram"), t5_cpu=bool(g("t5_cpu")),
                   triton=False if g("no_triton") else None, compile=g("compile"),
                   compile_mode=g("compile_mode", "default"), tf32=True if g("tf32") else None,
                   use_batched_cfg=True if g("use_batched_cfg") else None, attention=g("attention"),
                   fp8=True if fp8 else None, fp8_files=bool(g("fp8_dir")), vae_dtype=g("vae_dtype"),
                   t5_release=g("t5_release"),
                   parallel=parallel,
                   cache=cache_policy(g("cache"), g("cache_threshold"), g("cache_cfg"), g("cache_ratios")),
                   loras=any(g(name) for name in ("lora", "lora_high", "lora_low")), modes=tuple(modes),
                   checkpoint=ckpt_dir is not None,
                   diffusers_layout=ckpt_dir is not None and is_diffusers_layout(ckpt_dir),
                   **_weights(config, ckpt_dir, bool(g("convert_model_dtype")), fp8))


# ------------------------------------------------------------------ the request

def parse_request(args: argparse.Namespace, default_task: str, modes: tuple = ("optimized",)) -> Request:
    """Every check that needs no model, in the order a user fixes them, then the run's one plan
    (`modes`: the benchmark's, the reference mode running first); raises CLIError. `args` comes
    from a parser built with the flag groups of wan_triton.flags (missing groups read as unset)."""

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - flags a tool may not have
    apply_recipe(args)  # --recipe fills the sampling flags left unset: its values pass the same checks
    solver = g("sample_solver") or "unipc"
    try:
        config = get_config(g("task") or default_task)
    except KeyError as err:
        raise CLIError(str(err.args[0])) from None
    device = check_device(g("device"))
    check_weights(args, config, device)
    weights, ckpt_dir = weights_source(args, config)
    size = g("size") or config.default_size
    frame_num = config.frame_num if g("frame_num") is None else g("frame_num")
    steps = config.sample_steps if g("sample_steps") is None else g("sample_steps")
    seed = g("base_seed", -1)
    try:
        w, h = check_request(config, size, frame_num, solver, steps, shift=g("sample_shift"),
                             guide_scale=g("sample_guide_scale"), seed=seed)
    except InputError as err:
        raise CLIError(in_flags(err)) from None
    check_prompt(g("prompt"))
    prompt = read_prompt_file(g("prompt_file")) if g("prompt_file") is not None else g("prompt")
    check_demo_prompt(config, prompt)
    image = check_image(g("image"), config)
    par = parallel_request(args)
    options = flag_options(args, config, par, modes)
    info = DeviceInfo.of(device, fp8=bool(options.fp8), attention=options.attention)
    try:
        run = plan(options, find_preset(g("preset") or "none", info), info)
    except AccelError as err:
        raise CLIError(in_flags(err)) from None
    check_cache_ratios(run.cache, ckpt_dir, solver, steps,
                       config.sample_shift if g("sample_shift") is None else g("sample_shift"))
    loras = tuple(parse_lora_flags(args))
    try:  # torchrun's world and the task's heads: wan's rule (how it combines with the rest: the plan's)
        check_parallel_request(par, config.dit.num_heads, device)
    except ParallelError as err:
        raise CLIError(in_flags(err)) from None
    return Request(task=config.name, config=config, device=device, size=f"{w}*{h}", frame_num=frame_num,
                   steps=steps, solver=solver, seed=seed,
                   prompt=prompt or default_prompt(config),
                   prompt_given=prompt is not None, plan=run,
                   n_prompt=g("n_prompt", "") or "", shift=g("sample_shift"), guide_scale=g("sample_guide_scale"),
                   ckpt_dir=ckpt_dir, weights=weights, fp8_dir=g("fp8_dir"),
                   convert_model_dtype=bool(g("convert_model_dtype")),
                   loras=loras, image=image, quiet=bool(g("quiet")))


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
