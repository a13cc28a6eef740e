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
