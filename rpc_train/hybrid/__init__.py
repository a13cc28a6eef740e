"""mode=hybrid: embedding tables sharded over RPC servers, dense layers replicated under DDP.

Rank 0 drives (data positions, validation, TensorBoard); ranks 1..hybrid.servers hold
embedding shards with their optimizers (server.py); the rest are trainers (trainer.py), one
DDP group among them. A trainer's step looks its batch's rows up on every server at once,
runs the dense part, and one distributed-autograd backward carries the gradients both to
DDP's all-reduce and back to the servers' rows.
"""
