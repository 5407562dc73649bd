"""The hidden-state-sized copies of one patched DiT forward, found on the CPU: every copy or cast of
a tensor with one row per token (tokens x dim) outside the matmuls, attention and this project's
kernels, with the op that made it, and what the same copy would cost at 720p on an H100 (issue #34
item 3: "remove what is not compute"; bench/profile_dit.py measures the GPU time itself).

    TRITON_INTERPRET=1 python -m bench.op_census              # the tiny task, patched, bf16 autocast
    TRITON_INTERPRET=1 python -m bench.op_census --reference  # the same forward unpatched

A copy is an `aten::_to_copy` (a dtype cast), `aten::clone` or `aten::cat` whose input has the
token count in its shape; `aten::copy_` inside a matmul (the CPU's own packing) is not counted.
The cost at 720p: bytes read + written at 75,600 tokens x 5120 at the copy's dtypes, / 4.18 TB/s,
times 40 blocks where the copy happens in every block (the census builds the tiny DiT with 3 blocks:
a count divisible by 3 is read as one copy per block). CPU-only: a mixed-dtype add casts its
bf16 input in a copy on the CPU, where CUDA casts inside the add's own kernel (counted, flagged).
"""
from __future__ import annotations

import argparse
import collections
import sys
from dataclasses import dataclass, field, replace

import torch

TOKENS_720P, DIM_A14B, LAYERS_A14B = 21 * 45 * 80, 5120, 40
PEAK_BYTES_PER_S = 4.18e12
COPIES = ("aten::_to_copy", "aten::clone", "aten::cat")
CPU_ONLY = {"aten::add"}  # callers whose copy is the CPU's mixed-dtype path (CUDA casts in the kernel)
_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8}


@dataclass(frozen=True)
class Copy:
    op: str          # the copying op (aten::_to_copy, aten::clone, aten::cat)
    caller: str      # the top-level op it ran under (aten::linear: autocast's cast of a Linear's input)
    per_forward: int
    in_bytes: int    # bytes per element read
    out_bytes: int   # bytes per element written
    cpu_only: bool

    def in_every_block(self, blocks: int) -> bool:
        return self.per_forward % blocks == 0

    def ms_at_720p(self, blocks: int) -> float:
        """Floor time at 720p (ms per forward): a copy made in every block, 40 times; else as often as here."""
        n = self.per_forward // blocks * LAYERS_A14B if self.in_every_block(blocks) else self.per_forward
        return n * TOKENS_720P * DIM_A14B * (self.in_bytes + self.out_bytes) / PEAK_BYTES_PER_S * 1e3


@dataclass
class _Event:
    """One CPU op of the profile, with the ops it ran under (built from the profiler's kineto events:
    their dtypes are there on every torch this project supports; FunctionEvent.input_dtypes is not)."""
    name: str
    start: int
    end: int
    shapes: list
    dtypes: list
    parent: "_Event | None" = None
    children: list = field(default_factory=list)

    @property
    def top(self) -> "_Event":
        e = self
        while e.parent is not None:
            e = e.parent
        return e


def _events(prof) -> list[_Event]:
    """The profile's CPU ops per thread, each linked to the op whose interval encloses it."""
    by_thread = collections.defaultdict(list)
    for k in prof.profiler.kineto_results.events():
        if k.device_type() == torch.autograd.DeviceType.CPU:
            by_thread[k.start_thread_id()].append(
                _Event(k.name(), k.start_ns(), k.end_ns(), list(k.shapes()), list(k.dtypes())))
    out = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.start, -e.end))
        open_ = []
        for e in evs:
            while open_ and open_[-1].end < e.end:
                open_.pop()
            if open_:
                e.parent = open_[-1]
                open_[-1].children.append(e)
            open_.append(e)
        out += evs
    return out


def census(patched: bool = True, frames: int = 3, side: int = 8) -> tuple[list[Copy], int]:
    """(the token-sized copies of one forward of the tiny task's DiT, its block count)."""
    from torch.profiler import ProfilerActivity, profile

    import wan_triton
    from wan.configs import get_config
    from wan.dit import WanModel

    cfg = replace(get_config("tiny").dit, num_layers=3)  # 3 blocks: a count divisible by 3 is one per block
    model = WanModel.from_config(cfg, dtype=torch.bfloat16, seed=0, zero_head=False).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_dim, frames, side, side, generator=g)
    t, ctx = torch.tensor([700.0]), [torch.randn(7, cfg.text_dim, generator=g)]
    tokens = frames * (side // cfg.patch_size[1]) * (side // cfg.patch_size[2])
    if patched:
        wan_triton.patch(strict=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            model(x, t, ctx)  # warm: first-call work is not the forward's
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model(x, t, ctx)
    finally:
        if patched:
            wan_triton.unpatch()
    found = collections.Counter()
    for e in _events(prof):
        shape = e.shapes[0] if e.shapes else []
        if e.name not in COPIES or tokens not in shape:
            continue
        src = _BYTES.get((e.dtypes or ["float"])[0], 4)
        copy = next((c for c in e.children if c.name == "aten::copy_"), None)  # copy_(dst, src)
        dst = _BYTES.get(copy.dtypes[0], 4) if copy is not None and copy.dtypes else src
        found[(e.name, e.top.name, src, dst)] += 1
    copies = [Copy(op, caller, n, src, dst, caller in CPU_ONLY) for (op, caller, src, dst), n in sorted(found.items())]
    return copies, cfg.num_layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="op_census", description=__doc__.splitlines()[0])
    ap.add_argument("--reference", action="store_true", help="the unpatched forward (default: patched)")
    args = ap.parse_args(argv)
    from wan_triton import kernels

    if not args.reference and not kernels.interpret_mode():
        print("op_census: error: the patched forward runs the kernels on the CPU: set TRITON_INTERPRET=1 "
              "(or pass --reference)", file=sys.stderr)
        return 2
    copies, blocks = census(patched=not args.reference)
    print(f"{'patched' if not args.reference else 'reference'} forward of the tiny task ({blocks} blocks): "
          f"token-sized copies outside matmuls, attention and the kernels")
    print("| copy | under | per forward | every block | bytes/elem in -> out | ms per forward at 720p "
          "(A14B, H100 floor) | note |")
    print("|---|---|---|---|---|---|---|")
    for c in copies:
        note = "CPU only (CUDA casts inside the add)" if c.cpu_only else ""
        print(f"| {c.op} | {c.caller} | {c.per_forward} | {'yes' if c.in_every_block(blocks) else 'no'} | "
              f"{c.in_bytes} -> {c.out_bytes} | {c.ms_at_720p(blocks):.2f} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
