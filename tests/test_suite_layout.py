"""The suite's own rules (conftest.py): under `--dist loadgroup` a file's tests that share a module
fixture stay on one worker and the GPU-marked tests share one, the others spread one by one; a test
marked `interpreter` runs under TRITON_INTERPRET=1 on every machine (in a child pytest where the
process has no interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_once():
    return object()


def _groups(node) -> list:
    return [m.args for m in node.iter_markers("xdist_group")]


def test_a_test_with_a_module_fixture_is_grouped_by_its_file(request, built_once):
    assert _groups(request.node) == [(__name__,)]


def test_a_test_without_one_spreads(request, tmp_path):  # tmp_path: a session fixture of pytest's, not ours
    assert _groups(request.node) == []


@pytest.mark.gpu
def test_gpu_tests_share_one_group(request, built_once):
    assert _groups(request.node)[0] == ("gpu",)


@pytest.mark.interpreter
def test_marked_test_sees_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"


def _pytest(args, **env):
    return subprocess.run([sys.executable, "-m", "pytest", __file__, "-v", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_xdist_reads_the_groups():
    """pytest-xdist appends the group to the test id: only if conftest's hook ran before its own."""
    pytest.importorskip("xdist")
    r = _pytest(["-n", "2", "--dist", "loadgroup", "-k", "grouped_by_its_file or spreads"])
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"grouped_by_its_file@{__name__}" in r.stdout and "spreads@" not in r.stdout, r.stdout[-3000:]


BROKEN = "fake: this Triton interpreter cannot run the kernels' loops"


def _interpreter_says(tmp_path: Path, problem: str) -> dict:
    """Env for a child pytest (and its own children) whose interpreter probe answers `problem` ('' =
    healthy): a plugin sets kernels.interpreter_problem()'s kept answer, whatever this machine's
    Triton and NumPy would say."""
    (tmp_path / "interpreter_says.py").write_text(
        "from wan_triton.kernels import _utils\n"
        f"_utils._INTERPRETER_PROBLEM = {problem!r}\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    return dict(PYTHONPATH=path, PYTEST_PLUGINS="interpreter_says")


@pytest.fixture
def broken_interpreter(tmp_path):
    return _interpreter_says(tmp_path, BROKEN)


@pytest.fixture
def healthy_interpreter(tmp_path):
    return _interpreter_says(tmp_path, "")


def test_without_the_interpreter_a_marked_test_runs_in_a_child(healthy_interpreter):
    """A process started without TRITON_INTERPRET (as on a GPU machine) hands the marked test to a child
    pytest that has it; the marked test's body asserts it sees the interpreter. (Healthy by fiat: the
    routing is under test here, not this machine's interpreter, which may be Triton 3.6's with NumPy 2.4.)"""
    r = _pytest(["-p", "no:xdist", "-k", "sees_the_interpreter"], TRITON_INTERPRET="0", **healthy_interpreter)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:]


def test_a_broken_interpreter_stops_the_suite_with_its_reason(broken_interpreter):
    """Under TRITON_INTERPRET=1 with an interpreter that cannot run the kernels (Triton 3.6 with NumPy 2.4),
    the suite stops before any test, with the reason, and fails (not 43 failures of one cause)."""
    r = _pytest(["-p", "no:xdist", "-k", "sees_the_interpreter"], TRITON_INTERPRET="1", **broken_interpreter)
    assert r.returncode == 4 and BROKEN in r.stdout + r.stderr and "passed" not in r.stdout, r.stdout[-3000:]


def test_a_marked_test_skips_where_the_childs_interpreter_is_broken(broken_interpreter):
    """On a GPU machine (no interpreter in the process) whose interpreter is broken, a marked test is
    skipped with the child's reason, not failed with a wall of InterpreterErrors."""
    r = _pytest(["-p", "no:xdist", "-rs", "-k", "sees_the_interpreter"], TRITON_INTERPRET="0", **broken_interpreter)
    assert r.returncode == 0 and "1 skipped" in r.stdout and BROKEN in r.stdout, r.stdout[-3000:]
