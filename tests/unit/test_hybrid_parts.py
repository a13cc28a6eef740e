"""mode=hybrid's parts in one process: sharding plans, lookup routing, the tables' optimizers,
and the DLRM preset learning its data."""

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.hybrid.local import train_clicks_locally
from rpc_train.hybrid.optim import RowWiseAdagrad
from rpc_train.hybrid.sharding import Piece, Router, plan


def test_table_sharding_places_whole_tables_largest_first_on_the_least_loaded_server():
    # 100 -> server 0; 60 and then 50 -> server 1 (240 < 400); 10 -> server 0 (400 < 440).
    held = plan("table", [100, 10, 60, 50], dim=4, servers=2)
    assert held == [[Piece(0, 0, 100), Piece(1, 0, 10)], [Piece(2, 0, 60), Piece(3, 0, 50)]]


def test_row_sharding_cuts_every_table_into_one_contiguous_range_per_server():
    held = plan("row", [10, 3], dim=4, servers=3)
    assert held == [[Piece(0, 0, 3), Piece(1, 0, 1)], [Piece(0, 3, 6), Piece(1, 1, 2)],
                    [Piece(0, 6, 10), Piece(1, 2, 3)]]
    with pytest.raises(ConfigError, match="table 1 has 3 rows, fewer than the 4 servers"):
        plan("row", [10, 3], dim=4, servers=4)


def test_the_router_sends_each_unique_id_to_its_piece_as_a_local_row():
    held = plan("row", [10, 3], dim=4, servers=3)
    router = Router(held, tables=2)
    parts = router.split(0, torch.tensor([0, 2, 6, 9]))
    assert [(s, i, ids.tolist()) for s, i, ids in parts] == [(0, 0, [0, 2]), (2, 0, [0, 3])]
    # The second table is each server's second piece.
    assert [(s, i, ids.tolist()) for s, i, ids in router.split(1, torch.tensor([1]))] == [(1, 1, [0])]


def test_rowwise_adagrad_updates_only_the_rows_a_gradient_names():
    weight = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = RowWiseAdagrad([weight], lr=0.5)
    weight.grad = torch.sparse_coo_tensor([[1, 3]], torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 3.0]]), (4, 3),
                                          check_invariants=True)
    optimizer.step()
    assert weight[0].tolist() == [1.0, 1.0, 1.0] and weight[2].tolist() == [1.0, 1.0, 1.0]
    # Row 1: accumulator mean(4, 4, 4) = 4, step 0.5 * 2 / 2 = 0.5 on each element.
    assert weight[1].tolist() == pytest.approx([0.5, 0.5, 0.5])
    # Row 3: accumulator mean(0, 0, 9) = 3, step 0.5 * 3 / sqrt(3) on the last element only.
    assert weight[3].tolist() == pytest.approx([1.0, 1.0, 1.0 - 0.5 * 3 / 3 ** 0.5])
    assert optimizer.state[weight]["sum"].tolist() == pytest.approx([0.0, 4.0, 0.0, 3.0])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_dlrm_preset_learns_its_synthetic_clicks_in_one_process():
    torch.set_num_threads(2)
    cfg = compose(["experiment=dlrm_synthetic"])
    _, metrics = train_clicks_locally(cfg, batch_size=2 * cfg.trainer.batch_size)
    assert metrics["val/auc"] >= 0.75, metrics


def test_saved_row_ranges_join_into_the_tensor_they_tile_and_are_found_by_overlap():
    from rpc_train.checkpoint.pieces import joined_shapes, overlaps, piece_key

    shapes = {piece_key("t.weight", 0, 3): [3, 4], piece_key("t.weight", 3, 10): [7, 4], "top.bias": [1],
              piece_key("gap.weight", 0, 2): [2, 4], piece_key("gap.weight", 5, 8): [3, 4]}
    assert joined_shapes(shapes) == {"t.weight": [10, 4], "top.bias": [1], "gap.weight": [-1, 4]}
    index = {piece_key("t.weight", 0, 3): "server0.pt", piece_key("t.weight", 3, 10): "server1.pt", "top.bias": "dense.pt"}
    assert overlaps(index, "t.weight", 2, 5) == [("t.weight@0:3", 0, 3, "server0.pt"), ("t.weight@3:10", 3, 10, "server1.pt")]
    assert overlaps(index, "t.weight", 3, 4) == [("t.weight@3:10", 3, 10, "server1.pt")]


def test_device_cuda_needs_a_gpu_per_trainer_on_each_machine():
    from rpc_train.hybrid.group import check_gpus

    check_gpus("cpu", first_trainer=2, rank=0, world_size=4, local_size=4)  # no GPU needed
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs enough for two trainers")
    with pytest.raises(ConfigError, match=r"runs 2 trainers on this machine but it has \d GPU\(s\), and NCCL"):
        check_gpus("cuda", first_trainer=2, rank=0, world_size=4, local_size=4)


class _FailingTrainer:
    """An RRef-like trainer whose run_epoch answers with `error`, as a remote call re-raises it."""

    def __init__(self, error: Exception):
        self.error = error

    def rpc_async(self, timeout=None):
        return self

    def run_epoch(self, steps, epoch):
        future = torch.futures.Future()
        future.set_exception(self.error)
        return future


@pytest.mark.parametrize("error", [FloatingPointError("non-finite loss (nan) at step 4 of hybrid trainer 0"),
                                   ValueError("bad value")], ids=["FloatingPointError", "ValueError"])
def test_the_watch_turns_any_trainer_error_into_one_line_naming_the_trainer(error):
    # rpc_async hands a remote error back as a RuntimeError naming the original type, but a
    # future may fail with any type (rpc_sync re-raises the original): none escapes as a traceback.
    from types import SimpleNamespace

    from rpc_train.config.errors import RunFailure
    from rpc_train.hybrid.watch import run_trainers

    job = SimpleNamespace(trainers=[_FailingTrainer(error)], roles=SimpleNamespace(trainers=["worker2"]))
    with pytest.raises(RunFailure) as failed:
        run_trainers(job, steps=5, rpc_timeout_s=5)
    assert str(failed.value) == f"worker2 (hybrid trainer 0) failed: {error}"


def test_a_non_finite_loss_names_the_gradient_that_last_changed_its_parameters():
    from rpc_train.hybrid.trainer import last_update

    # Async: the stalest update among the servers the step looked rows up on.
    made_by = {0: (1, 2), 1: (0, 3), 2: (1, 5)}
    assert last_update(made_by, {0, 1}, 7) == (", on rows last updated by trainer 0's gradient of staleness 3 "
                                               "(embedding server 1)")
    # Sync (every update an average, trainer None), or no row update yet.
    assert last_update({0: (None, 0)}, {0}, 3) == ", on parameters last updated by step 3's gradient (every trainer's, averaged)"
    assert last_update({0: None}, {0}, 0) == ""
