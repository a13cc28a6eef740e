"""A step skipped for a non-finite loss counts as a training step but does not move the LR schedule."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rpc_train.config.compose import compose
from rpc_train.training.local import LocalEngine
from rpc_train.training.loop import Trainer

pytestmark = pytest.mark.timeout(60)


def test_a_skipped_step_advances_the_step_count_but_not_the_scheduler():
    cfg = compose(["experiment=smoke", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5",
                   "trainer.skip_nonfinite=true", "trainer.epochs=1", "trainer.max_steps=null",
                   "trainer.log_every=1"])
    engine = LocalEngine(cfg)
    x = torch.randn(4 * 8, *cfg.data.shape)
    x[8:16] = math.nan  # the second batch of four
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.int64)), batch_size=8)
    trainer = Trainer(engine, loader, loader, cfg.trainer)
    trainer.fit()
    assert trainer.position.step == 4 and trainer.position.skipped == 1
    # Three applied steps halved the rate three times; the skipped one did not.
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * 0.5 ** 3)
