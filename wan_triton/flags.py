"""The flag groups both CLIs build their parsers from (wan_triton.parser.OneLineParser): what to
build, what to generate, the hardware preset, the acceleration switches, offloading, multi-GPU.
Each group is one `add_<group>_flags(parser)`, called from both tools' `build_parser`; what the
flags mean is read by wan_triton.request.parse_request (checks, then the run's plan)."""
from __future__ import annotations

import argparse

from wan import attention as att
from wan.configs import TASKS
from wan.hostmem import HOST_RAM_MODES
from wan.offload import OFFLOAD_MODES
from wan.requests import SOLVERS
from wan.step_cache import CRITERIA, CRITERION_DEFAULTS
from wan.tasks import image_tasks
from wan.vae import VAE_DTYPES

from .accel import PRESET_CHOICES, preset_help
from .fp8_attention import register
from .plan import COMPILE_MODES

__all__ = ["add_model_flags", "add_request_flags", "add_image_flags", "add_preset_flags", "add_accel_flags",
           "add_no_offload_flag", "add_offload_flags", "add_parallel_flags", "add_cache_flags", "attention_registry"]


def add_model_flags(p: argparse.ArgumentParser, task_help: str, ckpt_help: str) -> None:
    """What to build and where: --task, --ckpt_dir, --convert_model_dtype, --device, --t5_cpu, --t5_release."""

    a = p.add_argument
    a("--task", default=None, metavar="{" + ",".join(TASKS) + "}", help=task_help)
    a("--ckpt_dir", default=None, help=ckpt_help)
    a("--random-weights", dest="random_weights", action="store_true",
      help="no checkpoint: build the task at its real shapes with random weights (t2v-A14B: ~69 GB of host RAM "
           "on a CPU; without --ckpt_dir and this flag, the demo task loads its built-in weights and tiny is random)")
    a("--convert_model_dtype", action="store_true",
      help="with --ckpt_dir: store the DiT weights in bf16 (official flag; default: as stored, fp32)")
    a("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    a("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    a("--t5_release", dest="t5_release", action="store_true", default=None,
      help="free the text encoder's weights after encoding (read again for the next video): its 11.4 GB are free "
           "while the DiT and the VAE run (default: the preset's; rtx4090: on)")


def add_request_flags(p: argparse.ArgumentParser, seed_default: int, seed_help: str) -> None:
    """What to generate: prompt(s), negative prompt, size, frames, steps, shift, guidance, solver, seed."""

    a = p.add_argument
    one = p.add_mutually_exclusive_group()
    one.add_argument("--prompt", default=None,
                     help="text prompt (default: the task's, e.g. the demo's caption, t2v-A14B's official example). A "
                          "prompt starting with '-' works: --prompt -v or --prompt=-v")
    one.add_argument("--prompt_file", default=None, metavar="PATH",
                     help="read the prompt from a UTF-8 text file, instead of --prompt (default: none)")
    a("--n_prompt", default="", help="negative prompt (default: the official one)")
    a("--size", default=None, help=f"WIDTH*HEIGHT, e.g. 1280*720 (default: the task's: {_per_task('default_size')})")
    a("--frame_num", type=int, default=None, help=f"number of frames, 4n+1, at most "
      f"{min(c.max_frame_num for c in TASKS.values())} (the RoPE table's latent frames) (default: {_per_task('frame_num')})")
    a("--sample_steps", type=int, default=None, help=f"denoising steps (default: {_per_task('sample_steps')})")
    a("--sample_shift", type=float, default=None,
      help=f"flow shift of the noise schedule (default: {_per_task('sample_shift')})")
    a("--sample_guide_scale", type=float, default=None,
      help="classifier-free guidance scale, one value for both experts (default: (low-noise, high-noise) "
           f"{_per_task('sample_guide_scale')})")
    a("--sample_solver", default=None, help=f"flow solver: {', '.join(SOLVERS)} (default: unipc)")
    a("--base_seed", "--seed", dest="base_seed", type=int, default=seed_default, help=seed_help)


def add_image_flags(p: argparse.ArgumentParser) -> None:
    """--image PATH: the video's first frame (required by i2v-A14B, optional for ti2v-5B: its image
    mode, refused by the text-only tasks; docs/models.md)."""

    p.add_argument("--image", default=None, metavar="PATH",
                   help=f"input image, the video's first frame (required by {image_tasks('required')}; optional "
                        f"for {image_tasks('optional')}: its image mode); the video takes the image's aspect ratio "
                        "within the area of --size (default: none)")


def _per_task(attr: str) -> str:
    """'t2v-A14B: 1280*720, tiny: 128*128' -- a config default per task, for --help."""

    return ", ".join(f"{n}: {getattr(c, attr)}" for n, c in TASKS.items())


def add_preset_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--preset", default=default, choices=PRESET_CHOICES,
                   help=f"hardware preset (default: {default}). auto: detect the GPU; none: no preset, only "
                        f"the flags (kernels where they run, official offloading); {preset_help()}")


