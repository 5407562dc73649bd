"""How both CLIs end: the exit codes, one line on stderr for each error a run can end in
(`run_main`), and the log's setup. Bad input is 2, found before any model is built; an output
that could not be written 3; out of (GPU or host) memory 1; Ctrl-C 130."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import torch

from wan.checkpoint import CheckpointError
from wan.parallel import ParallelError
from wan.requests import InputError
from wan.streaming import OffloadError
from wan.video import OutputWriteError

from .accel import oom_hint
from .errors import AccelError
from .flag_words import in_flags
from .patch import PatchError

__all__ = ["CLIError", "CLIOutputError", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_IO", "EXIT_INTERRUPTED",
           "EXIT_CODES_HELP", "GPU_OOM_HINT", "HOST_OOM_HINT", "gpu_oom_hint", "is_host_oom", "run_main",
           "process_rank", "setup_logging"]


class CLIError(Exception):
    """Bad command line or request, said in flag words: reported as one line with exit code 2."""


class CLIOutputError(CLIError):
    """An output file could not be written (disk full, ...): exit code 3 (EXIT_IO)."""


# Exit codes of both CLIs (README, "Exit codes"; --help's epilog)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = """exit codes:
  0    done
  1    the run failed: out of GPU or host memory (under torchrun, torchrun itself exits 1 whenever a worker fails)
  2    bad input or something unavailable (a flag, size, checkpoint file, a GPU for a GPU-only flag, ffmpeg),
       found before any model is built; nothing is written
  3    an output could not be written (disk full, ...); nothing is left half-written
  130  interrupted (Ctrl-C)"""

GPU_OOM_HINT = "try --preset auto, --offload blocks or --t5_cpu"  # when the GPU cannot be asked
HOST_OOM_HINT = ("the models are built in CPU memory first (an A14B expert takes 28.6 GB in bf16); "
                 "close other programs or use a machine with more RAM")


def gpu_oom_hint() -> str:
    """The preset (and flags) that fit this GPU, else block streaming (accel.oom_hint)."""

    try:
        return oom_hint()
    except Exception:  # noqa: BLE001 - a hint must never hide the error it explains
        return GPU_OOM_HINT


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_host_oom(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, MemoryError) or "DefaultCPUAllocator" in text or "can't allocate memory" in text


def run_main(prog: str, fn: Callable[[], object]) -> int:
    """Run `fn()` and map how it ends to an exit code (EXIT_*), errors as one line on stderr:
    bad input 2, an output that could not be written 3, out of (GPU or host) memory 1, Ctrl-C 130,
    success 0. Errors that name arguments (wan.naming) are said with the flags (flag_words).
    Under torchrun only rank 0 reports bad input (every rank makes the same checks and exits
    with the same code); a failure of one rank's own is reported by that rank."""

    rank = process_rank()

    def fail(msg: str, code: int) -> int:
        if rank == 0 or code != EXIT_BAD_INPUT:
            print(f"{prog}: error{f' (rank {rank})' if rank else ''}: {msg}", file=sys.stderr)
        return code

    try:
        fn()
    except (CLIOutputError, OutputWriteError) as err:
        return fail(str(err), EXIT_IO)
    except (CLIError, InputError, CheckpointError, AccelError, PatchError, ParallelError, OffloadError) as err:
        return fail(in_flags(err), EXIT_BAD_INPUT)
    except getattr(torch.distributed, "DistError", ()) as err:  # torchrun: a peer failed or a collective timed out
        return fail(f"distributed run failed: {_first_line(err)[:300]}", EXIT_FAILED)
    except torch.cuda.OutOfMemoryError:
        return fail(f"out of GPU memory; {gpu_oom_hint()}", EXIT_FAILED)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as err:
        if is_host_oom(err):
            return fail(f"out of host memory (RAM): {_first_line(err)}; {HOST_OOM_HINT}", EXIT_FAILED)
        if "out of memory" in str(err).lower():
            return fail(f"out of GPU memory: {_first_line(err)}; {gpu_oom_hint()}", EXIT_FAILED)
        raise
    return EXIT_OK


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""

    return int(os.environ.get("RANK", 0) or 0)


def setup_logging() -> None:
    """INFO on stderr; under torchrun only rank 0 logs INFO and warnings (every rank would say the
    same: a prompt cut to text_len, a lossy option); the others log errors only."""
    logging.basicConfig(level=logging.INFO if process_rank() == 0 else logging.ERROR,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
