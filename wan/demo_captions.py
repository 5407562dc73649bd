"""The caption grammar of the demo model (docs/demo_model.md): the only prompts it was trained on.

    a <colour> <shape> <motion> on a <background> background
    e.g. "a red circle moving right on a black background"

The demo model is a toy trained here on procedural clips of one coloured shape (bench/demo_data.py
renders them); it knows these words and nothing else. Its text encoder has fixed random weights, so
any other prompt still gives a video, of no particular colour, shape or motion.
"""
from __future__ import annotations

__all__ = ["COLOURS", "SHAPES", "MOTIONS", "BACKGROUNDS", "GRAMMAR", "DEMO_PROMPT", "caption", "parse_caption",
           "vocabulary"]

# RGB in [0, 1]: saturated and far apart in hue, so the dominant colour of a frame names the object
COLOURS = {"red": (0.95, 0.12, 0.10), "green": (0.15, 0.85, 0.15), "blue": (0.15, 0.30, 1.00),
           "yellow": (0.95, 0.90, 0.10), "magenta": (0.95, 0.15, 0.90), "cyan": (0.10, 0.90, 0.95)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "rotating")
BACKGROUNDS = ("black", "gray", "striped", "checkered")
GRAMMAR = "a <colour> <shape> <motion> on a <background> background"

# the demo's default prompt (wan-generate without --ckpt_dir and --prompt)
DEMO_PROMPT = "a red circle moving right on a black background"


def caption(colour: str, shape: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} {motion} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str, str]:
    """(colour, shape, motion, background) of a caption in the grammar; ValueError otherwise."""
    words = text.strip().split()
    if len(words) < 7 or words[0] != "a" or words[-1] != "background":
        raise ValueError(f"not a caption of the demo set: {text!r}")
    colour, shape = words[1], words[2]
    motion, _, bg = " ".join(words[3:-1]).rpartition(" on a ")
    if colour not in COLOURS or shape not in SHAPES or motion not in MOTIONS or bg not in BACKGROUNDS:
        raise ValueError(f"not a caption of the demo set: {text!r}")
    return colour, shape, motion, bg


def vocabulary() -> str:
    """The grammar and its words, on one line (for a hint to the user)."""
    return (f"'{GRAMMAR}' with colour {'/'.join(COLOURS)}, shape {'/'.join(SHAPES)}, motion {'/'.join(MOTIONS)}, "
            f"background {'/'.join(BACKGROUNDS)}")
