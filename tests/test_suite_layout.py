"""The suite's own scheduling rule (conftest.py): under `--dist loadgroup`, a file's tests that share a
module fixture stay on one worker, and the others spread one by one."""
import pytest


@pytest.fixture(scope="module")
def built_once():
    return object()


def _groups(node) -> list:
    return [m.args for m in node.iter_markers("xdist_group")]


def test_a_test_with_a_module_fixture_is_grouped_by_its_file(request, built_once):
    assert _groups(request.node) == [(__name__,)]


def test_a_test_without_one_spreads(request, tmp_path):  # tmp_path: a session fixture of pytest's, not ours
    assert _groups(request.node) == []
