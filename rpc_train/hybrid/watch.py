"""The driver's watch over an epoch: every trainer's `run_epoch` at once, the first failure named.

Most failures surface by themselves: an RPC to a stopped server times out in a trainer
(runtime.rpc_timeout_s), and a trainer that stops makes its peers' all-reduce time out. Two
do not, and the watch catches them: a lone trainer that stops (no peer waits for it), and a
failure whose own message blames the wrong process (a peer that timed out waiting). Each
trainer says where it is (`whereabouts`, answered by an RPC thread even while its training
thread is stuck); one whose step count stands still for longer than the RPC timeout (plus a
margin, so that a timed-out RPC, which names its peer, is reported first) ends the job.
"""

import time
from typing import Dict, List, Optional, Set

import torch

from rpc_train.config.errors import RunFailure, first_line
from rpc_train.hybrid.trainer import WAITING_FOR_PEERS
from rpc_train.metrics.progress import Progress
from rpc_train.runtime.liveness import timed_out, unresponsive

POLL_S = 1.0  # how often the watch asks the trainers where they are


def run_trainers(job, steps: int, rpc_timeout_s: float, progress: Optional[Progress] = None,
                 epoch: int = 0) -> List[List[Dict[str, float]]]:
    """Every trainer's `run_epoch(steps)` (`job`: a hybrid.driver.HybridJob); their windows.
    Trainer 0's answers move `progress` on: under DDP the trainers keep within a step of each other."""
    # timeout=0: an epoch may take longer than any one RPC; the watch bounds a silent trainer.
    futures = [t.rpc_async(timeout=0).run_epoch(steps, epoch) for t in job.trainers]
    pending = set(range(len(futures)))
    limit = 1.5 * rpc_timeout_s + 2.0
    last_step = {i: (-1, time.monotonic()) for i in pending}
    asked: Dict[int, torch.futures.Future] = {}
    next_poll = time.monotonic() + POLL_S
    while pending:
        for i in sorted(pending):
            if futures[i].done():
                pending.discard(i)
                try:
                    futures[i].wait()
                except Exception as err:  # rpc_async's remote errors are RuntimeErrors; any other type too
                    raise RunFailure(failure(job, i, err, pending)) from err
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + POLL_S
            for i in sorted(pending):
                answer = _note_progress(job, i, asked, last_step, now)
                if i == 0 and answer is not None and progress is not None and answer[0] > progress.step:
                    step, _, loss = answer
                    progress.update(step, (step - progress.step) * job.samples_per_step, loss, epoch)
                if now - last_step[i][1] > limit:
                    raise RunFailure(f"{_name(job, i)} made no step for {limit:.0f} s (1.5 x runtime.rpc_timeout_s "
                                     f"+ 2 s): {_where(job, i)}")
        time.sleep(0.05)
    return [f.wait() for f in futures]


def _note_progress(job, i: int, asked: Dict[int, torch.futures.Future], last_step: dict, now: float):
    """Collect trainer i's last answer (if in; it is returned) and ask again; a new step count
    resets its clock."""
    future, answer = asked.get(i), None
    if future is not None and future.done():
        try:
            answer = future.wait()
            if answer[0] != last_step[i][0]:
                last_step[i] = (answer[0], now)
        except RuntimeError:
            pass  # no answer: its clock runs on
        future = None
    if future is None:
        asked[i] = job.trainers[i].rpc_async(timeout=POLL_S * 5).whereabouts()
    return answer


def _name(job, i: int) -> str:
    return f"{job.roles.trainers[i]} (hybrid trainer {i})"


def _where(job, i: int) -> str:
    try:
        step, doing, _ = job.trainers[i].rpc_sync(timeout=5).whereabouts()
    except RuntimeError:
        return "it does not answer"
    return f"stopped in {doing} after step {step}"


def failure(job, failed: int, err: Exception, running: Set[int]) -> str:
    """One line for the first trainer failure. A trainer that timed out waited for someone: the
    peers still running and not in the backward themselves (or not answering), then the servers
    that do not answer, are named first."""
    name = _name(job, failed)
    if not timed_out(err):
        return f"{name} failed: {first_line(err)}"
    stuck = []
    for i in sorted(running - {failed}):
        try:
            step, doing, _ = job.trainers[i].rpc_sync(timeout=5).whereabouts()
        except RuntimeError:
            stuck.append(f"{_name(job, i)} does not answer")
            continue
        if doing != WAITING_FOR_PEERS:
            stuck.append(f"{_name(job, i)} stopped in {doing} after step {step}")
    # The backward also waits on the servers (the rows' gradients go to them).
    stuck += [f"{server} (embedding server {job.roles.servers.index(server)}) "
              f"{'does not answer' if silent else 'is gone'}"
              for server, silent in sorted(unresponsive(job.roles.servers, 5.0).items())]
    if not stuck:
        return f"{name} failed: {first_line(err)}"
    return f"{'; '.join(stuck)}: {name} timed out waiting ({first_line(err)})"
