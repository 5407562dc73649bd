"""Official-layout checkpoint loading and saving, with errors that name the file and the key.

DiT experts (`high_noise_model/`, `low_noise_model/`): `config.json` plus either
`diffusion_pytorch_model.safetensors` or `diffusion_pytorch_model.safetensors.index.json`
with its shards. T5 and VAE: plain `torch.save`d state dicts (`.pth`).
Models are built on `meta` and loaded with `assign=True`, one tensor at a time, so no
second copy of the weights is ever materialised.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
log = logging.getLogger("wan.checkpoint")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def _short(keys, n=5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(expected: dict, got_keys, source) -> None:
    """Raise CheckpointError on missing/unexpected keys. `expected`: name -> shape."""
    got = set(got_keys)
    missing, unexpected = set(expected) - got, got - set(expected)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} missing key(s): {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s): {_short(unexpected)}")


def check_shape(key: str, shape, expected_shape, source) -> None:
    if tuple(shape) != tuple(expected_shape):
        raise CheckpointError(f"{source}: shape mismatch for {key}: checkpoint {tuple(shape)}, "
                              f"model {tuple(expected_shape)}")


def load_pth(path, device="cpu") -> dict:
    """A plain torch.save'd state dict (T5, VAE), memory-mapped where possible."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    sd, err = None, None
    # zip format: memory-mapped; legacy pickle format: cannot be mmapped, read it whole.
    for kw in (dict(weights_only=True, mmap=True), dict(weights_only=True)):
        try:
            sd = torch.load(path, map_location=device, **kw)
            break
        except Exception as e:  # noqa: BLE001 - any unpickling failure is reported below
            err = e
    if sd is None and "legacy .tar format" in str(err):
        # The official loader notes Wan's first-party .pth files may be in torch's legacy .tar
        # format, which weights_only=True refuses; that format needs full unpickling.
        log.warning("%s is in torch's legacy .tar format; loading it with weights_only=False", path)
        try:
            sd = torch.load(path, map_location=device, weights_only=False)
        except Exception as e:  # noqa: BLE001
            err = e
    if sd is None:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {type(err).__name__}: {err}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors")
    return sd


def load_state_dict_into(module: torch.nn.Module, sd: dict, source, dtype=None, device=None) -> None:
    """Strict, assign-style load of `sd` into a (meta-built) module with clear errors.

    Floating tensors are cast to `dtype` when given; everything goes to `device` when given.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_keys(expected, sd.keys(), source)
    out = {}
    for k, v in sd.items():
        check_shape(k, v.shape, expected[k], source)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if device is not None:
            v = v.to(device)
        out[k] = v
    module.load_state_dict(out, strict=True, assign=True)


# ------------------------------------------------------------------ DiT (safetensors)

def read_dit_config(folder) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing model folder: {folder}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"missing {cfg_path}")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse {cfg_path}: {err}") from None


def dit_weight_files(folder) -> dict[str, list[str]]:
    """file path -> keys it holds (from the index when sharded)."""
    folder = Path(folder)
    index, single = folder / INDEX_NAME, folder / WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot parse {index}: {err}") from None
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(str(folder / fname), []).append(key)
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"missing shard {f} (listed in {index.name})")
        return files
    if single.is_file():
        return {str(single): None}
    raise CheckpointError(f"no weights in {folder}: expected {INDEX_NAME} with shards, or {WEIGHTS_NAME}")


def load_dit(folder, dtype=None, device="cpu", progress: bool = False):
    """`WanModel` from an official expert folder. dtype None keeps the stored dtype.
    `progress` shows a byte-counting bar over the shards (an A14B expert is tens of GB)."""
    from .configs import DiTConfig
    from .dit import WanModel

    folder = Path(folder)
    cfg = DiTConfig.from_dict(read_dit_config(folder))
    files = dit_weight_files(folder)
    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    loaded: dict = {}
    seen: set = set()
    dev = str(device) if device is not None else "cpu"
    total = sum(Path(f).stat().st_size for f in files)
    log.info("loading %s: %d file(s), %.1f GB", folder, len(files), total / 1e9)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"load {folder.name}", unit="B", unit_scale=True, leave=False,
                   dynamic_ncols=True)
    try:
        _read_shards(files, dev, expected, dtype, loaded, seen, bar)
    finally:
        if bar is not None:
            bar.close()
    check_keys(expected, loaded.keys(), folder)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _read_shards(files: dict, dev: str, expected: dict, dtype, loaded: dict, seen: set, bar) -> None:
    from safetensors import SafetensorError, safe_open

    for fname, keys in files.items():
        try:
            with safe_open(fname, framework="pt", device=dev) as f:
                file_keys = list(f.keys())
                if keys is not None:
                    absent = set(keys) - set(file_keys)
                    if absent:
                        raise CheckpointError(f"{fname}: index lists key(s) not in the file: {_short(absent)}")
                for k in file_keys:
                    if k in seen:
                        raise CheckpointError(f"{fname}: duplicate key {k}")
                    seen.add(k)
                    if k not in expected:
                        raise CheckpointError(f"{fname}: unexpected key {k}")
                    t = f.get_tensor(k)
                    if bar is not None:
                        bar.update(t.numel() * t.element_size())
                    check_shape(k, t.shape, expected[k], fname)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    loaded[k] = t
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {fname} (corrupt or truncated?): {err}") from None


def save_dit(model, folder, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write config.json + safetensors (sharded with an index when over `max_shard_bytes`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", **model.config.to_dict()}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
