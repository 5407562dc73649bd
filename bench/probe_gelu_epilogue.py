"""GPU probe: would the FFN's GELU pass fold into its first matrix product? (~30 s on an H100)

    python -m bench.probe_gelu_epilogue [--tokens 75600] [--out probe.json]

The exact forward spends ~50 ms per 720p forward (40 blocks) on one element-wise pass, the FFN's
GELU (75,600 x 13,824 bf16 read and written per block: 4.18 GB). cuBLASLt can apply GELU in the
product's epilogue, and torch reaches it as `torch._addmm_activation(bias, x, w.t(), use_gelu=True)`
on CUDA (bf16, 1-D bias, contiguous 2-D output; torch's CUDA fallback applies the tanh GELU too).
Its CPU kernel computes the erf GELU instead, so only a GPU can say. Prints, one line each:

- `linear + gelu`: `F.linear` then `F.gelu(approximate="tanh")` (what the model runs), median ms;
- `addmm_activation`: the fused call, median ms, and the saving;
- its difference from the model's two steps: max |diff| in units of the bf16 ulp of the value, the
  share of elements that differ, and both against float64 GELU of the fp32 product (which one is
  nearer the exact value): the epilogue applies GELU to the fp32 product before rounding to bf16,
  the model to the product rounded to bf16;
- which GELU the epilogue computes: its max |diff| from the tanh and from the erf GELU at 4096
  points, in fp32 (bias 0, an identity weight).

Every step catches its error and prints it in one line, so the probe always finishes. The numbers
go to bench/RESULTS.md before anything in the package uses the fused call.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench.bench_fp8 import _cuda_ms
from bench.kernel_sass import _positive

DIM, FFN = 5120, 13824


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps of b (fp32 result)."""
    b32 = b.float()
    ulp = torch.ldexp(torch.ones_like(b32), torch.frexp(b32).exponent - 8)  # bf16: 8 significant bits
    return (a.float() - b32).abs() / ulp


def which_gelu(dev) -> dict:
    """The epilogue's GELU on 4096 points of [-6, 6] (fp32, identity weight, zero bias)."""
    x = torch.linspace(-6, 6, 4096, device=dev).reshape(64, 64)
    eye = torch.eye(64, device=dev)
    y = torch._addmm_activation(torch.zeros(64, device=dev), x, eye, use_gelu=True)
    return {"vs tanh GELU": (y - F.gelu(x, approximate="tanh")).abs().max().item(),
            "vs erf GELU": (y - F.gelu(x)).abs().max().item()}


def compare(tokens: int, dev) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, DIM, device=dev, generator=g).bfloat16()
    w = (torch.randn(FFN, DIM, device=dev, generator=g) / DIM ** 0.5).bfloat16()
    b = (torch.randn(FFN, device=dev, generator=g) * 0.1).bfloat16()
    two = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    fused = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    out = {"linear + gelu ms": _cuda_ms(two, 10, 3), "addmm_activation ms": _cuda_ms(fused, 10, 3)}
    y2, yf = two(), fused()
    exact = F.gelu(torch.addmm(b.double(), x.double(), w.double().t()), approximate="tanh")
    d = _ulps(yf, y2)
    out.update({"max diff (bf16 ulps)": d.max().item(), "share differing": (yf != y2).float().mean().item(),
                "model two steps: mean |err| vs float64": (y2.double() - exact).abs().mean().item(),
                "fused: mean |err| vs float64": (yf.double() - exact).abs().mean().item()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="probe_gelu_epilogue", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=_positive, default=75600, help="rows of the product (75600: 1280x720x81)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_gelu_epilogue: error: needs a CUDA GPU (the CPU kernel computes another GELU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}
    for name, step in (("which GELU", lambda: which_gelu(dev)), ("at the FFN shape", lambda: compare(args.tokens, dev))):
        try:
            report[name] = step()
        except Exception as e:  # noqa: BLE001 - one line per failed step, the probe goes on
            report[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        print(f"{name}: {report[name]}", flush=True)
    shape = report.get("at the FFN shape")
    if isinstance(shape, dict):
        saved = shape["linear + gelu ms"] - shape["addmm_activation ms"]
        print(f"saving: {saved:.3f} ms per block, {40 * saved:.1f} ms per 40-block forward", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
