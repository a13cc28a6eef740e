"""Checkpoint files in one process: atomic writes, checksums, fallback, pruning, by-name state.

The real multi-process save/resume/kill/stall tests are in test_resume.py and test_faults.py.
"""

import copy
import json
import logging
import os
import pickle

import pytest
import torch
from torch import nn

from rpc_train.config.compose import compose
from rpc_train.checkpoint.store import (MANIFEST, Checkpoint, atomic_write, begin, checkpoint_dir,
                                  damage, newest_intact, prune, resolve_resume, save_file, sha256_of, write_manifest)
from rpc_train.checkpoint.manager import check_same_model, check_same_optimizer, model_tensors
from rpc_train.data.datasets import make_loaders
from rpc_train.config.errors import ConfigError
from rpc_train.training.local import LocalEngine
from rpc_train.training.loop import Trainer
from rpc_train.config.validate import validate
from rpc_train.checkpoint.shares import load_worker_state, save_worker_state

pytestmark = pytest.mark.timeout(60)

SMOKE = ["experiment=smoke"]


def fake_checkpoint(root, step, files=("stage0.pt", "trainer.pt"), manifest=True):
    """A checkpoint directory holding small real files and, unless told otherwise, its manifest."""
    directory = checkpoint_dir(str(root), step)
    begin(directory)
    digests = {name: save_file(os.path.join(directory, name), {"step": step, "w": torch.full((4,), step)})
               for name in files}
    if manifest:
        write_manifest(directory, {"step": step, "files": digests, "tensors": {}})
    return directory


def test_atomic_write_leaves_only_the_file(tmp_path):
    path = tmp_path / "x.bin"
    digest = atomic_write(str(path), b"hello")
    assert path.read_bytes() == b"hello" and digest == sha256_of(str(path))
    assert os.listdir(tmp_path) == ["x.bin"]  # no temporary file left behind


def test_a_save_into_an_existing_checkpoint_first_invalidates_it(tmp_path):
    directory = fake_checkpoint(tmp_path, 5)
    begin(directory)  # as a re-save of step 5 starts
    assert not os.path.exists(os.path.join(directory, MANIFEST))
    assert newest_intact(str(tmp_path)) is None  # an interrupted save, not a damaged checkpoint


@pytest.mark.parametrize("spoil, needle", [
    (lambda d: open(os.path.join(d, "stage0.pt"), "r+b").truncate(10), "stage0.pt fails its sha256 check"),
    (lambda d: os.unlink(os.path.join(d, "trainer.pt")), "trainer.pt is missing"),
    (lambda d: open(os.path.join(d, MANIFEST), "w").write("{"), "manifest.json is unreadable"),
])
def test_damage_names_the_bad_file(tmp_path, spoil, needle):
    directory = fake_checkpoint(tmp_path, 3)
    assert damage(directory) is None
    spoil(directory)
    assert needle in damage(directory)


def test_a_flipped_byte_is_caught(tmp_path):
    directory = fake_checkpoint(tmp_path, 3)
    path = os.path.join(directory, "stage0.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert "stage0.pt fails its sha256 check" in damage(directory)


def test_auto_falls_back_past_damaged_and_incomplete_checkpoints(tmp_path, caplog):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, manifest=False)  # a save that was interrupted
    open(os.path.join(newest, "stage0.pt"), "r+b").truncate(7)
    with caplog.at_level(logging.INFO):
        found = resolve_resume("auto", str(tmp_path))
    assert found.step == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_20" in warnings[0] and "stage0.pt fails its sha256 check" in warnings[0]
    assert any("step_30" in r.getMessage() and "interrupted" in r.getMessage() for r in caplog.records)


def test_auto_refuses_to_start_over_when_every_checkpoint_is_damaged(tmp_path):
    directory = fake_checkpoint(tmp_path, 10)
    os.unlink(os.path.join(directory, "stage0.pt"))
    with pytest.raises(ConfigError, match="no intact checkpoint.*checkpoint.resume=none"):
        resolve_resume("auto", str(tmp_path))


def test_resume_paths(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 8)
    assert resolve_resume("none", str(root)) is None
    assert resolve_resume("auto", str(tmp_path / "empty")) is None
    assert resolve_resume(str(root / "step_4"), "unused").step == 4
    assert resolve_resume(str(run), "unused").step == 8  # a run dir: its newest
    open(root / "step_4" / "trainer.pt", "ab").write(b"x")
    with pytest.raises(ConfigError, match="trainer.pt fails its sha256 check"):
        resolve_resume(str(root / "step_4"), "unused")  # asked for by name: no silent fallback
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path), "unused")


