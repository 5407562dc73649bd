"""Two-expert Wan 2.2 text-to-video pipeline with the official semantics.

prompt -> umT5 context; noise -> DiT (high-noise expert while t >= boundary * 1000, then the
low-noise expert), classifier-free guidance, flow solver -> latents -> VAE decode -> video.
The solver math is in docs/schedulers.md, the dtype of every stage in docs/precision.md.

Precision on CPU: the denoising loop runs under `torch.autocast(<device>, bf16)` on every
device, CPU included. The official code autocasts with CUDA's autocast only (on a CPU it
does nothing), but the official code has no CPU path at all; ours exists for the tiny demo
and the tests, and is useful there only if it computes what the GPU computes. So a CPU run
follows the CUDA precision map (bf16 matmuls, the fp32 regions of docs/precision.md), and
CPU results match GPU results up to kernel rounding, not an fp32 variant of the model.

`cfg_combine` is a module-level function so `wan_triton.patch()` can swap it. Request checks
live in `wan.requests`, video output in `wan.video`, stage timing in `wan.timing`.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import attention, diffusers_layout as dl
from .checkpoint import CheckpointError, check_checkpoint, is_diffusers_layout
from .configs import T2VConfig, get_config
from .denoise import Conditioning, denoise, expert_of, schedule_steps
from .dit import WanModel
from .footprint import build_footprint, check_host_ram
from .hostmem import ExpertFiles
from .lora import LoraError, load_lora_into_pipeline, unload_from_pipeline
from .naming import Arg
from .offload import (OFFLOAD_MODES, build_streamable_expert, check_offload_device, default_offload,
                      enable_pipeline_streaming, load_experts_for_streaming, park_all, switch_experts)
from .parking import to_device, to_host
from .requests import check_request
from .schedulers import make_scheduler
from .streaming import OffloadError
from .t5 import T5TextEncoder, byte_tokenizer, clean_text
from .timing import Timings
from .vae import WanVAE

__all__ = ["WanT2V", "cfg_combine", "expert_of", "schedule_experts"]

log = logging.getLogger("wan.pipeline")


def schedule_experts(config: T2VConfig, solver: str = "unipc", steps: int | None = None,
                     shift: float | None = None) -> list[str]:
    """The expert of each step of a schedule ('high'/'low'), from the solver's timesteps alone
    (no model): e.g. which expert a LoRA for one expert would ever meet."""

    sch = make_scheduler(solver, config.sample_steps if steps is None else steps,
                         config.sample_shift if shift is None else shift, "cpu", config.num_train_timesteps)
    return [expert_of(config, int(t.item())) for t in sch.timesteps]


def _offload_mode(offload: str | None, device, allow_cpu: bool) -> str:
    """A build's offload mode: None is the official default (wan.offload.default_offload); an
    unknown mode is an OffloadError, as is offloading off CUDA (unless `allow_cpu`: tests)."""
    mode = default_offload(device) if offload is None else offload
    if mode not in OFFLOAD_MODES:
        raise OffloadError("unknown offload mode {a}; choose from {modes}", a=Arg("offload", mode),
                           modes=", ".join(OFFLOAD_MODES))
    if not allow_cpu:
        check_offload_device(mode, device)
    return mode


def _to_host(model):
    """`model` moved to host memory, its device memory given back."""
    model = model.to("cpu")
    torch.cuda.empty_cache()
    return model


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), float32."""
    return uncond + scale * (cond - uncond)


