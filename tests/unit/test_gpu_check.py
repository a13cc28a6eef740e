"""The GPU check's parts that need no GPU: its refusal without one, reading pytest's results,
keeping to its budget, and the wheels it is carried with."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.launching import REPO
from rpc_train.bench.gpu_check import Outcome, Part, passed, read_outcomes, report_tests, run_until
from rpc_train.bench.gpu_wheels import project, remove_stale

pytestmark = pytest.mark.timeout(60)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.multiprocess.test_cuda" name="test_a[1f1b-3]" time="31.5" />
<testcase classname="tests.multiprocess.test_cuda" name="test_b" time="12.0">
<failure message="AssertionError: boom">Traceback
  line 1
E   AssertionError: boom</failure></testcase>
<testcase classname="tests.multiprocess.test_cuda" name="test_c" time="0.0">
<skipped message="needs a CUDA device" /></testcase>
<testcase time="0.005" />
</testsuite></testsuites>"""


def test_without_cuda_it_says_so_in_one_line_and_stops(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench.gpu_check", "--out", str(tmp_path / "r.txt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: CUDA is not available (torch.cuda.is_available() is False): the GPU check needs a CUDA device"]
    assert not (tmp_path / "r.txt").exists()


def test_each_test_outcome_comes_from_the_junit_file_or_the_verbose_lines(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    got = read_outcomes(junit, "")
    assert [(o.name, o.result, o.seconds) for o in got] == [("test_a[1f1b-3]", "PASS", 31.5),
                                                             ("test_b", "FAIL", 12.0), ("test_c", "SKIP", 0.0)]
    assert got[1].detail.splitlines()[-1] == "E   AssertionError: boom"
    # A run stopped before pytest wrote its XML: the -v lines say what finished.
    log = ("collected 4 items / 1 deselected / 3 selected\n\n"
           "tests/multiprocess/test_cuda.py::test_a[1f1b-3] PASSED   [ 33%]\n"
           "tests/multiprocess/test_cuda.py::test_b FAILED   [ 66%]\ntests/multiprocess/test_cuda.py::test_c \n")
    assert [(o.name, o.result) for o in read_outcomes(tmp_path / "none.xml", log)] == [
        ("test_a[1f1b-3]", "PASS"), ("test_b", "FAIL")]
    (tmp_path / "pytest.log").write_text(log)
    lines = report_tests(Part(None, 300.0, tmp_path / "pytest.log"), read_outcomes(tmp_path / "none.xml", log))
    assert lines[0].endswith("1 pass, 1 fail of 3 selected, 300 s")
    assert lines[1].startswith("  STOPPED at the budget in test_c:")
    # Everything must pass, and a skip on a GPU machine is no pass.
    done = Part(0, 1.0, tmp_path / "pytest.log")
    assert passed([Outcome("a", "PASS")], done, done) and not passed(got, done, done)
    assert not passed([Outcome("a", "PASS")], done, Part(None, 1.0, done.log)) and not passed([], done, None)


def test_a_part_still_running_at_its_deadline_is_stopped(tmp_path):
    # As in a check started from a background shell (`cmd &`, nohup), where SIGINT is ignored
    # and would stay ignored in the part: the part must still take its Ctrl-C.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.monotonic()
        part = run_until(["sh", "-c", "echo started; sleep 60"], tmp_path / "log", time.monotonic() + 1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert part.returncode is None and time.monotonic() - started < 10
    assert (tmp_path / "log").read_text() == "started\n"


def test_carried_wheels_replace_earlier_versions_of_the_same_projects(tmp_path):
    names = ["grpcio_tools-1.80.0-cp312-cp312-manylinux2014_x86_64.whl", "hydra_core-1.3.2-py3-none-any.whl",
             "other-1.0-py3-none-any.whl"]
    for name in names:
        (tmp_path / name).write_text("")
    assert [project(tmp_path / n) for n in names] == ["grpcio-tools", "hydra-core", "other"]
    remove_stale(tmp_path, ["grpcio-tools", "hydra-core"])
    assert [p.name for p in tmp_path.iterdir()] == ["other-1.0-py3-none-any.whl"]
