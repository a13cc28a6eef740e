"""Text generation from a GPT (models/gpt.py): sampling, and decoding with a KV cache in one process.

`sampling.py` draws the next byte from a sequence's logits with the sequence's own seeded
generator, and says what each step feeds the model (`step_input`); `decoding.py` runs that loop
in this process (`python -m rpc_train.generate`). The server (serve/generation.py) runs the
same steps with the caches on its replicas' workers.
"""
