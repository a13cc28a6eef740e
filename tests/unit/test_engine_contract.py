"""Every engine fulfils the contract the training loop and the checkpoint manager rely on."""

import pytest
import torch

from rpc_train.checkpoint.manager import Checkpointer
from rpc_train.config.compose import compose
from rpc_train.pipeline.engine import PipelineEngine
from rpc_train.ps.driver import ServerEngine
from rpc_train.training.local import LocalEngine
from rpc_train.training.protocol import Checkpointable, Engine, Evaluator

pytestmark = pytest.mark.timeout(60)


def test_the_engines_implement_their_protocols():
    assert isinstance(LocalEngine(compose(["experiment=smoke"])), Engine)
    for method in ("train_step", "eval_step", "state_dict", "save_checkpoint", "load_checkpoint", "layout"):
        assert callable(getattr(PipelineEngine, method)), method
    # The parameter server's trainers step themselves: the driver's side evaluates and checkpoints.
    assert all(callable(getattr(ServerEngine, m)) for m in ("eval_step", "save_checkpoint", "load_checkpoint",
                                                              "layout", "state_dict"))
    assert not hasattr(ServerEngine, "train_step")
    assert issubclass(Engine, Evaluator) and issubclass(Engine, Checkpointable)


def test_a_local_engine_checkpoint_resumes_its_training(tmp_path):
    cfg = compose(["experiment=smoke", "checkpoint.every_steps=1"])
    x, y = torch.randn(8, *cfg.data.shape), torch.randint(0, cfg.data.num_classes, (8,))
    engine = LocalEngine(cfg)
    engine.train_step(x, y)
    saver = Checkpointer(cfg, str(tmp_path), engine)
    saver.position.step = 1
    saver.save()
    resumed = LocalEngine(cfg)
    assert Checkpointer(cfg, str(tmp_path), resumed).resume().step == 1
    for e in (engine, resumed):  # the same next step: momentum came along
        e.train_step(x, y)
    for name, value in engine.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
