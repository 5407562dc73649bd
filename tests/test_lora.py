"""LoRA files in the published layouts -> exact merge / unmerge; guidance-1 skip; the few-step recipe; CLI errors.

Every file here is written by the test from official module names through a hand-written key
map per layout (independent of wan.lora's own tables), and the expected weights are computed by
hand with the documented formula: W' = cast(float32(W) + strength * alpha/rank * (B @ A)).
"""
import argparse
import copy

import pytest
import torch
from safetensors.torch import save_file

from wan import lora as L
from wan.configs import get_config
from wan.dit import WanModel
from wan.pipeline import WanT2V, cfg_combine
from wan.schedulers import FlowEulerScheduler, make_scheduler

CFG = get_config("tiny")
NL = CFG.dit.num_layers

# hand-written official -> diffusers names (what diffusers' Wan conversion uses)
_ATT = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}


def diffusers_name(m: str) -> str:
    top = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
           "text_embedding.2": "condition_embedder.text_embedder.linear_2",
           "time_embedding.0": "condition_embedder.time_embedder.linear_1",
           "time_embedding.2": "condition_embedder.time_embedder.linear_2",
           "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
           "head.modulation": "scale_shift_table", "patch_embedding": "patch_embedding"}
    if m in top:
        return top[m]
    _, i, *rest = m.split(".")
    rest = ".".join(rest)
    if rest.startswith(("self_attn.", "cross_attn.")):
        which, leaf = rest.split(".")
        return f"blocks.{i}.{'attn1' if which == 'self_attn' else 'attn2'}.{_ATT.get(leaf, leaf)}"
    return f"blocks.{i}." + {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2",
                             "modulation": "scale_shift_table"}[rest]


LINEARS = ["patch_embedding", "text_embedding.0", "time_embedding.2", "time_projection.1", "head.head"] + [
    f"blocks.{i}.{m}" for i in range(NL)
    for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
              "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]


def model(dtype=torch.bfloat16, seed=1):
    return WanModel.from_config(CFG.dit, dtype=dtype, seed=seed, zero_head=False)


def random_lora(m, gen, rank=4, modules=LINEARS, alpha=None):
    """official module -> (up [out, r], down [r, ...in], alpha) in float32."""
    params = dict(m.named_parameters())
    out = {}
    for mod in modules:
        w = params[f"{mod}.weight"]
        up = torch.randn(w.shape[0], rank, generator=gen) * 0.1
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.1
        out[mod] = (up, down, alpha)
    return out


def lowrank_keys(lo, layout):
    """Write the low-rank part of a LoRA in one of the published layouts."""
    sd = {}
    for mod, (up, down, alpha) in lo.items():
        if layout == "peft":
            base, a, b = f"diffusion_model.{mod}", "lora_A.weight", "lora_B.weight"
        elif layout == "peft_bare":
            base, a, b = mod, "lora_A.weight", "lora_B.weight"
        elif layout == "down_up":
            base, a, b = f"diffusion_model.{mod}", "lora_down.weight", "lora_up.weight"
        elif layout == "kohya":
            base, a, b = "lora_unet_" + mod.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif layout == "diffusers":
            base, a, b = f"transformer.{diffusers_name(mod)}", "lora_A.weight", "lora_B.weight"
        else:
            raise ValueError(layout)
        sd[f"{base}.{a}"], sd[f"{base}.{b}"] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    return sd


def hand_merge(m, lo=None, diffs=None, strength=1.0):
    """A copy of m with the deltas applied by hand (float32 math, one cast per parameter)."""
    m2 = copy.deepcopy(m)
    params = dict(m2.named_parameters())
    acc = {}
    for mod, (up, down, alpha) in (lo or {}).items():
        name = f"{mod}.weight"
        w = params[name]
        a = acc.setdefault(name, w.data.float().clone())
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        d = torch.mm(up, down.reshape(down.shape[0], -1))
        d.mul_(strength * scale)
        a.add_(d.reshape(w.shape))
    for name, d in (diffs or {}).items():
        w = params[name]
        acc.setdefault(name, w.data.float().clone()).add_((d * strength).reshape(w.shape))
    with torch.no_grad():
        for name, a in acc.items():
            params[name].data.copy_(a.to(params[name].dtype))
    return m2, set(acc)


def inputs(gen):
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)
    ctx = torch.randn(1, 7, CFG.dit.text_dim, generator=gen)
    return x, torch.tensor([731]), ctx


