"""The data layer against real file formats (written tiny in tmp_path) and the real conf/data."""

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from helpers.launching import REPO
from helpers.datasets import cifar10_md5s, tiny_cifar10_class, write_cifar10, write_mnist
from rpc_train.config.schema import DataConf
from rpc_train.data.datasets import CHANNEL_STATS, load_datasets, make_loaders, normalise, read_torchvision
from rpc_train.data.files import CLICK_DATASETS, DATASETS, check_available
from rpc_train.config.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

CONF_DATA = REPO / "conf" / "data"
MNIST_FAMILY = [("mnist", "MNIST", 0.13), ("fashion_mnist", "FashionMNIST", 0.29)]


def data_conf(file: str, **overrides):
    """conf/data/<file>.yaml merged into the schema, as Hydra composes it, plus overrides."""
    schema = OmegaConf.structured(DataConf)
    return OmegaConf.merge(schema, OmegaConf.load(CONF_DATA / f"{file}.yaml"), overrides)


def unnormalise(name: str, inputs: torch.Tensor) -> torch.Tensor:
    """Back to the uint8 pixels that were written (inverse of rpc_train.data.datasets.normalise)."""
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in CHANNEL_STATS[name])
    return ((inputs * std + mean) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", DATASETS)
def test_yaml_merges_into_schema(name):
    conf = data_conf(name)
    assert conf.name == name
    if name in CLICK_DATASETS:  # dense features, click or not, a table per categorical feature
        assert len(conf.shape) == 1 and conf.num_classes == 2 and len(conf.table_rows) >= 1
    elif name == "text":  # bytes: a window of model.context, one class per byte value
        assert OmegaConf.to_container(conf)["shape"] == ["${model.context}"] and conf.num_classes == 256
    else:
        assert len(conf.shape) == 3 and conf.num_classes == 10


@pytest.mark.parametrize("name, class_name, ink", MNIST_FAMILY)
def test_mnist_family_round_trip(tmp_path, name, class_name, ink):
    images, labels = write_mnist(str(tmp_path), class_name, n_train=20, ink=ink)
    train, val = load_datasets(data_conf(name, root=str(tmp_path)), seed=0)

    assert (len(train), len(val)) == (18, 2)  # val_fraction 0.1 of the 20 training images
    for inputs, targets in (train.tensors, val.tensors):
        assert inputs.dtype == torch.float32 and inputs.shape[1:] == (1, 28, 28)
        assert targets.dtype == torch.int64
    # Every written (image, label) pair comes back once, in one of the two splits.
    written = {img.tobytes(): int(lbl) for img, lbl in zip(images, labels)}
    inputs = torch.cat([train.tensors[0], val.tensors[0]])
    targets = torch.cat([train.tensors[1], val.tensors[1]])
    loaded = {img.numpy().tobytes(): int(t) for img, t in zip(unnormalise(name, inputs)[:, 0], targets)}
    assert loaded == written
    assert abs(inputs.mean().item()) < 0.2  # images drawn with the dataset's own mean


def test_mnist_gz_only_asks_to_gunzip(tmp_path):
    write_mnist(str(tmp_path))
    raw = tmp_path / "MNIST" / "raw"
    for f in raw.iterdir():
        f.rename(f.with_name(f.name + ".gz"))  # a name is all check_available looks at
    with pytest.raises(ConfigError, match="gunzip"):
        check_available(data_conf("mnist", root=str(tmp_path)))


def test_mnist_legacy_processed_files_count(tmp_path):
    # torchvision 0.29 still loads MNIST/processed/{training,test}.pt instead of raw files.
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for f in ("training.pt", "test.pt"):
        (processed / f).write_bytes(b"")
    check_available(data_conf("mnist", root=str(tmp_path)))


@pytest.mark.parametrize("name, folder", [
    ("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py"),
])
def test_missing_files_give_one_line_error(tmp_path, monkeypatch, name, folder):
    monkeypatch.setenv("HOME", str(tmp_path))  # so "~" is tmp_path, checking expansion
    conf = data_conf(name, root="~/data")
    for call in (lambda: check_available(conf), lambda: load_datasets(conf, seed=0)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert str(tmp_path / "data" / folder) in message
        assert "data.download=true" in message and "\n" not in message


def test_some_files_missing_are_named(tmp_path):
    write_mnist(str(tmp_path))
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="missing t10k-labels-idx1-ubyte under"):
        check_available(data_conf("mnist", root=str(tmp_path)))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="digits, mnist, fashion_mnist, cifar10, synthetic"):
        check_available(data_conf("digits", name="imagenet"))


