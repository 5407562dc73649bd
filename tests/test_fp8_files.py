"""fp8 expert files (wan_triton.fp8_files) and what they make possible: a pre-quantized folder
round-trips bit for bit; `convert_expert` writes, tensor by tensor and shard by shard, the same
folder that quantizing the loaded expert gives, atomically, and `ensure_fp8_expert` re-uses it
only for the same source; block streaming reads the e4m3 blocks from those files, host RAM low
included (bit-identical latents to the resident fp8 experts; the ledger holds one expert's e4m3
blocks, half the bf16 bytes); the text encoder released after encoding comes back with the same
weights. On the CPU the fp8 products run emulated and the activations are quantized by the torch
formula (TRITON_INTERPRET=0: the same bits as the kernels, fast)."""
import json

import pytest
import torch

from wan.checkpoint import CheckpointError
from wan.configs import get_config
from wan.dit import WanModel
from wan.hostmem import ExpertSource, block_bytes_in_files
from wan.pipeline import WanT2V
from wan.streaming import OffloadError, streamer_of
from wan_triton import fp8, fp8_files

E4M3 = torch.float8_e4m3fn
CFG = get_config("tiny")
PROMPT = "a red fox runs through snow"


@pytest.fixture(autouse=True)
def _torch_formulas(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # activations by the torch formula: fast, the kernels' bits
    monkeypatch.setenv("WAN_TRITON_STRICT", "0")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """The tiny pipeline's random weights in the official layout, experts sharded (several files)."""
    folder = tmp_path_factory.mktemp("ckpt")
    WanT2V.from_config("tiny", device="cpu", seed=0).save_pretrained(folder, max_shard_bytes=40_000)
    return folder


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(
        a[k].view(torch.uint8) if a[k].dtype == E4M3 else a[k], b[k].view(torch.uint8) if b[k].dtype == E4M3 else b[k])
        for k in a)


def _gen_args(seed):
    return dict(size="128*128", frame_num=5, sampling_steps=2, shift=3.0, seed=seed % 1000, progress=False,
                return_latents=True, offload_model=False)


