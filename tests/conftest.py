"""Shared test settings: one tolerance table, fresh seeds, the gpu marker.

Without CUDA, Triton kernels run on CPU tensors through the interpreter, so
TRITON_INTERPRET=1 is set here before anything imports triton. WAN_TRITON_STRICT=1 makes a
patched op that falls back to the reference raise (with the reason) instead of silently
running torch; tests that exercise a fallback on purpose unset it.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WAN_TRITON_STRICT", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (atol, rtol) against a float64 reference, by the dtype of the tensors under test.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist's --dist loadgroup keeps the group on one worker")
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels on CPU tensors (TRITON_INTERPRET=1; "
                                       "without it, the test runs in a child pytest that has it)")


INTERPRETER_UNUSABLE = "tests/conftest.py: the suite runs the kernels interpreted, and "


def pytest_sessionstart(session):
    """Under TRITON_INTERPRET=1 with an interpreter that cannot run the kernels (kernels.interpreter_problem:
    Triton 3.6 with NumPy 2.4), every kernel test would fail with the same reason: stop at once with it."""
    if INTERPRETED:
        from wan_triton import kernels

        if kernels.interpreter_problem():
            pytest.exit(INTERPRETER_UNUSABLE + kernels.interpreter_problem(), returncode=4)


def shares_a_module_fixture(item) -> bool:
    """Whether the test uses a fixture of module (or wider) scope defined in its own file."""
    info = getattr(item, "_fixtureinfo", None)
    module = getattr(getattr(item, "module", None), "__name__", None)
    return info is not None and any(
        d.scope != "function" and getattr(d.func, "__module__", None) == module
        for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    # For `-n N --dist loadgroup` (README, Contributing: the GPU suite): the tests of a file that builds a
    # module fixture (a spawned process group, a generated video) stay on one worker, which builds it
    # once; every other test goes to whichever worker is free. Per file (`loadfile`), the 139 kernel
    # tests of one file compile their Triton kernels one after another on one worker (~9 min on an H100).
    # The GPU-marked tests work at real shapes (up to tens of GB each): one at a time, in one group.
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("gpu"))
        elif shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test marked `interpreter` runs the kernels on CPU tensors, which needs TRITON_INTERPRET=1 from the
    start of the process (triton.jit reads it when a kernel is defined). A process without it (a GPU
    machine: conftest sets it only where there is no CUDA) runs such a test in a child pytest that has it
    and takes the child's outcome: the test runs on every machine, not skipped on some."""
    if INTERPRETED or pyfuncitem.get_closest_marker("interpreter") is None:
        return None
    nodeid = pyfuncitem.nodeid.split("@")[0]  # pytest-xdist's loadgroup appends "@group"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    r = subprocess.run([sys.executable, "-m", "pytest", nodeid, "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:xdist"],
                       cwd=pyfuncitem.config.rootpath, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=1200)
    out = r.stdout + r.stderr
    if INTERPRETER_UNUSABLE in out:  # the machine's Triton interpreter is broken (pytest_sessionstart): say so
        pytest.skip(out[out.index(INTERPRETER_UNUSABLE) + len(INTERPRETER_UNUSABLE):].splitlines()[0].strip(" !"))  # pytest frames it as '! ... !'
    last = (r.stdout.strip().splitlines() or [""])[-1]  # pytest's summary line: "1 passed in 3.2s"
    if r.returncode != 0 or not last.startswith("1 passed"):
        pytest.fail(f"under TRITON_INTERPRET=1 in a child pytest (exit {r.returncode}):\n{out[-6000:]}", pytrace=False)
    return True


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure through the test id's report)."""
    s = random.SystemRandom().randrange(2 ** 31)
    torch.manual_seed(s)
    print(f"seed={s}")  # pytest shows captured output of a failed test: rerun with this seed
    request.node.user_properties.append(("seed", s))
    return s


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _restore_reference_ops():
    """A test that patches (directly or through the CLI) must not leak kernels into the next."""
    yield
    import sys

    mod = sys.modules.get("wan_triton.patch")
    if mod is not None and mod.is_patched():
        mod.unpatch()
