"""Every ```python block of README.md runs as written (CPU, tiny task, each in a fresh process
in an empty folder). A block that needs what CI lacks says so on the line before its fence:

    <!-- needs: checkpoint, gpu -->
    ```python

(`checkpoint`: the official release; `gpu`: a CUDA GPU). Such blocks are skipped, every other
block must exit 0, and at least one block must run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NEEDS = {"checkpoint", "gpu"}  # what a block may declare it needs
_MARK = re.compile(r"^<!--\s*needs:\s*([a-z, ]+?)\s*-->$")


def python_blocks(text: str) -> list[dict]:
    """[{line, code, needs}] for each ```python fence; `needs` from a marker on the line before it."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            m = _MARK.match(lines[i - 1].strip()) if i else None
            needs = {w.strip() for w in m.group(1).split(",")} if m else set()
            out.append(dict(line=start, code="\n".join(lines[start:j]) + "\n", needs=needs))
            i = j
        i += 1
    return out


BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_marker_convention():
    blocks = python_blocks("a\n<!-- needs: checkpoint, gpu -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n")
    assert [(b["code"], b["needs"]) for b in blocks] == [("x = 1\n", {"checkpoint", "gpu"}), ("y = 2\n", set())]
    assert all(b["needs"] <= NEEDS for b in BLOCKS), [b["needs"] for b in BLOCKS]  # no unknown (mistyped) need
    runnable = [b for b in BLOCKS if not b["needs"]]
    assert len(runnable) >= 1 and len(BLOCKS) > len(runnable)


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b["needs"]], ids=lambda b: f"README.md:{b['line']}")
def test_readme_block_runs(block, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("TRITON_INTERPRET", "WAN_TRITON_STRICT"):  # set by conftest; a user runs it without them
        env.pop(var, None)  # (no interpreter: patch() says why it keeps the reference ops)
    script = tmp_path / "block.py"
    script.write_text(block["code"], encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"README.md line {block['line']}:\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
