"""data=imagefolder on real image files in ImageFolder layout (written tiny in tmp_path), composed from conf/."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.datasets import write_corrupt_image, write_imagefolder
from helpers.launching import REPO
from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.data.datasets import load_datasets, split_indices
from rpc_train.data.files import IMAGE_EXTENSIONS, check_available
from rpc_train.data.imagefolder import load_imagefolder, read_rgb, scan
from rpc_train.loader.transforms import build_transform
from rpc_train.preflight import check

pytestmark = pytest.mark.timeout(60)


def imagefolder(root, *overrides):
    """The data config a launch with data=imagefolder composes (3 classes, as write_imagefolder's default)."""
    return compose(["data=imagefolder", f"data.root={root}", "data.num_classes=3", *overrides]).data


def test_scan_lists_the_files_as_torchvisions_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    write_imagefolder(str(tmp_path), classes=3, per_class=4, fmt="mixed")
    (tmp_path / "class1" / "notes.txt").write_text("not an image: left out")
    classes, samples = scan(str(tmp_path))
    reference = ImageFolder(str(tmp_path))
    assert classes == reference.classes == ["class0", "class1", "class2"]
    assert samples == reference.samples and len(samples) == 12
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS  # the preflight's stdlib copy has not drifted


def test_split_is_seeded_and_limit_keeps_the_first_training_files(tmp_path):
    write_imagefolder(str(tmp_path), classes=3, per_class=4)
    _, samples = scan(str(tmp_path))
    train, val = load_imagefolder(imagefolder(tmp_path, "data.val_fraction=0.25"), seed=3)
    train_idx, val_idx = split_indices(12, 0.25, seed=3)
    assert train == [samples[i] for i in train_idx] and val == [samples[i] for i in val_idx]
    assert (len(train), len(val)) == (9, 3) and sorted(train + val) == samples
    other, _ = load_imagefolder(imagefolder(tmp_path, "data.val_fraction=0.25"), seed=4)
    assert other != train
    limited, limited_val = load_imagefolder(imagefolder(tmp_path, "data.val_fraction=0.25", "data.limit=4"), seed=3)
    assert limited == train[:4] and limited_val == val


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_lossless_files_decode_to_the_pixels_written(tmp_path, fmt):
    written = write_imagefolder(str(tmp_path), classes=1, per_class=2, size=(40, 32), fmt=fmt)
    for path, (_, pixels) in written.items():
        image = read_rgb(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 40)
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(pixels))


def test_jpeg_and_grey_png_decode_to_rgb(tmp_path):
    from PIL import Image

    written = write_imagefolder(str(tmp_path), classes=1, per_class=1, size=(40, 32), fmt="JPEG")
    (path, (_, pixels)), = written.items()
    image = read_rgb(path)
    assert image.shape == (3, 32, 40) and image.dtype == torch.uint8
    # Lossy, but the same picture: seeded noise compresses worst, so compare the means.
    assert abs(image.float().mean() - float(pixels.mean())) < 2.0
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 6), 77, dtype=np.uint8)).save(grey)
    assert torch.equal(read_rgb(str(grey)), torch.full((3, 8, 6), 77, dtype=torch.uint8))


