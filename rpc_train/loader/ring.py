"""Which data worker keeps a decoded sample: a consistent-hash ring over the workers.

Why consistent hashing and not `key % n_workers`: when a worker leaves the rotation (or comes
back), modulo hashing moves almost every key to a new owner, so every worker's cache goes cold at
once. On a ring only the keys of the worker that left move (about 1/N of them); the other workers
keep owning what they already hold, so their caches stay warm. Virtual nodes (each worker placed
at many points) keep the shares even: with a single point per worker one of four could own half.

Positions come from blake2b, never Python's hash(): hash() of a str is randomised per process,
and every worker must compute the same owner for the same sample.
"""

import bisect
import hashlib
from typing import Dict, List, Sequence, Tuple, Union

Key = Union[int, str]


def _position(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _key_bytes(key: Key) -> bytes:
    # A prefix keeps the int 7 and the str "7" apart; bool is an int subclass but not a sample id.
    if isinstance(key, int) and not isinstance(key, bool):
        return b"i" + str(key).encode()
    if isinstance(key, str):
        return b"s" + key.encode()
    raise TypeError(f"a ring key is an int sample id or a str, not {type(key).__name__}")


class HashRing:
    """An immutable ring: `without` and `with_node` return new rings, so threads can share one."""

    def __init__(self, nodes: Sequence[str], vnodes: int = 64):
        if isinstance(nodes, str):
            raise TypeError("nodes is a sequence of node names, not one str")
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        self._nodes = tuple(sorted(set(nodes)))
        self._vnodes = vnodes
        # Sorting by (position, node) makes a (vanishingly rare) position collision resolve the
        # same way in every process.
        points: List[Tuple[int, str]] = sorted(
            (_position(f"{node}#{v}".encode()), node) for node in self._nodes for v in range(vnodes))
        self._positions = [p for p, _ in points]
        self._owners = [n for _, n in points]

    @property
    def nodes(self) -> List[str]:
        return list(self._nodes)

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def owner(self, key: Key) -> str:
        """The node that keeps `key`: the first point at or after the key's position, wrapping."""
        if not self._positions:
            raise ValueError("the hash ring has no nodes: no data worker is in the rotation")
        i = bisect.bisect_left(self._positions, _position(_key_bytes(key)))
        return self._owners[i % len(self._owners)]

    def owners(self, keys: Sequence[Key]) -> Dict[str, List[Key]]:
        """Keys grouped by owner, each group in the order the keys came (one request per owner)."""
        grouped: Dict[str, List[Key]] = {}
        for key in keys:
            grouped.setdefault(self.owner(key), []).append(key)
        return grouped

    def without(self, node: str) -> "HashRing":
        """A new ring without `node`; only the keys `node` owned get new owners."""
        if node not in self._nodes:
            raise ValueError(f"{node!r} is not on the ring (nodes: {list(self._nodes)})")
        return HashRing([n for n in self._nodes if n != node], self._vnodes)

    def with_node(self, node: str) -> "HashRing":
        """A new ring with `node` added (a no-op copy if it is already there)."""
        return HashRing([*self._nodes, node], self._vnodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"HashRing(nodes={list(self._nodes)}, vnodes={self._vnodes})"
