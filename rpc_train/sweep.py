"""Hydra sweeps where every job is its own torchrun world: `./launch.sh -m a=1,2 b=3,4`.

Under torchrun every rank runs Hydra, so `-m` inside the ranks would run the whole sweep in
each of them. Instead this one process runs the sweep: Hydra's sweeper (the basic one, or any
plugin with the same interface) expands the overrides, and for each job the task function
below starts `launch.sh` with the job's overrides and run dir, one job after another. A job
that fails is recorded and the sweep goes on; the exit status says whether all passed.
"""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rpc_train.config.compose import CONF_DIR
from rpc_train.config.schema import register_configs
from rpc_train.metrics.table import format_table

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
METRICS_FILE = "metrics.json"
SUMMARY_COLUMNS = ["job", "overrides", "status", "val/accuracy", "throughput/samples_per_s", "run_dir"]

register_configs()


def run_job(cfg: DictConfig) -> Dict[str, Any]:
    """Run one sweep job as a fresh RPC world; return its summary row (never raises)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    code = subprocess.run([str(REPO / "launch.sh"), *overrides], env=env).returncode
    (run_dir / "exit_status").write_text(f"{code}\n")
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {
        "job": hc.job.num,
        "overrides": " ".join(overrides),
        "status": "ok" if code == 0 else f"failed (exit {code})",
        "val/accuracy": metrics.get("val/accuracy", ""),
        "throughput/samples_per_s": metrics.get("throughput/samples_per_s", ""),
        "run_dir": str(run_dir),
    }


class SweepSummary(Callback):
    """Collects each job's row; at the end prints the table and writes summary.csv."""

    failed = 0

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED:
            self.rows.append(job_return.return_value)
        else:  # the task function itself broke, not the job's world
            self.rows.append({"job": len(self.rows), "status": f"error: {job_return._return_value}"})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / "summary.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        print(format_table(self.rows, SUMMARY_COLUMNS[:-1], cell=_cell), flush=True)
        SweepSummary.failed = sum(1 for row in self.rows if row.get("status") != "ok")
        print(f"sweep: {len(self.rows) - SweepSummary.failed} of {len(self.rows)} jobs passed; "
              f"summary in {path}", flush=True)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Dict[str, Any]:
    return run_job(cfg)


if __name__ == "__main__":
    # The sweep process only orchestrates: console logging, no .hydra/ copy (each job's
    # driver writes its own), and the summary callback.
    sys.argv += ["hydra/job_logging=stdout", "hydra.output_subdir=null",
                 "+hydra.callbacks.summary._target_=rpc_train.sweep.SweepSummary"]
    main()
    # Hydra instantiated the callback from `rpc_train.sweep`, a second copy of this module
    # when it runs as __main__: read the count from there.
    from rpc_train.sweep import SweepSummary as Summary

    sys.exit(1 if Summary.failed else 0)