def test_prune_keeps_the_newest_and_drops_abandoned_ones(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 3, manifest=False)
    prune(str(tmp_path), keep=2, current_step=6)  # as after resuming from 4 and saving 6 again
    assert sorted(os.listdir(tmp_path)) == ["step_4", "step_6"]


def split_mlp(cfg, bounds):
    """Stand-ins for pipeline stages: the same MLP cut at `bounds`, each with its own optimizer."""
    from rpc_train.training.builders import build_model, build_optimizer

    container = {"_target_": cfg.model._target_, "in_shape": list(cfg.model.in_shape),
                 "num_classes": cfg.model.num_classes, "hidden": list(cfg.model.hidden)}
    full = build_model(container, 0)
    parts = []
    for start, stop in bounds:
        module = nn.Sequential(*[full[i] for i in range(start, stop)])
        names = [f"{start + int(n.split('.', 1)[0])}.{n.split('.', 1)[1]}" for n, _ in module.named_parameters()]
        optimizer, scheduler = build_optimizer(module.parameters(), {"_target_": "torch.optim.Adam", "_partial_": True,
                                                                      "lr": 0.01}, {
            "_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2, "gamma": 0.5})
        parts.append((start, module, names, optimizer, scheduler))
    return full, parts


def test_optimizer_state_moves_between_layouts_by_name(tmp_path):
    cfg = compose(SMOKE)
    full, two = split_mlp(cfg, [(0, 3), (3, 5)])
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        nn.functional.cross_entropy(full(x), y).backward()
        for *_, optimizer, scheduler in two:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    records = [save_worker_state(str(tmp_path), f"stage{i}.pt",
                                 {f"{start + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": v
                                  for k, v in module.state_dict().items()},
                                 optimizer, names, scheduler, ["layers", start])
               for i, (start, module, names, optimizer, scheduler) in enumerate(two)]
    index = {name: r["file"] for r in records for name in r["tensors"]}
    _, three = split_mlp(cfg, [(0, 2), (2, 3), (3, 5)])
    for start, module, names, optimizer, scheduler in three:
        local = {f"{start + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": k for k in module.state_dict()}
        tensors = load_worker_state(str(tmp_path), index, local, optimizer, names, scheduler, ["layers", start])
        module.load_state_dict({local[n]: t for n, t in tensors.items()})
    saved = {n: s for _, _, names, opt, _ in two for n, s in zip(names, opt.state_dict()["state"].values())}
    for _, module, names, optimizer, scheduler in three:
        state = optimizer.state_dict()
        assert len(state["state"]) == len(names)
        for i, name in enumerate(names):
            for key, value in saved[name].items():
                assert torch.equal(state["state"][i][key], value), (name, key)
        assert state["param_groups"][0]["lr"] == two[0][3].param_groups[0]["lr"] == 0.005  # StepLR halved it
        assert scheduler.state_dict()["last_epoch"] == 3


def test_loading_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # A well-formed checkpoint whose manifest vouches for a hostile file: the checksum passes,
    # weights_only loading must still refuse it.
    directory = str(tmp_path / "step_1")
    os.makedirs(directory)
    digest = atomic_write(os.path.join(directory, "stage0.pt"), pickle.dumps({"tensors": Payload()}, protocol=2))
    write_manifest(directory, {"step": 1, "files": {"stage0.pt": digest}, "tensors": {"0.w": {"file": "stage0.pt"}}})
    assert damage(directory) is None
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(pickle.UnpicklingError):
        load_worker_state(directory, {"0.w": "stage0.pt"}, ["0.w"], optimizer, ["0.w"], None, None)
    assert not marker.exists()


def test_a_different_model_is_a_one_line_error_listing_the_differences():
    cfg = compose(SMOKE)
    saved = {n: {"file": "stage0.pt", "shape": s} for n, s in model_tensors(cfg.model).items()}
    other = compose(SMOKE + ["model.hidden=[256,128]"])
    with pytest.raises(ConfigError) as err:
        check_same_model(Checkpoint("ckpt", 1, {"tensors": saved}), other.model)
    message = str(err.value)
    assert "\n" not in message
    assert "missing 2: 3.bias, 3.weight" in message
    assert "unexpected 4: 3.0.bias, 3.0.weight, 4.bias, 4.weight" in message
    assert "2.0.weight [256, 256] vs [128, 256]" in message
    check_same_model(Checkpoint("ckpt", 1, {"tensors": saved}), cfg.model)  # the same model passes


def test_another_optimizer_class_is_a_clear_error():
    saved = Checkpoint("ckpt", 1, {"config": {"optim": {"_target_": "torch.optim.SGD"}}})
    check_same_optimizer(saved, compose(SMOKE).optim)
    with pytest.raises(ConfigError, match="holds torch.optim.SGD state but optim is torch.optim.Adam"):
        check_same_optimizer(saved, compose(SMOKE + ["optim=adam"]).optim)


def test_model_tensors_leave_the_rng_alone():
    cfg = compose(SMOKE)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    model_tensors(cfg.model)
    assert torch.equal(torch.get_rng_state(), before)


class Snapshot:
    """A Trainer hook that copies everything a checkpoint holds at one step, in memory."""

    def __init__(self, engine, step):
        self.engine, self.step, self.trainer, self.saved = engine, step, None, None

    def __call__(self, step, result):
        if step == self.step:
            self.saved = copy.deepcopy((self.trainer.position, self.engine.model.state_dict(),
                                        self.engine.optimizer.state_dict()))


def _train_and_resume(stop_at: int):
    """Train 40 steps (two epochs of 20) while snapshotting what a checkpoint at `stop_at`
    holds, then resume a fresh engine from it; (the full run's engine, the resumed engine,
    the resumed Trainer's final metrics)."""
    cfg = compose(SMOKE + ["trainer.max_steps=40", "trainer.log_every=100"])

    def engine_and_loaders():
        torch.manual_seed(cfg.seed)
        return (LocalEngine(cfg), *make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed))

    engine, train_loader, val_loader = engine_and_loaders()
    snapshot = Snapshot(engine, stop_at)
    trainer = Trainer(engine, train_loader, val_loader, cfg.trainer, hooks=[snapshot])
    snapshot.trainer = trainer
    trainer.fit()
    position, model_state, optim_state = snapshot.saved

    resumed, train_loader, val_loader = engine_and_loaders()
    resumed.model.load_state_dict(model_state)
    resumed.optimizer.load_state_dict(optim_state)
    final = Trainer(resumed, train_loader, val_loader, cfg.trainer, start=position).fit()
    return engine, resumed, final


@pytest.mark.parametrize("stop_at", [7, 20, 33])  # mid-epoch, at an epoch's end (20 batches), in epoch 2
def test_a_trainer_started_from_a_position_sees_the_same_batches(stop_at):
    engine, resumed, _ = _train_and_resume(stop_at)
    for name, value in engine.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize("stop_at, validated", [(20, ["epoch 2 step 40"]), (40, [])])
def test_a_run_resumed_at_an_epochs_end_does_not_validate_that_epoch_again(caplog, stop_at, validated):
    """The epoch's validation runs before the step's hooks, so a checkpoint there holds it done."""
    with caplog.at_level(logging.INFO, logger="rpc_train.training.loop"):
        _, _, final = _train_and_resume(stop_at)
    lines = [r.getMessage().split(":")[0] for r in caplog.records if "val loss" in r.getMessage()]
    assert lines == ["epoch 1 step 20", "epoch 2 step 40"] + validated
    assert "val/loss" in final  # resumed at the run's end: the final metrics still have it


@pytest.mark.parametrize("override, needle", [
    ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1"),
    ("checkpoint.keep=0", "checkpoint.keep=0"),
    ("checkpoint.resume=/nonexistent/run", "checkpoint.resume=/nonexistent/run: no such directory"),
])
def test_bad_checkpoint_settings_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose([override]), 3)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_manifest_is_json_with_a_checksum_per_file(tmp_path):
    directory = fake_checkpoint(tmp_path, 1)
    manifest = json.loads(open(os.path.join(directory, MANIFEST)).read())
    assert manifest["format"] == 1 and manifest["step"] == 1
    assert {name: sha256_of(os.path.join(directory, name)) for name in manifest["files"]} == manifest["files"]
    assert newest_intact(str(tmp_path)).step == 1
