"""The asynchronous update rule (training/staleness.py) and how the parameter server applies it."""

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import as_dict
from rpc_train.config.validate import validate
from rpc_train.hybrid.server import EmbeddingServer
from rpc_train.hybrid.sharding import Piece
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
    grads = [torch.full((4,), 3.0), torch.full((9,), 2.0)]  # norm sqrt(36 + 36)
    AsyncUpdateRule(clip_grad_norm=1.0).clip(grads)  # its norm was sqrt(72)
    assert torch.linalg.vector_norm(torch.cat(grads)).item() == pytest.approx(1.0, rel=1e-4)
    small = [torch.full((4,), 0.1)]
    AsyncUpdateRule(clip_grad_norm=1.0).clip(small)
    assert torch.equal(small[0], torch.full((4,), 0.1))  # under the norm: untouched


def _gradients(params: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}


@pytest.mark.parametrize("optim", [["optim=sgd", "optim.momentum=0.9"], ["optim=adam", "optim.lr=0.01"]])
def test_an_async_server_moves_a_stale_gradients_parameters_by_the_fraction_of_a_fresh_step(optim):
    """Adam divides a gradient by its own size: a scaled gradient would move the parameters as
    far as a fresh one. The rule scales the step, so with any optimizer staleness 2 moves half."""
    cfg = compose(["experiment=smoke", *ASYNC, *optim])
    names = ["1.0.weight"]

    def server(rule):
        return ParameterServer(0, names, as_dict(cfg.model), as_dict(cfg.optim), None, cfg.seed,
                               trainers=2, sync=False, max_staleness=4, rule=rule)

    plain, aware = server(AsyncUpdateRule()), server(AsyncUpdateRule(scale_by_staleness=True))
    for s in (plain, aware):  # the same history, each update staleness 0 or 1: a full step each
        s.push(0, 0, _gradients(s.params, 1), {}).wait()
        before = s.params[names[0]].detach().clone()
        reply = s.push(1, 0, _gradients(s.params, 2), {}).wait()
        assert reply.staleness == 1 and reply.made_by == (1, 1)
        s.moved = s.params[names[0]].detach() - before
    torch.testing.assert_close(aware.moved, plain.moved)  # staleness 1: a full step in Zhang et al.'s rule
    for s in (plain, aware):
        before = s.params[names[0]].detach().clone()
        s.push(0, 0, _gradients(s.params, 3), {}).wait()  # staleness 2
        s.moved = s.params[names[0]].detach() - before
    torch.testing.assert_close(aware.moved, plain.moved / 2)
    assert aware.lr() == plain.lr() == cfg.optim.lr  # the scaled learning rate was for that step only


def _embedding_server(optim: str, rule: AsyncUpdateRule, server_id: int = 90) -> EmbeddingServer:
    cfg = compose(["experiment=dlrm_synthetic"])
    return EmbeddingServer(server_id, [Piece(0, 0, cfg.data.table_rows[0])], as_dict(cfg.model), cfg.seed,
                           trainers=2, sync=False, optim=optim, lr=0.1, rule=rule)


def _rows_gradient(server: EmbeddingServer, rows: list, seed: int) -> dict:
    weight = server.shard.weights[0]
    values = torch.randn(len(rows), weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return {0: torch.sparse_coo_tensor([rows], values, tuple(weight.shape), check_invariants=True)}


@pytest.mark.parametrize("optim", ["sgd", "rowwise_adagrad"])
def test_an_async_embedding_server_moves_a_stale_gradients_rows_by_the_fraction_of_a_fresh_step(optim):
    """Row-wise Adagrad divides by the row's gradient size too; and the stale gradient enters its
    accumulator whole, so that later steps of those rows are not made larger."""
    plain, aware = (_embedding_server(optim, AsyncUpdateRule(scale_by_staleness=s), 90 + s) for s in (False, True))
    rows = [1, 3, 4]
    for s in (plain, aware):
        s.push(0, 0, _rows_gradient(s, rows, 1)).wait()
        assert s.push(1, 0, _rows_gradient(s, rows, 2)).wait() == 1
        before = s.shard.weights[0].detach().clone()
        assert s.push(0, 0, _rows_gradient(s, rows, 3)).wait() == 2  # staleness 2
        s.moved = s.shard.weights[0].detach() - before
    torch.testing.assert_close(aware.moved, plain.moved / 2)
    assert plain.moved[rows].abs().min() > 0 and plain.moved[[0, 2]].abs().max() == 0
    if optim == "rowwise_adagrad":
        torch.testing.assert_close(aware.optimizer.state[aware.shard.weights[0]]["sum"],
                                   plain.optimizer.state[plain.shard.weights[0]]["sum"])


def test_an_embedding_server_counts_only_updates_that_changed_rows():
    """A trainer that looked nothing up on a server still tells it so each step; that is no
    update: the version, the others' staleness and max_staleness stay where they were."""
    server = _embedding_server("sgd", AsyncUpdateRule(scale_by_staleness=True))
    server.pop_stats()
    before = server.shard.weights[0].detach().clone()
    server.push(1, 0, {}).wait()  # trainer 1 looked nothing up here
    assert server.version == 0 and server.made_by is None
    assert torch.equal(server.shard.weights[0], before)
    assert server.push(0, 0, _rows_gradient(server, [2], 1)).wait() == 0  # fresh, so a full step
    assert server.version == 1 and server.made_by == (0, 0)
    stats = server.pop_stats()
    assert stats["max_staleness"] == 0 and stats["version"] == 1


def test_staleness_lr_with_an_optimizer_whose_step_does_not_follow_its_lr_is_refused_in_one_line():
    rprop = ["optim._target_=torch.optim.Rprop", "~optim.momentum"]
    with pytest.raises(ConfigError, match=r"ps.staleness_lr=true with optim._target_=torch.optim.Rprop: .*SGD, Adam"):
        validate(compose(ASYNC + ["ps.staleness_lr=true", *rprop]), 4)
    validate(compose(ASYNC + ["ps.staleness_lr=true", "optim=adam"]), 4)  # Adam's step follows its lr
    validate(compose(["mode=parameter_server", "ps.staleness_lr=true", *rprop]), 4)  # sync: nothing is stale


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
