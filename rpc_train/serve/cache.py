"""Answers to repeated inputs, kept LRU: a hit is answered by the front end, never by a replica.

The key is a digest of the model file's hash (each version's own) and every input's datatype,
shape and bytes, so an answer never outlives the version that computed it, and equal rows of
another shape (or type) are other inputs.
"""

import hashlib
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch


class ResponseCache:
    def __init__(self, size: int):
        self.size = size
        self._answers: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()

    def key(self, model_digest: str, inputs: Sequence[torch.Tensor]) -> bytes:
        digest = hashlib.blake2b(model_digest.encode(), digest_size=32)
        for rows in inputs:
            digest.update(f"|{rows.dtype}{list(rows.shape)}|".encode())
            digest.update(rows.contiguous().numpy().tobytes())
        return digest.digest()

    def get(self, key: bytes) -> Optional[torch.Tensor]:
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None:
                self._answers.move_to_end(key)
            return answer

    def put(self, key: bytes, logits: torch.Tensor) -> None:
        with self._lock:
            self._answers[key] = logits.clone()
            self._answers.move_to_end(key)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
