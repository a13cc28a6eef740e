"""Which server holds which rows of which table, and how a trainer routes its lookups.

A `Piece` is a contiguous row range of one table. `table` sharding places whole tables
(greedy by rows x dim, largest first, each on the least-loaded server: the classic LPT
balance); `row` sharding cuts every table into one contiguous range per server, as even as
the rows allow. Either way a trainer finds a row's server by binary search over the pieces'
first rows (`Router`).
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from rpc_train.config.errors import ConfigError


@dataclass(frozen=True)
class Piece:
    table: int
    lo: int  # first row held
    hi: int  # one past the last

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def name(self) -> str:
        return f"table{self.table}.rows{self.lo}-{self.hi}"


def plan(sharding: str, table_rows: Sequence[int], dim: int, servers: int) -> List[List[Piece]]:
    """The pieces each server holds, by server id."""
    if sharding == "table":
        return _by_table(table_rows, dim, servers)
    if sharding == "row":
        return _by_row(table_rows, servers)
    raise ConfigError(f"hybrid.sharding={sharding}: expected table or row")


def _by_table(table_rows: Sequence[int], dim: int, servers: int) -> List[List[Piece]]:
    held: List[List[Piece]] = [[] for _ in range(servers)]
    load = [0] * servers
    for t in sorted(range(len(table_rows)), key=lambda t: (-table_rows[t] * dim, t)):
        j = min(range(servers), key=lambda s: (load[s], s))
        held[j].append(Piece(t, 0, table_rows[t]))
        load[j] += table_rows[t] * dim
    return [sorted(pieces, key=lambda p: p.table) for pieces in held]


def _by_row(table_rows: Sequence[int], servers: int) -> List[List[Piece]]:
    for t, rows in enumerate(table_rows):
        if rows < servers:
            raise ConfigError(f"hybrid.sharding=row: table {t} has {rows} rows, fewer than the {servers} "
                              "servers it would be split over; use hybrid.sharding=table or fewer servers")
    held: List[List[Piece]] = [[] for _ in range(servers)]
    for t, rows in enumerate(table_rows):
        cuts = [rows * j // servers for j in range(servers + 1)]
        for j in range(servers):
            held[j].append(Piece(t, cuts[j], cuts[j + 1]))
    return held


class Router:
    """For each table, which server holds which rows: splits a batch's unique ids by server."""

    def __init__(self, held: List[List[Piece]], tables: int):
        by_table: Dict[int, List[Tuple[int, int, int]]] = {t: [] for t in range(tables)}
        for server, pieces in enumerate(held):
            for index, piece in enumerate(pieces):
                by_table[piece.table].append((piece.lo, server, index))
        self._starts, self._owners = {}, {}
        for t, ranges in by_table.items():
            ranges.sort()
            self._starts[t] = torch.tensor([lo for lo, _, _ in ranges])
            self._owners[t] = ranges

    def split(self, table: int, ids: torch.Tensor) -> List[Tuple[int, int, torch.Tensor]]:
        """(server, the piece's index on that server, ids local to the piece) for sorted unique
        `ids` of `table`, in the order of `ids`."""
        # Sorted ids fall into the pieces in order: one searchsorted gives every cut.
        cuts = torch.searchsorted(ids, self._starts[table]).tolist() + [len(ids)]
        return [(server, index, ids[a:b] - lo)
                for (lo, server, index), a, b in zip(self._owners[table], cuts[:-1], cuts[1:]) if b > a]
