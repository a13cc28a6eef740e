"""Hooks for the data service's tests, installed through `loader.batch_hook`.

    loader.batch_hook={_target_:helpers.loader_hooks.RecordIds,path:/tmp/ids}

The consumer calls the hook for each training batch it takes, in the order it trains on them.
The ranks import this module, so the launch puts tests/ on PYTHONPATH (helpers.launching).
"""

import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def attempt() -> int:
    """Which of torchrun's attempts this process belongs to (0, then 1 after a restart)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class RecordIds:
    """Appends `attempt consumer epoch index id,id,...` for each batch to `path`; with
    `kill_epoch` and `kill_index`, SIGKILLs its own process on taking that batch in attempt 0
    (a crash mid-epoch); `delay_s` slows each batch down so a test can act while the job runs."""

    def __init__(self, path: str, kill_epoch: Optional[int] = None, kill_index: Optional[int] = None,
                 delay_s: float = 0.0):
        self.path, self.kill_at, self.delay_s = path, (kill_epoch, kill_index), delay_s

    def __call__(self, consumer: str, epoch: int, index: int, ids) -> None:
        if attempt() == 0 and (epoch, index) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        line = f"{attempt()} {consumer} {epoch} {index} {','.join(str(int(i)) for i in ids)}\n"
        with open(self.path, "a") as f:  # one write per line: appends from several consumers stay whole
            f.write(line)
        if self.delay_s:
            time.sleep(self.delay_s)


def read_ids(path: Path) -> List[Tuple[int, str, int, int, Tuple[int, ...]]]:
    """(attempt, consumer, epoch, index, ids) per batch, in the order they were taken."""
    rows = []
    for line in Path(path).read_text().splitlines():
        run, consumer, epoch, index, ids = line.split(" ")
        rows.append((int(run), consumer, int(epoch), int(index), tuple(int(i) for i in ids.split(","))))
    return rows


def by_consumer(path: Path) -> Dict[str, List[Tuple[int, int, Tuple[int, ...]]]]:
    """Each consumer's (epoch, index, ids) sequence, whatever attempt took it."""
    out: Dict[str, list] = {}
    for _, consumer, epoch, index, ids in read_ids(path):
        out.setdefault(consumer, []).append((epoch, index, ids))
    return out
