"""The family in both CLIs: --task ti2v-tiny / i2v-tiny (text and image modes), --image checks made
before any model is built (one line, exit 2, no file), a ti2v checkpoint through --ckpt_dir, and a
benchmark of the image mode."""
import json

import imageio
import numpy as np
import pytest
from PIL import Image

from wan_triton.benchmark import main as bench_main
from wan_triton.generate import main

FAST = ["--frame_num", "5", "--sample_steps", "2", "--base_seed", "3", "--quiet", "--no-triton"]


def _frames(path):
    with imageio.get_reader(str(path), format="FFMPEG") as r:
        return sum(1 for _ in r), tuple(r.get_meta_data()["size"]), r.get_meta_data()["fps"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "first.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 160, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_ti2v_text_and_image_modes(tmp_path, image):
    out = tmp_path / "t.mp4"
    assert main(["--task", "ti2v-tiny", "--random-weights", "--save_file", str(out), *FAST]) == 0
    assert _frames(out) == (5, (128, 128), 24)  # 24 fps: the ti2v sample rate
    out = tmp_path / "i.mp4"
    assert main(["--task", "ti2v-tiny", "--random-weights", "--image", str(image), "--save_file", str(out),
                 *FAST]) == 0
    assert _frames(out) == (5, (160, 96), 24)  # the image's aspect ratio within 128*128


def test_i2v_image_mode(tmp_path, image):
    out = tmp_path / "v.mp4"
    assert main(["--task", "i2v-tiny", "--random-weights", "--image", str(image), "--save_file", str(out),
                 *FAST]) == 0
    assert _frames(out) == (5, (160, 96), 16)


def test_ti2v_checkpoint_through_ckpt_dir(tmp_path):
    from wan.pipeline_ti2v import WanTI2V

    WanTI2V.from_config("ti2v-tiny").save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "v.mp4"
    assert main(["--task", "ti2v-tiny", "--ckpt_dir", str(tmp_path / "ckpt"), "--save_file", str(out), *FAST]) == 0
    assert _frames(out)[0] == 5


@pytest.mark.parametrize("args, msg", [
    (["--task", "i2v-tiny", "--random-weights"], "--task i2v-tiny needs --image PATH"),
    (["--task", "tiny", "--image", "IMG"], "--task tiny takes no --image"),
    (["--task", "ti2v-tiny", "--random-weights", "--image", "/nonexistent.png"], "--image: image /nonexistent.png "
                                                                                 "not found"),
    (["--task", "ti2v-tiny", "--random-weights", "--size", "1280*720"], "size 1280*720 is not supported by "
                                                                        "ti2v-tiny"),
    (["--task", "ti2v-5B"], "--task ti2v-5B needs its weights"),
])
def test_bad_requests_one_line_no_file(tmp_path, capsys, image, args, msg):
    out = tmp_path / "v.mp4"
    args = [str(image) if a == "IMG" else a for a in args]
    assert main([*args, "--save_file", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not out.exists()


def test_not_an_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no pixels here")
    assert main(["--task", "ti2v-tiny", "--random-weights", "--image", str(bad)]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err


def test_benchmark_image_mode(tmp_path, image):
    rc = bench_main(["--task", "ti2v-tiny", "--random-weights", "--image", str(image), "--frame_num", "5",
                     "--sample_steps", "2", "--num_runs", "1", "--warmup", "0", "--no-decode", "--quiet",
                     "--out_dir", str(tmp_path), "--name", "b", "--no-triton"])
    assert rc == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["config"]["task"] == "ti2v-tiny"
    assert report["config"]["latent_shape"] == [48, 2, 6, 10]  # the image's 160x96, not --size's 128x128
    assert report["modes"]["reference"]["experts"] == ["model", "model"]
    assert report["comparison"]["latents_rel_err"] == 0.0  # nothing patched: the same computation
