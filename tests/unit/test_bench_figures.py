"""The benchmark figures the README quotes: each from a table in docs/benchmarks.md, with the
date and machine it was taken on next to it; and the hybrid bench's peer measured as its jobs are."""

import re
from pathlib import Path

import pytest

from rpc_train.bench.ddp_rpc_peer import windowed_rate

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def benchmark_rows():
    """The README's benchmark table: (benchmark, command, taken, headline) per row."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_every_headline_names_its_date_and_machine_and_quotes_ratios_from_docs_benchmarks():
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    rows = benchmark_rows()
    assert len(rows) >= 8
    for benchmark, command, taken, headline in rows:
        assert re.search(r"\b2026-\d\d-\d\d\b", taken), (benchmark, taken)
        assert re.search(r"\d+ vCPUs|H200|H100", taken), (benchmark, taken)
        for ratio in re.findall(r"(\d+\.\d+)(?:-\d+\.\d+)?x", headline) + re.findall(r"-(\d+\.\d+)x", headline):
            assert ratio in docs, (benchmark, ratio)


def test_the_peers_rate_is_computed_as_a_hybrid_jobs_windows_are():
    # Two trainers, windows of 2 steps: the first (start-up) window is left out; each window's
    # samples (2 trainers x 2 steps x 10) over its slower trainer's time.
    fast, slow = [1.0, 1.0, 0.1, 0.1, 0.2, 0.2], [1.0, 1.0, 0.2, 0.2, 0.1, 0.3]
    assert windowed_rate([fast, slow], log_every=2, batch_size=10) == pytest.approx((40 / 0.4 + 40 / 0.4) / 2)
    # A slow step counts in full, as in a job's window (a median would hide it).
    assert windowed_rate([[1.0, 0.1, 0.1, 0.1, 1.0]], log_every=1, batch_size=1) == pytest.approx((30 + 1) / 4)
