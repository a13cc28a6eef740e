"""A launch in the background, for tests that act on a running job (signal a rank, watch it)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers.launching import REPO, launch_env


class Job:
    """./launch.sh in the background, in its own session so cleanup can end all of it."""

    def __init__(self, args, run_dir: Path, **env: str):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True)
        self.stdout, self.stderr = open(run_dir.parent / "stdout", "w+"), open(run_dir.parent / "stderr", "w+")
        full_env = launch_env(run_dir, **env)
        self.proc = subprocess.Popen([str(REPO / "launch.sh"), *args], cwd=REPO, env=full_env,
                                     stdout=self.stdout, stderr=self.stderr, start_new_session=True)

    def wait_for_checkpoint(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not list(self.run_dir.glob("checkpoints/step_*/manifest.json")):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)

    def rank_pid(self, rank: int) -> int:
        """The process of `rank` in this job: torchrun's children carry RUN_DIR and RANK."""
        wanted = {f"RUN_DIR={self.run_dir}".encode(), f"RANK={rank}".encode()}
        for proc in Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if wanted <= environ and b"rpc_train.train" in cmdline and b"torch.distributed.run" not in cmdline:
                return int(proc.name)
        raise AssertionError(f"no process for rank {rank}")

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        """Until the driver's log (rank0.log) holds `text`, while the job runs."""
        log, deadline = self.run_dir / "rank0.log", time.monotonic() + timeout
        while text not in (log.read_text() if log.exists() else ""):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def stop_rank_until_exit(self, rank: int, timeout: float = 120) -> tuple:
        """SIGSTOP `rank` and wait for the job to end; (its exit code, seconds from the stop).
        The stopped process is continued afterwards if it is still there, so nothing stays frozen."""
        pid = self.rank_pid(rank)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
            return code, time.monotonic() - stopped
        finally:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)

    def output(self) -> str:
        self.stdout.seek(0)
        self.stderr.seek(0)
        return self.stdout.read()[-3000:] + self.stderr.read()[-3000:]

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()
