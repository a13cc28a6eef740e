"""mode=serve: trained models behind the Open Inference Protocol, replicas over torch RPC.

Rank 0 is the front end (`driver.py`). Its doors translate the protocol: gRPC in
`frontend.py` (messages from `inference.proto` via `protocol.py`, converted by `codec.py`).
Behind them one core (`core.py`) checks each request against its model (`spec.py`,
`tensors.py`) and queues it; one thread batches queued requests and sends each batch to a
replica picked by `routing.py` with `rpc_async` (`dispatch.py`). The other ranks host the
replicas (`replica.py`) of the runs `source.py` finds. `client.py` is an example client;
`checks.py` runs in the launcher's preflight.
"""
