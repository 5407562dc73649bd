"""fp8 expert files: an expert's block linears in e4m3 on disk, written once and read again by
every run (docs/fp8.md), so that neither quantization nor a whole bf16 expert in host memory is
needed per run; block streaming (wan.streaming) reads the e4m3 blocks straight from them.

    from wan_triton import fp8_files
    files = fp8_files.fp8_expert_files(ckpt_dir, "Wan2.2-fp8", config, dtype=torch.bfloat16)  # converts what is missing
    pipe = WanT2V.from_pretrained(ckpt_dir, config, offload="blocks", host_ram="low", expert_files=files)

    fp8_files.save_fp8(model, folder)          # a model quantized in memory (fp8.quantize_model)
    model = fp8_files.load_fp8(folder, device="cuda")

Layout: the official expert layout (`config.json` + `diffusion_pytorch_model.safetensors`, or
shards + index); for each of the 400 block linears `<name>.weight` (F8_E4M3 [N, K]),
`<name>.weight_scale` (F32 [N, 1]) and `<name>.bias`; every other tensor as in the source model.
`config.json` gains `"quantization": {"format": "wan-triton-fp8", "version": 1, ...}`; a folder
written by `convert_expert` also records its `source` (the source files' names and sizes and the
dtype the weights were cast to before quantizing), and `ensure_fp8_expert` re-uses it only for
that source.

`convert_expert` reads the source one tensor at a time (each file opened for one tensor, so at
most one tensor's pages are mapped) and hands it to `write_fp8_folder`, which quantizes each
block linear's weight on the GPU when there is one (the same bits as on the CPU:
wan_triton.fp8.quantize_weight) and writes shards of at most `max_shard_bytes` as they fill: the
host memory peak is about one shard plus one tensor, never an expert. It writes into a temporary
folder next to the destination and renames it at the end: an interrupted conversion leaves no
folder that looks finished (bench/bench_offload.py writes random A14B experts through it). The
result loads bit-identical to `quantize_model` of the same expert loaded in `dtype` (tested).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from wan import dit
from wan.checkpoint import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError, dit_weight_files,
                            load_weights_into, read_dit_config, safetensors_header, save_dit)
from wan.configs import DiTConfig
from wan.hostmem import ExpertFiles, load_dit_without_blocks

from .fp8 import BLOCK_LINEARS, FP8_DTYPE, Fp8Error, Fp8Linear, GeluQuantFp8, _block_targets, is_quantized, \
    quantize_weight

log = logging.getLogger("wan_triton")

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save_fp8", "load_fp8", "load_fp8_without_blocks", "convert_expert",
           "write_fp8_folder", "fp8_block_keys", "ensure_fp8_expert", "fp8_expert_files"]

FORMAT_NAME = "wan-triton-fp8"
FORMAT_VERSION = 1
CONVERT_SHARD_BYTES = 2 * 2 ** 30  # shards convert_expert writes (its host memory peak is about one)


def _quantization_entry(source: dict | None = None) -> dict:
    entry = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "float8_e4m3fn",
             "weights": "per-output-channel fp32 scale: <name>.weight_scale [N, 1]",
             "activations": "per-token, dynamic", "layers": [f"blocks.*.{p}" for p in BLOCK_LINEARS]}
    if source is not None:
        entry["source"] = source
    return entry


# ------------------------------------------------------------------ a model quantized in memory

def save_fp8(model, folder, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write a quantized expert: the official layout (config.json + safetensors, sharded with an
    index over `max_shard_bytes`) where each fp8 linear has `<name>.weight` (F8_E4M3 [N, K]),
    `<name>.weight_scale` (F32 [N, 1]) and `<name>.bias`; config.json gains a "quantization" entry."""
    if not is_quantized(model):
        raise Fp8Error("save_fp8 needs a quantized model (quantize_model first)")
    folder = Path(folder)
    save_dit(model, folder, max_shard_bytes=max_shard_bytes)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg["quantization"] = _quantization_entry()
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def _fp8_config(folder) -> dict:
    """config.json of an fp8 expert folder (CheckpointError for any other folder)."""
    raw = read_dit_config(folder)
    qc = raw.get("quantization") or {}
    if qc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder} is not a wan-triton fp8 checkpoint (config.json has no "
                              f"quantization.format = {FORMAT_NAME!r}); load it with WanModel.from_pretrained")
    if int(qc.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: fp8 format version {qc.get('version')} is newer than this code's "
                              f"({FORMAT_VERSION})")
    return raw


