"""Checkpoints in the diffusers layout (`Wan2.2-T2V-A14B-Diffusers`), read into our modules.

    model_index.json        WanPipeline, boundary_ratio 0.875
    transformer/            high-noise expert: config.json (WanTransformer3DModel) + diffusion_pytorch_model*.safetensors
    transformer_2/          low-noise expert, same files
    text_encoder/           config.json (UMT5EncoderModel) + model*.safetensors
    tokenizer/              the umT5 tokenizer files (read by transformers' AutoTokenizer, as in the official layout)
    vae/                    config.json (AutoencoderKLWan) + diffusion_pytorch_model.safetensors
    scheduler/              not read: the solver settings come from the task config (docs/schedulers.md)

Pure key and shape logic: nothing here imports diffusers. Each component gets a key table file
name -> our name, built from the architecture (the DiT's from wan.lora's module-name pairs, the
T5's from wan.t5.hf_to_official, the VAE's below), and is loaded through
wan.checkpoint.load_weights_into with every key and shape checked. docs/diffusers.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import DIFFUSERS_FOLDERS, CheckpointError, dit_weight_files, load_weights_into, safetensors_header
from .configs import DiTConfig, T2VConfig, VAEConfig
from .lora import official_to_diffusers

__all__ = ["dit_config", "vae_config", "dit_key_map", "t5_key_map", "vae_key_map", "load_dit", "load_t5",
           "load_vae", "HIGH", "LOW"]

HIGH, LOW = "transformer", "transformer_2"  # diffusers runs `transformer` while t >= boundary


def _read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {err}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    return cfg


def _refuse(cfg: dict, source, **want) -> None:
    for key, value in want.items():
        if cfg.get(key, value) != value:
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not the T2V architecture ({value!r})")


# ------------------------------------------------------------------ DiT

def dit_config(cfg: dict, source="transformer/config.json") -> DiTConfig:
    """Our DiTConfig from a WanTransformer3DModel config.json (T2V only; text_len is 512 as in
    diffusers' pipeline, RoPE table 1024 positions as ours)."""
    _refuse(cfg, source, image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)
    try:
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        return DiTConfig(patch_size=tuple(cfg["patch_size"]), in_dim=int(cfg["in_channels"]), dim=heads * head_dim,
                         ffn_dim=int(cfg["ffn_dim"]), freq_dim=int(cfg["freq_dim"]), text_dim=int(cfg["text_dim"]),
                         out_dim=int(cfg.get("out_channels") or cfg["in_channels"]), num_heads=heads,
                         num_layers=int(cfg["num_layers"]), qk_norm=True,
                         cross_attn_norm=bool(cfg.get("cross_attn_norm", True)), eps=float(cfg.get("eps", 1e-6)))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: missing or bad field {err}") from None


def dit_key_map(model) -> dict[str, str]:
    """diffusers key -> our key for every parameter of `model` (a WanModel, meta is fine)."""
    names = official_to_diffusers(len(model.blocks))
    out = {}
    for ours in model.state_dict():
        mod, _, leaf = ours.rpartition(".")
        theirs = names.get(ours) or f"{names[mod]}.{leaf}"
        out[theirs] = ours
    return out


def load_dit(folder, dtype=None, device="cpu", progress: bool = False):
    """Our WanModel from a diffusers transformer folder (config.json + safetensors)."""
    from .dit import WanModel

    folder = Path(folder)
    cfg = dit_config(_read_config(folder), folder / "config.json")
    with torch.device("meta"):
        model = WanModel(cfg)
    files = dit_weight_files(folder, *DIFFUSERS_FOLDERS[HIGH])
    return load_weights_into(model, folder, files, device, dtype, progress, rename=dit_key_map(model))


# ------------------------------------------------------------------ T5 (transformers' UMT5EncoderModel)

def t5_key_map(model, file_keys) -> dict[str, str | None]:
    """transformers key -> our key (wan.t5.hf_to_official per key). The token embedding is stored
    as `shared.weight`, `encoder.embed_tokens.weight` or both (tied): the second copy is skipped."""
    from .t5 import hf_to_official

    ours = set(model.state_dict())
    out: dict[str, str | None] = {}
    for k in file_keys:
        try:
            mapped = next(iter(hf_to_official({k: None})))
        except KeyError:
            continue  # left unmapped: reported as an unexpected key by the loader
        out[k] = mapped if mapped in ours else f"{k} (no such parameter)"
    if "shared.weight" in out and "encoder.embed_tokens.weight" in out:
        out["encoder.embed_tokens.weight"] = None
    return out


def load_t5(ckpt_dir, config: T2VConfig, device="cpu", dtype=None):
    """Our T5TextEncoder from text_encoder/ and tokenizer/."""
    from .t5 import T5Encoder, T5TextEncoder, _load_tokenizer

    folder = Path(ckpt_dir) / "text_encoder"
    files = dit_weight_files(folder, *DIFFUSERS_FOLDERS["text_encoder"])
    keys = [k for f, ks in files.items() for k in (ks if ks is not None else safetensors_header(f))]
    tokenizer = _load_tokenizer(Path(ckpt_dir) / "tokenizer")
    with torch.device("meta"):
        model = T5Encoder(config.t5)
    model = load_weights_into(model, folder, files, device or "cpu", dtype or config.t5_dtype,
                              rename=t5_key_map(model, keys))
    return T5TextEncoder(tokenizer, model, config.t5.text_len)


# ------------------------------------------------------------------ VAE (AutoencoderKLWan)

def vae_config(cfg: dict, source="vae/config.json") -> VAEConfig:
    """Our VAEConfig from an AutoencoderKLWan config.json (the Wan 2.1 VAE only)."""
    _refuse(cfg, source, is_residual=False, patch_size=None, in_channels=3, out_channels=3)
    if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
        raise CheckpointError(f"{source}: decoder_base_dim={cfg['decoder_base_dim']!r} is not the Wan 2.1 VAE")
    base = VAEConfig()
    try:
        return VAEConfig(dim=int(cfg.get("base_dim", base.dim)), z_dim=int(cfg.get("z_dim", base.z_dim)),
                         dim_mult=tuple(cfg.get("dim_mult", base.dim_mult)),
                         num_res_blocks=int(cfg.get("num_res_blocks", base.num_res_blocks)),
                         attn_scales=tuple(cfg.get("attn_scales", base.attn_scales)),
                         temperal_downsample=tuple(cfg.get("temperal_downsample", base.temperal_downsample)),
                         mean=tuple(float(v) for v in cfg.get("latents_mean", base.mean)),
                         std=tuple(float(v) for v in cfg.get("latents_std", base.std)))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad field: {err}") from None


# a residual block's layers: ours (official Sequential indices) -> diffusers' names
_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}
_TOP = {"encoder.conv1": "encoder.conv_in", "encoder.head.0": "encoder.norm_out", "encoder.head.2": "encoder.conv_out",
        "conv1": "quant_conv", "conv2": "post_quant_conv", "decoder.conv1": "decoder.conv_in",
        "decoder.head.0": "decoder.norm_out", "decoder.head.2": "decoder.conv_out"}
