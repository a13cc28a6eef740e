"""A decoder-only transformer over bytes, after nanoGPT's model.py, as an `nn.Sequential`.

Its children are the pipeline's units: the token+position embedding, `layers` transformer
blocks, the final LayerNorm and the head. The head is a Linear of its own, not tied to the
embedding's table (nanoGPT ties them): on a pipeline the two land on different stages, and a
tied weight would need its gradient summed across workers.

Two ways through it:
- `forward(tokens)`, the training path: int64 bytes [B, T] (T <= context) -> logits [B, T, vocab].
- `decode(tokens, cache, start)`, the incremental path for generation: every child has a
  `decode(x, cache, start)` that takes only the new positions start, start+1, ... of each
  sequence and keeps the attention's keys and values of the positions before in `cache`
  (a `KVCache`), so `for layer in model: x = layer.decode(x, cache, start)` gives the logits
  `forward` gives at those positions. A pipeline stage can do the same with its own slice of
  the layers and a cache of its own: the cache holds an entry per block index it has seen.
  Positions are learned, so a sequence decodes up to `context` positions; beyond that a caller
  starts a new cache over the last `context` tokens.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """One batch of sequences' attention keys and values, per block: [batch, heads, t, head_dim]."""

    def __init__(self):
        self.layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, index: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add block `index`'s keys and values of new positions; all of its keys and values so far."""
        if index in self.layers:
            old_k, old_v = self.layers[index]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.layers[index] = (k, v)
        return k, v

    def length(self, index: int) -> int:
        """Positions cached for block `index` (0 before its first decode)."""
        return self.layers[index][0].shape[2] if index in self.layers else 0


class Positionwise:
    """A layer that treats each position alone: decoding new positions is its forward."""

    def decode(self, x: torch.Tensor, cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        return self(x)


class Embedding(nn.Module):
    """Bytes -> token embedding + learned position embedding, then dropout."""

    def __init__(self, vocab: int, context: int, dim: int, dropout: float):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, None, 0)

    def decode(self, tokens: torch.Tensor, cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        t = tokens.shape[1]
        if start + t > self.context:
            raise ValueError(f"positions up to {start + t} but the model's context is {self.context}")
        pos = torch.arange(start, start + t, device=tokens.device)
        return self.dropout(self.tokens(tokens) + self.positions(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        return tuple(z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self._merge_heads(y)

    def decode(self, x: torch.Tensor, cache: KVCache, index: int, start: int) -> torch.Tensor:
        """New positions start.. attend to every cached position and to the new ones up to themselves."""
        if cache.length(index) != start:
            raise ValueError(f"block {index}: {cache.length(index)} positions cached, but decoding from {start}")
        q, k, v = self._split_heads(x)
        k, v = cache.append(index, k, v)
        t = q.shape[2]
        # is_causal aligns its mask to the top left, right only when the queries start at 0;
        # one new position sees everything cached, and several need the mask shifted by start.
        mask = None
        if t > 1:
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._merge_heads(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(ln(x)), then x + MLP(ln(x))."""

    def __init__(self, index: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.index = index  # its place among the blocks: the key of its keys and values in a KVCache
        self.ln1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def decode(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        x = x + self.attention.decode(self.ln1(x), cache, self.index, start)
        return x + self.mlp(self.ln2(x))


class Norm(Positionwise, nn.LayerNorm):
    """The final LayerNorm."""


class Head(Positionwise, nn.Linear):
    """Hidden states -> logits over the vocabulary (untied from the embedding: see the module doc)."""


class GPT(nn.Sequential):
    """Embedding, `layers` Blocks, Norm, Head: int64 tokens [B, T] -> logits [B, T, vocab]."""

    def __init__(self, vocab: int = 256, context: int = 128, dim: int = 128, heads: int = 4, layers: int = 4,
                 dropout: float = 0.0):
        super().__init__(Embedding(vocab, context, dim, dropout),
                         *[Block(i, dim, heads, dropout) for i in range(layers)],
                         Norm(dim), Head(dim, vocab))
        self.context = context
        self.apply(_init_weights)
        # GPT-2's scaled init of the projections into the residual stream (nanoGPT's c_proj).
        for name, p in self.named_parameters():
            if name.endswith(("attention.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def decode(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits [B, t, vocab] of positions start..start+t-1, given `cache` holds the positions before."""
        x = tokens
        for layer in self:
            x = layer.decode(x, cache, start)
        return x

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """`prompt` [B, t] followed by `new_tokens` sampled ones (greedy at temperature 0), each
        from the full forward of the last `context` tokens: no cache, as nanoGPT's generate."""
        tokens = prompt
        for _ in range(new_tokens):
            logits = self(tokens[:, -self.context:])[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
