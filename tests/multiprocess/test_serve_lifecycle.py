"""How a serving job stops, as a contract: SIGTERM to the launcher, to torchrun, or to every
process at once (as Slurm's scancel does), under client load. Readiness goes false at once,
requests are still answered for serve.drain_grace_s, then refused with UNAVAILABLE; nothing
fails otherwise, every process exits, the launcher exits 0 and no traceback is printed."""

import os
import signal
import time

import pytest

from helpers.serving import Load, ServingJob, digits_rows

pytestmark = pytest.mark.timeout(300)

GRACE_S = 1.5


def _signal(job: ServingJob, way: str) -> None:
    processes = job.processes()  # the launcher, torchrun, then the ranks
    launcher, torchrun = processes[0], processes[1]
    if way == "launcher":
        os.kill(launcher, signal.SIGTERM)
    elif way == "torchrun":
        os.kill(torchrun, signal.SIGTERM)
    elif way == "torchrun's process group":
        os.killpg(os.getpgid(torchrun), signal.SIGTERM)
    elif way == "every process":  # scancel: the launcher, torchrun and every rank, at once
        for pid in processes:
            os.kill(pid, signal.SIGTERM)
    elif way == "a replica":
        os.kill(job.pid_of(1), signal.SIGINT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("way", [
    pytest.param("launcher", marks=pytest.mark.slow),  # test_serve.py's quick test signals the launcher too
    pytest.param("torchrun", marks=pytest.mark.slow),
    "every process",
    pytest.param("torchrun's process group", marks=pytest.mark.slow),
    pytest.param("a replica", marks=pytest.mark.slow),
])
def test_a_signal_to_any_process_drains_and_the_launcher_exits_0(trained, tmp_path, way):
    job = ServingJob(trained, tmp_path / "run", [f"serve.drain_grace_s={GRACE_S}"]).wait_ready()
    processes = job.processes()
    assert len(processes) == 5, processes  # launch.sh, torchrun, 3 ranks
    with Load(job.url, digits_rows(2), leave_when_draining=True) as load:
        time.sleep(1.5)
        before = len(load.outcomes)
        signalled = time.monotonic()
        _signal(job, way)
        while job.ready() and time.monotonic() < signalled + 10:
            time.sleep(0.05)
        unready_s = time.monotonic() - signalled
        answered_while_unready = len(load.outcomes)
        time.sleep(0.5)
        assert load.codes(answered_while_unready) and set(load.codes(answered_while_unready)) == {"OK"}, \
            "requests were refused inside the grace period"
        output = job.wait_exit(timeout_s=90)
    assert unready_s < 2, f"readiness went false {unready_s:.1f} s after the signal"
    assert job.proc.returncode == 0, output[-3000:]
    codes = load.codes(before)
    assert set(codes) == {"OK", "StatusCode.UNAVAILABLE"}, codes  # answered, then refused: none failed
    logs = output + "".join(job.log(rank) for rank in range(3))
    assert "Traceback" not in logs and "Error" not in logs, logs[-3000:]
    assert not [pid for pid in processes if _alive(pid)], "a process of the job outlived it"


@pytest.mark.slow
def test_a_second_ctrl_c_forces_a_stuck_drain(trained, tmp_path):
    # One replica, stopped with a batch on it: the drain would wait for that batch for minutes.
    job = ServingJob(trained, tmp_path / "run", ["serve.replica_timeout_s=120"], nproc=2).wait_ready()
    processes = job.processes()
    with Load(job.url, digits_rows(1), deadline_s=120) as load:
        time.sleep(1)
        os.kill(job.pid_of(1), signal.SIGSTOP)
        time.sleep(1)
        job.proc.send_signal(signal.SIGINT)
        time.sleep(GRACE_S + 2)
        assert job.proc.poll() is None  # draining, stuck
        forced = time.monotonic()
        job.proc.send_signal(signal.SIGINT)
        output = job.wait_exit(timeout_s=30)
        took_s = time.monotonic() - forced
    assert job.proc.returncode != 0 and "forcing the job down" in output, output[-2000:]
    assert took_s < 10 and not [pid for pid in processes if _alive(pid)]
    assert load.outcomes  # the clients were answered or cut, none left hanging
