"""Generation in this process: a GPT's `decode` with one KV cache, or its full forward each step."""

from typing import Iterator

import torch

from models.gpt import KVCache
from rpc_train.generation.sampling import Sampling, next_token, step_input


@torch.no_grad()
def generate(model, prompt: bytes, sampling: Sampling, cached: bool = True) -> Iterator[int]:
    """The bytes after `prompt`, one at a time. `cached`: each step decodes only the new byte
    against the KV cache; False: a full forward of the last `context` bytes each step (the
    reference the cache must match)."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one byte")
    device = next(model.parameters()).device
    generator, tokens, filled, cache = sampling.generator(), list(prompt), 0, KVCache()
    for _ in range(sampling.max_tokens):
        if cached:
            feed, start = step_input(tokens, filled, model.context)
            cache = KVCache() if start == 0 else cache
            logits = model.decode(torch.tensor([feed], device=device), cache, start)[0, -1]
            filled = start + len(feed)
        else:
            logits = model(torch.tensor([tokens[-model.context:]], device=device))[0, -1]
        token = next_token(logits, sampling, generator)
        tokens.append(token)
        yield token
