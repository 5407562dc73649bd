"""Write the demo model's card (docs/demo_model.md) from its training log.

    python -m bench.demo_card --log runs/demo/train_log.json          # after bench/train_demo.py
    python -m bench.demo_card                                         # the skeleton: figures marked TODO

The sizes and parameter counts come from wan.configs.DEMO (built on the meta device); the files
from wan/demo_model; data, recipe, steps, wall time, losses, seed and the command from the
train_log.json that bench/train_demo.py writes beside the weights. Without --log every figure
that only training knows is written as TODO.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from bench.train_demo import MAX_BYTES, RECIPES
from wan.configs import DEMO, DEMO_CKPT_DIR
from wan.demo_captions import BACKGROUNDS, COLOURS, DEMO_PROMPT, GRAMMAR, MOTIONS, SHAPES
from wan.dit import WanModel
from wan.t5 import T5TextEncoder
from wan.vae import WanVAE

ROOT = Path(__file__).resolve().parents[1]
TODO = "**TODO**"
FORMATS = {".safetensors": "safetensors", ".pth": "PyTorch pickle (.pth)", ".json": "JSON"}


def param_counts() -> dict:
    """Parameters of one DiT expert, the VAE and the text encoder at the DEMO size (meta device)."""
    with torch.device("meta"):
        dit = WanModel(DEMO.dit)
        vae = WanVAE(DEMO.vae)
        t5 = T5TextEncoder.from_config(DEMO, device="meta")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"dit_expert": n(dit), "vae": n(vae), "t5": n(t5.model)}


def files_table(folder: Path) -> list[str]:
    rows = ["| file | format | bytes |", "|---|---|---:|"]
    total = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            rows.append(f"| `{p.relative_to(folder).as_posix()}` | {FORMATS.get(p.suffix, p.suffix)} | "
                        f"{p.stat().st_size:,} |")
    rows.append(f"| **total** | | **{total:,}** ({total / 1e6:.1f} MB of the {MAX_BYTES / 1e6:.0f} MB budget) |")
    return rows


def card(log: dict | None, folder: Path) -> str:
    g = (lambda *keys: TODO) if log is None else (lambda *keys: _text(_get(log, keys)))  # noqa: E731
    params = param_counts()
    d, t5, vae = DEMO.dit, DEMO.t5, DEMO.vae
    recipe = log["recipe"] if log else asdict(RECIPES["cpu"])
    check = log.get("prompt_check") if log else None
    lines = [
        "# The demo model",
        "",
        "`wan-generate` without `--ckpt_dir` runs this model (`--task demo`). It is a **toy trained here** on "
        "procedural clips of one coloured shape moving over a black, grey, striped or checkered background: "
        "the Wan 2.2 T2V-A14B "
        "architecture (two experts, official schedule and file layout) at a size that trains on a CPU. "
        "**It is not Wan's weights** and knows nothing but its training captions.",
        "",
        f"Written by `python -m bench.demo_card{' --log ' + str(log.get('_path', 'train_log.json')) if log else ''}`"
        " (do not edit by hand).",
        "",
        "## What it can and cannot show",
        "",
        f"- Prompts in its grammar only: `{GRAMMAR}`, with colour {', '.join(COLOURS)}; shape {', '.join(SHAPES)}; "
        f"motion {', '.join(MOTIONS)} (circles do not rotate); background {', '.join(BACKGROUNDS)}. "
        f"The default prompt: \"{DEMO_PROMPT}\". Other prompts give a video of some shape (wan-generate warns).",
        "- 64x64 pixels, 17 frames (about one second at 16 fps), 20 UniPC steps, guidance 3 / 4.",
        "- Its text encoder keeps fixed random weights (umT5 architecture, byte tokenizer): the DiT learned to read "
        "them; it has no language knowledge.",
        "- It shows that the stack runs end to end with trained weights (text -> DiT experts -> VAE -> MP4), on a "
        "CPU in seconds; it says nothing about Wan 2.2's quality or speed.",
        "",
        "## Architecture (wan.configs.DEMO)",
        "",
        "| part | size | parameters |",
        "|---|---|---:|",
        f"| DiT expert x 2 (high-noise, low-noise) | dim {d.dim}, ffn {d.ffn_dim}, {d.num_layers} layers, "
        f"{d.num_heads} heads, patch {tuple(d.patch_size)}, text dim {d.text_dim} | {params['dit_expert']:,} each |",
        f"| text encoder (umT5 architecture, fixed random weights) | dim {t5.dim}, {t5.num_layers} layers, "
        f"{t5.num_heads} heads, vocab {t5.vocab_size}, {t5.text_len} tokens | {params['t5']:,} |",
        f"| VAE (Wan2.1 architecture) | dim {vae.dim}, z {vae.z_dim} channels, 4x8x8 compression | {params['vae']:,} |",
        "",
        f"Schedule as the official T2V-A14B: flow shift {DEMO.sample_shift:g}, expert boundary {DEMO.boundary}, "
        f"{DEMO.num_train_timesteps} training timesteps; negative prompt \"\" (training dropped captions to \"\").",
        "",
        "## Files (wan/demo_model, the official layout)",
        "",
        *files_table(folder),
        "",
        "The DiT experts are safetensors, as in the official release; the VAE (`Wan2.1_VAE.pth`) and the text "
        "encoder (`models_t5_umt5-xxl-enc-bf16.pth`) are `.pth` files because the official layout names them so "
        "(the loaders read them with `weights_only=True`). All weights are stored in fp32.",
        "",
        "## Data",
        "",
        f"Procedural clips rendered by `bench/demo_data.py` from (seed, index), never stored: one shape of radius "
        f"0.13-0.19 of the side, straight motion, bouncing or rotating, over a plain (black or grey) or "
        f"low-contrast textured (striped, checkered) "
        f"background; {recipe['size']}x{recipe['size']} pixels, {recipe['frames']} frames. Training clips: "
        f"{recipe['clips']:,} (split seed 0; the VAE stage draws a fresh stream); held-out: {recipe['heldout']} "
        f"(split seed 1){'' if log else ' ' + TODO + ' (the cpu recipe shown)'}.",
        "",
        "## Training",
        "",
        f"- Command: `{g('command')}`",
        *([f"- How it ran: {log['history']}"] if log and log.get("history") else []),
        f"- Repeat without a deadline: `{g('repeat')}`",
        f"- Seed: {g('seed')}; device: {g('device')}; torch {g('torch')}",
        f"- Steps: VAE {g('steps_run', 'vae')}, DiT {g('steps_run', 'dit')} (each expert, batch "
        f"{recipe['dit_batch']})",
        f"- Wall time: {g('wall_total_s')} s in all ({g('wall_s')})",
        f"- Held-out flow-matching loss: {g('heldout_loss')}",
        ("- Recipe: " if log else f"- Recipe: {TODO} (the cpu recipe's values until then) ")
        + ", ".join(f"{k} {v}" for k, v in recipe.items()),
        "",
        "Stages (bench/train_demo.py): the VAE as an autoencoder, its latent statistics folded into its 1x1 convs; "
        "the clips and captions encoded once; both experts trained with flow matching under the official shift and "
        "boundary, captions dropped with p = 0.1.",
        "",
        "![loss curves](demo_loss.png)" if log else f"Loss curves: {TODO} (docs/demo_loss.png)",
        "",
        "## Check",
        "",
        _check_line(check),
        "",
        "tests/test_demo_model.py decodes the default video and checks it against its prompt (colour, size, motion, "
        "shape, no noise); the same check fails on the demo model with random weights.",
        "",
        "## Regenerate",
        "",
        "```",
        "python -m bench.train_demo --out runs/demo --device cpu          # or --recipe gpu --device cuda",
        "cp -r runs/demo/demo_model/. wan/demo_model/ && cp runs/demo/demo_loss.png docs/",
        "python -m bench.demo_card --log runs/demo/train_log.json",
        "python -m bench.demo_data --sample --out docs/demo_strip.png     # the README's strip",
        "```",
        "",
    ]
    return "\n".join(lines)


def _text(v) -> str:
    """A log value as card text: {'vae': 6.2, ...} -> 'vae 6.2, ...'."""
    return ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)


def _get(log: dict, keys: tuple):
    v = log
    for k in keys:
        v = v.get(k, TODO) if isinstance(v, dict) else TODO
    return v


def _check_line(check: dict | None) -> str:
    if not check:
        return f"After training, sampled on 8 prompts: colour right in {TODO}, direction right in {TODO}."
    n = len(check["videos"])
    return (f"After training, sampled on {n} videos of 8 prompts (bench/train_demo.py prompt_check): the object's "
            f"colour is the prompt's in {check['colour']:.0%}; of the straight motions, {check['direction']:.0%} "
            f"move the prompt's way" + (" (chance: the motion words are not learned; the object moves, in some "
                                        "direction)" if check["direction"] < 0.5 else "") + ".")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/demo_model.md from bench/train_demo.py's train_log.json.")
    ap.add_argument("--log", default=None, help="train_log.json (default: none: figures marked TODO)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo_model.md"))
    ap.add_argument("--weights", default=str(DEMO_CKPT_DIR), help="the exported folder (default: wan/demo_model)")
    args = ap.parse_args(argv)
    log = None
    if args.log:
        log = json.loads(Path(args.log).read_text())
        log["_path"] = args.log
    Path(args.out).write_text(card(log, Path(args.weights)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
