"""Checks of a composed config against the world it will run in.

Pure Python (no torch), so the launcher runs them before torchrun starts anything, and every
rank runs them again before it joins RPC: a bad value fails fast and the same on every rank.
"""

from typing import Iterator, Sequence

from omegaconf import DictConfig

from rpc_train.errors import ConfigError

MODES = ("pipeline",)
DEVICES = ("cpu", "cuda")
BALANCE_STRATEGIES = ("params", "time")
SCHEDULES = ("gpipe", "1f1b")
BALANCE_HELP = "'params', 'time', or a list of layer counts per stage such as [3,2]"


def _positive(name: str, value) -> Iterator[str]:
    if value is None or int(value) < 1:
        yield f"{name}={value}: must be a positive integer"


def _problems(cfg: DictConfig, world_size: int) -> Iterator[str]:
    if cfg.mode.name not in MODES:
        yield f"mode.name={cfg.mode.name}: expected one of {', '.join(MODES)}"
    if cfg.device not in DEVICES:
        yield f"device={cfg.device}: expected one of {', '.join(DEVICES)}"
    trainer, pipe = cfg.trainer, cfg.pipeline
    yield from _positive("trainer.batch_size", trainer.batch_size)
    yield from _positive("trainer.epochs", trainer.epochs)
    yield from _positive("trainer.log_every", trainer.log_every)
    if trainer.max_steps is not None:
        yield from _positive("trainer.max_steps", trainer.max_steps)
    yield from _positive("pipeline.micro_batches", pipe.micro_batches)
    if pipe.micro_batches > trainer.batch_size >= 1:
        yield (f"pipeline.micro_batches={pipe.micro_batches} is larger than "
               f"trainer.batch_size={trainer.batch_size}: each micro-batch needs at least one sample")
    if world_size < 2:
        yield (f"world size {world_size} (NPROC x NNODES): rpc_train needs at least 2 processes, "
               "a driver and one worker; use NPROC=2 or more")
        return
    if pipe.stages is not None:
        yield from _positive("pipeline.stages", pipe.stages)
        if pipe.stages > world_size - 1:
            yield (f"pipeline.stages={pipe.stages} needs {pipe.stages + 1} processes (a driver and "
                   f"one per stage) but the world has {world_size}; use NPROC={pipe.stages + 1} "
                   f"or pipeline.stages<={world_size - 1}")
    yield from _balance_problems(pipe.balance, pipe.stages or world_size - 1)
    if pipe.schedule not in SCHEDULES:
        yield f"pipeline.schedule={pipe.schedule}: expected one of {', '.join(SCHEDULES)}"
    if not 0.0 < cfg.data.val_fraction < 1.0:
        yield f"data.val_fraction={cfg.data.val_fraction}: must be between 0 and 1"


def _balance_problems(balance, stages: int) -> Iterator[str]:
    if isinstance(balance, str):
        if balance not in BALANCE_STRATEGIES:
            yield f"pipeline.balance={balance}: expected {BALANCE_HELP}"
    elif isinstance(balance, Sequence):
        if len(balance) != stages or not all(isinstance(c, int) and c >= 1 for c in balance):
            yield (f"pipeline.balance={list(balance)}: expected {stages} positive layer counts, "
                   f"one per stage")
    else:
        yield f"pipeline.balance={balance}: expected {BALANCE_HELP}"


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError naming the first bad value and what would be valid."""
    for problem in _problems(cfg, world_size):
        raise ConfigError(problem)
