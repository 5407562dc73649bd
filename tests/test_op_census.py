"""bench/op_census.py: the hidden-state-sized copies of one patched DiT forward (issue #34 item 3). The
patched forward's list is pinned: a change that adds a token-sized copy or cast outside the kernels
fails here (run `TRITON_INTERPRET=1 python -m bench.op_census` to see it)."""
import pytest

from bench import op_census
from wan_triton import kernels


@pytest.mark.interpreter
def test_the_patched_forward_copies_only_what_is_known():
    copies, blocks = op_census.census(patched=True)
    got = {(c.op, c.caller, c.per_forward, c.in_bytes, c.out_bytes, c.cpu_only) for c in copies}
    assert got == {
        # (no cast of norm3's output for cross_attn.q: the layer_norm kernel writes bf16; unpatched, autocast's
        # cast of the fp32 LayerNorm output is in every block, 22 ms per 720p forward at the H100's copy rate)
        # the cross-attention residual x + o (fp32 + bf16): the CPU casts o in a copy, CUDA in the add
        ("aten::_to_copy", "aten::add", blocks, 2, 4, True),
        # block 0's input is the patch embedding's transposed view: its first two kernels copy it
        ("aten::clone", "wan_kernels::modulate", 1, 2, 2, False),
        ("aten::clone", "wan_kernels::gated_residual", 1, 2, 2, False),
    }, got


def test_patched_census_without_the_interpreter_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "interpret_mode", lambda: False)
    assert op_census.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("op_census: error: the patched forward runs the kernels on the CPU")
