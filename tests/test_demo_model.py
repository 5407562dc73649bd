"""The shipped demo model (wan/demo_model, docs/demo_model.md): its files, and the video that
`wan-generate` makes without --ckpt_dir shows its prompt.

The video is checked the simple way bench/demo_data.observe measures the training clips: the
saturated pixels are the object (the backgrounds are unsaturated). Against the prompt: their dominant
colour is the prompt's, they cover about a shape's area in (nearly) every frame, the frames are
smooth (noise: roughness ~0.33, training clips <= 0.04), the object moves (its direction is not
checked: the toy has not learned the motion words), and its fill of its bounding box is a circle's. The same check on the demo model with random weights fails
(test_random_weights_fail_the_check): the check can fail.
"""
from __future__ import annotations

import json
import math

import imageio
import pytest
import torch

from bench.demo_data import observe
from wan.checkpoint import checkpoint_problems
from wan.configs import DEMO, DEMO_CKPT_DIR
from wan.demo_captions import DEMO_PROMPT, parse_caption
from wan_triton import request
from wan_triton.generate import main

MAX_BYTES = 20 * 10 ** 6  # the budget for the shipped weights, all files together
FILL = {"circle": (0.6, 0.92), "square": (0.8, 1.0), "triangle": (0.35, 0.65)}  # pi/4, 1, 1/2 with edges


def decoded(path) -> torch.Tensor:
    """The MP4's frames, [F, H, W, 3] uint8."""
    with imageio.get_reader(str(path), format="FFMPEG") as r:
        return torch.stack([torch.from_numpy(f.copy()) for f in r])


def look_problems(frames: torch.Tensor, prompt: str) -> list[str]:
    """What is wrong with the frames as a video of `prompt`'s object (empty: nothing): its colour, its
    size, its presence in every frame, noise."""
    colour = parse_caption(prompt)[0]
    seen = observe(frames)
    present = sum(not math.isnan(x) for x, _ in seen.centroids)
    problems = []
    if seen.colour != colour or seen.colour_share < 0.7:
        problems.append(f"dominant colour {seen.colour} ({seen.colour_share:.0%} of the saturated pixels), "
                        f"the prompt says {colour}")
    if not 0.01 <= seen.object_area <= 0.2:
        problems.append(f"the saturated pixels cover {seen.object_area:.1%} of a frame (one shape: 2-12 %)")
    if present < len(seen.centroids) - 2:
        problems.append(f"the object is in {present} of {len(seen.centroids)} frames")
    if seen.roughness > 0.08:
        problems.append(f"roughness {seen.roughness:.3f} (noise ~0.33, the training clips <= 0.04)")
    return problems


def motion_problems(frames: torch.Tensor) -> list[str]:
    """The object's shift from the first frame to the last: it moves (more than 5 % of the side). Its
    direction is not asserted: the shipped toy follows the motion word no better than chance (its card,
    docs/demo_model.md: "direction right" in the export check), so a direction test would pass or fail
    by luck."""
    dx, dy = observe(frames).shift
    return [] if math.hypot(dx, dy) > 0.05 else [f"the object moved ({dx:+.3f}, {dy:+.3f}) of the side: it stands "
                                                   f"still"]


def fill_of(frames: torch.Tensor) -> float:
    """Median over the frames of the saturated pixels' share of their bounding box."""
    x = frames.float() / 255
    mx, mn = x.amax(-1), x.amin(-1)
    sat = ((mx - mn) / mx.clamp_min(1e-6) >= 0.45) & (mx >= 0.3)
    fills = []
    for m in sat:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys):
            fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item())
    return float(torch.tensor(fills).median()) if fills else math.nan


@pytest.fixture(scope="module")
def default_video(tmp_path_factory):
    """The video of `wan-generate --device cpu` (no --ckpt_dir, no --prompt): the shipped demo model.
    --no-triton: a CPU run without TRITON_INTERPRET keeps the reference ops anyway (the plan's rule);
    under the interpreter the kernels would take minutes here (test_wan_triton checks them)."""
    out = tmp_path_factory.mktemp("demo") / "default.mp4"
    assert main(["--device", "cpu", "--quiet", "--no-triton", "--save_file", str(out)]) == 0
    return decoded(out)


