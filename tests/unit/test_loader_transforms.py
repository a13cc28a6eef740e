"""Seeded per-sample augmentation (rpc_train/loader/transforms.py): same inputs, same pixels, in any process."""

import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch

from helpers.launching import REPO
from rpc_train.config.errors import ConfigError
from rpc_train.loader.transforms import (apply_seeded, build_transform, sample_seed, train_augmentation,
                                         val_transform)

pytestmark = pytest.mark.timeout(60)


def image(seed: int = 0, size=(3, 40, 32)) -> torch.Tensor:
    return torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_sample_seed_is_stable_across_calls_and_processes():
    seeds = [sample_seed(7, epoch, key) for epoch in (0, 1) for key in (0, 1, 123456789)]
    assert seeds == [sample_seed(7, epoch, key) for epoch in (0, 1) for key in (0, 1, 123456789)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    # Python's hash() differs per process with PYTHONHASHSEED; the seed must not.
    code = ("from rpc_train.loader.transforms import sample_seed; "
            "print([sample_seed(7, e, k) for e in (0, 1) for k in (0, 1, 123456789)])")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "321"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(seeds)


def test_apply_seeded_is_a_function_of_seed_epoch_and_key():
    transform, x = train_augmentation(16), image()
    first = apply_seeded(transform, x, seed=0, epoch=0, key=5)
    assert first.shape == (3, 16, 16) and first.dtype == torch.float32
    assert torch.equal(first, apply_seeded(transform, x, seed=0, epoch=0, key=5))
    for other in (dict(seed=0, epoch=1, key=5), dict(seed=0, epoch=0, key=6), dict(seed=1, epoch=0, key=5)):
        assert not torch.equal(first, apply_seeded(transform, x, **other)), other


def test_apply_seeded_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    apply_seeded(train_augmentation(16), image(), seed=0, epoch=0, key=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)


def test_apply_seeded_is_deterministic_across_threads():
    # A data worker's RPC threads transform samples at once; each must still get its own seed's crop.
    transform, x = train_augmentation(16), image()
    expected = {k: apply_seeded(transform, x, 0, 0, k) for k in range(32)}
    got, errors = {}, []

    def run(keys):
        try:
            for k in keys:
                got[k] = apply_seeded(transform, x, 0, 0, k)
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(range(i, 32, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(got[k], expected[k]) for k in expected)


def test_no_transform_returns_the_sample():
    x = image()
    assert apply_seeded(None, x, 0, 0, 0) is x


def test_val_transform_is_the_centre_crop_and_has_no_randomness():
    x = image(size=(3, 70, 90))
    out = val_transform(32)(x)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, val_transform(32)(x))


def test_build_transform_builds_a_target_node_that_pickles():
    node = {"_target_": "rpc_train.loader.transforms.train_augmentation", "size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    transform = build_transform(node, "data.train_transform")
    x = image()
    again = pickle.loads(pickle.dumps(transform))  # a DataLoader worker started with spawn gets a copy
    assert torch.equal(apply_seeded(transform, x, 0, 0, 3), apply_seeded(again, x, 0, 0, 3))
    assert build_transform(None, "data.train_transform") is None


@pytest.mark.parametrize("node, needle", [
    ({"_target_": "torchvision.transforms.v2.Nope"},
     "loader.transform: cannot import 'torchvision.transforms.v2.Nope' (module 'torchvision.transforms.v2' has no attribute 'Nope')"),
    ({"_target_": "no_such_package.Crop"}, "loader.transform: cannot import 'no_such_package.Crop' (No module named"),
    # A bad target inside a Compose is named itself, not the Compose around it.
    ({"_target_": "torchvision.transforms.v2.Compose", "transforms": [{"_target_": "torchvision.transforms.v2.Flip"}]},
     "cannot import 'torchvision.transforms.v2.Flip'"),
    ({"_target_": "torchvision.transforms.v2.Resize"}, "loader.transform: cannot build 'torchvision.transforms.v2"),
    ("RandomCrop", "loader.transform=RandomCrop: expected a node with a _target_"),
])
def test_a_transform_that_does_not_build_is_a_one_line_config_error(node, needle):
    with pytest.raises(ConfigError) as err:
        build_transform(node, "loader.transform")
    assert needle in str(err.value) and "\n" not in str(err.value)
