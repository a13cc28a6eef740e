"""torchrun for a serving job: `python -m rpc_train.serve.agent <torchrun arguments>` (launch.sh).

torchrun's own answer to SIGTERM or SIGINT (torch/distributed/elastic: `_terminate_process_handler`
raises SignalException in the agent) is to send the signal to every worker, SIGKILL those still
there after --shutdown-timeout (30 s), and exit 1 with a traceback, whatever the workers did.
A serving job must drain instead (rpc_train/serve/lifecycle.py). This is the same agent, with
SIGTERM and SIGINT taken out of its `--signals-to-handle`: on either it passes SIGTERM on to each
of its workers once that worker holds the signal (so a rank still starting is never killed by
it) and keeps waiting; the workers drain and exit 0, and so does torchrun.
"""

import os
import signal
import sys
import threading
import time
from typing import List

from torch.distributed.run import main as torchrun

OTHER_SIGNALS = "SIGHUP,SIGQUIT"  # torchrun's defaults, less SIGTERM and SIGINT
PASS_ON_EVERY_S = 0.2


def children() -> List[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return pids


def holds_sigterm(pid: int) -> bool:
    """The process catches SIGTERM (its rank installed lifecycle.hold_signals), read from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


class PassOn:
    """Once asked to stop: SIGTERM to every worker that holds it, once each, until the agent exits."""

    def __init__(self):
        self.asked, self.told = threading.Event(), set()
        threading.Thread(target=self._forever, name="pass-on", daemon=True).start()

    def handler(self, signum, frame) -> None:
        self.asked.set()

    def _forever(self) -> None:
        self.asked.wait()
        print(f"rpc_train agent: {os.getpid()} passes the stop on to its workers (they drain)", file=sys.stderr,
              flush=True)
        while True:
            for pid in children():
                if pid not in self.told and holds_sigterm(pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    self.told.add(pid)
            time.sleep(PASS_ON_EVERY_S)


def main(argv: List[str]) -> None:
    pass_on = PassOn()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on.handler)
    torchrun([f"--signals-to-handle={OTHER_SIGNALS}", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
