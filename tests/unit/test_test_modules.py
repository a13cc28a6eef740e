"""The test tree itself: pytest (rootdir imports, no packages) cannot collect two test modules of
one basename, and then stops the whole run at collection; it happened twice when branches met."""

from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename():
    where = defaultdict(list)
    for module in TESTS.rglob("test_*.py"):
        where[module.name].append(str(module.relative_to(TESTS)))
    assert len(where) > 50, f"only {len(where)} test modules under {TESTS}: is this the tests folder?"
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, f"rename one of each: {shared}"
