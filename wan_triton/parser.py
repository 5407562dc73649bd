"""The argument parser both CLIs build on: one-line errors (exit 2), prompts that start with '-',
'(default: X)' on every flag, the exit codes as --help's epilog, and True/False flag values."""
from __future__ import annotations

import argparse
import sys

from .exits import EXIT_BAD_INPUT, EXIT_CODES_HELP, process_rank

__all__ = ["TEXT_FLAGS", "parse_bool", "HelpFormatter", "OneLineParser"]

# flags whose value may itself start with '-' (a prompt): `--prompt -v` is read as `--prompt=-v`
TEXT_FLAGS = ("--prompt", "--n_prompt")


def parse_bool(v: str) -> bool:
    """argparse type for True/False flags (the official CLI's `--offload_model True`)."""
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {v!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to every flag whose help does not already say its default."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" in h or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings
                or action.nargs == 0):  # switches: their help says what happens without them
            return h
        return f"{h} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line on stderr (exit code 2) and accepts
    prompts that start with '-' (`--prompt -v`)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("epilog", EXIT_CODES_HELP)
        super().__init__(*a, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        out, i = [], 0
        while i < len(args):
            tok = args[i]
            nxt = args[i + 1] if i + 1 < len(args) else None
            if tok in TEXT_FLAGS and nxt is not None and nxt.startswith("-") and nxt not in self._option_string_actions:
                out.append(f"{tok}={nxt}")
                i += 2
                continue
            out.append(tok)
            i += 1
        return super().parse_known_args(out, namespace)

    def error(self, message):
        if process_rank() == 0:  # under torchrun every rank parses the same command line: rank 0 says it
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
