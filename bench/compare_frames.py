"""Compare two runs saved by `wan-benchmark --save_frames` (different processes, GPUs or flags):
latents relative error and the PSNR of the decoded uint8 frames.

    python -m bench.compare_frames bench/out/a.frames.pt bench/out/b.frames.pt [--mode optimized] [--out cmp.json]

`--mode` picks the mode in each file (default: optimized, else the only one saved); `--mode_b` for
the second file when it differs. Both runs must have the same size, frames and seed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from wan_triton.metrics import rel_err
from wan_triton.metrics import psnr_uint8


def _pick(saved: dict, mode: str | None, path: str) -> dict:
    modes = saved["modes"]
    if mode is None:
        mode = "optimized" if "optimized" in modes else next(iter(modes))
    if mode not in modes:
        raise SystemExit(f"{path}: no mode {mode!r} saved (saved: {', '.join(modes)})")
    return modes[mode]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--mode", default=None)
    ap.add_argument("--mode_b", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sa, sb = (torch.load(p, map_location="cpu", weights_only=False) for p in (args.a, args.b))
    for key in ("size", "frame_num", "sample_steps", "base_seed"):
        if sa["config"].get(key) != sb["config"].get(key):
            raise SystemExit(f"the runs differ in {key}: {sa['config'].get(key)} vs {sb['config'].get(key)}")
    a, b = _pick(sa, args.mode, args.a), _pick(sb, args.mode_b or args.mode, args.b)
    out = dict(a=args.a, b=args.b, latents_rel_err=rel_err(b["latents"], a["latents"]),
               latents_max_abs_err=(b["latents"] - a["latents"]).abs().max().item(), psnr_db=None)
    if a["frames"] is not None and b["frames"] is not None:
        p = psnr_uint8(b["frames"], a["frames"])
        out["psnr_db"] = "inf" if math.isinf(p) else p
    print(f"latents rel err {out['latents_rel_err']:.3e} (max abs {out['latents_max_abs_err']:.3e}), "
          f"frames PSNR {out['psnr_db'] if out['psnr_db'] is not None else 'n/a (no frames)'}"
          + (" dB" if isinstance(out["psnr_db"], float) else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