def _fp8_shells(model) -> None:
    """Meta-built model -> the quantized module structure (empty Fp8Linear on meta)."""
    for blk, parent, attr, _ in list(_block_targets(model)):
        lin = getattr(parent, attr)
        shell = Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        setattr(parent, attr, shell)
        if attr == "2" and isinstance(blk.ffn[1], nn.GELU):
            blk.ffn[1] = GeluQuantFp8(blk.ffn[1])


def _meta_fp8_model(folder) -> dit.WanModel:
    with torch.device("meta"):
        model = dit.WanModel(DiTConfig.from_dict(_fp8_config(folder)))
    _fp8_shells(model)
    return model


def load_fp8(folder, device="cpu", progress: bool = False):
    """A quantized WanModel from an fp8 folder, bit-identical to what was saved."""
    folder = Path(folder)
    model = _meta_fp8_model(folder)
    return load_weights_into(model, folder, dit_weight_files(folder), device, None, progress)


def load_fp8_without_blocks(folder):
    """`load_fp8` on the CPU of everything outside the blocks; the blocks' tensors are placeholders
    (right shape and dtype, no storage) until a block streamer reads them from the files."""
    return load_dit_without_blocks(folder, model=_meta_fp8_model(folder))


# ------------------------------------------------------------------ converting an expert on disk

def _source_fingerprint(src: Path, dtype) -> dict:
    files = dit_weight_files(src)
    return {"files": {Path(f).name: os.path.getsize(f) for f in files},
            "dtype": str(dtype).replace("torch.", "") if dtype is not None else "as stored"}