_MIDDLE = {"middle.0": "mid_block.resnets.0", "middle.1": "mid_block.attentions.0", "middle.2": "mid_block.resnets.1"}


def _vae_module_map(cfg: VAEConfig) -> dict[str, str]:
    """Our VAE module prefix -> diffusers' (blocks of a residual module end in '.')."""
    out = dict(_TOP)
    for side in ("encoder", "decoder"):
        for ours, theirs in _MIDDLE.items():
            out[f"{side}.{ours}."] = f"{side}.{theirs}."
    # encoder: downsamples.{n} keep their flat index
    n_down = len(cfg.dim_mult) * cfg.num_res_blocks + len(cfg.dim_mult) - 1
    for n in range(n_down):
        out[f"encoder.downsamples.{n}."] = f"encoder.down_blocks.{n}."
    # decoder: per stage, num_res_blocks + 1 residual blocks, then an upsampler except after the last
    n = 0
    for stage in range(len(cfg.dim_mult)):
        for j in range(cfg.num_res_blocks + 1):
            out[f"decoder.upsamples.{n}."] = f"decoder.up_blocks.{stage}.resnets.{j}."
            n += 1
        if stage != len(cfg.dim_mult) - 1:
            out[f"decoder.upsamples.{n}."] = f"decoder.up_blocks.{stage}.upsamplers.0."
            n += 1
    return out


def vae_key_map(model, cfg: VAEConfig) -> dict[str, str]:
    """diffusers key -> our key for every parameter of `model` (a WanVAE built from `cfg`)."""
    if cfg.attn_scales:
        raise CheckpointError("VAE with attn_scales: not the Wan 2.1 VAE")
    mods = _vae_module_map(cfg)
    out = {}
    for ours in model.state_dict():
        mod, _, leaf = ours.rpartition(".")
        if mod in mods:
            out[f"{mods[mod]}.{leaf}"] = ours
            continue
        prefix = next((p for p in mods if p.endswith(".") and ours.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"VAE key {ours} has no diffusers name")
        rest = ours[len(prefix):]
        for a, b in _RESIDUAL.items():
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
                break
        out[mods[prefix] + rest] = ours
    return out


def load_vae(folder, device="cpu", dtype: torch.dtype = torch.float32):
    """Our WanVAE from a diffusers vae folder; its config (latent mean/std included) from config.json."""
    from .vae import WanVAE

    folder = Path(folder)
    cfg = vae_config(_read_config(folder), folder / "config.json")
    with torch.device("meta"):
        model = WanVAE(cfg)
    files = dit_weight_files(folder, *DIFFUSERS_FOLDERS["vae"])
    model = load_weights_into(model, folder, files, "cpu", dtype, rename=vae_key_map(model, cfg))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
