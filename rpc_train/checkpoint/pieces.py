"""Row ranges of a tensor saved in different files: how a checkpoint names them and joins them.

mode=hybrid saves each embedding table as the row ranges its servers held, under keys such as
`embeddings.3.weight@0:250` (rows 0-249 of `embeddings.3.weight`). Any other layout loads
them by overlap (another number of servers, table or row sharding); the model check sees the
whole tensors again once the ranges are joined.
"""

import re
from typing import Dict, List, Optional, Tuple

_KEY = re.compile(r"(.+)@(\d+):(\d+)")


def piece_key(name: str, lo: int, hi: int) -> str:
    return f"{name}@{lo}:{hi}"


def parse_piece(key: str) -> Optional[Tuple[str, int, int]]:
    """(tensor name, first row, one past the last) of a piece key, None for a whole tensor."""
    match = _KEY.fullmatch(key)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def joined_shapes(shapes: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """Name -> shape with every tensor's pieces joined. Pieces that do not tile rows 0..n
    without gap or overlap join to a first dimension of -1, which no model has."""
    out: Dict[str, List[int]] = {}
    pieces: Dict[str, List[Tuple[int, int, List[int]]]] = {}
    for key, shape in shapes.items():
        parsed = parse_piece(key)
        if parsed is None:
            out[key] = list(shape)
        else:
            name, lo, hi = parsed
            pieces.setdefault(name, []).append((lo, hi, list(shape[1:])))
    for name, ranges in pieces.items():
        ranges.sort()
        tiled = ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        same_rest = all(r[2] == ranges[0][2] for r in ranges)
        out[name] = [ranges[-1][1] if tiled and same_rest else -1, *ranges[0][2]]
    return out


def overlaps(index: Dict[str, str], name: str, lo: int, hi: int) -> List[Tuple[str, int, int, str]]:
    """The saved pieces of `name` that hold any of rows lo..hi-1: (key, their lo, hi, file)."""
    found = []
    for key, file in index.items():
        parsed = parse_piece(key)
        if parsed and parsed[0] == name and parsed[1] < hi and parsed[2] > lo:
            found.append((key, parsed[1], parsed[2], file))
    return sorted(found, key=lambda f: f[1])
