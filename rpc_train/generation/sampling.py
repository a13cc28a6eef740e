"""How a sequence's next byte is drawn, and what each decode step feeds the model.

A sequence draws from a `torch.Generator` of its own, seeded by its request: what else is
decoded beside it never changes its draws. `step_input` keeps a sequence within the model's
learned positions: up to `context` tokens each step feeds only what the cache lacks; past it,
each step starts a new cache over the last `context` tokens (start 0), which is what a full
forward of the last `context` tokens (GPT.generate) computes.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

MAX_TOKENS = 4096  # a request's max_tokens at most


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy (the argmax)
    top_k: int = 0  # > 0: draw among the k likeliest bytes only
    seed: int = 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The byte after `logits` ([vocab], the last position's), drawn with `generator`."""
    logits = logits.detach().float().cpu()
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # [1, vocab], as GPT.generate draws: the same generator gives the same byte.
    return int(torch.multinomial(F.softmax(logits, dim=-1)[None], 1, generator=generator))


def step_input(tokens: List[int], cached: int, context: int) -> Tuple[List[int], int]:
    """(the tokens to feed, the position of the first): `cached` positions are in the sequence's
    cache (0: none yet). Start 0 means a new cache."""
    if cached and len(tokens) <= context:
        return tokens[cached:], cached
    return tokens[-context:], 0
