"""The asynchronous update rule (training/staleness.py) and how the parameter server applies it."""

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import as_dict
from rpc_train.config.validate import validate
from rpc_train.ps.driver import server_update
from rpc_train.ps.progress import collapse_warning
from rpc_train.ps.server import ParameterServer
from rpc_train.training.staleness import AsyncUpdateRule, compensated_momentum, remedy

pytestmark = pytest.mark.timeout(60)

ASYNC = ["mode=parameter_server", "ps.sync=false"]


def test_momentum_is_lowered_by_what_asynchrony_adds():
    assert compensated_momentum(0.9, 1) == pytest.approx(0.9)  # one worker: nothing implicit
    assert compensated_momentum(0.9, 2) == pytest.approx(0.4)
    assert compensated_momentum(0.9, 4) == pytest.approx(0.15)
    assert compensated_momentum(0.5, 4) == 0.0  # never below zero


def test_the_servers_get_the_compensated_momentum_only_in_async_mode():
    optim, rule = server_update(compose(ASYNC), trainers=2)
    assert optim["momentum"] == pytest.approx(0.4) and rule == AsyncUpdateRule()
    assert server_update(compose(ASYNC + ["ps.momentum_compensation=false"]), 2)[0]["momentum"] == 0.9
    optim, rule = server_update(compose(["mode=parameter_server", "ps.staleness_lr=true"]), 2)
    assert optim["momentum"] == 0.9 and not rule.scale_by_staleness  # sync: every gradient is fresh
    assert server_update(compose(ASYNC + ["optim=adam"]), 2)[0] == as_dict(compose(["optim=adam"]).optim)


def test_a_stale_gradient_takes_a_smaller_step_and_a_large_one_is_clipped():
    rule = AsyncUpdateRule(scale_by_staleness=True)
    assert [rule.step_scale(s) for s in (0, 1, 2, 4)] == [1.0, 1.0, 0.5, 0.25]
    grads = {"a": torch.full((4,), 3.0), "b": torch.full((9,), 2.0)}  # norm sqrt(36 + 36)
    AsyncUpdateRule(clip_grad_norm=1.0).prepare(grads, staleness=0)  # its norm was sqrt(72)
    clipped = torch.linalg.vector_norm(torch.cat([g for g in grads.values()]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-4)
    small = {"a": torch.full((4,), 0.1)}
    AsyncUpdateRule(clip_grad_norm=1.0).prepare(small, staleness=3)
    assert torch.equal(small["a"], torch.full((4,), 0.1))  # under the norm, fresh scale: untouched


def test_an_async_server_scales_each_gradient_by_its_staleness():
    cfg = compose(["experiment=smoke", *ASYNC, "optim.momentum=0.0"])
    names = ["1.0.weight"]

    def server(rule):
        return ParameterServer(0, names, as_dict(cfg.model), as_dict(cfg.optim), None, cfg.seed,
                               trainers=2, sync=False, max_staleness=4, rule=rule)

    plain, aware = server(AsyncUpdateRule()), server(AsyncUpdateRule(scale_by_staleness=True))
    for s in (plain, aware):
        s.push(0, 0, {n: torch.ones_like(p) for n, p in s.params.items()}, {}).wait()
        before = s.params[names[0]].detach().clone()
        reply = s.push(1, 0, {n: torch.ones_like(p) for n, p in s.params.items()}, {}).wait()
        assert reply.staleness == 1 and reply.made_by == (1, 1)
        s.moved = (before - s.params[names[0]]).abs().max().item()
    assert aware.moved == pytest.approx(plain.moved)  # staleness 1: a full step in Zhang et al.'s rule
    for s in (plain, aware):
        before = s.params[names[0]].detach().clone()
        s.push(0, 0, {n: torch.ones_like(p) for n, p in s.params.items()}, {}).wait()  # staleness 2
        s.moved = (before - s.params[names[0]]).abs().max().item()
    assert aware.moved == pytest.approx(plain.moved / 2)


def test_a_collapse_is_one_line_naming_the_step_the_trainer_the_staleness_and_a_remedy():
    line = collapse_warning(0.95, 0.21, 360, (3, 1), remedy(False, True, None))
    assert line == ("validation accuracy collapsed from 0.950 to 0.210 at step 360; the stalest gradient "
                    "applied since the last validation was trainer 1's, staleness 3; set ps.clip_grad_norm=1.0, "
                    "or lower optim.lr")
    assert collapse_warning(0.95, 0.9, 360, (3, 1), "x") is None and collapse_warning(None, 0.1, 10, None, "x") is None
    assert remedy(False, False, None).startswith("set ps.momentum_compensation=true")
    assert remedy(True, True, None) == "lower optim.lr"


def test_a_clip_norm_must_be_positive():
    with pytest.raises(ConfigError, match="ps.clip_grad_norm=0.0: must be a positive norm"):
        validate(compose(ASYNC + ["ps.clip_grad_norm=0"]), 4)
