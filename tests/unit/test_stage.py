"""A pipeline stage's bookkeeping, run in this process (no RPC), and a step's result."""

import threading

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.schema import as_dict
from rpc_train.pipeline.engine import step_result
from rpc_train.pipeline.stage import StageWorker
from rpc_train.training.builders import build_model

pytestmark = pytest.mark.timeout(60)


def one_stage(max_in_flight):
    """The whole smoke MLP as stage 0 of a one-stage pipeline."""
    cfg = compose(["experiment=smoke"])
    layers = range(len(build_model(as_dict(cfg.model), cfg.seed)))
    return StageWorker(0, as_dict(cfg.model), layers, as_dict(cfg.optim), None, "cpu", cfg.seed, max_in_flight), cfg


def test_a_forward_that_raises_gives_back_its_1f1b_place():
    stage, cfg = one_stage(max_in_flight=1)
    with pytest.raises(RuntimeError):
        stage.compute(0, torch.randn(2, 3), training=True)  # not the model's input shape
    # With the place still taken, micro-batch 1 would wait for a backward that never comes.
    done = threading.Event()
    thread = threading.Thread(target=lambda: (stage.compute(1, torch.randn(2, *cfg.data.shape), True), done.set()),
                              daemon=True)
    thread.start()
    assert done.wait(10), "the next micro-batch waits for ever"
    stage.release()


def stage_stats(lr):
    return {"lr": lr, "forward_ms": 1.0, "backward_ms": 2.0, "page_faults": 0, "peak_memory_mb": 1.0, "spans": []}


def test_a_step_result_without_any_optimizer_has_no_lr():
    # Stages of parameter-free layers only have no optimizer, hence no learning rate to report.
    result = step_result(1.5, 3, [stage_stats(None), stage_stats(None)], started=0.0, step_ms=1.0)
    assert "lr" not in result.stats and result.stats["stage1/backward_ms"] == 2.0
    assert step_result(1.5, 3, [stage_stats(None), stage_stats(0.1)], 0.0, 1.0).stats["lr"] == 0.1


def test_a_step_fails_with_its_first_error_without_waiting_for_the_rest():
    # A micro-batch that fails may leave the others waiting for ever (a stage holds them at
    # their turn): the combined result must not wait for them.
    from rpc_train.pipeline.feed import all_or_first_error

    first, second, third = (torch.futures.Future() for _ in range(3))
    combined = all_or_first_error([first, second, third])
    first.set_result(1)
    second.set_exception(ValueError("micro-batch 1: target 12 is out of bounds"))
    assert combined.done()  # third is still pending
    with pytest.raises(ValueError, match="target 12"):
        combined.wait()
    ok = [torch.futures.Future() for _ in range(2)]
    together = all_or_first_error(ok)
    ok[1].set_result("b")
    assert not together.done()
    ok[0].set_result("a")
    assert together.wait() == ["a", "b"] and all_or_first_error([]).wait() == []
