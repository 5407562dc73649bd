"""The argument parser both CLIs build on: one-line errors (exit 2), prompts that start with '-',
'(default: X)' on every flag, the exit codes as --help's epilog, and True/False flag values.
Also the step cache's flag group (--cache, docs/caching.md), checked by `check_cache_flags`
(Request.extra["cache"]) before any model is built."""
from __future__ import annotations

import argparse
import sys

from wan.configs import get_config
from wan.mag_ratios import find_ratios, load_ratios, ratios_dir
from wan.step_cache import CRITERIA, CRITERION_DEFAULTS, CacheError

from .cli import EXIT_BAD_INPUT, EXIT_CODES_HELP, EXTRA_GROUPS, CLIError, implied_task, process_rank, request_options
from .flag_words import flag_words

__all__ = ["TEXT_FLAGS", "parse_bool", "HelpFormatter", "OneLineParser", "add_cache_flags", "check_cache_flags"]

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


# ------------------------------------------------------------------ the step cache (wan.step_cache)

def add_cache_flags(p: argparse.ArgumentParser) -> None:
    """--cache {none,easy,mag}, --cache_threshold, --cache_cfg, --cache_ratios."""
    d = CRITERION_DEFAULTS
    g = p.add_argument_group("step cache (lossy, opt-in; docs/caching.md)")
    a = g.add_argument
    a("--cache", default=None, choices=CRITERIA,
      help="reuse the DiT blocks' residual on steps that change little: easy (calibration-free, from the change of "
           "the output), mag (from the model's magnitude ratios, --cache_ratios) (default: none, every step exact)")
    a("--cache_threshold", type=float, default=None,
      help=f"the criterion's threshold: higher skips more (default: easy {d['easy'].threshold:g}, mag "
           f"{d['mag'].threshold:g})")
    a("--cache_cfg", type=int, default=None, metavar="N",
      help="CFG-branch cache, alone or with --cache: the unconditional branch runs every N-th step, in between it is "
           "the conditional one plus their last difference (default: 0, off)")
    a("--cache_ratios", default=None, metavar="PATH",
      help="--cache mag: the magnitude-ratio file or folder (default: <ckpt_dir>/mag_ratios; python -m "
           "wan_triton.calibrate writes them)")


def check_cache_flags(args):
    """The step cache asked for (wan.step_cache.CachePolicy, or None), checked: its values, and for
    --cache mag the ratio file of this schedule (solver, steps, shift), before any model is built.
    Whether they were measured on this model is checked once it is built. CLIError."""
    policy = request_options(args).cache
    if policy is None:
        return None
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - a tool may not have every flag
    config = get_config(g("task") or implied_task(args))
    try:
        policy.check(config.dit.num_layers)
        source = policy.ratios_file or (ratios_dir(g("ckpt_dir")) if g("ckpt_dir") else None)
        if policy.criterion == "mag" and source is not None:  # no source: the plan's rule said it already
            steps = config.sample_steps if g("sample_steps") is None else g("sample_steps")
            shift = config.sample_shift if g("sample_shift") is None else g("sample_shift")
            find_ratios(load_ratios(source), g("sample_solver") or "unipc", steps, shift)
    except CacheError as err:
        raise CLIError(flag_words(str(err))) from None
    return policy


EXTRA_GROUPS["cache"] = check_cache_flags
