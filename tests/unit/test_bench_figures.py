"""The benchmark figures the README quotes: the hybrid bench's peer measured as its jobs are."""

import pytest

from rpc_train.bench.ddp_rpc_peer import windowed_rate

pytestmark = pytest.mark.timeout(60)


def test_the_peers_rate_is_computed_as_a_hybrid_jobs_windows_are():
    # Two trainers, windows of 2 steps: the first (start-up) window is left out; each window's
    # samples (2 trainers x 2 steps x 10) over its slower trainer's time.
    fast, slow = [1.0, 1.0, 0.1, 0.1, 0.2, 0.2], [1.0, 1.0, 0.2, 0.2, 0.1, 0.3]
    assert windowed_rate([fast, slow], log_every=2, batch_size=10) == pytest.approx((40 / 0.4 + 40 / 0.4) / 2)
    # A slow step counts in full, as in a job's window (a median would hide it).
    assert windowed_rate([[1.0, 0.1, 0.1, 0.1, 1.0]], log_every=1, batch_size=1) == pytest.approx((30 + 1) / 4)