def test_save_load_round_trip_bit_identical(seed, tmp_path):
    model = WanModel.from_config(CFG.dit, dtype=torch.bfloat16, seed=0, zero_head=False)
    fp8.quantize_model(model, progress=False)
    fp8_files.save_fp8(model, tmp_path / "q", max_shard_bytes=40_000)  # several shards + index
    assert (tmp_path / "q" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    back = fp8_files.load_fp8(tmp_path / "q")
    assert _same_state(back.state_dict(), model.state_dict())
    assert back.blocks[0].self_attn.q.weight.dtype == E4M3
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.dit.in_dim, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 5, CFG.dit.text_dim, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(back(x, torch.tensor([700.0]), ctx), model(x, torch.tensor([700.0]), ctx))
    plain = WanModel.from_config(CFG.dit, seed=0)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a wan-triton fp8 checkpoint"):
        fp8_files.load_fp8(tmp_path / "plain")
    with pytest.raises(fp8.Fp8Error, match="needs a quantized model"):
        fp8_files.save_fp8(plain, tmp_path / "x")


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_convert_equals_quantize_model_shard_by_shard(tiny_ckpt, tmp_path, monkeypatch, dtype):
    """The converted folder loads as the expert loaded in `dtype` then quantized in memory, bit for
    bit; no shard is larger than asked (or than its one tensor) and every tensor is read once, on
    its own (the host never holds more than a shard and a tensor)."""
    src = tiny_ckpt / CFG.high_noise_checkpoint
    shard_bytes, reads = [], []
    save, read = fp8_files.save_file, fp8_files._read
    sizes = lambda d: [v.numel() * v.element_size() for v in d.values()]  # noqa: E731
    monkeypatch.setattr(fp8_files, "save_file", lambda d, path, **kw: (
        shard_bytes.append((sum(sizes(d)), max(sizes(d)))), save(d, path, **kw))[1])
    monkeypatch.setattr(fp8_files, "_read", lambda f, k: (reads.append(k), read(f, k))[1])
    dst = fp8_files.convert_expert(src, tmp_path / "h", dtype=dtype, max_shard_bytes=30_000, progress=False)
    ref = WanModel.from_pretrained(src, dtype=dtype)
    fp8.quantize_model(ref, progress=False, compute_device="cpu", log_line=False)
    assert _same_state(fp8_files.load_fp8(dst).state_dict(), ref.state_dict())
    assert len(shard_bytes) > 1 and all(n <= max(30_000, top) for n, top in shard_bytes)  # one big tensor alone
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(WanModel.from_pretrained(src).state_dict())
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["format"] == "wan-triton-fp8" and q["source"]["dtype"] == ("float32" if dtype else "as stored")
    assert not list(tmp_path.glob(".*partial*"))


def test_convert_is_atomic_and_reuse_checks_the_source(tiny_ckpt, tmp_path, monkeypatch):
    src = tiny_ckpt / CFG.high_noise_checkpoint
    calls = []

    def failing(w):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("disk full")
        return fp8.quantize_weight(w)

    monkeypatch.setattr(fp8_files, "quantize_weight", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        fp8_files.convert_expert(src, tmp_path / "h", progress=False)
    assert not (tmp_path / "h").exists() and not list(tmp_path.iterdir())  # nothing half-written
    monkeypatch.setattr(fp8_files, "quantize_weight", fp8.quantize_weight)
    dst = fp8_files.ensure_fp8_expert(src, tmp_path / "h", progress=False)
    stamp = (dst / "config.json").stat().st_mtime_ns
    monkeypatch.setattr(fp8_files, "convert_expert", lambda *a, **k: pytest.fail("converted twice"))
    assert fp8_files.ensure_fp8_expert(src, tmp_path / "h") == dst  # re-used
    assert (dst / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="holds fp8 files of other weights"):
        fp8_files.ensure_fp8_expert(src, tmp_path / "h", dtype=torch.float32)  # another cast: other codes
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="exists already"):
        fp8_files.convert_expert(src, dst, progress=False)


def test_stream_fp8_files_host_ram_low_equals_resident(seed, tiny_ckpt, tmp_path):
    """Block streaming from fp8 files with host RAM low: the same latents as the resident fp8
    experts over two videos (each crosses the switch); the ledger never holds more than one
    expert's e4m3 blocks, about half the bf16 blocks' bytes."""
    files = fp8_files.fp8_expert_files(tiny_ckpt, tmp_path / "fp8", CFG, progress=False)
    assert files.kind == "fp8" and files.high == tmp_path / "fp8" / CFG.high_noise_checkpoint
    args = _gen_args(seed)
    ref = WanT2V.from_pretrained(tiny_ckpt, "tiny", device="cpu", expert_files=files)
    assert fp8.is_quantized(ref.high_noise_model) and fp8.is_quantized(ref.low_noise_model)
    a = ref.generate(PROMPT, **args)
    pipe = WanT2V.from_pretrained(tiny_ckpt, "tiny", device="cpu", offload="blocks", host_ram="low", allow_cpu=True,
                                  expert_files=files)
    hi, lo = streamer_of(pipe.high_noise_model), streamer_of(pipe.low_noise_model)
    assert pipe.host_ram_choice.mode == "low" and hi.resident and not lo.resident
    fp8_one = max(hi.blocks_bytes, lo.blocks_bytes)
    bf16_one = block_bytes_in_files(tiny_ckpt / CFG.high_noise_checkpoint)
    for video in range(2):
        assert torch.equal(a, pipe.generate(PROMPT, **args)), f"video {video}"
        assert pipe.host_ledger.peak <= fp8_one
    assert fp8_one < 0.75 * bf16_one, (fp8_one, bf16_one)  # the tiny model's norms and modulation stay bf16
    assert lo.stats.reloads == 2 and hi.stats.reloads == 1
    assert lo.source.folder == str(files.low)


def test_bf16_files_for_an_fp8_expert_are_refused(tiny_ckpt, tmp_path):
    files = fp8_files.fp8_expert_files(tiny_ckpt, tmp_path / "fp8", CFG, progress=False)
    model = fp8_files.load_fp8(files.high)
    with pytest.raises(OffloadError, match="not this expert's weights"):
        ExpertSource(tiny_ckpt / CFG.high_noise_checkpoint, model)
    pipe = WanT2V.from_pretrained(tiny_ckpt, "tiny", device="cpu")
    fp8.quantize_model(pipe.high_noise_model, progress=False, log_line=False)
    fp8.quantize_model(pipe.low_noise_model, progress=False, log_line=False)
    with pytest.raises(OffloadError, match="quantized to fp8 in memory"):
        pipe.enable_block_streaming(host_ram="low", allow_cpu=True)


@pytest.mark.parametrize("from_files", [False, True])
def test_text_encoder_released_after_encoding_comes_back_the_same(seed, tiny_ckpt, from_files):
    """t5_release: after the prompts are encoded the encoder holds no weights; the next video
    reads them again (from the checkpoint, or the seed for random weights): the same latents."""
    args = _gen_args(seed)
    make = ((lambda **kw: WanT2V.from_pretrained(tiny_ckpt, "tiny", device="cpu", **kw)) if from_files
            else (lambda **kw: WanT2V.from_config("tiny", device="cpu", seed=0, **kw)))
    a = make().generate(PROMPT, **args)
    pipe = make(t5_release=True)
    for video in range(2):
        assert torch.equal(a, pipe.generate(PROMPT, **args)), f"video {video}"
        assert pipe.text_encoder.released
        assert all(p.is_meta for p in pipe.text_encoder.model.parameters())


# ------------------------------------------------------------------ the plan and the command line

def _gpu():
    from wan_triton.plan import DeviceInfo

    return DeviceInfo("cuda", "cuda", total_memory_gb=25.3, capability=(8, 9), gpu_name="NVIDIA GeForce RTX 4090",
                      fp8=(True, ""))


def test_plan_host_ram_low_with_fp8_needs_fp8_files():
    from wan_triton import accel
    from wan_triton.errors import PlanError
    from wan_triton.plan import Options, plan

    rtx = accel.PRESETS["rtx4090"]
    with pytest.raises(PlanError, match="must be fp8 expert files .* give fp8_dir=<folder>"):
        plan(Options(host_ram="low", fp8=True, checkpoint=True), rtx, _gpu())
    run = plan(Options(host_ram="low", fp8=True, fp8_files=True, checkpoint=True), rtx, _gpu())
    assert run.offload == "blocks" and run.host_ram == "low" and run.fp8 and run.stream_from_load
    assert not plan(Options(fp8=True, checkpoint=True), rtx, _gpu()).stream_from_load  # quantized in memory first
    assert run.t5_release and not run.t5_cpu  # the 24 GB preset: T5 on the GPU for the encode, then freed
    assert not plan(Options(t5_release=False), rtx, _gpu()).t5_release
    assert plan(Options(t5_release=True), accel.PRESETS["h200"], _gpu()).t5_release


def _cli(monkeypatch, tool, argv):
    """Run a CLI's main() with a 24 GB fp8 GPU's facts (nothing is built: from_pretrained is refused)."""
    from wan.pipeline import WanT2V
    from wan_triton import request
    from wan_triton.plan import DeviceInfo

    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, dev=None, fp8=False, attention=None: _gpu()))
    monkeypatch.setattr(request, "check_device", lambda spec: torch.device("cuda"))
    built = {}

    def no_build(*a, **k):
        built.update(k)
        raise SystemExit(99)

    monkeypatch.setattr(WanT2V, "from_pretrained", no_build)
    monkeypatch.setattr(WanT2V, "from_config", no_build)
    main = __import__(f"wan_triton.{tool}", fromlist=["main"]).main
    try:
        rc = main(argv + ["--quiet"])
    except SystemExit as exit_:
        rc = exit_.code
    return rc, built


