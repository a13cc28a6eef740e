"""The driver's side of checkpoints: resume where a run stopped, save every N steps and at the end.

Save: every worker writes its own share at once (`engine.save_checkpoint`), then the driver
writes trainer.pt (loop position, RNG state), then the manifest, last (checkpoint/store.py);
then old checkpoints are pruned. Resume: pick the checkpoint (`checkpoint.resume`), check that
it holds this model, load every worker's share by name, restore the driver's RNG, and hand the
Trainer its position so the data order continues exactly.

An engine takes part as a `Checkpointable` (training/protocol.py): the pipeline's stages,
the parameter-server shards (ps/driver.py), the hybrid mode's embedding shards and dense part
(hybrid/driver.py) and the single-process reference.
"""

import logging
import os
from dataclasses import fields
from typing import Dict, List, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rpc_train.checkpoint.pieces import joined_shapes
from rpc_train.checkpoint.store import (Checkpoint, begin, checkpoint_dir, checkpoints_root, load_file, name_list,
                                  prune, resolve_resume, save_file, write_manifest)
from rpc_train.config.errors import ConfigError
from rpc_train.checkpoint.position import Position

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.pt"


def model_tensors(model_cfg) -> Dict[str, List[int]]:
    """Name -> shape of every parameter and buffer of the configured model, built on the meta
    device: no memory, no compute, and the driver's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = instantiate(model_cfg)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def check_same_model(found: Checkpoint, model_cfg) -> None:
    """ConfigError listing what differs when the checkpoint holds another model."""
    # Row ranges saved apart (mode=hybrid's embedding shards) count as the tensors they tile.
    saved = joined_shapes({name: record["shape"] for name, record in found.manifest["tensors"].items()})
    expected = model_tensors(model_cfg)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(f"{n} {saved[n]} vs {expected[n]}"
                      for n in set(saved) & set(expected) if saved[n] != expected[n])
    differences = (("missing", missing), ("unexpected", unexpected), ("other shape (saved vs model)", reshaped))
    problems = [f"{label} {len(names)}: {name_list(names)}" for label, names in differences if names]
    if problems:
        raise ConfigError(f"checkpoint {found.path} holds a different model than model={model_cfg.get('_target_')} "
                          f"({'; '.join(problems)}); resume with the model it was saved from, "
                          "or checkpoint.resume=none")


def check_same_optimizer(found: Checkpoint, optim_cfg) -> None:
    """Optimizer state only fits the optimizer class that wrote it (SGD's momentum is no Adam state)."""
    saved = (found.manifest.get("config") or {}).get("optim", {}).get("_target_")
    if saved and saved != optim_cfg.get("_target_"):
        raise ConfigError(f"checkpoint {found.path} holds {saved} state but optim is {optim_cfg.get('_target_')}; "
                          "resume with the same optimizer, or start over with checkpoint.resume=none")


class Checkpointer:
    """A Trainer hook (`hook(step, result)`) that also resumes and saves on demand.

    `position` is the object the Trainer advances in place, so a save always records where
    training stands.
    """

    def __init__(self, cfg: DictConfig, run_dir: str, engine, logger=None):
        """`engine`: a `training.protocol.Checkpointable` (not imported: training imports checkpoint)."""
        self.cfg, self.conf, self.engine, self.logger = cfg, cfg.checkpoint, engine, logger
        self.root = checkpoints_root(run_dir)
        self.position = Position()
        self.saved_step: Optional[int] = None
        self.resumed_layout: Optional[dict] = None  # the resumed checkpoint's engine layout, if any

    def resume(self) -> Position:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            log.info("torchrun restart %s of at most %s", restart, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
        found = resolve_resume(self.conf.resume, self.root)
        if found is None:
            log.info("no checkpoint to resume from (checkpoint.resume=%s): starting at step 0", self.conf.resume)
            return self.position
        check_same_model(found, self.cfg.model)
        check_same_optimizer(found, self.cfg.optim)
        self.engine.load_checkpoint(found.path, {n: r["file"] for n, r in found.manifest["tensors"].items()})
        state = load_file(os.path.join(found.path, TRAINER_FILE))
        torch.set_rng_state(state["rng"])
        self.position = Position(**{f.name: state[f.name] for f in fields(Position)})
        self.resumed_layout = found.manifest.get("layout")
        if os.path.abspath(found.path) == os.path.abspath(checkpoint_dir(self.root, found.step)):
            self.saved_step = found.step  # ours already: the final save need not repeat it
        if self.logger is not None:
            self.logger.resumed_at(found.step)
        log.info("resumed from %s: step %d (epoch %d, %d batches into it)",
                 found.path, found.step, self.position.epoch, self.position.batch)
        return self.position

    def __call__(self, step: int, result) -> None:
        self.save_if_due(step - 1, step)

    def save_if_due(self, before: int, after: int) -> None:
        """Save when training went past a multiple of checkpoint.every_steps, from step `before`
        to step `after` (one step for the pipeline's Trainer, an epoch for the parameter server)."""
        every = self.conf.every_steps
        if every and after // every > before // every:
            self.save()

    def save(self) -> None:
        """Write the checkpoint of the current step (once), then prune the old ones."""
        position = self.position
        if position.step == self.saved_step:
            return
        directory = checkpoint_dir(self.root, position.step)
        begin(directory)
        records = self.engine.save_checkpoint(directory)
        # Every field of the position, so a field added to Position is saved and restored too.
        trainer_state = {**{f.name: getattr(position, f.name) for f in fields(Position)}, "rng": torch.get_rng_state()}
        files = {r["file"]: r["sha256"] for r in records}
        files[TRAINER_FILE] = save_file(os.path.join(directory, TRAINER_FILE), trainer_state)
        tensors = {name: {"file": r["file"], "shape": shape} for r in records for name, shape in r["tensors"].items()}
        write_manifest(directory, {
            "step": position.step, "epoch": position.epoch, "mode": self.cfg.mode.name,
            "layout": self.engine.layout(), "files": files, "tensors": tensors,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        })
        self.saved_step = position.step
        prune(self.root, self.conf.keep, position.step)
        log.info("saved checkpoint %s", directory)
