"""A DLRM-style click model (Naumov et al., "Deep Learning Recommendation Model", 2019).

Dense features go through a bottom MLP to one vector of `embedding_dim`; each categorical
feature is looked up in its own `nn.EmbeddingBag` (one value a feature here, so a bag of one,
summed); the interaction is every pairwise dot product among those vectors; a top MLP maps
the bottom vector and the dot products to one logit. It knows nothing of RPC: mode=hybrid
moves `embeddings` to servers and runs `dense_forward` on the trainers.
"""

from typing import List, Sequence

import torch
from torch import nn


def _mlp(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, num_dense: int, table_rows: Sequence[int], embedding_dim: int = 16,
                 bottom: Sequence[int] = (64, 32), top: Sequence[int] = (64, 32)):
        super().__init__()
        self.num_dense, self.table_rows, self.embedding_dim = num_dense, list(table_rows), embedding_dim
        self.bottom = _mlp([num_dense, *bottom, embedding_dim], last_relu=True)
        self.embeddings = nn.ModuleList(nn.EmbeddingBag(rows, embedding_dim, mode="sum") for rows in table_rows)
        vectors = 1 + len(table_rows)
        self.top = _mlp([embedding_dim + vectors * (vectors - 1) // 2, *top, 1], last_relu=False)
        self._pairs = torch.triu_indices(vectors, vectors, offset=1)

    def pooled(self, sparse: torch.Tensor) -> List[torch.Tensor]:
        """Each table's pooled vector for a batch of indices (batch, tables): (batch, dim) each."""
        return [table(sparse[:, t : t + 1]) for t, table in enumerate(self.embeddings)]

    def dense_forward(self, dense: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        """The logits (batch,) from the dense features and the tables' pooled vectors."""
        x = self.bottom(dense)
        vectors = torch.stack([x, *pooled], dim=1)  # (batch, 1 + tables, dim)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self._pairs[0], self._pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.dense_forward(dense, self.pooled(sparse))
