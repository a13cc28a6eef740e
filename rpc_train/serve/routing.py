"""Which replica takes the next batch (`serve.routing`): small policies, testable without a server.

Each sees the replicas that can take a batch now (in rotation, under their in-flight limit)
and picks one.
"""

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Dict, Sequence


@dataclass
class ReplicaLoad:
    """The front end's view of one replica."""

    replica: int
    rows_in_flight: int = 0
    batches_in_flight: int = 0
    in_rotation: bool = True
    served: int = 0  # batches answered: least_loaded breaks ties with it

    def can_take(self, max_inflight_batches: int) -> bool:
        return self.in_rotation and self.batches_in_flight < max_inflight_batches


Policy = Callable[[Sequence[ReplicaLoad]], ReplicaLoad]


def least_loaded() -> Policy:
    # Ties go to the replica that has served least, so idle replicas share the work.
    return lambda ready: min(ready, key=lambda r: (r.rows_in_flight, r.served, r.replica))


def round_robin() -> Policy:
    turn = itertools.count()

    def pick(ready: Sequence[ReplicaLoad]) -> ReplicaLoad:
        return ready[next(turn) % len(ready)]

    return pick


def power_of_two(seed: int = 0) -> Policy:
    """Two replicas at random, the less loaded of them (Mitzenmacher's power of two choices)."""
    rng = random.Random(seed)

    def pick(ready: Sequence[ReplicaLoad]) -> ReplicaLoad:
        pair = rng.sample(list(ready), min(2, len(ready)))
        return min(pair, key=lambda r: (r.rows_in_flight, r.replica))

    return pick


POLICIES: Dict[str, Callable[[], Policy]] = {"least_loaded": least_loaded, "round_robin": round_robin,
                                             "power_of_two": power_of_two}
