"""TensorBoard logging, on the driver only (workers report their numbers to it by RPC).

Tags are grouped by prefix: train/, val/, throughput/, time/, stage<k>/ and lr.
"""

from typing import Dict, Mapping

from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


class RunLogger:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def config(self, cfg: DictConfig) -> None:
        text = OmegaConf.to_yaml(cfg, resolve=True)
        # Four leading spaces make TensorBoard's markdown show the YAML as a code block.
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def hparams(self, params: Dict[str, object], metrics: Dict[str, float]) -> None:
        """Write the HParams summary into this run's own event file.

        `SummaryWriter.add_hparams` would open a second run in a sub-directory, which shows
        every job twice in the HParams dashboard.
        """
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        metric_tags = {f"hparam/{k}": v for k, v in metrics.items()}
        for summary in hparams(clean, metric_tags):
            self.writer.file_writer.add_summary(summary)
        self.scalars(0, metric_tags)

    def resumed_at(self, step: int) -> None:
        """Hide what an interrupted attempt logged after `step`, which this one logs again.

        On a SessionLog START at step s, TensorBoard drops the events read before it whose step
        is s or later (SummaryWriter's purge_step writes the same event, but only on opening).
        """
        start = SessionLog(status=SessionLog.START)
        self.writer.file_writer.add_event(Event(step=step + 1, session_log=start))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flat_hparams(cfg: DictConfig) -> Dict[str, object]:
    """The config flattened to dotted keys (`optim.lr`), as the HParams dashboard lists them."""
    flat: Dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node) if isinstance(node, list) else node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if v is not None and not k.endswith("_partial_")}
