"""Official-layout checkpoint loading and saving, with errors that name the file and the key.

DiT experts (`high_noise_model/`, `low_noise_model/`): `config.json` plus either
`diffusion_pytorch_model.safetensors` or `diffusion_pytorch_model.safetensors.index.json`
with its shards. T5 and VAE: plain `torch.save`d state dicts (`.pth`).
Models are built on `meta` and loaded with `assign=True`, one tensor at a time, so no
second copy of the weights is ever materialised.

The diffusers layout (`Wan2.2-T2V-A14B-Diffusers`: model_index.json, transformer/, transformer_2/,
text_encoder/, tokenizer/, vae/) is recognised here too; its key tables and loaders are in
wan/diffusers_layout.py (docs/diffusers.md).

`check_checkpoint(ckpt_dir, config)` is the pre-flight `WanT2V.from_pretrained` runs first: it
reads only headers, the index and zip directories, and names every missing or corrupt file in
one error, so a bad file is reported before minutes of loading.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
log = logging.getLogger("wan.checkpoint")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# diffusers layout: folder -> (weights file, index file); transformer = high-noise expert
DIFFUSERS_FOLDERS = {"transformer": (WEIGHTS_NAME, INDEX_NAME), "transformer_2": (WEIGHTS_NAME, INDEX_NAME),
                     "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
                     "vae": (WEIGHTS_NAME, INDEX_NAME)}


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


def dit_weight_files(folder, weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME) -> dict[str, list[str]]:
    """file path -> keys it holds (from the index when sharded)."""
    folder = Path(folder)
    index, single = folder / index_name, folder / weights_name
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
    raise CheckpointError(f"no weights in {folder}: expected {index_name} with shards, or {weights_name}")


def load_weights_into(model, folder, files: dict, device="cpu", dtype=None, progress: bool = False,
                      rename: dict | None = None):
    """Fill a `meta`-built model from the safetensors `files` of `folder` (as `dit_weight_files`
    lists them), with assign=True: every key checked (unexpected, duplicate, index vs file, shape,
    missing), floating tensors cast to `dtype` when given (None keeps them as stored, fp8 included).
    `rename` maps file keys to the model's (another layout's names; wan/diffusers_layout.py); a
    file key it lacks is unexpected, one it maps to None is skipped (a tied copy). Returns the model
    in eval mode without gradients. Shared by `WanModel.from_pretrained`, the fp8 loader and the
    diffusers-layout loader."""
    folder = Path(folder)
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
        _read_shards(files, dev, expected, dtype, loaded, seen, bar, rename)
    finally:
        if bar is not None:
            bar.close()
    check_keys(expected, loaded.keys(), folder)
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _read_shards(files: dict, dev: str, expected: dict, dtype, loaded: dict, seen: set, bar, rename=None) -> None:
    for fname, keys in files.items():
        file_keys = sorted(safetensors_header(fname))  # safe_open's order: sorted
        try:
            with safe_open(fname, framework="pt", device=dev) as f:
                if keys is not None:
                    absent = set(keys) - set(file_keys)
                    if absent:
                        raise CheckpointError(f"{fname}: index lists key(s) not in the file: {_short(absent)}")
                for fk in file_keys:
                    k = fk if rename is None else rename.get(fk, f"{fk} (no mapping)")
                    if k is None:
                        continue
                    if k in seen:
                        raise CheckpointError(f"{fname}: duplicate key {fk}")
                    seen.add(k)
                    if k not in expected:
                        raise CheckpointError(f"{fname}: unexpected key {fk}")
                    t = f.get_tensor(fk)
                    if bar is not None:
                        bar.update(t.numel() * t.element_size())
                    check_shape(fk, t.shape, expected[k], fname)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    loaded[k] = t
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {fname} (corrupt or truncated?): {err}") from None


def save_dit(model, folder, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write config.json + safetensors (sharded with an index when over `max_shard_bytes`)."""
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


# ------------------------------------------------------------------ pre-flight check

