"""The machine code of the row-quantize kernels for an H100 / H200 (sm_90), compiled on any machine
(no GPU: Triton's bundled LLVM, ptxas and nvdisasm): instructions per thread on the fast path (from
the entry to the first EXIT, which a program takes when no element needed the IEEE division), per
element, registers, global loads and stores. A kernel that streams bytes at the copy rate has a
budget of instructions per element; this says what a change to the kernel spends, before a GPU is
lent to time it.

    python -m bench.kernel_sass                                  # today's quant_fp8 vs section 20's, 5120-wide bf16 rows
    python -m bench.kernel_sass --warps 4 --dtype fp32

Kernels: `quant_fp8` (wan_triton/kernels/quant_fp8.py), `verified` (section 20's verified quotient,
bench/bench_fp8_kernels.py's `_verified_kernel`), `gelu` (wan_triton/kernels/gelu_quant_fp8.py),
`tile_copy` (bench/bench_fp8_kernels.py's probe: the tiles loaded and stored, nothing between). `barriers` counts BAR instructions on the fast path (a row reduced across warps
goes through shared memory and a barrier; within one warp, through shuffles alone); `local` is
the bytes of local memory per thread (spilled registers: 0 is what a streaming kernel wants).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wan_triton.kernels.gelu_quant_fp8 import _gelu_quant_fp8_kernel
from wan_triton.kernels.quant_fp8 import _quant_fp8_kernel, row_tiles

from bench.bench_fp8_kernels import _tile_copy_kernel, _verified_kernel

KERNELS = {"quant_fp8": _quant_fp8_kernel, "verified": _verified_kernel, "gelu": _gelu_quant_fp8_kernel,
           "tile_copy": _tile_copy_kernel}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Sass:
    """What one compiled kernel spends: fast-path instructions per thread, elements per thread."""
    kernel: str
    tiles: str
    fast_path: int
    elements: int
    registers: int
    loads: str
    stores: str
    barriers: int
    local: int

    def line(self) -> str:
        return (f"{self.kernel}: {self.fast_path} instructions per thread on the fast path, "
                f"{self.fast_path / self.elements:.1f} per element ({self.elements} per thread), {self.registers} "
                f"registers, {self.local} bytes local, {self.barriers} barriers, loads {self.loads}, stores "
                f"{self.stores} | {self.tiles}")


def compile_sm90(name: str, width: int, dtype: str, rows: int | None, warps: int | None, chunk: int | None) -> Sass:
    """Compile kernel `name` for sm_90 with row_tiles(width)'s tiling (overridden by rows / warps /
    chunk) and read its SASS."""
    import triton
    import triton.compiler
    from triton.backends.compiler import GPUTarget

    kernel = KERNELS[name]
    tiles = row_tiles(width, rows=rows, warps=warps, chunk=chunk)
    sig = {"X": DTYPES[dtype], "Q": "*fp8e4nv", "S": "*fp32", "n_rows": "i32", "stride_x": "i32", "n_cols": "i32",
           "amax_floor": "fp32", "ROWS": "constexpr", "CHUNK": "constexpr", "CHUNKS": "constexpr",
           "EVEN": "constexpr", "LOOPED": "constexpr"}
    consts = dict(ROWS=tiles.rows, CHUNK=tiles.chunk, CHUNKS=tiles.chunks, EVEN=tiles.even, LOOPED=tiles.looped)
    # what a launch specializes on: 16-byte aligned pointers, a row stride and width divisible by 16
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("X", "Q", "S", "stride_x", "n_cols")
             if a != "n_cols" or width % 16 == 0}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tiles.warps})
    sass = _disassemble(compiled.asm["cubin"])
    exit_at = next((i for i, line in enumerate(sass) if re.search(r"\bEXIT\b", line)), len(sass))
    fast = sass[:exit_at + 1]
    threads = tiles.warps * 32
    return Sass(kernel=name, tiles=f"{tiles}, {dtype}", fast_path=len(fast),
                elements=tiles.rows * tiles.chunk * tiles.chunks // threads,
                registers=_usage(compiled, "REG"), loads=_count(fast, "LDG"), stores=_count(fast, "STG"),
                barriers=sum(1 for line in fast if re.search(r"\bBAR\.", line)), local=_usage(compiled, "LOCAL"))


def _bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _disassemble(cubin: bytes) -> list[str]:
    """The instruction lines of the cubin's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([_bin("nvdisasm"), "-c", path], check=True, capture_output=True, text=True).stdout
    return [line for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line)]


def _usage(compiled, what: str) -> int:
    """cuobjdump's resource usage: REG (registers per thread), LOCAL (local-memory bytes per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        text = subprocess.run([_bin("cuobjdump"), "-res-usage", path], check=True, capture_output=True,
                              text=True).stdout
    return int(re.search(rf"\b{what}:(\d+)", text).group(1))


def _count(lines: list[str], op: str) -> str:
    """'5 x LDG.E.64' style counts of the instructions starting with op."""
    found: dict[str, int] = {}
    for line in lines:
        m = re.search(rf"\b({op}[.A-Z0-9]*)", line)
        if m:
            found[m.group(1)] = found.get(m.group(1), 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in sorted(found.items())) or "none"


def _positive(text: str) -> int:
    """A positive integer (argparse type)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _pow2(text: str) -> int:
    """A power of two (argparse type: Triton's block shapes and warp counts)."""
    n = _positive(text)
    if n & (n - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two, got {text!r}")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kernel_sass", description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="quant_fp8,verified", help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--width", type=_positive, default=5120, help="row width (5120: attention outputs; 13824: ffn.0)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--rows", type=_pow2, default=None, help="rows per program (default: row_tiles' choice)")
    ap.add_argument("--warps", type=_pow2, default=None, help="warps per program (default: row_tiles' choice)")
    ap.add_argument("--chunk", type=_pow2, default=None, help="tile width (default: row_tiles' choice)")
    args = ap.parse_args(argv)
    names = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in names if k not in KERNELS]
    if unknown or not names:
        print(f"kernel_sass: error: unknown kernel(s) {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_sass: error: compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    for name in names:
        try:
            sass = compile_sm90(name, args.width, args.dtype, args.rows, args.warps, args.chunk)
        except Exception as err:  # a tiling Triton refuses (too many registers, shapes): one line, no traceback
            first = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
            print(f"kernel_sass: error: {name} did not compile ({type(err).__name__}: {first})", file=sys.stderr)
            return 1
        print(sass.line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
