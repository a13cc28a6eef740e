"""The gRPC load generator's start: a client process that dies while starting is an error at once,
not a wait at the start line for the others."""

import time

import pytest

from rpc_train.bench.loadgen import run_load

pytestmark = pytest.mark.timeout(60)


def test_a_client_that_dies_while_starting_fails_the_load_at_once():
    began = time.monotonic()
    # A shape numpy refuses: each client raises while building its request, before it is ready.
    with pytest.raises(RuntimeError, match="a load client process exited with 1 while starting"):
        run_load("localhost:1", "mlp", [-1], clients=1, duration_s=1)
    assert time.monotonic() - began < 30