@pytest.mark.parametrize("tool,argv,msg", [
    ("generate", ["--fp8_dir", "/f"], "--fp8_dir holds fp8 files written from --ckpt_dir's experts"),
    ("generate", ["--fp8", "--host_ram", "low", "--offload", "blocks", "--ckpt_dir", "/c"],
     "must be fp8 expert files (the checkpoint's are bf16): give --fp8_dir <folder>"),
    ("benchmark", ["--fp8_dir", "/f", "--ckpt_dir", "/c", "--mode", "both"], "--fp8_dir loads fp8 experts"),
])
def test_cli_fp8_dir_refusals_one_line(tmp_path, capsys, monkeypatch, tool, argv, msg):
    out = ["--save_file", str(tmp_path / "x.mp4")] if tool == "generate" else ["--out_dir", str(tmp_path / "o")]
    rc, built = _cli(monkeypatch, tool, argv + ["--task", "tiny"] + out)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not built
    assert len(err) == 1 and msg in err[0], err
    assert not list(tmp_path.iterdir())


def test_cli_fp8_dir_loads_fp8_files_and_streams_from_them(tiny_ckpt, tmp_path, monkeypatch):
    """--fp8_dir implies --fp8, converts the experts once and hands their files to from_pretrained,
    which streams from load (host RAM low allowed); the 24 GB preset releases the T5."""
    rc, built = _cli(monkeypatch, "generate", ["--fp8_dir", str(tmp_path / "fp8"), "--ckpt_dir", str(tiny_ckpt),
                                               "--task", "tiny", "--preset", "rtx4090", "--host_ram", "low",
                                               "--save_file", str(tmp_path / "x.mp4")])
    assert rc == 99, "the build was not reached"
    files = built["expert_files"]
    assert files.kind == "fp8" and fp8_files.load_fp8(files.low).blocks[0].ffn[0].weight.dtype == E4M3
    assert built["offload"] == "blocks" and built["host_ram"] == "low" and not built["t5_cpu"]
    assert (tmp_path / "fp8" / CFG.high_noise_checkpoint / "config.json").is_file()
