"""mode=serve: a trained model behind the Open Inference Protocol, replicas over torch RPC.

Rank 0 is the front end (`driver.py`): gRPC handlers (`frontend.py`) check each request
(`codec.py`) and queue it; one thread batches queued requests and sends each batch to a
replica picked by `routing.py` with `rpc_async` (`dispatch.py`); the other ranks host the
replicas (`replica.py`) of the run `source.py` finds. `protocol.py` builds the protocol's
messages from `inference.proto`; `client.py` is an example client; `checks.py` runs in the
launcher's preflight.
"""
