"""Sample ids -> batches (rpc_train/loader/maker.py) on real image files and the real datasets."""

import pytest
import torch
from torch.utils.data import DataLoader

from helpers.datasets import write_corrupt_image, write_imagefolder
from rpc_train.config.compose import compose
from rpc_train.data.datasets import load_datasets
from rpc_train.data.imagefolder import scan
from rpc_train.loader.maker import BatchMaker, SampleDataset
from rpc_train.loader.sources import ImageFolderSource, SampleError, build_sources
from rpc_train.loader.transforms import train_augmentation

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def folder_data(tmp_path):
    """The composed data config reading 3 classes x 4 PNG and JPEG files (val_fraction 0.25)."""
    write_imagefolder(str(tmp_path), classes=3, per_class=4, fmt="mixed")
    return compose(["data=imagefolder", f"data.root={tmp_path}", "data.num_classes=3", "data.val_fraction=0.25"]).data


def test_without_transform_a_batch_is_todays_rows():
    data = compose(["data=digits", "data.limit=50"]).data
    train, _ = build_sources(data, seed=0)
    expected, _ = load_datasets(data, seed=0)
    ids = [7, 0, 49, 3]
    batch, decoded = BatchMaker(train, None, seed=0).make(ids, epoch=0)
    assert torch.equal(batch.x, expected.tensors[0][ids]) and torch.equal(batch.y, expected.tensors[1][ids])
    assert batch.ids.tolist() == ids and batch.ids.dtype == batch.y.dtype == torch.int64
    assert sorted(decoded) == sorted(ids) and batch.skipped == []


def test_batches_are_the_same_with_or_without_decoded_samples(folder_data):
    train, _ = build_sources(folder_data, seed=0)
    maker = BatchMaker(train, train_augmentation(16), seed=5)
    ids = [8, 2, 5, 0]
    batch, decoded = maker.make(ids, epoch=2)
    assert batch.x.shape == (4, 3, 16, 16) and batch.ids.tolist() == ids
    assert batch.y.tolist() == [train.label(i) for i in ids]
    cached = {i: decoded[i] for i in (2, 0)}
    again, decoded_again = maker.make(ids, epoch=2, raws=cached)
    assert torch.equal(again.x, batch.x) and torch.equal(again.y, batch.y)
    assert sorted(decoded_again) == [5, 8]  # only what it had to decode itself
    assert not torch.equal(maker.make(ids, epoch=3)[0].x, batch.x)  # a new epoch, new crops


def test_skip_leaves_a_corrupt_file_out_and_names_it(tmp_path):
    write_imagefolder(str(tmp_path), classes=2, per_class=3, fmt="PNG")
    corrupt = write_corrupt_image(str(tmp_path / "class1"))
    _, samples = scan(str(tmp_path))
    assert samples[3] == (corrupt, 1)  # class1/corrupt.jpg sorts before class1/img000.png
    with_corrupt = ImageFolderSource("imagefolder train", samples)
    maker = BatchMaker(with_corrupt, train_augmentation(16), seed=0, on_error="skip")
    ids = list(range(7))
    batch, decoded = maker.make(ids, epoch=1)
    assert batch.ids.tolist() == [0, 1, 2, 4, 5, 6] and 3 not in decoded
    assert len(batch.skipped) == 1 and batch.skipped[0] == f"{corrupt}: cannot identify image file"
    # The other samples are exactly what they are without the bad file among them (seeded by their own ids).
    for row, i in enumerate(batch.ids.tolist()):
        alone, _ = maker.make([i], epoch=1)
        assert torch.equal(batch.x[row], alone.x[0])
    again, decoded_again = maker.make(ids, epoch=1, raws=decoded)
    assert decoded_again == {} and again.skipped == batch.skipped and torch.equal(again.x, batch.x)
    with pytest.raises(SampleError, match="no sample decoded; first: .*corrupt.jpg"):
        maker.make([3], epoch=1)
    with pytest.raises(SampleError, match="corrupt.jpg: cannot identify image file$"):
        BatchMaker(with_corrupt, None, seed=0).make(ids, epoch=1)  # on_error="raise"


def test_on_error_must_be_raise_or_skip(folder_data):
    train, _ = build_sources(folder_data, seed=0)
    with pytest.raises(ValueError, match="on_error='ignore': expected one of raise, skip"):
        BatchMaker(train, None, seed=0, on_error="ignore")


def test_a_torch_dataloader_over_sample_dataset_matches_the_batch_maker(folder_data):
    # The benchmark's peer: DataLoader worker processes must augment exactly as the maker does.
    train, _ = build_sources(folder_data, seed=0)
    transform = train_augmentation(16)
    dataset = SampleDataset(train, transform, seed=5)
    dataset.epoch = 2
    xs, ys = zip(*DataLoader(dataset, batch_size=4, num_workers=2))
    expected, _ = BatchMaker(train, transform, seed=5).make(range(len(train)), epoch=2)
    assert torch.equal(torch.cat(xs), expected.x) and torch.equal(torch.cat(ys), expected.y)