def assert_same_params(a, b, names=None):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in names or pa:
        assert torch.equal(pa[n], pb[n]), n


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout,alpha", [("peft", None), ("peft_bare", None), ("down_up", 8.0), ("kohya", 2.0),
                                          ("diffusers", None), ("diffusers", 6.0)])
def test_layout_merge_equals_hand_merge_and_unmerge_restores(tmp_path, seed, layout, alpha):
    gen = torch.Generator().manual_seed(seed)
    m = model()
    before = copy.deepcopy(m)
    lo = random_lora(m, gen, rank=4, alpha=alpha)
    f = tmp_path / f"{layout}.safetensors"
    save_file(lowrank_keys(lo, layout), str(f))
    ref, touched = hand_merge(m, lo, strength=0.7)
    n = L.merge_lora(m, f, strength=0.7)
    assert n == len(touched) == len(LINEARS)
    assert_same_params(m, ref)
    x, t, ctx = inputs(gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the pipeline runs an expert
        assert torch.equal(m(x, t, ctx), ref(x, t, ctx))
        assert not torch.equal(m(x, t, ctx), before(x, t, ctx))
    assert L.unmerge_loras(m) == len(LINEARS)
    assert_same_params(m, before)  # bit for bit
    assert L.loaded_loras(m) == []


def test_full_delta_keys(tmp_path, seed):
    """.diff (weights, norms, modulation as a named parameter), .diff_b (biases), .diff_m (block modulation),
    and diffusers-named deltas (norm2 is the official norm3, lora_B.bias is a bias delta)."""
    gen = torch.Generator().manual_seed(seed)
    m = model()
    before = copy.deepcopy(m)
    params = dict(m.named_parameters())
    d = {n: torch.randn(params[n].shape, generator=gen) * 0.05 for n in (
        "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight", "head.head.weight", "blocks.0.ffn.0.bias",
        "blocks.0.modulation", "blocks.1.modulation", "head.modulation", "blocks.1.norm3.weight",
        "blocks.1.cross_attn.k.bias", "time_projection.1.bias")}
    sd = {"diffusion_model.blocks.0.norm3.diff": d["blocks.0.norm3.weight"],
          "diffusion_model.blocks.0.self_attn.norm_q.diff": d["blocks.0.self_attn.norm_q.weight"],
          "diffusion_model.head.head.diff": d["head.head.weight"],
          "diffusion_model.blocks.0.ffn.0.diff_b": d["blocks.0.ffn.0.bias"],
          "diffusion_model.blocks.0.modulation.diff": d["blocks.0.modulation"],
          "diffusion_model.blocks.1.diff_m": d["blocks.1.modulation"].reshape(6, -1),  # squeezed shape is fine
          "diffusion_model.head.modulation.diff": d["head.modulation"],
          "diffusion_model.time_projection.1.diff_b": d["time_projection.1.bias"]}
    f = tmp_path / "diff.safetensors"
    save_file(sd, str(f))
    ref, touched = hand_merge(m, diffs={k: v for k, v in d.items() if k not in (
        "blocks.1.norm3.weight", "blocks.1.cross_attn.k.bias")}, strength=1.3)
    assert L.merge_lora(m, f, strength=1.3) == len(touched) == 8
    assert_same_params(m, ref)
    L.unmerge_loras(m)
    assert_same_params(m, before)

    dd = {"transformer.blocks.1.norm2.diff": d["blocks.1.norm3.weight"],
          "transformer.blocks.1.attn2.to_k.lora_B.bias": d["blocks.1.cross_attn.k.bias"],
          "transformer.blocks.1.scale_shift_table.diff": d["blocks.1.modulation"]}
    f2 = tmp_path / "diffusers_diff.safetensors"
    save_file(dd, str(f2))
    ref2, _ = hand_merge(m, diffs={n: d[n] for n in ("blocks.1.norm3.weight", "blocks.1.cross_attn.k.bias",
                                                     "blocks.1.modulation")})
    assert L.merge_lora(m, f2) == 3
    assert_same_params(m, ref2)


def test_fp32_merge_matches_float64(tmp_path, seed):
    """On an fp32 expert the merged weight is the float64 formula to fp32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    m = model(torch.float32)
    w0 = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    lo = random_lora(m, gen, rank=8, alpha=4.0)
    f = tmp_path / "a.safetensors"
    save_file(lowrank_keys(lo, "down_up"), str(f))
    L.merge_lora(m, f, strength=-0.9)
    params = dict(m.named_parameters())
    for mod, (up, down, alpha) in lo.items():
        n = f"{mod}.weight"
        exp = w0[n] + (-0.9 * alpha / 8) * (up.double() @ down.double().reshape(8, -1)).reshape(w0[n].shape)
        torch.testing.assert_close(params[n].double(), exp, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- pipeline API


def test_stacked_and_per_expert_strengths(tmp_path, seed, caplog):
    caplog.set_level("INFO", logger="wan.lora")
    gen = torch.Generator().manual_seed(seed)
    pipe = WanT2V.from_config("tiny")
    hi0, lo0 = copy.deepcopy(pipe.high_noise_model), copy.deepcopy(pipe.low_noise_model)
    a = random_lora(hi0, gen, rank=3)
    b = random_lora(hi0, gen, rank=5, modules=LINEARS[5:12], alpha=10.0)
    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(lowrank_keys(a, "peft"), str(fa))
    save_file(lowrank_keys(b, "kohya"), str(fb))

    assert pipe.load_lora(fa, 0.7, expert="high") == {"high": len(LINEARS)}
    assert pipe.load_lora(fb, -0.4, expert="both") == {"high": 7, "low": 7}
    exp_hi, _ = hand_merge(hand_merge(hi0, a, strength=0.7)[0], b, strength=-0.4)  # sequential: one cast per LoRA
    exp_lo, _ = hand_merge(lo0, b, strength=-0.4)
    assert_same_params(pipe.high_noise_model, exp_hi)
    assert_same_params(pipe.low_noise_model, exp_lo)
    assert f"a.safetensors -> high-noise expert: {len(LINEARS)} modules changed" in caplog.text
    assert "b.safetensors -> low-noise expert: 7 modules changed" in caplog.text

    assert pipe.unload_loras() == len(LINEARS) + 7
    assert_same_params(pipe.high_noise_model, hi0)
    assert_same_params(pipe.low_noise_model, lo0)

    # one pass over two LoRAs (what the CLI does): summed in float32, cast once
    L.merge_loras(pipe.low_noise_model, [(fa, 0.25), (fb, 1.5)])
    m2 = copy.deepcopy(lo0)
    params = dict(m2.named_parameters())
    for name in {f"{k}.weight" for k in (*a, *b)}:
        acc = params[name].data.float().clone()
        for lo, s in ((a, 0.25), (b, 1.5)):
            mod = name[: -len(".weight")]
            if mod in lo:
                up, down, alpha = lo[mod]
                acc.add_((torch.mm(up, down.reshape(down.shape[0], -1)) * (s * (alpha or down.shape[0])
                                                                          / down.shape[0])).reshape(acc.shape))
        params[name].data.copy_(acc.to(params[name].dtype))
    assert_same_params(pipe.low_noise_model, m2)
    pipe.unload_loras()
    assert_same_params(pipe.low_noise_model, lo0)


def test_keep_none_cannot_unmerge(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    m = model()
    f = tmp_path / "a.safetensors"
    save_file(lowrank_keys(random_lora(m, gen), "peft"), str(f))
    L.merge_lora(m, f, keep="none")
    with pytest.raises(L.LoraError, match="keep='none'"):
        L.unmerge_loras(m)


# ----------------------------------------------------------------------------- guidance 1 and the recipe


def _two_pass(self, model, latent, t, context, context_null, seq_len, scale):
    """The official two-forward CFG, whatever the scale (the reference for the skip)."""
    tt = t.reshape(1).to(self.device)
    cond = model([latent], tt, context, seq_len=seq_len)[0]
    uncond = model([latent], tt, self._null, seq_len=seq_len)[0]
    return cfg_combine(uncond, cond, scale)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_guidance_one_skips_the_unconditional_pass(monkeypatch, seed, solver):
    pipe = WanT2V.from_config("tiny")
    calls = {"dit": 0, "text": 0}
    for m in (pipe.high_noise_model, pipe.low_noise_model):
        m.register_forward_pre_hook(lambda *a: calls.__setitem__("dit", calls["dit"] + 1))
    real_encode = pipe.encode_text

    def counting_encode(prompts):
        calls["text"] += 1
        return real_encode(prompts)

    monkeypatch.setattr(pipe, "encode_text", counting_encode)
    kw = dict(size=(128, 128), frame_num=5, sampling_steps=4, shift=5.0, sample_solver=solver, guide_scale=1.0,
              seed=seed % 1000, progress=False, return_latents=True)
    fast = pipe.generate("a red kite", **kw)
    assert calls == {"dit": 4, "text": 1}  # one forward per step, no negative prompt

    pipe._null = real_encode([CFG.sample_neg_prompt])
    monkeypatch.setattr(WanT2V, "_guided", _two_pass)
    calls.update(dit=0, text=0)
    slow = pipe.generate("a red kite", **kw)
    assert calls["dit"] == 8
    assert (fast - slow).abs().max().item() <= 1e-6


def test_lightning_recipe_schedule_and_experts(seed):
    r = L.RECIPES["lightning-4step"]
    assert (r.steps, r.shift, r.guide_scale, r.solver) == (4, 5.0, 1.0, "euler")
    sch = make_scheduler(r.solver, r.steps, r.shift, "cpu")
    assert isinstance(sch, FlowEulerScheduler)
    torch.testing.assert_close(sch.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    boundary = get_config("t2v-A14B").boundary * 1000
    assert ["high" if t >= boundary else "low" for t in sch.timesteps.tolist()] == ["high", "high", "low", "low"]
    x, v = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed)).unbind(0)
    out = sch.step(v, sch.timesteps[0], x)[0]
    assert torch.equal(out, x + (sch.sigmas[1] - sch.sigmas[0]) * v)

    pipe = WanT2V.from_config("tiny")
    pipe.generate("x", size=(128, 128), frame_num=5, sampling_steps=4, shift=5.0, sample_solver="euler",
                  guide_scale=1.0, seed=1, progress=False, return_latents=True)
    assert pipe.last_timings.experts == ["high", "high", "low", "low"]


def test_recipe_fills_only_unset_flags():
    from wan_triton.request import parse_request
    from wan_triton.lora_flags import apply_recipe

    ns = argparse.Namespace(recipe="lightning-4step", sample_steps=6, sample_shift=None, sample_guide_scale=None,
                            sample_solver=None)
    apply_recipe(ns)
    assert (ns.sample_steps, ns.sample_shift, ns.sample_guide_scale, ns.sample_solver) == (6, 5.0, 1.0, "euler")
    ns = argparse.Namespace(recipe=None, sample_steps=None, sample_shift=None, sample_guide_scale=None,
                            sample_solver=None)
    apply_recipe(ns)
    assert ns.sample_solver is None and ns.sample_steps is None
    # through parse_request (recipe first, then the checks); a tool without --sample_shift still gets it
    req = parse_request(argparse.Namespace(recipe="lightning-4step", sample_solver="unipc", device="cpu"), "tiny")
    assert (req.steps, req.shift, req.guide_scale, req.solver) == (4, 5.0, 1.0, "unipc")
    req = parse_request(argparse.Namespace(device="cpu"), "tiny")
    assert req.solver == "unipc" and req.steps == get_config("tiny").sample_steps and req.loras == ()


@pytest.mark.parametrize("text,path,strength", [
    ("a.safetensors", "a.safetensors", 1.0),
    ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("x:-1.5", "x", -1.5),
    ("x.safetensors:1e-1", "x.safetensors", 0.1),
    ("C:\\loras\\x.safetensors", "C:\\loras\\x.safetensors", 1.0),
    ("C:\\loras\\x.safetensors:0.8", "C:\\loras\\x.safetensors", 0.8),
    ("dir:with:colons/x.safetensors", "dir:with:colons/x.safetensors", 1.0),
])
def test_parse_lora_arg(text, path, strength):
    from wan_triton.lora_flags import parse_lora_arg

    sp = parse_lora_arg(text, "low")
    assert (sp.path, sp.strength, sp.expert) == (path, strength, "low")


# ----------------------------------------------------------------------------- CLI


def _bad_files(tmp, gen):
    m = model()
    good = random_lora(m, gen, rank=2, modules=["blocks.0.self_attn.q"])
    (tmp / "notst.safetensors").write_bytes(b"this is not a safetensors file at all")
    cases = {}
    cases["missing"] = (str(tmp / "nope.safetensors"), "not found")
    cases["not_safetensors"] = (str(tmp / "notst.safetensors"), "not a readable safetensors")
    sd = lowrank_keys(good, "peft")
    sd["diffusion_model.blocks.7.self_attn.q.lora_A.weight"] = torch.randn(2, 64, generator=gen)
    sd["diffusion_model.blocks.7.self_attn.q.lora_B.weight"] = torch.randn(64, 2, generator=gen)
    save_file(sd, str(tmp / "unmapped.safetensors"))
    cases["unmapped"] = (str(tmp / "unmapped.safetensors"), "blocks.7.self_attn.q.lora_A.weight' maps to no module")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 96, generator=gen),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(96, 2, generator=gen)},
              str(tmp / "size.safetensors"))
    cases["shape"] = (str(tmp / "size.safetensors"), "does not fit blocks.0.self_attn.q.weight [64, 64]")
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8, generator=gen),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=gen)},
              str(tmp / "other.safetensors"))
    cases["nothing"] = (str(tmp / "other.safetensors"), "nothing for this model")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 64, generator=gen)},
              str(tmp / "half.safetensors"))
    cases["half"] = (str(tmp / "half.safetensors"), "no matching up/lora_B")
    sd = lowrank_keys(good, "peft")
    sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(64, 1)
    save_file(sd, str(tmp / "dora.safetensors"))
    cases["dora"] = (str(tmp / "dora.safetensors"), "does not merge (dora_scale)")
    return cases


@pytest.mark.parametrize("case", ["missing", "not_safetensors", "unmapped", "shape", "nothing", "half", "dora"])
@pytest.mark.parametrize("flag", ["--lora", "--lora_high"])
def test_bad_lora_one_line_exit_2_before_any_model(tmp_path, capsys, monkeypatch, seed, case, flag):
    from wan_triton.generate import main

    path, msg = _bad_files(tmp_path, torch.Generator().manual_seed(seed))[case]

    def must_not_build(*a, **k):
        raise AssertionError("a model was built before the LoRA was checked")

    monkeypatch.setattr(WanT2V, "from_config", must_not_build)
    out = tmp_path / "out" / "v.mp4"
    rc = main([flag, f"{path}:0.8", "--task", "tiny", "--save_file", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_lora_benchmark_cli(tmp_path, capsys, seed):
    from wan_triton.benchmark import main

    path, msg = _bad_files(tmp_path, torch.Generator().manual_seed(seed))["shape"]
    out = tmp_path / "bench_out"
    rc = main(["--lora_low", path, "--task", "tiny", "--out_dir", str(out), "--device", "cpu", "--quiet", "--num_runs", "1",
               "--warmup", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0]
    assert not out.exists()


def test_cli_lora_and_recipe_end_to_end(tmp_path, caplog, seed):
    from wan_triton.generate import main

    caplog.set_level("INFO")
    gen = torch.Generator().manual_seed(seed)
    f = tmp_path / "lightning_like.safetensors"
    save_file(lowrank_keys(random_lora(model(), gen, rank=2), "down_up"), str(f))
    out = tmp_path / "v.mp4"
    rc = main(["--lora_high", f"{f}:0.5", "--lora_low", str(f), "--task", "tiny", "--recipe", "lightning-4step", "--frame_num", "5",
               "--save_file", str(out), "--quiet", "--device", "cpu", "--no-triton"])
    assert rc == 0 and out.exists()
    log = caplog.text
    assert f"{f.name} -> high-noise expert: {len(LINEARS)} modules changed (strength 0.5" in log
    assert f"{f.name} -> low-noise expert: {len(LINEARS)} modules changed (strength 1" in log
    assert "(4 steps)" in log


def test_lora_for_an_expert_the_schedule_never_reaches_warns(tmp_path, caplog, seed):
    """Issue 22: --lora_low with a schedule whose steps are all high-noise (1 step; 2 steps at shift 12)
    says the LoRA changes nothing; with 4 lightning steps both experts run: no warning."""
    from wan_triton import generate, lora_flags, request

    gen = torch.Generator().manual_seed(seed)
    f = tmp_path / "l.safetensors"
    save_file(lowrank_keys(random_lora(model(), gen, rank=2, modules=LINEARS[:3]), "peft"), str(f))
    caplog.set_level("WARNING")
    for argv, warns in ((["--sample_steps", "1"], True), (["--sample_steps", "2", "--sample_shift", "12"], True),
                        (["--recipe", "lightning-4step"], False)):
        caplog.clear()
        req = request.parse_request(generate.build_parser().parse_args(["--lora_low", str(f), "--device", "cpu"] + argv),
                                "tiny")
        lora_flags.lora_specs(req)
        hit = [r.getMessage() for r in caplog.records if "never runs" in r.getMessage()]
        assert bool(hit) == warns, (argv, hit)
        if warns:
            assert hit[0].startswith(f"--lora_low {f}: the low-noise expert never runs in this schedule")


def test_lora_strength_must_be_finite_in_the_api_too(tmp_path, seed):
    from wan.lora import LoraError, merge_loras

    gen = torch.Generator().manual_seed(seed)
    f = tmp_path / "l.safetensors"
    m = model()
    save_file(lowrank_keys(random_lora(m, gen, rank=2, modules=LINEARS[:3]), "peft"), str(f))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LoraError, match="LoRA strength must be a finite number, got nan"):
        merge_loras(m, [(f, float("nan"))])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
