"""Pre-flight check of an official-layout checkpoint (wan.checkpoint.check_checkpoint): every
missing or corrupt file is named in one error before any weight is loaded."""
import json
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from wan.checkpoint import CheckpointError, check_checkpoint, checkpoint_problems, safetensors_header
from wan.configs import get_config

TINY = get_config("tiny")
HIGH, LOW = "high_noise_model", "low_noise_model"
T5, VAE, TOK = TINY.t5_checkpoint, TINY.vae_checkpoint, TINY.t5_tokenizer
SHARD = "diffusion_pytorch_model-{:05d}-of-{:05d}.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny official-layout checkpoint: sharded experts (index + 6 shards), T5/VAE .pth, tokenizer."""
    from wan.pipeline import WanT2V

    d = tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-tiny"
    WanT2V.from_config("tiny").save_pretrained(d, max_shard_bytes=64 * 1024)
    return d


@pytest.fixture
def ckpt(pristine, tmp_path):
    d = tmp_path / pristine.name
    shutil.copytree(pristine, d)
    return d


@pytest.fixture
def rng():
    seed = random.randrange(2 ** 31)
    print(f"seed {seed}")
    return random.Random(seed)


def _shards(ckpt, expert):
    index = json.loads((ckpt / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def _truncate(path, rng):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(size // 4, size - 1))


def _garbage(path, rng):
    path.write_bytes(bytes(rng.randrange(256) for _ in range(path.stat().st_size)))


def _problems(ckpt):
    return checkpoint_problems(ckpt, TINY)


def test_pristine_checkpoint_passes(pristine):
    assert _problems(pristine) == []
    check_checkpoint(pristine, TINY)
    keys = safetensors_header(pristine / HIGH / _shards(pristine, HIGH)[0])
    assert "patch_embedding.weight" in keys


def test_single_file_expert_passes(tmp_path):
    from wan.dit import WanModel

    WanModel.from_config(TINY.dit, seed=3).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    from wan.checkpoint import _dit_problems
    assert _dit_problems(tmp_path / "m") == []
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    (p,) = _dit_problems(tmp_path / "m")
    assert p.startswith(f"{f} is corrupt or truncated: ")


@pytest.mark.parametrize("expert", [HIGH, LOW])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "empty"])
def test_damaged_shard_is_named(ckpt, rng, expert, damage):
    shard = ckpt / expert / rng.choice(_shards(ckpt, expert))
    if damage == "truncate":
        _truncate(shard, rng)
    elif damage == "garbage":
        _garbage(shard, rng)
    elif damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(b"")
    probs = _problems(ckpt)
    assert len(probs) == 1 and str(shard) in probs[0], probs
    expect = {"truncate": "corrupt or truncated", "garbage": "corrupt or truncated", "delete": "missing",
              "empty": "empty"}[damage]
    assert expect in probs[0]


def test_garbled_header_json(ckpt, rng):
    shard = ckpt / HIGH / _shards(ckpt, HIGH)[1]
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    for i in rng.sample(range(8, 8 + n), 5):
        raw[i] = ord("}")
    shard.write_bytes(bytes(raw))
    probs = _problems(ckpt)
    assert len(probs) == 1 and str(shard) in probs[0] and "corrupt" in probs[0]


def test_tensor_range_past_the_end(ckpt):
    """Header edited so that one tensor's byte range ends past the file: found from the header."""
    shard = ckpt / LOW / _shards(ckpt, LOW)[0]
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10 ** 6
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    probs = _problems(ckpt)
    assert len(probs) == 1 and key in probs[0] and str(shard) in probs[0]


def test_index_inconsistent_with_shards(ckpt):
    index_path = ckpt / HIGH / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = _shards(ckpt, HIGH)
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[-1]                        # that shard does not hold it
    index["weight_map"]["blocks.0.ghost"] = "diffusion_pytorch_model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    probs = _problems(ckpt)
    assert len(probs) == 2
    assert any(shards[-1] in p and key in p for p in probs)
    assert any("00099-of-00099" in p and "missing" in p for p in probs)


@pytest.mark.parametrize("damage", ["delete", "garbage", "bad json"])
def test_damaged_index_or_config(ckpt, rng, damage):
    index = ckpt / LOW / "diffusion_pytorch_model.safetensors.index.json"
    cfg = ckpt / LOW / "config.json"
    if damage == "delete":
        index.unlink()
        assert _problems(ckpt) == [f"no weights in {ckpt / LOW}: expected {index.name} with its shards, or "
                                   "diffusion_pytorch_model.safetensors"]
    elif damage == "garbage":
        _garbage(index, rng)
        (p,) = _problems(ckpt)
        assert str(index) in p and "not a valid index" in p
    else:
        cfg.write_text('{"dim": 64,')
        assert _problems(ckpt) == [f"{cfg} is not valid JSON"]


@pytest.mark.parametrize("name", [T5, VAE])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "empty", "garble middle"])
def test_damaged_pth_is_named(ckpt, rng, name, damage):
    path = ckpt / name
    if damage == "truncate":
        _truncate(path, rng)
    elif damage == "garbage":
        _garbage(path, rng)
    elif damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # overwrite data.pkl's bytes: caught by its CRC (tensor bytes themselves are not hashed)
        with zipfile.ZipFile(path) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        with open(path, "r+b") as f:
            f.seek(info.header_offset + 30 + len(info.filename) + info.compress_size // 2)
            f.write(b"\x00\xff" * 4)
    probs = _problems(ckpt)
    assert len(probs) == 1 and str(path) in probs[0], probs


def test_legacy_pickle_pth_passes_and_bad_magic_fails(tmp_path):
    from wan.checkpoint import _pth_problem

    p = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(3)}, p, _use_new_zipfile_serialization=False)
    assert _pth_problem(p) is None
    torch.load(p, weights_only=True)  # and torch agrees it is readable
    import pickle
    p.write_bytes(pickle.dumps(12345, protocol=2) + b"rest")
    assert "bad magic" in _pth_problem(p)