def one_line_error(call) -> str:
    with pytest.raises(ConfigError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_missing_root_is_named(tmp_path):
    message = one_line_error(lambda: check_available(imagefolder(tmp_path / "nowhere")))
    assert f"no folder {tmp_path / 'nowhere'} (data.root={tmp_path / 'nowhere'})" in message
    assert "one sub-folder of images per class" in message


def test_a_root_without_class_folders_is_named(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"")  # images straight in root are not ImageFolder's layout
    message = one_line_error(lambda: check_available(imagefolder(tmp_path)))
    assert f"no class folders in {tmp_path}" in message and "<root>/<class>/<image>" in message


def test_a_class_folder_without_images_is_named_with_the_extensions(tmp_path):
    write_imagefolder(str(tmp_path), classes=2)
    (tmp_path / "class2").mkdir()
    (tmp_path / "class2" / "readme.txt").write_text("no images here")
    message = one_line_error(lambda: check_available(imagefolder(tmp_path)))
    assert f"class folder {tmp_path / 'class2'} holds no image" in message
    assert ".jpg, .jpeg, .png" in message


def test_images_in_nested_folders_count(tmp_path):
    # make_dataset walks each class folder recursively; the check must accept what it accepts.
    write_imagefolder(str(tmp_path / "nested"), classes=1, per_class=1)
    os.makedirs(tmp_path / "root" / "class0")
    os.rename(tmp_path / "nested" / "class0", tmp_path / "root" / "class0" / "deeper")
    for name in ("class1", "class2"):
        write_imagefolder(str(tmp_path / "root" / name / "x"), classes=1, per_class=1)
    check_available(imagefolder(tmp_path / "root"))


def test_num_classes_that_does_not_match_gives_the_count(tmp_path):
    write_imagefolder(str(tmp_path), classes=3)
    message = one_line_error(lambda: check_available(imagefolder(tmp_path, "data.num_classes=10")))
    assert message == (f"data.num_classes=10 does not match the 3 class folders in {tmp_path}; "
                       "set data.num_classes=3")


def test_shape_must_follow_image_size(tmp_path):
    write_imagefolder(str(tmp_path), classes=3)
    check_available(imagefolder(tmp_path, "data.image_size=32"))  # shape follows by interpolation
    message = one_line_error(lambda: check_available(imagefolder(tmp_path, "data.shape=[3,64,64]", "data.image_size=32")))
    assert "data.shape=[3, 64, 64] does not match data.image_size=32" in message and "[3,32,32]" in message


def test_load_datasets_points_to_the_data_service(tmp_path):
    write_imagefolder(str(tmp_path), classes=3)
    message = one_line_error(lambda: load_datasets(imagefolder(tmp_path), seed=0))
    assert "data=imagefolder" in message and "rpc_train/loader" in message


def test_the_config_builds_both_transforms_to_image_size(tmp_path):
    write_imagefolder(str(tmp_path), classes=3)
    data = imagefolder(tmp_path, "data.image_size=24")
    assert list(data.shape) == [3, 24, 24]
    image = read_rgb(next(iter(scan(str(tmp_path))[1]))[0])
    for key in ("train_transform", "val_transform"):
        out = build_transform(data[key], f"data.{key}")(image)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    check(["data=imagefolder", f"data.root={tmp_path}", "data.num_classes=3"], world_size=3)  # the launcher's check


@pytest.mark.parametrize("override, setting", [
    ("data.val_transform._target_=torchvision.transforms.v2.Nope", "loader.val_transform"),  # the data set's default
    ("+loader.transform={_target_:torchvision.transforms.v2.Nope}", "loader.transform"),  # the loader's own
])
def test_the_launchers_check_names_a_transform_that_does_not_import(tmp_path, override, setting):
    write_imagefolder(str(tmp_path), classes=3)
    message = one_line_error(lambda: check(["data=imagefolder", f"data.root={tmp_path}", "data.num_classes=3",
                                            override], 3))
    assert message.startswith(f"{setting}: cannot import 'torchvision.transforms.v2.Nope'")


@pytest.mark.parametrize("case", ["missing root", "empty class"])
def test_preflight_exits_2_with_one_line(tmp_path, case):
    if case == "empty class":
        write_imagefolder(str(tmp_path), classes=2)
        (tmp_path / "class2").mkdir()
        root, needle = tmp_path, f"class folder {tmp_path / 'class2'} holds no image"
    else:
        root, needle = tmp_path / "missing", f"no folder {tmp_path / 'missing'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "rpc_train.preflight", "data=imagefolder", f"data.root={root}",
                             "data.num_classes=3"], env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: data=imagefolder: ")
    assert needle in result.stderr


def test_a_corrupt_file_fails_to_decode_with_a_reason(tmp_path):
    path = write_corrupt_image(str(tmp_path / "class0"))
    with pytest.raises(OSError, match="cannot identify image file"):
        read_rgb(path)