def _read(fname: str, key: str) -> torch.Tensor:
    """One tensor, copied out of its file (the file is mapped only while it is read)."""
    with safe_open(fname, framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def fp8_block_keys(num_layers: int) -> set:
    """The weights that are stored in e4m3 (with a `_scale` beside each): the 10 linears of each block."""
    return {f"blocks.{i}.{p}.weight" for i in range(num_layers) for p in BLOCK_LINEARS}


def write_fp8_folder(dst, raw_config: dict, items, dtype=None, compute_device=None,
                     max_shard_bytes: int = CONVERT_SHARD_BYTES, source: dict | None = None) -> Path:
    """Write an fp8 expert folder from `items`, an iterable of (key, tensor) over every tensor of an
    expert (consumed one at a time): floating tensors cast to `dtype` (None: as they are), the block
    linears' weights quantized on `compute_device` (default: the GPU when there is one), shards of
    at most `max_shard_bytes` (or one tensor) written as they fill, then the index, the config with
    its quantization entry (and `source`), and one rename of the finished folder."""
    dst = Path(dst)
    if FP8_DTYPE is None:
        raise Fp8Error(f"torch {torch.__version__} has no float8_e4m3fn")
    if dst.exists():
        raise CheckpointError(f"{dst} exists already: remove it, or use ensure_fp8_expert to re-use it")
    if compute_device is None:
        compute_device = "cuda" if torch.cuda.is_available() else "cpu"
    fp8_keys = fp8_block_keys(DiTConfig.from_dict(raw_config).num_layers)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards, cur, size = [], {}, 0

        def flush():
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(cur, str(tmp / name), metadata={"format": "pt"})
            shards.append((name, {k: v.numel() * v.element_size() for k, v in cur.items()}))

        for k, t in items:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if k in fp8_keys:
                q, sc = quantize_weight(t.to(compute_device))
                out = {k: q.cpu(), k + "_scale": sc.cpu()}
            else:
                out = {k: t.detach().to("cpu").contiguous()}
            n = sum(v.numel() * v.element_size() for v in out.values())
            if cur and size + n > max_shard_bytes:
                flush()
                cur, size = {}, 0
            cur.update(out)
            size += n
        if cur or not shards:
            flush()
        del cur
        n = len(shards)
        names = [WEIGHTS_NAME] if n == 1 else [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                                for i in range(1, n + 1)]
        weight_map, total = {}, 0
        for (tmp_name, sizes), name in zip(shards, names):
            os.replace(tmp / tmp_name, tmp / name)
            weight_map.update(dict.fromkeys(sizes, name))
            total += sum(sizes.values())
        if len(shards) > 1:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(raw_config, quantization=_quantization_entry(source)),
                                                  indent=2))
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def convert_expert(src, dst, dtype=None, compute_device=None, max_shard_bytes: int = CONVERT_SHARD_BYTES,
                   progress: bool = True) -> Path:
    """Write the fp8 folder `dst` from the official expert folder `src` (module docstring): every
    floating tensor cast to `dtype` first (None: as stored; the experts' bf16 with
    convert_model_dtype), each block linear's weight quantized per output channel. Returns `dst`."""
    src, dst = Path(src), Path(dst)
    raw = read_dit_config(src)
    if "quantization" in raw:
        raise CheckpointError(f"{src} holds quantized weights already")
    file_of = {k: fname for fname in dit_weight_files(src) for k in safetensors_header(fname)}
    missing = sorted(fp8_block_keys(DiTConfig.from_dict(raw).num_layers) - set(file_of))
    if missing:
        raise CheckpointError(f"{src} has no {missing[0]}: not an expert of this layout")
    bar = tqdm(total=len(file_of), desc=f"fp8 convert {src.name}", unit="tensor", leave=False,
               disable=not progress, dynamic_ncols=True)

    def items():
        for k, fname in file_of.items():
            yield k, _read(fname, k)
            bar.update(1)

    try:
        return write_fp8_folder(dst, raw, items(), dtype, compute_device, max_shard_bytes,
                                source=_source_fingerprint(src, dtype))
    finally:
        bar.close()


def ensure_fp8_expert(src, dst, dtype=None, compute_device=None, progress: bool = True) -> Path:
    """`dst` when it holds the fp8 files of `src` cast to `dtype` (its recorded source matches the
    files' names, sizes and the dtype), else convert `src` into it (CheckpointError when `dst` is
    another folder: nothing is overwritten)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        source = (_fp8_config(dst).get("quantization") or {}).get("source")
        want = _source_fingerprint(src, dtype)
        if source != want:
            raise CheckpointError(f"{dst} holds fp8 files of other weights ({source or 'source not recorded'}; "
                                  f"{src} cast to {want['dtype']} would give other ones): remove it or choose "
                                  "another fp8 folder")
        log.info("fp8 expert files: re-using %s (written from %s)", dst, src)
        return dst
    log.warning("fp8 expert files: writing %s from %s (once; later runs re-use it)", dst, src)
    return convert_expert(src, dst, dtype, compute_device, progress=progress)


def fp8_expert_files(ckpt_dir, fp8_dir, config, dtype=None, compute_device=None,
                     progress: bool = True) -> ExpertFiles:
    """Both experts of `ckpt_dir` as fp8 folders under `fp8_dir` (the official sub-folder names),
    converted where missing (`ensure_fp8_expert`); the ExpertFiles that `WanT2V.from_pretrained`
    and block streaming read them through."""
    ckpt_dir, fp8_dir = Path(ckpt_dir), Path(fp8_dir)
    folders = {}
    for label, sub in (("high", config.high_noise_checkpoint), ("low", config.low_noise_checkpoint)):
        folders[label] = ensure_fp8_expert(ckpt_dir / sub, fp8_dir / sub, dtype, compute_device, progress)

    def load(folder, progress: bool = False):
        return load_fp8(folder, progress=progress)

    return ExpertFiles(folders["high"], folders["low"], load, load_fp8_without_blocks, None, kind="fp8")