def test_cifar10_layout_through_torchvision(tmp_path):
    # torchvision md5-checks every CIFAR file against the official release, with or without
    # download, so no tiny file passes CIFAR10 itself. A subclass expecting the tiny files'
    # md5s runs torchvision's real reading and integrity check without patching anything.
    images, labels = write_cifar10(str(tmp_path), per_batch=4)
    check_available(data_conf("cifar10", root=str(tmp_path)))
    inputs, targets = read_torchvision(tiny_cifar10_class(str(tmp_path)), str(tmp_path), download=False)
    assert inputs.dtype == torch.uint8 and inputs.shape == (20, 3, 32, 32)
    assert torch.equal(inputs, torch.from_numpy(images))  # rows are R, G, B planes -> [C, H, W]
    assert torch.equal(targets, torch.from_numpy(labels))


def test_cifar10_failed_md5_is_config_error(tmp_path):
    # The same tiny files through the real CIFAR10 class: their md5s are not the official ones.
    write_cifar10(str(tmp_path))
    assert len(cifar10_md5s(str(tmp_path))) == 7
    with pytest.raises(ConfigError, match="corrupted.*data.download=true") as err:
        load_datasets(data_conf("cifar10", root=str(tmp_path)), seed=0)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_cifar10_normalisation_is_per_channel():
    mean, _ = CHANNEL_STATS["cifar10"]
    pixels = torch.tensor(mean).mul(255).round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert normalise("cifar10", pixels).abs().max() < 0.01


def test_digits_split_is_seeded():
    conf = data_conf("digits")
    train, val = load_datasets(conf, seed=0)
    assert (len(train), len(val)) == (1617, 180)  # 1797 samples, val_fraction 0.1
    assert train.tensors[0].shape[1:] == (1, 8, 8) and abs(train.tensors[0].mean().item()) < 0.1
    again, _ = load_datasets(conf, seed=0)
    other, _ = load_datasets(conf, seed=1)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert not torch.equal(train.tensors[0], other.tensors[0])


def test_loaders_repeat_batch_order_for_a_seed():
    conf = data_conf("digits", limit=100)
    first_labels = [torch.cat([y for _, y in make_loaders(conf, 32, seed)[0]]) for seed in (0, 0, 1)]
    assert len(first_labels[0]) == 96  # drop_last: three full batches of 32 out of 100
    assert torch.equal(first_labels[0], first_labels[1])
    assert not torch.equal(first_labels[0], first_labels[2])
    _, val_loader = make_loaders(conf, 32, seed=0)
    assert sum(len(y) for _, y in val_loader) == 180  # validation keeps every sample


def test_limit_keeps_first_training_samples():
    full, full_val = load_datasets(data_conf("digits"), seed=0)
    limited, limited_val = load_datasets(data_conf("digits", limit=50), seed=0)
    assert len(limited) == 50
    assert torch.equal(limited.tensors[0], full.tensors[0][:50])
    assert torch.equal(limited_val.tensors[1], full_val.tensors[1])


def test_batch_larger_than_training_set_is_config_error():
    with pytest.raises(ConfigError, match=r"trainer.batch_size=64 .* 20 training samples"):
        make_loaders(data_conf("digits", limit=20), batch_size=64, seed=0)


def test_shape_override_that_does_not_match_is_config_error():
    with pytest.raises(ConfigError, match=r"data.shape=\[1, 28, 28\]"):
        load_datasets(data_conf("digits", shape=[1, 28, 28]), seed=0)


def test_split_is_the_same_in_another_process():
    # The pipeline driver and a reference run are different processes; nothing may depend on
    # process state such as the global RNG or hash seeds.
    code = (
        "from omegaconf import OmegaConf; from rpc_train.config.schema import DataConf; "
        "from rpc_train.data.datasets import make_loaders; "
        "conf = OmegaConf.merge(OmegaConf.structured(DataConf), "
        "dict(name='synthetic', shape=[1, 4, 4], num_classes=3, size=64)); "
        "print([y.tolist() for _, y in make_loaders(conf, 8, seed=5)[0]])"
    )
    root = str(REPO)
    env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    conf = data_conf("synthetic", shape=[1, 4, 4], num_classes=3, size=64)
    assert out.stdout.strip() == str([y.tolist() for _, y in make_loaders(conf, 8, seed=5)[0]])


def test_synthetic_labels_are_learnable():
    conf = data_conf("synthetic", size=512)
    train, val = load_datasets(conf, seed=0)
    assert (len(train), len(val)) == (461, 51)
    assert train.tensors[0].shape[1:] == (3, 32, 32) and train.tensors[1].max() < 10
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 32 * 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, labels = train.tensors[0].flatten(1), train.tensors[1]
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
