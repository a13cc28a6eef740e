"""mode=predict for real: a trained run's model over every file of an image folder, on the
prediction workers, written as Parquet files that a rerun completes."""

import os

import pytest
import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader
from torchvision.transforms.v2.functional import pil_to_tensor

from helpers.datasets import write_imagefolder
from helpers.launching import launch, ok
from rpc_train.loader.transforms import val_transform
from rpc_train.predict.writer import read_predictions
from rpc_train.serve.source import build_served, served_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DATA = ["data=imagefolder", "data.num_classes=3", "data.image_size=16"]


def expected(run, root):
    """Each file's class probabilities from the model in this process, through torchvision's own ImageFolder."""
    model = build_served(served_model(str(run), None))
    folder = ImageFolder(str(root), loader=lambda path: pil_to_tensor(pil_loader(path)), transform=val_transform(16))
    with torch.no_grad():
        return {path: torch.softmax(model(folder[i][0].unsqueeze(0)), dim=1)[0]
                for i, (path, _) in enumerate(folder.samples)}


def test_every_file_once_as_the_model_predicts_it_and_a_rerun_writes_only_what_is_missing(tmp_path):
    root, out, run = tmp_path / "images", tmp_path / "predictions", tmp_path / "trained"
    write_imagefolder(str(root), classes=3, per_class=12, size=(40, 32))
    ok(launch([*DATA, f"data.root={root}", "trainer.batch_size=8", "trainer.max_steps=4"], run))
    command = ["mode=predict", f"serve.run={run}", *DATA, f"data.root={root}", f"predict.out={out}",
               "predict.split_size=10"]
    result = ok(launch(command, tmp_path / "predict1"))
    assert sorted(os.listdir(out)) == [f"part-0000{k}.parquet" for k in range(4)]  # 36 files in splits of 10
    table = read_predictions(str(out), 4).to_pydict()
    assert table["sample"] == list(range(36))  # every file once, in ImageFolder's order
    want = expected(run, root)
    assert sorted(table["path"]) == sorted(want)
    for path, probabilities, predicted in zip(table["path"], table["probabilities"], table["predicted"]):
        torch.testing.assert_close(torch.tensor(probabilities), want[path], rtol=0, atol=1e-5)
        assert predicted == int(want[path].argmax())
    assert table["label"] == [int(os.path.basename(os.path.dirname(p))[len("class"):]) for p in table["path"]]

    # A crash in the middle: split 2 was being written (its temp file left behind), 3 never started.
    os.remove(out / "part-00002.parquet")
    os.remove(out / "part-00003.parquet")
    (out / ".part-00002.parquet.tmp-99999-dead").write_bytes(b"half a file")
    kept = {name: os.stat(out / name).st_mtime_ns for name in ("part-00000.parquet", "part-00001.parquet")}
    result = ok(launch(command, tmp_path / "predict2"))
    assert "2 to write" in result.stdout + result.stderr and "(2 there already)" in result.stdout + result.stderr
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # the finished splits untouched
    assert sorted(os.listdir(out)) == [f"part-0000{k}.parquet" for k in range(4)]  # no temp file left
    assert read_predictions(str(out), 4).to_pydict()["sample"] == list(range(36))


def test_a_missing_output_directory_setting_is_one_line(tmp_path):
    result = launch(["mode=predict", *DATA, f"data.root={tmp_path}"], tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: predict.out=null: mode=predict needs the directory to write the prediction files to"]
