"""A parameter server's share of a checkpoint, saved and loaded in this process."""

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.schema import as_dict
from rpc_train.config.validate import validate
from rpc_train.ps.server import ParameterServer
from rpc_train.training.builders import build_model

pytestmark = pytest.mark.timeout(60)

PS = ["experiment=smoke", "mode=parameter_server", "ps.servers=1", "trainer.epochs=2"]


def make_server(cfg, names, server_id=0):
    return ParameterServer(server_id, names, as_dict(cfg.model), as_dict(cfg.optim), None, cfg.seed,
                           trainers=1, sync=True, max_staleness=0)


def test_validate_accepts_checkpoint_settings_in_parameter_server_mode(tmp_path):
    validate(compose(["mode=parameter_server", "checkpoint.every_steps=5",
                             f"checkpoint.resume={tmp_path}"]), 4)


def test_a_server_shard_saves_and_loads_by_name_with_its_optimizer_state(tmp_path):
    cfg = compose(PS)
    names = list(build_model(as_dict(cfg.model), cfg.seed).state_dict())
    server = make_server(cfg, names)
    for step in range(3):  # momentum state builds up
        grads = {n: torch.full_like(p, 0.1 * (step + 1)) for n, p in server.params.items()}
        server.push(0, server.version, grads, {}).wait()
    record = server.save_checkpoint(str(tmp_path))
    assert record["file"] == "server0.pt" and set(record["tensors"]) == set(names)

    fresh = make_server(cfg, names, server_id=1)
    fresh.load_checkpoint(str(tmp_path), {n: "server0.pt" for n in names})
    for name, value in server.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    grads = {n: torch.full_like(p, 0.5) for n, p in server.params.items()}
    for s in (server, fresh):  # the same next step: momentum came along
        s.push(0, s.version, grads, {}).wait()
    for name, value in server.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