def test_the_weights_ship_in_the_official_layout_within_budget():
    assert DEMO_CKPT_DIR.is_dir(), (f"{DEMO_CKPT_DIR} is missing: the demo model's weights ship in the repository "
                                    f"(bench/train_demo.py writes them)")
    assert checkpoint_problems(DEMO_CKPT_DIR, DEMO) == []
    files = {p.relative_to(DEMO_CKPT_DIR).as_posix(): p.stat().st_size for p in DEMO_CKPT_DIR.rglob("*") if p.is_file()}
    for expert in DEMO.dit_folders:  # the DiT experts as the official release has them: safetensors + config
        assert f"{expert}/diffusion_pytorch_model.safetensors" in files and f"{expert}/config.json" in files
        stored = json.loads((DEMO_CKPT_DIR / expert / "config.json").read_text())
        assert (stored["dim"], stored["num_layers"], stored["num_heads"]) == (DEMO.dit.dim, DEMO.dit.num_layers,
                                                                               DEMO.dit.num_heads)
    assert DEMO.vae_checkpoint in files and DEMO.t5_checkpoint in files  # .pth, as the official release
    assert sum(files.values()) <= MAX_BYTES, files


def test_default_video_shows_the_prompts_object(default_video):
    assert default_video.shape == (DEMO.frame_num, 64, 64, 3)
    assert look_problems(default_video, DEMO_PROMPT) == []


def test_default_video_object_moves(default_video):
    assert motion_problems(default_video) == []


def test_default_video_shows_the_prompts_shape(default_video):
    shape = parse_caption(DEMO_PROMPT)[1]
    lo, hi = FILL[shape]
    assert lo <= fill_of(default_video) <= hi, f"fill {fill_of(default_video):.2f} of the bounding box, a {shape}'s"


def test_random_weights_fail_the_check(tmp_path):
    """The demo task with random weights (--random-weights), same prompt and seed: the check fails."""
    out = tmp_path / "random.mp4"
    assert main(["--task", "demo", "--random-weights", "--base_seed", str(DEMO.seed), "--device", "cpu", "--quiet",
                 "--no-triton", "--save_file", str(out)]) == 0
    frames = decoded(out)
    problems = look_problems(frames, DEMO_PROMPT)
    print(problems)
    assert problems


def test_missing_weights_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(request, "DEMO_CKPT_DIR", tmp_path / "gone")
    out = tmp_path / "v.mp4"
    assert main(["--device", "cpu", "--save_file", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo model's weights are not installed" in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


def test_a_prompt_outside_the_grammar_is_warned(caplog):
    args = request.argparse.Namespace(prompt="two cats boxing", device="cpu")
    req = request.parse_request(args, request.implied_task(args))
    assert req.task == "demo" and req.weights == "built-in" and "only knows captions" in caplog.text
    caplog.clear()
    request.parse_request(request.argparse.Namespace(prompt="a blue square moving up on a gray background",
                                                     device="cpu"), "demo")
    assert "only knows captions" not in caplog.text


def test_the_training_captions_and_the_cli_share_one_grammar():
    from bench import demo_data

    assert demo_data.parse_caption is parse_caption
    assert parse_caption(DEMO_PROMPT) == ("red", "circle", "moving right", "black")
    assert request.default_prompt(DEMO) == DEMO_PROMPT


def test_both_tools_default_to_the_shipped_demo_model():
    """wan-generate and wan-benchmark without --ckpt_dir: one rule (request.implied_task, weights_source)."""
    from wan_triton import benchmark, generate

    for parser in (generate.build_parser(), benchmark.build_parser()):
        args = parser.parse_args(["--device", "cpu"])
        req = request.parse_request(args, request.implied_task(args))
        assert (req.task, req.weights, req.ckpt_dir, req.size) == ("demo", "built-in", str(DEMO_CKPT_DIR), "64*64")
        args = parser.parse_args(["--device", "cpu", "--task", "demo", "--random-weights"])
        assert request.parse_request(args, request.implied_task(args)).weights == "random"
