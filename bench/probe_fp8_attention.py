"""Quick GPU probe: can this machine run the fp8 attention backend, and FA4? (~30 s)

    PYTHONPATH=/tmp/site:$PYTHONPATH python -m bench.probe_fp8_attention [--seq 75600] [--out probe.json]

Prints, one line each: torch / CUDA / cuDNN versions, the cudnn frontend and the cuDNN backend it
loaded, the flash-attention probes (fa4, fa3, fa2: imports or why not), the fp8 backend's
availability verdict; then builds and runs a small cuDNN fp8 SDPA graph for each output type
(bf16, fp16, fp8) with and without padded keys (rel err vs float64), and finally the 720p shape
(B=1, --seq tokens, 40 heads, 128) with the first output type that built: time, TFLOP/s, rel err
on 1024 query rows, for P scales 64 / 256 / 448 and with / without the k mean.
Each attempt catches its error and prints it in one line, so the whole probe always finishes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch


def _line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:300] if s else ''}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=75600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rep = {}

    def say(key, val):
        rep[key] = val
        print(f"{key}: {val}", flush=True)

    say("torch", f"{torch.__version__} (CUDA {torch.version.cuda}), cuDNN via torch {torch.backends.cudnn.version()}")
    if not torch.cuda.is_available():
        say("verdict", "no CUDA device")
        return 2
    say("device", f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}")
    try:
        from wan_triton.fp8_attention import _cudnn

        cudnn = _cudnn()
        say("cudnn frontend", f"{getattr(cudnn, '__version__', '?')} at {cudnn.__file__}")
        say("cudnn backend", str(cudnn.backend_version()))
    except Exception as e:  # noqa: BLE001
        say("cudnn frontend", f"import failed: {_line(e)}")

    from wan import attention as att
    from wan_triton import fp8_attention as f8

    for b in ("fa4", "fa3", "fa2"):
        ok, why = att.probe_flash(b)
        say(f"probe {b}", "imports" if ok else why)
    f8.register()
    say("fp8 availability", att.unavailable_reason("fp8", "cuda") or "available")
    say("available backends", ", ".join(att.available_backends("cuda")))

    gen = torch.Generator(device="cuda").manual_seed(0)

    def inputs(B, L, H=2, D=128):
        q = torch.randn(B, L, H, D, device="cuda", generator=gen).bfloat16()
        k = (torch.randn(B, L, H, D, device="cuda", generator=gen)
             + torch.randn(1, 1, H, D, device="cuda", generator=gen)).bfloat16()
        v = torch.randn(B, L, H, D, device="cuda", generator=gen).bfloat16()
        return q, k, v

    from bench.bench_attention import _ref_rows, _rel

    built = []
    for ot in f8.OUT_TYPES:
        for padded in (False, True):
            key = f"small {ot}{' padded' if padded else ''}"
            try:
                q, k, v = inputs(2, 512)
                kl = torch.tensor([512, 300], device="cuda") if padded else None
                s = f8.Settings(out_types=(ot,))
                o = f8.attention_fp8(q, k, v, kl, settings_=s)
                ref = _ref_rows(q, k, v, torch.arange(512, device="cuda"), kl)
                say(key, f"ok, rel err {_rel(o, ref):.2e}")
                if not padded:
                    built.append(ot)
            except Exception as e:  # noqa: BLE001
                say(key, f"FAILED {_line(e)}")

    if built:
        ot = built[0]
        try:
            L, H, D = args.seq, 40, 128
            q, k, v = inputs(1, L, H, D)
            rows = torch.randperm(L, device="cuda", generator=gen)[:1024].sort().values
            ref = _ref_rows(q, k, v, rows)
            for ps in (64.0, 256.0, 448.0):
                for mean in (True, False):
                    s = f8.Settings(subtract_k_mean=mean, p_scale=ps, out_types=(ot,))
                    f8.attention_fp8(q, k, v, None, settings_=s)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        o = f8.attention_fp8(q, k, v, None, settings_=s)
                    torch.cuda.synchronize()
                    t = (time.perf_counter() - t0) / 3
                    tflops = 4 * L * L * H * D / t / 1e12
                    say(f"720p {ot} p_scale={ps:g} k_mean={mean}",
                        f"{t * 1e3:.1f} ms, {tflops:.0f} TFLOP/s, rel err {_rel(o[:, rows], ref):.2e}")
        except Exception as e:  # noqa: BLE001
            say("720p", f"FAILED {_line(e)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