# bytes per element of the safetensors dtype names
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# safetensors dtype names -> torch dtypes (those this torch has)
ST_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
    ("U8", "uint8"), ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}
_ST_MAX_HEADER = 100 * 2 ** 20      # safetensors itself refuses headers over 100 MB
_TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # first object pickled by torch.save's legacy format


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return f"missing {path}"
    if not path.is_file():
        return f"{path} is not a file"
    if path.stat().st_size == 0:
        return f"{path} is empty"
    return None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""
    dtype: str                 # the safetensors name: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]
    begin: int                 # its bytes are [begin, end) of the data that follows the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype of `dtype` (None for a name this torch does not have)."""
        return ST_DTYPES.get(self.dtype)


def safetensors_header(path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file (key -> TensorInfo, in the header's order), from its header
    alone: the one reader of safetensors headers in wan. Raises CheckpointError unless the header
    parses and every tensor's byte range [begin, end) lies inside the file and matches its
    dtype x shape. Layout: u64 little-endian header length N, N bytes of JSON, then the data,
    whose ranges must tile [0, file_size - 8 - N) exactly."""
    path = Path(path)
    bad = _file_problem(path)
    if bad:
        raise CheckpointError(bad)
    size = path.stat().st_size
    what = f"{path} is corrupt or truncated"
    if size < 8:
        raise CheckpointError(f"{what}: {size} bytes, shorter than a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise CheckpointError(f"{what}: header length {n} does not fit the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{what}: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what}: its header is not a JSON object")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{what}: bad header entry for {key}") from None
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{what}: tensor {key} needs bytes [{begin}, {end}) of the data, "
                                  f"the file holds {data_len}")
        if dtype in _ST_ITEMSIZE and end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{what}: tensor {key} ({dtype} {list(shape)}) has {end - begin} bytes")
        tensors[key] = TensorInfo(dtype, shape, begin, end)
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            break
        pos = t.end
    if pos != data_len:
        raise CheckpointError(f"{what}: the tensors do not cover its {data_len} data bytes exactly")
    return tensors


def _dit_problems(folder: Path, weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME) -> list[str]:
    """config.json, then the index and every shard it names (each holds its keys), or the single file."""
    if not folder.is_dir():
        return [f"missing model folder {folder}"]
    problems = []
    cfg = folder / CONFIG_NAME
    bad = _file_problem(cfg)
    if bad is None:
        try:
            if not isinstance(json.loads(cfg.read_text()), dict):
                bad = f"{cfg} is not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad = f"{cfg} is not valid JSON"
    problems += [bad] if bad else []
    index, single = folder / index_name, folder / weights_name
    if not index.exists() and not single.exists():
        return problems + [f"no weights in {folder}: expected {index_name} with its shards, or {weights_name}"]
    if not index.exists():
        try:
            safetensors_header(single)
        except CheckpointError as err:
            problems.append(str(err))
        return problems
    bad = _file_problem(index)
    weight_map = None
    if bad is None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            bad = f"{index} is not a valid index (JSON with a 'weight_map' of key -> shard file)"
    if bad:
        return problems + [bad]
    by_shard: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_shard.setdefault(fname, []).append(key)
    for fname, keys in by_shard.items():
        try:
            absent = set(keys) - set(safetensors_header(folder / fname))
        except CheckpointError as err:
            problems.append(f"{err} (listed in {index.name})" if str(err).startswith("missing") else str(err))
            continue
        if absent:
            problems.append(f"{folder / fname} lacks {len(absent)} key(s) that {index.name} puts there: "
                            f"{_short(absent, 3)}")
    return problems


class _NoClasses(pickle.Unpickler):
    def find_class(self, module, name):  # only plain values may be unpickled here
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _pth_problem(path: Path) -> str | None:
    """A torch.save file that torch.load can open: zip (central directory, every member's local
    header inside the file, data.pkl's CRC), legacy pickle (torch's magic number first) or legacy
    tar. Reads directory records and a few small members only, never the tensor data."""
    bad = _file_problem(path)
    if bad:
        return bad
    size = path.stat().st_size
    what = f"{path} is corrupt or truncated"
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(f) as zf:
                    infos = zf.infolist()
                    for info in infos:
                        if info.header_offset + 30 + len(info.filename.encode()) + info.compress_size > size:
                            return f"{what}: member {info.filename} runs past the end of the file"
                        f.seek(info.header_offset)
                        if f.read(4) != b"PK\x03\x04":
                            return f"{what}: member {info.filename} has no valid header"
                    pkl = [i for i in infos if i.filename.endswith("data.pkl")]
                    if not pkl:
                        return f"{path} is a zip file but not a torch checkpoint (no data.pkl)"
                    zf.read(pkl[0])
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
                return f"{what}: {err}"
            return None
        f.seek(0)
        if head[:1] == b"\x80":
            try:
                magic = _NoClasses(f).load()
            except Exception:  # noqa: BLE001 - any failure: not a legacy torch file
                magic = None
            return None if magic == _TORCH_LEGACY_MAGIC else f"{what}: not a torch checkpoint (bad magic number)"
    if tarfile.is_tarfile(path):
        return None
    return f"{what}: not a torch checkpoint (neither a zip nor a pickle file)"


def _tokenizer_problems(folder: Path) -> list[str]:
    """The Hugging Face tokenizer folder: tokenizer_config.json and tokenizer.json or spiece.model,
    non-empty, JSON files parsing."""
    if not folder.is_dir():
        return [f"missing tokenizer folder {folder}"]
    problems = []
    have = [n for n in ("tokenizer.json", "spiece.model") if (folder / n).exists()]
    if not have:
        problems.append(f"missing {folder / 'tokenizer.json'} (or spiece.model)")
    for name in ["tokenizer_config.json"] + have:
        p = folder / name
        bad = _file_problem(p)
        if bad is None and p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad = f"{p} is not valid JSON"
        problems += [bad] if bad else []
    return problems


def is_diffusers_layout(ckpt_dir) -> bool:
    """The folder is in the diffusers layout (model_index.json, or a transformer/ folder)."""
    ckpt = Path(ckpt_dir)
    return (ckpt / "model_index.json").is_file() or (ckpt / "transformer").is_dir()


def checkpoint_problems(ckpt_dir, config) -> list[str]:
    """Every problem with the files a run of `config` needs under `ckpt_dir`, in one list:
    the DiT folders (`config.dit_folders`: both experts, or the one model of ti2v-5B at the top), the T5
    and VAE .pth files, the tokenizer folder (layout: docs/checkpoint.md, docs/models.md);
    in the diffusers layout its five folders (docs/diffusers.md)."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        return [f"checkpoint folder not found: {ckpt}"]
    problems = []
    if is_diffusers_layout(ckpt):
        for sub, (weights, index) in DIFFUSERS_FOLDERS.items():
            problems += _dit_problems(ckpt / sub, weights, index)
        problems += _tokenizer_problems(ckpt / "tokenizer")
        return [" ".join(p.split()) for p in problems]
    for sub in config.dit_folders:
        problems += _dit_problems(ckpt / sub)
    for name in (config.t5_checkpoint, config.vae_checkpoint):
        bad = _pth_problem(ckpt / name)
        problems += [bad] if bad else []
    problems += _tokenizer_problems(ckpt / config.t5_tokenizer)
    return [" ".join(p.split()) for p in problems]  # one line each


def check_checkpoint(ckpt_dir, config) -> None:
    """Pre-flight: raise one CheckpointError naming every missing or corrupt file before any
    weight is loaded (reads headers and directories only: well under a second for A14B)."""
    problems = checkpoint_problems(ckpt_dir, config)
    if len(problems) == 1:
        raise CheckpointError(problems[0])
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {len(problems)} problems: " + "; ".join(problems))
