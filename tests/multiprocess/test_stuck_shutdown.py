"""A graceful RPC shutdown that cannot end (a worker stopped with SIGSTOP) ends the job anyway:
the driver prints every thread's stack after runtime.rpc_timeout_s and exits 1, and torchrun
stops the other rank."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.launching import REPO

pytestmark = pytest.mark.timeout(120)

RPC_TIMEOUT_S = 3


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_a_stuck_shutdown_prints_the_stacks_and_ends_the_job(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "helpers.stuck_shutdown", str(RPC_TIMEOUT_S)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    job = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker, lines, stuck_at, ended_at = None, [], None, None
    # The stopped worker must not outlive the test, whatever happens: resumed (it then takes
    # torchrun's SIGTERM) once the driver has given up, or killed at the deadline.
    deadline = threading.Timer(60, lambda: worker and os.kill(worker, signal.SIGKILL))
    deadline.start()
    try:
        for line in job.stdout:
            lines.append(line)
            found = re.search(r"stopped the worker \((\d+)\)", line)
            if found:
                worker, stuck_at = int(found.group(1)), time.monotonic()
            if line.startswith("Timeout (") and worker:
                ended_at = time.monotonic()
                _resume(worker)
        job.wait(timeout=30)
    finally:
        deadline.cancel()
        if worker:
            _resume(worker)
    output = "".join(lines)
    assert worker and job.returncode != 0, output[-3000:]
    # faulthandler's report: the timeout, then the main thread waiting in the session's shutdown.
    assert f"Timeout (0:00:0{RPC_TIMEOUT_S})!" in output, output[-3000:]
    assert "in rpc_session" in output and "in shutdown" in output, output[-3000:]
    assert ended_at - stuck_at < RPC_TIMEOUT_S + 5
