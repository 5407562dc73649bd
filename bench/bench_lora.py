"""Time merging a rank-64 LoRA into a bf16 A14B expert on the GPU, and unmerging it exactly.

    python -m bench.bench_lora                         # A14B expert, rank 64, on cuda (~1-2 min on an H200)
    python -m bench.bench_lora --save-lora bench/out/random_lora_a14b_rank64.safetensors
    python -m bench.bench_lora --task tiny --device cpu   # smoke test

What it does: builds one random bf16 expert at the preset's shapes directly on the device, writes a
random LoRA file in the PEFT layout (`diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}` and
`ffn.{0,2}`, lora_A/lora_B, bf16, every one of the blocks: 400 linears for A14B) and then times:

- map: reading the file header and checking every key and shape against the model
- merge keep=none: the CLI's one-shot merge (no copy of the originals)
- merge keep=cpu: the API default (originals copied to pinned host memory first)
- unmerge: putting the originals back; checked bit for bit against checksums taken beforehand
  (two int64 checksums of each touched tensor's raw bits, computed on the device)

The keep=none merge leaves the weights changed, so the expert is rebuilt from the same seed before
the keep=cpu round trip, whose unmerge is then checked bit for bit.
Prints a table; writes JSON to --out. `--save-lora PATH` keeps the LoRA file (for wan-benchmark).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from wan.timing import sync as _sync


def write_random_lora(model, path: Path, rank: int, seed: int, dtype) -> tuple[int, int]:
    """PEFT-layout LoRA over every attention and FFN linear of every block; returns (modules, bytes)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, blk in enumerate(model.blocks):
        for name, lin in (("self_attn.q", blk.self_attn.q), ("self_attn.k", blk.self_attn.k),
                          ("self_attn.v", blk.self_attn.v), ("self_attn.o", blk.self_attn.o),
                          ("cross_attn.q", blk.cross_attn.q), ("cross_attn.k", blk.cross_attn.k),
                          ("cross_attn.v", blk.cross_attn.v), ("cross_attn.o", blk.cross_attn.o),
                          ("ffn.0", blk.ffn[0]), ("ffn.2", blk.ffn[2])):
            out_f, in_f = lin.weight.shape
            base = f"diffusion_model.blocks.{i}.{name}"
            sd[f"{base}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(dtype)
            sd[f"{base}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 1e-2).to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return len(sd) // 2, path.stat().st_size


def checksums(model, names) -> dict:
    """Two int64 checksums of each tensor's raw bits (computed where the tensor lives)."""
    import torch

    params = dict(model.named_parameters())
    out = {}
    for n in names:
        w = params[n].detach()
        bits = w.view(torch.int16) if w.element_size() == 2 else w.view(torch.int32)
        b = bits.reshape(-1).to(torch.int64)
        pos = torch.arange(1, b.numel() + 1, device=b.device, dtype=torch.int64) % 65521
        out[n] = (int(b.sum()), int((b * pos).sum()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_lora", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="t2v-A14B")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-lora", dest="save_lora", default=None, help="keep the random LoRA file here")
    p.add_argument("--out", default="bench/out/bench_lora.json")
    args = p.parse_args(argv)

    import torch

    from wan import lora as L
    from wan.configs import get_config
    from wan.dit import WanModel

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_lora: error: --device cuda: no CUDA device is available (try --task tiny --device cpu)",
              file=sys.stderr)
        return 2
    cfg = get_config(args.task)
    rows, res = [], dict(task=args.task, device=str(device), rank=args.rank,
                         device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")

    def timed(label, fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        rows.append((label, dt))
        res[label] = dt
        print(f"[bench_lora] {label}: {dt:.2f} s", flush=True)
        return out

    build = lambda: WanModel.from_config(cfg.dit, device=device, dtype=torch.bfloat16, seed=args.seed + 1)  # noqa: E731
    model = timed("build expert (random bf16)", build)
    tmpdir = tempfile.TemporaryDirectory()
    lora_path = Path(args.save_lora) if args.save_lora else Path(tmpdir.name) / "random_lora.safetensors"
    n_mod, n_bytes = timed("write LoRA file", lambda: write_random_lora(model, lora_path, args.rank, args.seed,
                                                                        torch.bfloat16))
    res.update(modules=n_mod, lora_file_bytes=n_bytes, lora_path=str(lora_path) if args.save_lora else None)
    lmap = timed("map (header + key/shape checks)", lambda: L.map_lora(lora_path, model))
    names = sorted(lmap.terms)
    touched_bytes = sum(dict(model.named_parameters())[n].numel() * 2 for n in names)
    res["touched_gb"] = touched_bytes / 1e9

    timed("merge keep=none (CLI)", lambda: L.merge_loras(model, [(lmap, 1.0)], keep="none"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build()  # untouched weights again (same seed)
    before = timed("checksums before", lambda: checksums(model, names))
    timed("merge keep=cpu (API default)", lambda: L.merge_loras(model, [(lmap, 1.0)], keep="cpu"))
    changed = checksums(model, names)
    res["merge_changed_all"] = all(changed[n] != before[n] for n in names)
    timed("unmerge", lambda: L.unmerge_loras(model))
    after = checksums(model, names)
    res["unmerge_exact"] = after == before
    if device.type == "cuda":
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    tmpdir.cleanup()

    print(f"\n{args.task} expert, bf16, random rank-{args.rank} LoRA ({n_mod} linears, {n_bytes / 1e6:.0f} MB file, "
          f"{res['touched_gb']:.1f} GB of weights touched) on {res['device_name']}")
    print("| step | seconds |\n|---|---:|")
    for label, dt in rows:
        print(f"| {label} | {dt:.2f} |")
    print(f"- every touched weight changed by the merge: {res['merge_changed_all']}")
    print(f"- unmerge exact (bitwise checksums): {res['unmerge_exact']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"- wrote {out}")
    return 0 if res["unmerge_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
