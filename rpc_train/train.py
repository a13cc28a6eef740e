"""Entry point: `torchrun ... -m rpc_train.train [overrides]`, normally through ./launch.sh.

Every rank composes the same config, checks it, and joins the RPC world; the driver trains
and the workers serve it until it shuts the world down.
"""

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rpc_train.config.compose import CONF_DIR, check_override_syntax
from rpc_train.config.schema import register_configs
from rpc_train.config.errors import ConfigError, RunFailure
from rpc_train.config.validate import validate

register_configs()


def driver_job(cfg: DictConfig) -> Callable[[DictConfig, int, str], dict]:
    """Rank 0's job: serving, or training in the configured mode (imported only when needed)."""
    if cfg.mode.name == "serve":
        from rpc_train.serve.driver import serve

        return serve
    if cfg.mode.name == "predict":
        from rpc_train.predict.driver import predict

        return predict
    from rpc_train.driver import drive

    return drive


def train(cfg: DictConfig) -> Optional[dict]:
    """Run one job on this rank; the driver returns the final metrics, workers None."""
    # Imported here so `--help` and `--cfg job` answer without loading torch.
    from rpc_train.runtime.devices import check_device
    from rpc_train.runtime.interface import check_interface
    from rpc_train.runtime.roles import stage_device_maps
    from rpc_train.runtime.session import rpc_session
    from rpc_train.runtime.world import World, configure_process

    world = World.from_env()
    if cfg.mode.name == "serve":  # from now on a signal drains the service (serve/lifecycle.py)
        from rpc_train.serve.lifecycle import hold_signals

        hold_signals(front_end=world.is_driver)
    validate(cfg, world.size)
    check_device(cfg.device)  # on every rank, before the device maps are built from the GPU count
    check_interface(cfg.runtime.interface, cfg.runtime.allow_public_interface)  # each machine its own
    configure_process(cfg.runtime, world)
    # The DDP group outside the RPC session: a worker's body returns at once and waits in the
    # session's shutdown while the driver still trains through it, so the group must outlive that.
    with dense_group_of(cfg, world), rpc_session(cfg.runtime, world, stage_device_maps(cfg, world)):
        if world.is_driver:
            return driver_job(cfg)(cfg, world.size, HydraConfig.get().runtime.output_dir)
    return None


@contextmanager
def dense_group_of(cfg: DictConfig, world) -> Iterator[None]:
    """mode=hybrid: the trainers' DDP group, which every rank helps create; nothing otherwise."""
    if cfg.mode.name != "hybrid":
        yield
        return
    from rpc_train.hybrid.group import check_gpus, join_dense_group, leave_dense_group
    from rpc_train.runtime.roles import role_rank

    first_trainer = role_rank(cfg, 1 + cfg.hybrid.servers)
    check_gpus(cfg.device, first_trainer, world.rank, world.size, world.local_size)
    join_dense_group(cfg.device, first_trainer, world.rank, world.size, cfg.runtime.rpc_timeout_s)
    try:
        yield
    finally:
        leave_dense_group()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:
        # The ranks of a machine fail alike (a bad value, or that machine's GPUs), so one rank
        # per machine says why: the driver's machine is not always the one at fault.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunFailure as err:  # raised on the driver only, after it stopped the workers
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_override_syntax(sys.argv[1:])
    except ConfigError as err:  # a bad override reads the same on every rank: one per machine says so
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if os.environ.get("RANK", "0") != "0":
        # All ranks share one run dir; only the driver writes the .hydra/ config record there.
        sys.argv.append("hydra.output_subdir=null")
    main()
