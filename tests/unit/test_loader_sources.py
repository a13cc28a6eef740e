"""Where samples come from (rpc_train/loader/sources.py): the in-memory datasets' rows and real image files."""

import pickle

import pytest
import torch

from helpers.datasets import write_corrupt_image, write_imagefolder
from rpc_train.config.compose import compose
from rpc_train.data.clicks import load_clicks
from rpc_train.data.datasets import load_datasets
from rpc_train.loader.sources import ImageFolderSource, SampleError, TensorSource, build_sources

pytestmark = pytest.mark.timeout(60)


def test_tensor_source_gives_todays_rows():
    data = compose(["data=digits", "data.limit=50"]).data
    train, val = build_sources(data, seed=0)
    expected, expected_val = load_datasets(data, seed=0)
    assert (train.name, val.name) == ("digits train", "digits val") and isinstance(train, TensorSource)
    assert (len(train), len(val)) == (50, 180) and train.describe(12) == "digits train[12]"
    for source, dataset in ((train, expected), (val, expected_val)):
        for i in (0, 5, len(source) - 1):
            assert torch.equal(source.decode(i), dataset.tensors[0][i]) and source.label(i) == int(dataset.tensors[1][i])


def test_click_data_samples_are_dense_and_sparse_rows_with_float_labels():
    data = compose(["experiment=dlrm_synthetic", "data.size=200"]).data
    train, val = build_sources(data, seed=0)
    want, _ = load_clicks(data, seed=0)
    assert len(train) == len(want) and len(val) == 200 - len(want)
    dense, sparse = train.decode(7)
    assert torch.equal(dense, want.tensors[0][7]) and torch.equal(sparse, want.tensors[1][7])
    assert train.label(7) == float(want.tensors[2][7])


def test_imagefolder_sources_follow_the_split(tmp_path):
    write_imagefolder(str(tmp_path), classes=3, per_class=4, fmt="mixed")
    data = compose(["data=imagefolder", f"data.root={tmp_path}", "data.num_classes=3", "data.val_fraction=0.25"]).data
    train, val = build_sources(data, seed=0)
    assert (train.name, val.name, len(train), len(val)) == ("imagefolder train", "imagefolder val", 9, 3)
    for source in (train, val):
        for i in range(len(source)):
            path = source.describe(i)
            assert path.startswith(str(tmp_path)) and f"class{source.label(i)}" in path
    image = train.decode(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 40)
    # Built from the config on each worker, but a source must pickle (a spawned DataLoader worker copies it).
    again = pickle.loads(pickle.dumps(train))
    assert torch.equal(again.decode(0), image)


def test_a_corrupt_file_is_a_one_line_sample_error_naming_it(tmp_path):
    path = write_corrupt_image(str(tmp_path))
    source = ImageFolderSource("imagefolder train", [(path, 0)])
    with pytest.raises(SampleError) as err:
        source.decode(0)
    message = str(err.value)
    assert message == f"{path}: cannot identify image file"
    assert str(pickle.loads(pickle.dumps(err.value))) == message  # as it comes back over RPC
