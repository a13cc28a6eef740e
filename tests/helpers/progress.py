"""Read a job's progress report back: plain lines in a file or pipe, tqdm's bar on a terminal."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from typing import List, Tuple

# Overrides that make a short run report progress often enough to see several lines.
REPORT_OFTEN = ["trainer.progress=true", "log.progress_s=0.2"]

LINE = re.compile(r"train step (\d+)/(\d+) \(\d+%\)(?: epoch \d+/\d+)?: loss \d+\.\d{4}, \d+ samples/s")


def progress_lines(text: str) -> List[Tuple[int, int]]:
    """(step, total) of every plain progress line in a log; a bar's carriage return fails it."""
    assert "\r" not in text, "a progress bar's carriage returns in a log that is not a terminal"
    return [(int(m.group(1)), int(m.group(2))) for m in LINE.finditer(text)]


def assert_reports_to_the_end(text: str, total: int, at_least: int = 2) -> None:
    """Plain lines (`at_least` of them), in step order, the last at the run's last step."""
    lines = progress_lines(text)
    assert len(lines) >= at_least, text[-3000:]
    steps = [step for step, _ in lines]
    assert steps == sorted(steps) and lines[-1] == (total, total), lines


def run_in_terminal(argv: List[str], env: dict, cwd, timeout: float) -> Tuple[int, str]:
    """Run `argv` with a pseudo-terminal (120 columns) as its stdin, stdout and stderr, as a
    person's shell would; (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