@pytest.mark.parametrize("damage", ["delete folder", "delete tokenizer.json", "bad json"])
def test_damaged_tokenizer(ckpt, damage):
    tok = ckpt / TOK
    if damage == "delete folder":
        shutil.rmtree(tok)
        assert _problems(ckpt) == [f"missing tokenizer folder {tok}"]
    elif damage == "delete tokenizer.json":
        (tok / "tokenizer.json").unlink()
        assert _problems(ckpt) == [f"missing {tok / 'tokenizer.json'} (or spiece.model)"]
    else:
        (tok / "tokenizer_config.json").write_text("{")
        assert _problems(ckpt) == [f"{tok / 'tokenizer_config.json'} is not valid JSON"]


def test_several_missing_files_named_together(ckpt, rng):
    (ckpt / VAE).unlink()
    (ckpt / T5).unlink()
    shutil.rmtree(ckpt / LOW)
    shard = ckpt / HIGH / _shards(ckpt, HIGH)[-1]
    _truncate(shard, rng)
    with pytest.raises(CheckpointError) as exc:
        check_checkpoint(ckpt, TINY)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {ckpt}: 4 problems: ")
    for part in (str(ckpt / VAE), str(ckpt / T5), f"missing model folder {ckpt / LOW}", str(shard)):
        assert part in msg


def _forbid_loading(monkeypatch):
    import wan.checkpoint as wc
    from wan.dit import WanModel
    from wan.t5 import T5TextEncoder
    from wan.vae import WanVAE

    def boom(*a, **k):
        raise AssertionError("a weight file was loaded before the pre-flight check finished")

    for owner, name in ((wc, "load_pth"), (T5TextEncoder, "from_pretrained"),
                        (WanVAE, "from_pretrained"), (WanModel, "from_pretrained")):
        monkeypatch.setattr(owner, name, boom)


def test_garbage_high_noise_shard_found_before_any_load(ckpt, rng, monkeypatch):
    from wan.pipeline import WanT2V

    shard = ckpt / HIGH / _shards(ckpt, HIGH)[2]
    _garbage(shard, rng)
    _forbid_loading(monkeypatch)
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt or truncated"):
        WanT2V.from_pretrained(ckpt, "tiny", device="cpu")


def test_pristine_checkpoint_loads(pristine):
    from wan.pipeline import WanT2V

    pipe = WanT2V.from_pretrained(pristine, "tiny", device="cpu")
    assert pipe.high_noise_model is not None


def test_cli_names_every_problem_in_one_line(ckpt, rng, tmp_path, capsys, monkeypatch):
    from wan_triton.generate import main

    _garbage(ckpt / HIGH / _shards(ckpt, HIGH)[0], rng)
    (ckpt / VAE).unlink()
    _forbid_loading(monkeypatch)
    out = tmp_path / "x.mp4"
    rc = main(["--task", "tiny", "--ckpt_dir", str(ckpt), "--save_file", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("wan-generate: error: checkpoint ") and "2 problems" in err[0]
    assert str(ckpt / VAE) in err[0] and _shards(ckpt, HIGH)[0] in err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_module_entry_point(ckpt, tmp_path):
    import subprocess
    import sys

    (ckpt / T5).write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "wan_triton.generate", "--task", "tiny", "--ckpt_dir", str(ckpt),
                        "--save_file", str(tmp_path / "x.mp4"), "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # our one line; a dependency may add its own warnings to stderr (e.g. a deprecation at import)
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("wan-generate")]
    assert len(ours) == 1 and ours[0].startswith("wan-generate: error: ") and str(ckpt / T5) in ours[0], r.stderr


def test_safetensors_header_describes_every_tensor(tmp_path):
    """The one header reader: every tensor's dtype, shape and byte range, without reading the data."""
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(5), "c": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    header = safetensors_header(tmp_path / "t.safetensors")
    assert sorted(header) == ["a", "b", "c"]
    for k, t in tensors.items():
        info = header[k]
        assert (info.shape, info.torch_dtype, info.nbytes) == (tuple(t.shape), t.dtype, t.numel() * t.element_size())
    assert header["a"].dtype == "BF16" and header["b"].dtype == "F32"
