"""bench/kernel_sass.py: the row-quantize kernels compiled for sm_90 on any machine (no GPU), their
fast paths read from the SASS. Pins what the quantize kernel spends: its 5120-wide bf16 rows load
with 8-byte vector loads (a lost alignment hint would make them 2-byte loads) and its codes cost
fewer instructions than section 20's verified quotient."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wan_triton.kernels._utils import triton_available

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (its ptxas and nvdisasm)")


def _sass(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run([sys.executable, "-m", "bench.kernel_sass", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _fast_path(line: str) -> int:
    return int(line.split(": ", 1)[1].split(" instructions")[0])


def test_quant_kernel_spends_fewer_instructions_than_the_verified_quotient():
    r = _sass()
    lines = [line for line in r.stdout.splitlines() if " instructions per thread" in line]
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and len(lines) == 2, r.stderr[-2000:]
    now, verified = lines
    assert now.startswith("quant_fp8: ") and verified.startswith("verified: ")
    assert "LDG.E.64" in now and "LDG.E.U16" not in now and "0 bytes local" in now, now
    assert _fast_path(now) < 0.9 * _fast_path(verified), (now, verified)


def test_unknown_kernel_is_one_line():
    r = _sass("--kernels", "foo")
    assert r.returncode == 2
    assert r.stderr.strip() == "kernel_sass: error: unknown kernel(s) foo; choose from quant_fp8, verified, gelu, tile_copy"


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.kernel_sass"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "kernel_sass: error: compiles real kernels: unset TRITON_INTERPRET"


@pytest.mark.parametrize("args,message", [
    (["--width", "0"], "argument --width: expected a positive integer, got '0'"),
    (["--warps", "3"], "argument --warps: expected a power of two, got '3'"),
    (["--chunk", "100"], "argument --chunk: expected a power of two, got '100'"),
])
def test_bad_values_are_one_line(args, message):
    r = _sass(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"kernel_sass: error: {message}"