class WanT2V:
    """Wan 2.2 T2V-A14B: text encoder, two DiT experts, VAE, flow solver.

    Build with `from_pretrained(ckpt_dir)` (official layout) or `from_config(task)` (random weights).
    `offload` is where the DiT weights wait between uses (wan.offload): 'none', 'model' (the idle
    expert in host memory) or 'blocks' (streamed); None: the official default, 'model' on CUDA.
    `generate()` follows it unless its `offload_model` says otherwise.
    """

    parallel = None  # wan.parallel.ParallelState under torchrun (set by wan.parallel.apply_to_pipeline)

    def __init__(self, config: T2VConfig, text_encoder, vae, low_noise_model, high_noise_model,
                 device="cuda", t5_cpu: bool = False, use_batched_cfg: bool = False, offload: str | None = None,
                 t5_release: bool = False):
        self.config = config
        self.text_encoder = text_encoder
        self.vae = vae
        self.low_noise_model = low_noise_model
        self.high_noise_model = high_noise_model
        self.device = torch.device(device)
        self.t5_cpu = t5_cpu
        self.use_batched_cfg = use_batched_cfg
        # True: the text encoder's weights are freed after the prompts are encoded and read again
        # for the next video (T5Source): its 11.4 GB (A14B) are free while the DiT and the VAE run
        self.t5_release = t5_release
        # "blocks" only once enable_block_streaming has run (wan.offload)
        self.offload = default_offload(self.device) if offload in (None, "blocks") else offload
        self.step_cache = None  # a wan.step_cache.CachePolicy (enable_step_cache): opt-in, lossy
        self.ckpt_dir = None   # the checkpoint folder (from_pretrained)
        self.expert_files = None  # wan.hostmem.ExpertFiles the experts were read from (from_pretrained)
        self.last_timings: Timings | None = None  # of the latest generate() call
        self.last_seed: int | None = None         # the seed it used (drawn when seed < 0)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, ckpt_dir, config: T2VConfig | str = "t2v-A14B", device="cuda", t5_cpu=False,
                        convert_model_dtype=False, init_on_cpu=True, progress: bool = False,
                        offload: str | None = None, host_ram: str = "auto", allow_cpu: bool = False,
                        expert_files: ExpertFiles | None = None, **kw) -> "WanT2V":
        """Load a checkpoint folder, official or diffusers layout (docs/diffusers.md). DiT params
        stay in their stored dtype (fp32) unless `convert_model_dtype` (then `config.param_dtype`, as
        the official flag does). The experts wait in host memory (`init_on_cpu`) until generate()
        moves the active one in; `offload` (see the class) is recorded. offload="blocks": block
        streaming is on when it returns; the host-memory mode (`host_ram`, wan.hostmem.choose_host_ram)
        is chosen before the experts are read, and in low mode the low-noise expert's blocks are only
        read at the expert switch. Offloading needs a CUDA device (OffloadError on a CPU unless
        `allow_cpu`, see `enable_block_streaming`). `expert_files` (wan.hostmem.ExpertFiles): read
        the experts from these folders with their loaders (e.g. fp8 expert files, wan_triton.fp8_files)
        instead of the checkpoint's own; block streaming with host RAM low re-reads them from there too."""

        config = get_config(config) if isinstance(config, str) else config
        offload = _offload_mode(offload, device, allow_cpu)
        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {ckpt}")
        check_checkpoint(ckpt, config)  # every file the run needs, checked before any is loaded
        device = torch.device(device)
        dit_dtype = config.param_dtype if convert_model_dtype else None
        dit_dev = "cpu" if init_on_cpu else device
        low_dev = "cpu" if offload == "model" else dit_dev  # the idle expert waits on the host either way
        kw["offload"] = offload
        if is_diffusers_layout(ckpt):
            return cls._from_diffusers_layout(ckpt, config, device, t5_cpu, dit_dtype, (dit_dev, low_dev), progress,
                                              kw)
        t5 = T5TextEncoder.from_pretrained(ckpt, config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype)
        vae = WanVAE.from_pretrained(ckpt / config.vae_checkpoint, device=device, dtype=torch.float32,
                                     cfg=config.vae)
        choice = None
        files = expert_files or ExpertFiles.official(ckpt, config, dit_dtype)
        if offload == "blocks":
            low, high, choice = load_experts_for_streaming(files, host_ram, progress)
        elif expert_files is not None:
            low, high = (expert_files.load(expert_files.folder(e), progress).to(d)
                         for e, d in (("low", low_dev), ("high", dit_dev)))
        else:
            low = WanModel.from_pretrained(ckpt / config.low_noise_checkpoint, dtype=dit_dtype, device=low_dev,
                                           progress=progress)
            high = WanModel.from_pretrained(ckpt / config.high_noise_checkpoint, dtype=dit_dtype, device=dit_dev,
                                            progress=progress)
        pipe = cls(config, t5, vae, low, high, device=device, t5_cpu=t5_cpu, **kw)
        pipe.ckpt_dir = ckpt
        pipe.expert_files = files  # block streaming with host RAM low re-reads an expert from here
        if choice is not None:
            enable_pipeline_streaming(pipe, choice=choice, allow_cpu=allow_cpu)
        return pipe

    @classmethod
    def _from_diffusers_layout(cls, ckpt, config, device, t5_cpu, dit_dtype, devices, progress, kw):
        """The Wan2.2-T2V-A14B-Diffusers layout: transformer/ is the high-noise expert. `devices`:
        (the high-noise expert's, the low-noise expert's)."""

        if kw["offload"] == "blocks":
            raise CheckpointError(f"block streaming reads the official layout only; {ckpt} is in the diffusers "
                                  "layout (load it without streaming)")
        t5 = dl.load_t5(ckpt, config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype)
        vae = dl.load_vae(ckpt / "vae", device=device, dtype=torch.float32)
        high = dl.load_dit(ckpt / dl.HIGH, dtype=dit_dtype, device=devices[0], progress=progress)
        low = dl.load_dit(ckpt / dl.LOW, dtype=dit_dtype, device=devices[1], progress=progress)
        config = config.replace(dit=high.config, vae=vae.config)  # the files' architecture and latent statistics
        pipe = cls(config, t5, vae, low, high, device=device, t5_cpu=t5_cpu, **kw)
        pipe.ckpt_dir = ckpt
        return pipe

    @classmethod
    def from_config(cls, config: T2VConfig | str = "tiny", device="cpu", dtype=None, seed: int = 0,
                    t5_cpu=False, offload: str | None = None, allow_cpu: bool = False, **kw) -> "WanT2V":
        """Random weights at the task's real shapes (official init, head randomised so the output
        is not zero), built directly on `device`. DiT dtype defaults to `param_dtype`. First
        checks that the host memory holds what lands there (wan.footprint; InputError, one line,
        otherwise: the A14B on a CPU takes ~69 GB).
        offload (see the class; None: 'model' on CUDA): 'model' builds the low-noise expert (idle
        until the expert switch) on `device` and moves it to host memory before the high-noise one
        is built, so the device never holds both (same values as a resident build); 'blocks'
        builds the experts' blocks one at a time into host memory and turns block streaming on (a
        24 GB card never holds an expert; other random values)."""

        config = get_config(config) if isinstance(config, str) else config
        device = torch.device(device)
        dtype = dtype or config.param_dtype
        offload = _offload_mode(offload, device, allow_cpu)
        check_host_ram(config, build_footprint(config, device, dtype, t5_cpu, offload),
                       device)  # one line now rather than an out-of-memory kill while building
        if offload == "blocks":  # the experts first: their build peaks (fp32 init) before the T5 takes its share
            low = build_streamable_expert(config.dit, device, dtype, seed=seed + 1)
            high = build_streamable_expert(config.dit, device, dtype, seed=seed + 2)
        else:
            low = WanModel.from_config(config.dit, device=device, dtype=dtype, seed=seed + 1, zero_head=False)
            if offload == "model" and device.type == "cuda":
                low = _to_host(low)
            high = WanModel.from_config(config.dit, device=device, dtype=dtype, seed=seed + 2, zero_head=False)
        tok = None
        if config.t5.vocab_size > 256 + 3:  # real umT5 vocab: no tokenizer files without a checkpoint
            log.info("random weights: the built-in byte tokenizer stands in for umT5's (no tokenizer files)")
            tok = byte_tokenizer(config.t5.text_len)
        t5 = T5TextEncoder.from_config(config, device="cpu" if t5_cpu else device, dtype=config.t5_dtype, seed=seed,
                                       tokenizer=tok)
        vae = WanVAE.from_config(config.vae, device=device, dtype=torch.float32, seed=seed)
        pipe = cls(config, t5, vae, low, high, device=device, t5_cpu=t5_cpu, offload=offload, **kw)
        if offload == "blocks":
            pipe.enable_block_streaming(allow_cpu=allow_cpu)
        return pipe

    def enable_block_streaming(self, ring: int = 2, pin: bool | None = None, host_ram: str = "auto",
                               ckpt_dir=None, allow_cpu: bool = False):
        """Stream both experts' DiT blocks from (pinned) host memory through a ring of `ring`
        device buffers (wan.offload); returns the two handles. Bit-identical output.
        host_ram "low" keeps only the active expert's blocks in host memory and re-reads the other
        from `ckpt_dir` (default: the folder it was loaded from) at the switch; "auto" decides.
        Needs a CUDA device, as --offload blocks does (OffloadError on a CPU, where the weights sit
        in host memory already); `allow_cpu=True` runs the machinery there anyway (tests)."""
        return enable_pipeline_streaming(self, ring=ring, pin=pin, host_ram=host_ram, ckpt_dir=ckpt_dir,
                                         allow_cpu=allow_cpu)

    def save_pretrained(self, ckpt_dir, max_shard_bytes: int = 5 * 2 ** 30):
        """Write the official layout (tests use this to make small checkpoints)."""
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(ckpt, self.config)
        self.vae.save_pretrained(ckpt / self.config.vae_checkpoint)
        self.low_noise_model.save_pretrained(ckpt / self.config.low_noise_checkpoint, max_shard_bytes)
        self.high_noise_model.save_pretrained(ckpt / self.config.high_noise_checkpoint, max_shard_bytes)

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path, strength: float = 1.0, expert: str = "both", keep: str = "cpu") -> dict:
        """Merge a LoRA file into the high-noise, low-noise or both experts (wan.lora); the
        originals are kept (`keep`: cpu / device / none) so unload_loras() restores them exactly."""
        if self.offload == "blocks":  # the streamer owns the block storage (and may have evicted it)
            raise LoraError("LoRAs merge before block streaming starts: call "
                            "wan.offload.disable_pipeline_streaming(pipe) first, or load them before streaming")
        return load_lora_into_pipeline(self, path, strength, expert, keep)

    def unload_loras(self) -> int:
        """Restore both experts' weights to their pre-LoRA state, bit for bit."""
        return unload_from_pipeline(self)

    # ------------------------------------------------------------------ helpers
    def dit_models(self) -> tuple:
        """The DiT models this pipeline runs: the two experts (ti2v-5B's pipeline has one)."""
        return (self.high_noise_model, self.low_noise_model)

    def latent_shape(self, width: int, height: int, frame_num: int) -> tuple[int, int, int, int]:
        st, sh, sw = self.config.vae_stride
        return (self.config.vae.z_dim, (frame_num - 1) // st + 1, height // sh, width // sw)

    def seq_len(self, latent_shape) -> int:
        _, f, h, w = latent_shape
        pt, ph, pw = self.config.dit.patch_size
        u = self.parallel.ulysses_size if self.parallel is not None else 1  # official: a multiple of U
        return math.ceil((h * w) / (ph * pw) * f / pt / u) * u

    def _expert(self, t: int, offload: bool):
        if expert_of(self.config, t) == "high":
            use, idle, g = self.high_noise_model, self.low_noise_model, 1
        else:
            use, idle, g = self.low_noise_model, self.high_noise_model, 0
        if self.offload == "blocks":  # the blocks stream; only the small non-block parts move
            switch_experts(use, idle, self.device)
            return use, g
        if offload and self.device.type == "cuda":
            to_host(idle)  # into its kept (pinned) host copies: wan.parking
        if next(use.parameters()).device != self.device:
            to_device(use, self.device)
        return use, g

    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        ctx = self.text_encoder(prompts, device=self.text_encoder_device)
        return [c.to(self.device) for c in ctx]

    def release_text_encoder(self) -> None:
        """Free the text encoder's weights (read again by its next call; `t5_release`)."""
        self.text_encoder.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def text_encoder_device(self) -> torch.device:
        return torch.device("cpu") if self.t5_cpu else self.device

    def prompt_tokens(self, text: str) -> int:
        """Tokens the text encoder would see for `text` before truncation (</s> included)."""

        ids = self.text_encoder.tokenizer(clean_text(text), add_special_tokens=True, truncation=False,
                                          verbose=False)["input_ids"]
        return len(ids)

    def _warn_if_cut(self, what: str, text: str) -> None:
        n, keep = self.prompt_tokens(text), self.text_encoder.text_len
        if n > keep:
            log.warning("the %s is %d tokens long; the text encoder keeps the first %d (text_len) and "
                        "ignores the rest", what, n, keep)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str, size=(1280, 720), frame_num: int = 81, shift: float | None = None,
                 sample_solver: str = "unipc", sampling_steps: int | None = None, guide_scale=None,
                 n_prompt: str = "", seed: int = -1, offload_model: bool | None = None, progress: bool = True,
                 return_latents: bool = False):
        """-> video [3, frame_num, height, width] float32 in [-1, 1] (or latents [16, F, H, W]).

        size is (width, height) or 'W*H'. guide_scale: float (both experts) or (low-noise,
        high-noise). seed < 0 draws one (kept in `last_seed`); per-stage times land in
        `last_timings`. offload_model: True moves the idle expert to host memory, False keeps
        both on the device; None follows the pipeline's `offload` ('model': True).
        """

        offload_model = self.offload == "model" if offload_model is None else offload_model
        cfg = self.config
        shift = cfg.sample_shift if shift is None else shift
        sampling_steps = cfg.sample_steps if sampling_steps is None else sampling_steps
        guide_scale = cfg.sample_guide_scale if guide_scale is None else guide_scale
        if isinstance(guide_scale, (int, float)):
            guide_scale = (float(guide_scale), float(guide_scale))
        w, h = check_request(cfg, size, frame_num, sample_solver, sampling_steps, shift=shift,
                             guide_scale=guide_scale, seed=seed)
        if any(g < 0 for g in guide_scale):
            log.warning("guidance scale %s is negative: each step is pushed away from the prompt, towards the "
                        "negative prompt", "/".join(f"{g:g}" for g in guide_scale))
        self._warn_if_cut("prompt", prompt)
        if n_prompt:
            self._warn_if_cut("negative prompt", n_prompt)
        n_prompt = n_prompt or cfg.sample_neg_prompt
        if seed is None or seed < 0:
            seed = random.randint(0, sys.maxsize)
        par = self.parallel
        if par is not None:  # every rank draws rank 0's noise; only rank 0 shows progress and decodes
            seed = par.broadcast_seed(seed)
            progress = progress and par.is_main
        dev = self.device
        tm = Timings(device=str(dev))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        with tm.measure("total"):
            # 1. text (two batch-1 calls, as the official pipeline does; no negative prompt when
            #    neither expert uses guidance, i.e. both scales are exactly 1)
            with tm.measure("text_encode"):
                context = self.encode_text([prompt])
                context_null = None if all(g == 1.0 for g in guide_scale) else self.encode_text([n_prompt])
                if self.t5_release:
                    self.release_text_encoder()

            # 2. noise: one float32 draw from a generator on the device
            shape = self.latent_shape(w, h, frame_num)
            seq_len = self.seq_len(shape)
            gen = torch.Generator(device=dev).manual_seed(seed)
            latent = torch.randn(*shape, dtype=torch.float32, device=dev, generator=gen)

            # 3. denoise: expert by timestep, CFG, one solver step (bf16 autocast on every device,
            #    see the module docstring); the loop is wan.denoise.denoise
            scheduler = make_scheduler(sample_solver, sampling_steps, shift, dev, cfg.num_train_timesteps)
            attention.resolve_backend(dev)  # its log line comes before the progress bar, not inside it
            cond = Conditioning(context, context_null, seq_len, guide_scale)
            with torch.autocast(device_type=dev.type, dtype=cfg.param_dtype):
                latent = denoise(self, latent, scheduler, schedule_steps(cfg, scheduler.timesteps), cond,
                                 generator=gen, offload_model=offload_model, timings=tm, progress=progress,
                                 solver=sample_solver, shift=shift)

            # 4. decode
            out = latent
            if par is not None and not par.is_main and not return_latents:
                out = None  # rank 0 decodes
            elif not return_latents:
                log.info("decoding %d frames with the VAE ...", frame_num)
                with tm.measure("decode"):
                    z = latent.unsqueeze(0)  # a bar per latent frame (the decode is most of a small run)
                    out = (self.vae.decode(z, progress=True) if progress else self.vae.decode(z))[0]
        if dev.type == "cuda":
            tm.peak_mem_gb = torch.cuda.max_memory_allocated(dev) / 1e9
        self.last_timings = tm
        self.last_seed = seed
        return out

    @torch.no_grad()
    def warm_up(self, size=(1280, 720), frame_num: int = 81, decode: bool = True) -> float:
        """The first calls of a generation at `size`, made cheaply so that a timed generation makes
        none of them (kernel compilation, cuDNN plans, library set-up): the text encoder once, one
        forward of the high-noise expert on fewer latent frames at the full height and width (the
        token count's divisibility by 16, on which compiled kernels are keyed, kept; the other
        expert runs the same kernels, and under host RAM low it is not read here), the VAE decode of
        2 latent frames at full size. The high-noise expert is left where a generation's first step
        puts it (on the device unless its blocks stream); nothing a generation computes from
        changes. Returns the seconds."""
        t0 = time.perf_counter()
        w, h = check_request(self.config, size, frame_num, "unipc", 1)
        z, f, lh, lw = self.latent_shape(w, h, frame_num)
        one = self.seq_len((z, 1, lh, lw))
        full = self.seq_len((z, f, lh, lw)) % 16 == 0
        frames = next(k for k in range(1, f + 1) if (k * one % 16 == 0) == full)
        dev = self.device
        context = self.encode_text([""])
        if self.t5_release:
            self.release_text_encoder()
        x = torch.zeros(z, frames, lh, lw, device=dev)
        tt = torch.tensor([self.config.num_train_timesteps - 1], device=dev)
        model, _ = self._expert(int(tt.item()), offload=False)  # where the first step would put it
        with torch.autocast(device_type=dev.type, dtype=self.config.param_dtype):
            self._warm_up_forward(model, x, tt, context, self.seq_len((z, frames, lh, lw)))
        if self.offload == "blocks":
            park_all(self.low_noise_model, self.high_noise_model)
        if decode:
            self.vae.decode(torch.zeros(1, z, min(2, f), lh, lw, device=dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def _warm_up_forward(self, model, x, tt, context, seq_len):
        """warm_up's one forward (a pipeline with conditioning channels adds them)."""
        model([x], tt, context, seq_len=seq_len)

    def _guided(self, model, latent, t, context, context_null, seq_len, scale, cache=None):
        """One CFG-combined velocity for one step: two batch-1 forwards (official) or one batch-2.
        At scale exactly 1, uncond + 1*(cond - uncond) is cond: one forward, no unconditional pass.
        `cache`: the step cache's run (wan.step_cache), told which CFG branch each forward computes;
        on a step where its CFG-branch cache holds, the unconditional velocity needs no forward."""
        tt = t.reshape(1).to(self.device)
        if scale == 1.0:  # guidance 1: the combined velocity is the conditional one (also under CFG-parallel)
            return _forward(model, cache, ("cond",), [latent], tt, context, seq_len)[0]
        par = self.parallel
        if par is not None and par.cfg_parallel:  # this half runs one branch; one exchange per step
            mine = _forward(model, cache, (("cond", "uncond")[par.cfg_rank],), [latent], tt,
                            context if par.cfg_rank == 0 else context_null, seq_len)[0]
            cond, uncond = par.exchange_cfg(mine)
        elif cache is not None and cache.reuse_uncond:
            cond = _forward(model, cache, ("cond",), [latent], tt, context, seq_len)[0]
            uncond = cache.uncond_of(cond)
        elif self.use_batched_cfg:
            both = _forward(model, cache, ("cond", "uncond"), latent.unsqueeze(0).expand(2, *latent.shape),
                            tt.expand(2), [context[0], context_null[0]], seq_len)
            cond, uncond = both[0], both[1]
        else:
            cond = _forward(model, cache, ("cond",), [latent], tt, context, seq_len)[0]
            uncond = _forward(model, cache, ("uncond",), [latent], tt, context_null, seq_len)[0]
        if cache is not None:
            cache.saw_branches(cond, uncond)
        return cfg_combine(uncond, cond, scale)


def _forward(model, cache, branches: tuple, x, tt, context, seq_len):
    """model(x, tt, context, seq_len=seq_len); with a step cache's run, labelled with the CFG branch
    of each sample ('cond' / 'uncond'), whose stored residual it keeps or reuses."""
    if cache is None:
        return model(x, tt, context, seq_len=seq_len)
    with cache.branches(branches):
        return model(x, tt, context, seq_len=seq_len)
