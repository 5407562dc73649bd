"""The task table's pipelines: which class builds a task and whether it takes an input image.

A task's kind is its DiT's official `model_type` (config.dit.model_type):

    t2v    WanT2V   (wan/pipeline.py)        text only
    i2v    WanI2V   (wan/pipeline_i2v.py)    an image is required (the first frame)
    ti2v   WanTI2V  (wan/pipeline_ti2v.py)   text, or an image as the first frame
"""
from __future__ import annotations

from .configs import TASKS
from .pipeline import WanT2V
from .pipeline_i2v import WanI2V
from .pipeline_ti2v import WanTI2V

__all__ = ["PIPELINES", "IMAGE_INPUT", "pipeline_class", "image_input", "image_tasks"]

PIPELINES = {"t2v": WanT2V, "i2v": WanI2V, "ti2v": WanTI2V}
IMAGE_INPUT = {"t2v": "none", "i2v": "required", "ti2v": "optional"}


def pipeline_class(config) -> type:
    """The pipeline class of a task config."""
    return PIPELINES[config.dit.model_type]


def image_input(config) -> str:
    """'none', 'required' or 'optional': whether the task takes an input image."""
    return IMAGE_INPUT[config.dit.model_type]


def image_tasks(mode: str = "any") -> str:
    """The names of the tasks whose image input is `mode` ('required', 'optional'; 'any': either),
    joined by ', ' (for help texts and messages)."""
    return ", ".join(n for n, c in TASKS.items() if image_input(c) != "none" and mode in ("any", image_input(c)))
