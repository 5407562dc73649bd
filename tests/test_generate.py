"""The generate CLI: the demo writes an MP4; bad input gives one line, exit 2, and no file."""
import subprocess
import sys

import imageio
import pytest

from wan_triton.generate import build_parser, main


def frames_of(path):
    with imageio.get_reader(str(path), format="FFMPEG") as r:
        meta = r.get_meta_data()
        n = sum(1 for _ in r)
    return n, meta


def test_demo_writes_mp4(tmp_path, caplog):
    """No --ckpt_dir: the shipped demo model (tests/test_demo_model.py checks what its video shows)."""
    caplog.set_level("INFO")
    out = tmp_path / "demo.mp4"
    rc = main(["--save_file", str(out), "--frame_num", "9", "--sample_steps", "3", "--quiet", "--no-triton"])
    assert rc == 0
    n, meta = frames_of(out)
    assert n == 9 and tuple(meta["size"]) == (64, 64) and meta["fps"] == 16
    log = caplog.text
    assert "built-in demo model" in log and "not Wan's weights" in log and "denoise" in log and "saved" in log


def test_tiny_is_the_random_smoke_task(tmp_path, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "tiny.mp4"
    rc = main(["--task", "tiny", "--save_file", str(out), "--frame_num", "5", "--sample_steps", "2", "--quiet",
               "--no-triton"])
    assert rc == 0 and frames_of(out)[0] == 5 and tuple(frames_of(out)[1]["size"]) == (128, 128)
    assert "smoke-test task tiny with random weights" in caplog.text and "built-in demo" not in caplog.text


def test_tiny_checkpoint_through_ckpt_dir(tmp_path):
    from wan.pipeline import WanT2V

    WanT2V.from_config("tiny").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "v.mp4"
    rc = main(["--task", "tiny", "--ckpt_dir", str(tmp_path / "ckpt"), "--save_file", str(out),
               "--frame_num", "5", "--sample_steps", "2", "--base_seed", "3", "--quiet"])
    assert rc == 0 and frames_of(out)[0] == 5


def _ckpt_missing_vae(tmp_path):
    from wan.pipeline import WanT2V

    d = tmp_path / "ckpt"
    WanT2V.from_config("tiny").save_pretrained(d)
    (d / "Wan2.1_VAE.pth").unlink()
    return d


@pytest.mark.parametrize("args,msg", [
    (["--size", "100*100"], "multiples of 16"),
    (["--size", "1280*720"], "not supported"),
    (["--frame_num", "8"], "4n+1"),
    (["--frame_num", "4097"], "--frame_num 4097 is past the limit of 4093 frames (1024 latent frames"),
    (["--sample_solver", "heun"], "unknown solver"),
    (["--ckpt_dir", "/nonexistent/ckpt", "--task", "tiny"], "not found"),
    (["--tf32"], "needs a CUDA GPU"),
    (["--compile"], "needs a CUDA GPU"),
    (["--offload_model", "True"], "needs a CUDA GPU"),
    (["--preset", "h200"], "needs a CUDA GPU"),
    (["--task", "t2v-XXL"], "unknown task"),
    (["--save_file", "out.avi"], ".mp4"),
    (["--sample_steps", "0"], "sample_steps"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    if "--save_file" not in args:
        args = args + ["--save_file", str(tmp_path / "x.mp4")]
    rc = main(args + ["--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*"))


def test_help_gives_the_frame_limit():
    assert "4n+1, at most 4093" in " ".join(build_parser().format_help().split())


def test_missing_checkpoint_part(tmp_path, capsys):
    d = _ckpt_missing_vae(tmp_path)
    out = tmp_path / "x.mp4"
    rc = main(["--task", "tiny", "--ckpt_dir", str(d), "--save_file", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Wan2.1_VAE.pth" in err[-1] and not out.exists()


def test_module_entry_point_bad_flag():
    r = subprocess.run([sys.executable, "-m", "wan_triton.generate", "--frame_num", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_flags_reach_the_pipeline(tmp_path, monkeypatch):
    """--use_batched_cfg, --attention, --no-triton, --t5_cpu, solver/steps/shift/guidance/seed arrive in generate()."""
    import torch

    import wan_triton
    from wan import attention as att
    from wan.pipeline import WanT2V

    seen = {}

    def fake_generate(self, prompt, **kw):
        seen.update(kw, pipe=self, prompt=prompt, backend=att.get_backend(), patched=wan_triton.is_patched())
        self.last_seed = kw["seed"]
        self.last_timings = __import__("wan.pipeline", fromlist=["Timings"]).Timings()
        return torch.zeros(3, kw["frame_num"], 128, 128)

    monkeypatch.setattr(WanT2V, "generate", fake_generate)
    out = tmp_path / "f.mp4"
    rc = main(["--use_batched_cfg", "--attention", "math", "--no-triton", "--t5_cpu", "--sample_solver", "dpm++",
               "--sample_steps", "7", "--sample_shift", "3.5", "--sample_guide_scale", "6", "--base_seed", "123",
               "--frame_num", "5", "--prompt", "a boat", "--save_file", str(out), "--quiet", "--device", "cpu"])
    att.set_backend("auto")
    assert rc == 0 and out.exists()
    p = seen["pipe"]
    assert p.use_batched_cfg and p.t5_cpu and seen["backend"] == "math" and not seen["patched"]
    assert (seen["sample_solver"], seen["sampling_steps"], seen["shift"], seen["guide_scale"], seen["seed"]) == \
        ("dpm++", 7, 3.5, 6.0, 123)
    assert seen["prompt"] == "a boat" and seen["progress"] is False
    assert "offload_model" not in seen and p.offload == "none"  # the plan's mode is the pipeline's (CPU: none)


@pytest.mark.parametrize("flags", [["--no-offload"], ["--offload", "none"], ["--offload_model", "False"]])
def test_no_offload_runs_on_a_cpu(tmp_path, monkeypatch, flags):
    """Issue 31 item 6: --no-offload is --offload none (described the same in --help): both run on a
    CPU, where there is nothing to offload."""
    from wan.pipeline import WanT2V

    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    assert main([*flags, "--save_file", str(tmp_path / "v.mp4"), "--quiet", "--device", "cpu", "--frame_num", "5",
                 "--no-triton"]) == 0
    assert (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("how", ["module", "binary"])
def test_no_ffmpeg_fails_before_any_model(tmp_path, capsys, monkeypatch, how):
    """Without imageio-ffmpeg (or its binary) the CLI says so in one line before building anything."""
    import imageio_ffmpeg

    from wan.pipeline import WanT2V

    if how == "module":
        monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import raises ImportError
    else:
        def no_exe():
            raise RuntimeError("No ffmpeg exe could be found.\nInstall ffmpeg on your system.")
        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_exe)

    def must_not_build(*a, **k):
        raise AssertionError("a model was built although the MP4 cannot be written")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    out = tmp_path / "v.mp4"
    rc = main(["--save_file", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "imageio-ffmpeg" in err[0] and "Traceback" not in err[0]
    assert ("is missing" in err[0]) == (how == "module") and ("No ffmpeg exe" in err[0]) == (how == "binary")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where,msg", [("file_parent", "is not a directory"), ("is_dir", "is a directory"),
                                       ("read_only", "no write permission")])
def test_unwritable_output_fails_before_any_model(tmp_path, capsys, monkeypatch, where, msg):
    """An output path that cannot be created is reported in one line before anything is built."""
    import os

    from wan.pipeline import WanT2V

    def must_not_build(*a, **k):
        raise AssertionError("a model was built although the output cannot be written")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    if where == "file_parent":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "sub" / "v.mp4"
    elif where == "is_dir":
        out = tmp_path / "v.mp4"
        out.mkdir()
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        out = ro / "new" / "v.mp4"
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    rc = main(["--save_file", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "ro" / "new").exists()


def test_write_failure_at_the_end_is_one_line(tmp_path, capsys, monkeypatch):
    """A disk error while writing the MP4 (after generation) is one line, and no partial file is left."""
    import imageio

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio, "get_writer", full_disk)
    out = tmp_path / "v.mp4"
    rc = main(["--task", "tiny", "--save_file", str(out), "--quiet", "--device", "cpu", "--frame_num", "5",
               "--sample_steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and err[-1] == f"wan-generate: error: cannot write {out}: No space left on device"  # I/O: 3
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ issue 11: what a new user hits

def _fake_generate(seen):
    import torch

    from wan.timing import Timings

    def fake(self, prompt, **kw):
        seen.update(kw, prompt=prompt)
        self.last_seed, self.last_timings = kw["seed"], Timings()
        return torch.rand(3, kw["frame_num"], 128, 128) * 2 - 1
    return fake


def test_disk_full_on_the_trailer_is_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    """ffmpeg failing while it writes the trailer (disk full) is not reported by imageio's writer:
    the CLI finds the broken file, exits 2 with one line, and leaves nothing behind."""
    import imageio

    from wan.pipeline import WanT2V

    real_get_writer = imageio.get_writer

    class Truncating:
        def __init__(self, path, **kw):
            self.path, self.real = path, real_get_writer(path, **kw)

        def __enter__(self):
            return self

        def append_data(self, f):
            self.real.append_data(f)

        def __exit__(self, *exc):
            self.real.close()
            with open(self.path, "r+b") as f:
                f.truncate(1500)  # the tail (the moov atom) never made it to the disk
            return False

    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    monkeypatch.setattr(imageio, "get_writer", Truncating)
    out = tmp_path / "v.mp4"
    rc = main(["--save_file", str(out), "--quiet", "--device", "cpu", "--frame_num", "5", "--no-triton"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1  # an I/O failure, not bad input
    assert err[0].startswith(f"wan-generate: error: cannot write {out}: the finished MP4 does not decode")
    assert not list(tmp_path.iterdir())


def test_prompt_starting_with_a_dash_reaches_the_pipeline(tmp_path, monkeypatch):
    from wan.pipeline import WanT2V

    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    rc = main(["--prompt", "-v", "--save_file", str(tmp_path / "v.mp4"), "--quiet", "--device", "cpu",
               "--frame_num", "5", "--no-triton"])
    assert rc == 0 and seen["prompt"] == "-v"


def test_empty_prompt_with_a_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["--task", "tiny", "--ckpt_dir", str(tmp_path), "--prompt", "", "--save_file", str(out),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["wan-generate: error: --prompt is empty; give a prompt, or leave --prompt out for "
                               "the task's default prompt"]


def test_default_name_is_safe_and_startup_log_is_readable(tmp_path, monkeypatch, caplog):
    import re

    from wan.pipeline import WanT2V

    caplog.set_level("INFO")
    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    monkeypatch.chdir(tmp_path)
    rc = main(["--task", "tiny", "--prompt", 'a "cat" <b>: c\\d*e\nf/g', "--quiet", "--device", "cpu",
               "--frame_num", "5", "--no-triton"])
    assert rc == 0
    (f,) = tmp_path.iterdir()
    assert re.fullmatch(r"tiny_128x128_1_a_cat_b_c_d_e_f_g_\d{8}_\d{6}\.mp4", f.name), f.name
    msgs = [r.getMessage() for r in caplog.records]
    line = next(m for m in msgs if m.startswith("preset "))
    assert line.startswith("preset none (only the flags): Triton kernels off, torch.compile off, TF32 off, "
                           "batched CFG off, idle expert offloaded to CPU: no, attention auto")
    assert not any("{" in m or "'flags'" in m for m in msgs)


def test_demo_without_prompt_says_it_uses_the_demo_prompt(tmp_path, monkeypatch, caplog):
    from wan.pipeline import WanT2V

    caplog.set_level("INFO")
    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    assert main(["--save_file", str(tmp_path / "v.mp4"), "--quiet", "--device", "cpu", "--no-triton"]) == 0
    assert "the task's default prompt" in caplog.text
    from wan_triton.request import DEMO_PROMPT
    assert seen["prompt"] == DEMO_PROMPT


# ------------------------------------------------------------------ issue 22: what a new user hits, third tour

def test_a14b_random_weights_checks_host_ram_first(tmp_path, capsys, monkeypatch, caplog):
    """--random-weights --task t2v-A14B on a host without the RAM: one line with what it needs and what
    is free, exit 2, before any expert is built; the log named the model and the seed it would use."""
    from wan import hostmem
    from wan.dit import WanModel

    def must_not_build(*a, **k):
        raise AssertionError("an expert was built although the host RAM was short")

    caplog.set_level("INFO")
    monkeypatch.setattr(hostmem, "host_memory", lambda: hostmem.HostMemory(8 * 10 ** 9, "MemAvailable"))
    monkeypatch.setattr(WanModel, "from_config", must_not_build)
    rc = main(["--random-weights", "--device", "cpu", "--save_file", str(tmp_path / "v.mp4"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("wan-generate: error: building t2v-A14B on cpu needs ~69.0 GB of host RAM (two experts "
                             "57.2 GB, text encoder 11.4 GB, VAE 0.5 GB), and 8.0 GB is free (MemAvailable)")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("building t2v-A14B at its real shapes with random weights" in m for m in msgs)
    assert not any("demo" in m for m in msgs)
    line = next(m for m in msgs if m.startswith("generating "))
    seed = int(line.rsplit("seed ", 1)[1].split(";")[0])
    assert 0 <= seed < 2 ** 63 and "solver unipc, shift 12, guidance 3 (low-noise) / 4 (high-noise)" in line
    assert not list(tmp_path.iterdir())


def test_drawn_seed_is_logged_and_used(tmp_path, monkeypatch, caplog):
    from wan.pipeline import WanT2V

    caplog.set_level("INFO")
    seen = {}
    monkeypatch.setattr(WanT2V, "generate", _fake_generate(seen))
    assert main(["--random-weights", "--task", "tiny", "--save_file", str(tmp_path / "v.mp4"), "--quiet",
                 "--device", "cpu", "--frame_num", "5", "--no-triton"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("generating "))
    assert "seed -1" not in line and line.endswith(f"seed {seen['seed']}; the task's default prompt")
    assert seen["seed"] >= 0
    assert "--random-weights: building tiny" in caplog.text and "smoke-test" not in caplog.text


@pytest.mark.parametrize("exe", ["/nonexistent/ffmpeg", "/bin/false"])
def test_broken_ffmpeg_fails_before_any_model(tmp_path, capsys, monkeypatch, exe):
    """IMAGEIO_FFMPEG_EXE pointing at nothing, or at a binary that fails: one line naming ffmpeg, exit 2,
    before any model (imageio takes the variable's binary untested)."""
    from wan.pipeline import WanT2V

    def must_not_build(*a, **k):
        raise AssertionError("a model was built although ffmpeg does not run")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    monkeypatch.setattr(WanT2V, "from_pretrained", must_not_build)  # the default: the shipped demo model
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", exe)
    rc = main(["--save_file", str(tmp_path / "v.mp4"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"wan-generate: error: writing MP4 needs a working ffmpeg binary: {exe} -version ")
    assert ("cannot run" if exe.startswith("/nonexistent") else "exited with code 1") in err[0]
    assert not list(tmp_path.iterdir())


def test_default_prompts_fit_their_text_encoders():
    """tiny's own prompt and the README's tiny snippet fit the tiny model's 32 tokens, the demo's prompt
    the demo model's 64: no truncation warning on a first run."""
    import re
    from pathlib import Path

    from wan.pipeline import WanT2V
    from wan_triton.request import DEMO_PROMPT, TINY_PROMPT

    pipe = WanT2V.from_config("tiny")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r'pipe\.generate\("([^"]+)", size=\(128, 128\)', readme).group(1)
    for text in (TINY_PROMPT, snippet):
        assert pipe.prompt_tokens(text) <= pipe.text_encoder.text_len, text
    demo = WanT2V.from_config("demo")
    assert demo.prompt_tokens(DEMO_PROMPT) <= demo.text_encoder.text_len


def test_vae_decode_shows_progress(tmp_path, capsys):
    rc = main(["--save_file", str(tmp_path / "v.mp4"), "--frame_num", "5", "--sample_steps", "1", "--no-triton",
               "--device", "cpu"])
    assert rc == 0 and "VAE decode" in capsys.readouterr().err


def test_ffmpeg_probe_says_what_went_wrong(tmp_path):
    """The pre-flight ffmpeg check (before any model): a binary that hangs, is missing or fails, each said."""
    import wan.video as video

    exe = tmp_path / "ffmpeg"
    exe.write_text("#!/bin/sh\nsleep 5\n")
    exe.chmod(0o755)
    assert video._ffmpeg_runs(str(exe), timeout=0.5) == "did not answer within 0.5 s"
    assert video._ffmpeg_runs(str(tmp_path / "missing")).startswith("cannot run: ")
    assert video._ffmpeg_runs("/bin/false") == "exited with code 1"
    assert video._ffmpeg_runs("/bin/true") == ""
