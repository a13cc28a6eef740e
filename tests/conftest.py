"""Fixtures shared by the test folders; helpers live in the `helpers` package (tests/helpers/)."""

import pytest

from helpers.jobs import Job
from helpers.launching import SMOKE, launch, ok
from helpers.progress import REPORT_OFTEN


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real 3-process smoke launch shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = ok(launch(SMOKE + REPORT_OFTEN + ["pipeline.timeline_every=10", "pipeline.trace_step=12",
                                               "pipeline.profile_step=12"], run_dir))
    return run_dir, result


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A smoke model trained for real, for the serving tests to serve."""
    run = tmp_path_factory.mktemp("trained") / "run"
    ok(launch(SMOKE, run))
    return run


@pytest.fixture
def job_factory():
    """Start background launches (helpers.jobs.Job); every one is ended after the test."""
    jobs = []

    def start(*args, **kwargs):
        jobs.append(Job(*args, **kwargs))
        return jobs[-1]

    yield start
    for job in jobs:
        job.close()
