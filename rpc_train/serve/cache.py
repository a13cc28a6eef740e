"""Answers to repeated inputs, kept LRU: a hit is answered by the front end, never by a replica.

The key is a digest of the model file's hash, the datatype, the shape and the input's bytes,
so a cache never outlives the model it answered for, and equal rows of another shape (or
type) are other inputs.
"""

import hashlib
import threading
from collections import OrderedDict
from typing import Optional

import torch


class ResponseCache:
    def __init__(self, size: int, model_digest: str):
        self.size, self._model = size, model_digest.encode()
        self._answers: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()

    def key(self, rows: torch.Tensor) -> bytes:
        digest = hashlib.blake2b(self._model, digest_size=32)
        digest.update(f"{rows.dtype}{list(rows.shape)}".encode())
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
