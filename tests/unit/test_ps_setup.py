"""mode=parameter_server set-up without processes: trainers' data shards, and the world's split checked."""

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate
from rpc_train.data.datasets import load_datasets, make_loaders, make_trainer_loader

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("trainers", [2, 3])
def test_trainer_shards_are_slices_of_the_single_process_batches(trainers):
    cfg = compose(["experiment=smoke"])
    b = cfg.trainer.batch_size
    reference, _ = make_loaders(cfg.data, trainers * b, cfg.seed)
    train, _ = load_datasets(cfg.data, cfg.seed)
    shards = [make_trainer_loader(train, b, i, trainers, cfg.seed) for i in range(trainers)]
    for _ in range(3):  # epoch after epoch, each loader run to its end as a training loop does
        wholes, parts = list(reference), [list(shard) for shard in shards]
        assert len(wholes) == len(parts[0]) == len(train) // (trainers * b)
        for t, (x, y) in enumerate(wholes):
            assert torch.equal(y, torch.cat([part[t][1] for part in parts]))
            assert torch.equal(x, torch.cat([part[t][0] for part in parts]))


@pytest.mark.parametrize("overrides, world_size, needle", [
    (["ps.servers=3"], 4, "ps.servers=3 leaves no trainer in a world of 4 (NPROC x NNODES): need NPROC >= ps.servers + 2 = 5"),
    (["ps.servers=1"], 2, "ps.servers=1 leaves no trainer in a world of 2"),
    (["ps.servers=0"], 4, "ps.servers=0: must be a positive integer"),
    (["ps.max_staleness=-1"], 4, "ps.max_staleness=-1: must be 0 or more"),
    (["ps.sync=false", "ps.max_staleness=0"], 4, "ps.max_staleness=0 with ps.sync=false"),
    (["trainer.skip_nonfinite=true"], 4, "trainer.skip_nonfinite=true: mode=parameter_server stops"),
    (["device=cuda"], 4, "device=cuda: mode=parameter_server runs on CPU only"),
])
def test_validate_names_the_bad_split(overrides, world_size, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose(["mode=parameter_server", *overrides]), world_size)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_pipeline_only_settings_do_not_apply_to_the_parameter_server():
    validate(compose(["mode=parameter_server", "pipeline.micro_batches=64",
                             "pipeline.stages=9", "pipeline.balance=fast"]), 4)