def add_accel_flags(p: argparse.ArgumentParser, triton_help: str) -> None:
    """The opt-in switches shared by wan-generate and wan-benchmark."""

    reg = attention_registry()
    exact = ", ".join(b.name for b in reg.backends() if not b.lossy)
    lossy = "".join(f"; {b.name}: opt-in, LOSSY ({b.note})" for b in reg.backends() if b.lossy).replace("%", "%%")

    a = p.add_argument
    a("--use_batched_cfg", action="store_true", help="cond and uncond in one batch-2 forward (default: two "
                                                     "batch-1 calls, official)")
    a("--tf32", action="store_true", help="allow TF32 in fp32 matmuls/convs (CUDA; default: off)")
    a("--compile", dest="compile", action="store_true", default=None,
      help="torch.compile each DiT block (CUDA; default: the preset's, off for every preset)")
    a("--no-compile", dest="compile", action="store_false", help="never torch.compile (overrides a preset that compiles)")
    a("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile mode, with --compile")
    a("--attention", default="auto", choices=reg.backend_names(),
      help=f"attention backend; auto: the first available of {exact}{lossy} (docs/attention.md)")
    a("--no-triton", dest="no_triton", action="store_true",
      help=f"{triton_help} (default: the Triton kernels wherever they run: CUDA, or TRITON_INTERPRET=1)")
    a("--fp8", action="store_true", help="lossy: the DiT blocks' linears in fp8 e4m3 (per-channel weights, per-token "
                                         "activations; half the expert weight bytes; GPUs of compute capability "
                                         ">= 8.9; docs/fp8.md) (default: off, bf16 as official)")
    a("--vae_dtype", default=None, choices=tuple(VAE_DTYPES),
      help="what the VAE runs in: fp32 (official) or bf16 (lossy: half its memory, ~1.8x faster 720p decode on "
           "Hopper, slower on a CPU; docs/quality.md has its loss) (default: fp32)")
    a("--fp8_dir", default=None, metavar="DIR",
      help="implies --fp8: read the experts from fp8 expert files in DIR, written there once from --ckpt_dir's "
           "(block by block, ~14 GB per expert) and re-used by later runs; block streaming then reads the e4m3 "
           "blocks from them (--host_ram low: ~14 GB of host RAM for the DiT) (default: none, the experts are "
           "quantized in memory after loading; docs/fp8.md)")


def add_no_offload_flag(p: argparse.ArgumentParser, scope: str = "") -> None:
    """--no-offload (both tools): both experts stay on the GPU, as --offload none; `scope` adds
    where it applies (wan-benchmark: both modes)."""
    p.add_argument("--no-offload", dest="no_offload", action="store_true",
                   help=f"keep both experts on the GPU (= --offload none{scope})")


def add_offload_flags(p: argparse.ArgumentParser) -> None:
    """--offload {none,model,blocks}: where the DiT weights wait (CUDA only for model and blocks).
    `model` is the official --offload_model True; `blocks` streams each block from pinned host
    memory (wan.streaming). --host_ram: block streaming's host memory."""

    p.add_argument("--offload", default=None, choices=OFFLOAD_MODES,
                   help="none: both experts on the GPU; model: the idle expert in CPU memory (= --offload_model "
                        "True); blocks: stream the DiT blocks from pinned CPU memory (fits 24 GB at 720p) "
                        "(model and blocks: CUDA only; default: the preset's)")
    p.add_argument("--host_ram", default=None, choices=HOST_RAM_MODES,
                   help="with --offload blocks: high keeps both experts' blocks in pinned CPU memory (~57 GB for "
                        "A14B in bf16); low keeps the active expert's only and re-reads the other from --ckpt_dir "
                        "at the expert switch; auto (default) picks low when the host is short (logged)")


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """--ulysses_size, --cfg_parallel, --dit_fsdp, --t5_fsdp, --dist_timeout (official names, plus
    --cfg_parallel; under torchrun)."""
    g = p.add_argument_group("multi-GPU (under torchrun --nproc_per_node N)")
    g.add_argument("--ulysses_size", type=int, default=1,
                   help="Ulysses sequence-parallel degree U (divides the 40 heads)")
    g.add_argument("--cfg_parallel", action="store_true",
                   help="cond and uncond branches on two halves of the ranks (N = 2 x U)")
    g.add_argument("--dit_fsdp", action="store_true", help="shard the DiT experts' weights over all ranks (FSDP2)")
    g.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder's weights over all ranks (FSDP2)")
    g.add_argument("--dist_timeout", type=float, default=600.0,
                   help="seconds a collective may wait before every rank fails (default 600)")


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """--cache {none,easy,mag}, --cache_threshold, --cache_cfg, --cache_ratios: the step cache
    (wan.step_cache; lossy, opt-in; docs/caching.md), checked by wan_triton.request before any model."""
    d = CRITERION_DEFAULTS
    g = p.add_argument_group("step cache (lossy, opt-in; docs/caching.md)")
    a = g.add_argument
    a("--cache", default=None, choices=CRITERIA,
      help="reuse the DiT blocks' residual on steps that change little: easy (calibration-free, from the change of "
           "the output), mag (from the model's magnitude ratios, --cache_ratios) (default: none, every step exact)")
    a("--cache_threshold", type=float, default=None,
      help=f"the criterion's threshold: higher skips more (default: easy {d['easy'].threshold:g}, mag "
           f"{d['mag'].threshold:g})")
    a("--cache_cfg", type=int, default=None, metavar="N",
      help="CFG-branch cache, alone or with --cache: the unconditional branch runs every N-th step, in between it is "
           "the conditional one plus their last difference (default: 0, off)")
    a("--cache_ratios", default=None, metavar="PATH",
      help="--cache mag: the magnitude-ratio file or folder (default: <ckpt_dir>/mag_ratios; python -m "
           "wan_triton.calibrate writes them)")


def attention_registry():
    """wan.attention with wan_triton's own backend (fp8, lossy and opt-in) registered: the CLIs
    offer every registered backend by name."""

    register()
    return att
