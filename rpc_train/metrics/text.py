"""A language model's validation extras (data=text): bits per byte and a sample of its text.

At each validation the driver copies the trained state into a model of its own, continues a
fixed prompt from it (`GPT.generate`: a full forward per new byte, no cache; a few hundred
forwards of a small model) and logs the text with `add_text` as `val/sample`, next to
`val/bits_per_byte`, the validation loss in bits rather than nats. The draws are seeded by
`seed`, the same at every validation, so two samples differ only by what the model learned.
"""

import logging
import math
from typing import Callable, Dict, Optional

import torch
from omegaconf import DictConfig

from rpc_train.config.schema import as_dict
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.training.builders import build_model

log = logging.getLogger(__name__)

StateFn = Callable[[], Dict[str, torch.Tensor]]


class TextSampler:
    def __init__(self, cfg: DictConfig, state_fn: StateFn, logger: Optional[RunLogger]):
        self.sample_cfg, self.seed = cfg.data.sample, cfg.seed
        self.state_fn, self.logger = state_fn, logger
        self.model = build_model(as_dict(cfg.model), cfg.seed).eval()

    def __call__(self, step: int, scalars: Dict[str, float]) -> None:
        """Add `val/bits_per_byte` to this validation's scalars, and log a sample."""
        scalars["val/bits_per_byte"] = scalars["val/loss"] / math.log(2)
        text = self.sample()
        log.info("step %d sample: %r", step, text)
        if self.logger:
            # Four leading spaces: TensorBoard's markdown shows the text as it is, in a code block.
            self.logger.text("val/sample", "\n".join("    " + line for line in text.splitlines()), step)

    def sample(self) -> str:
        self.model.load_state_dict(self.state_fn())
        conf = self.sample_cfg
        prompt = torch.tensor([list(conf.prompt.encode())], dtype=torch.int64)
        generator = torch.Generator().manual_seed(self.seed)
        out = self.model.generate(prompt, conf.length, conf.temperature, generator)
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def validation_extras(cfg: DictConfig, state_fn: StateFn, logger: Optional[RunLogger]) -> list:
    """The callables each validation runs as extra(step, scalars): a sampler for data=text."""
    if cfg.data.name != "text" or cfg.data.get("sample") is None:
        return []
    return [TextSampler(cfg, state_fn, logger)]
