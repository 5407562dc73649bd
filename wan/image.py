"""Input images of the image-conditioned tasks: reading, the official sizing rules, pixels in [-1, 1].

Two official rules decide the video size from the image and the requested area (the `size`
string's width x height; docs/models.md):

* ti2v-5B (`ti2v_size`, `ti2v_frame`): `best_output_size` picks the size with sides multiples of
  32 (VAE stride 16 x patch 2) and area at most the requested one whose aspect ratio is closest to
  the image's (width-first vs height-first rounding); the image is scaled (Lanczos) to cover it and
  centre-cropped.
* i2v-A14B (`i2v_latent_size`, `i2v_frame`): latent sides = sqrt(area * h/w) and sqrt(area * w/h)
  rounded down to the VAE stride (8), then to the patch (2); the image is resized (bicubic, no
  crop) to exactly 8x those.

Pixels: uint8 RGB -> x / 255 -> (x - 0.5) / 0.5, float32, channels first (torchvision's to_tensor
then the official normalisation).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .requests import InputError

__all__ = ["load_image", "to_pixels", "best_output_size", "ti2v_size", "ti2v_frame", "i2v_latent_size",
           "i2v_frame"]


def load_image(path) -> Image.Image:
    """The image file as RGB; InputError (one line) when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} not found")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"image {path} cannot be read as an image: {err}") from None


def to_pixels(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    return x.sub(0.5).div(0.5)


def best_output_size(w: int, h: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """(ow, oh): multiples of (dw, dh), ow * oh <= area, aspect ratio closest to w / h among the
    width-first and the height-first rounding (ties: height-first), as the official rule."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    return (ow1, oh1) if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else (ow2, oh2)


def ti2v_size(img: Image.Image, area: int, align: int) -> tuple[int, int]:
    """The ti2v-5B video size (width, height) for `img` within `area` pixels, sides multiples of `align`."""
    return best_output_size(img.width, img.height, align, align, area)


def ti2v_frame(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """The ti2v-5B first frame: `img` scaled (Lanczos) to cover width x height, centre-cropped;
    float32 [3, 1, height, width] in [-1, 1]."""
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    x1, y1 = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((x1, y1, x1 + width, y1 + height))
    return to_pixels(img).unsqueeze(1)


def i2v_latent_size(img: Image.Image, area: int, stride: int, patch: int) -> tuple[int, int]:
    """The i2v-A14B latent (width, height): sqrt(area * aspect) rounded down to `stride`, then to `patch`."""
    aspect = img.height / img.width
    lat_h = int(math.sqrt(area * aspect) // stride // patch * patch)
    lat_w = int(math.sqrt(area / aspect) // stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise InputError(f"image {img.width}x{img.height} is too narrow for an area of {area} pixels")
    return lat_w, lat_h


def i2v_frame(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """The i2v-A14B first frame: `img` in [-1, 1] resized (bicubic, float32, on the CPU) to exactly
    width x height; float32 [3, 1, height, width] (not clamped: bicubic may overshoot, as officially)."""
    x = to_pixels(img)[None]
    return F.interpolate(x, size=(height, width), mode="bicubic").transpose(0, 1)
