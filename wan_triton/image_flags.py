"""The input-image flag of wan-generate and wan-benchmark (docs/models.md).

    --image PATH     the first frame: required by i2v-A14B, optional for ti2v-5B (its image
                     mode), refused by the text-only tasks

Importing this module registers the group with wan_triton.cli: `Request.extra["image"]` holds the
image (RGB, read and decoded before any model is built) or None. `image_kwargs(req)` is what
the pipeline's generate() takes for it.
"""
from __future__ import annotations

from wan.configs import PRESETS
from wan.image import load_image
from wan.requests import InputError
from wan.tasks import IMAGE_INPUT, image_input

from .cli import EXTRA_GROUPS, CLIError, implied_task

__all__ = ["add_image_flags", "parse_image_flag", "image_kwargs"]


def _tasks(mode: str) -> str:
    return ", ".join(n for n, c in PRESETS.items() if IMAGE_INPUT[c.dit.model_type] != "none" and
                     (mode == "any" or IMAGE_INPUT[c.dit.model_type] == mode))


def add_image_flags(parser) -> None:
    parser.add_argument("--image", default=None, metavar="PATH",
                        help=f"input image, the video's first frame (required by {_tasks('required')}; optional "
                             f"for {_tasks('optional')}: its image mode); the video takes the image's aspect "
                             "ratio within the area of --size (default: none)")


def parse_image_flag(args):
    """--image against the task: the image (PIL, RGB) or None; CLIError when the task needs one and
    none is given, when the task takes none, or when the file is not a readable image."""
    path = getattr(args, "image", None)
    cfg = PRESETS.get(getattr(args, "task", None) or implied_task(args))
    if cfg is None:
        return None  # an unknown task: parse_request says so
    mode = image_input(cfg)
    if path is None:
        if mode == "required":
            raise CLIError(f"--task {cfg.name} needs --image PATH (the video's first frame)")
        return None
    if mode == "none":
        raise CLIError(f"--task {cfg.name} takes no --image (image tasks: {_tasks('any')})")
    try:
        return load_image(path)
    except InputError as err:
        raise CLIError(f"--image: {err}") from None


EXTRA_GROUPS["image"] = parse_image_flag


def image_kwargs(req) -> dict:
    """{'image': the image} for a task that takes one, else {} (WanT2V.generate has no image)."""
    return {} if image_input(req.config) == "none" else {"image": req.extra.get("image")}
