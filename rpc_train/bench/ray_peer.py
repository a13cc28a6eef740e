"""The serving benchmark's peer: Ray Serve with `@serve.batch`, on the same model and settings.

What a team would deploy instead of rpc_train's serving mode: a Ray Serve deployment whose
replicas batch requests with `@serve.batch`, behind Ray Serve's own gRPC proxy, which speaks
our `inference.proto` (Ray routes a gRPC method to the deployment method of the same name).
The load generator's clients are the same for both, so the rows compare like for like.

Ray's proxy unpickles requests in its replicas; our messages come from a private descriptor
pool (serve/protocol.py) that pickle cannot name, so the proxy is given raw bytes (no request
deserializer) and the replica parses them itself; the replica's reply is a message, which
Ray serializes. Ray is an optional extra (`pip install -e ".[bench]"`): without it the
benchmark prints its rows as skipped.
"""

import os
from contextlib import contextmanager
from typing import Iterator, List, Optional

import grpc
import torch

from rpc_train.serve.protocol import METHODS, SERVICE

NAME = "Ray Serve @serve.batch"


def missing() -> Optional[str]:
    """Why the peer cannot run here, or None."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return 'Ray Serve is not installed: pip install -e ".[bench]"'
    return None


def add_inference_servicer(servicer, server) -> None:
    """What Ray's gRPC proxy registers (`grpc_servicer_functions`): every method of the
    service, bytes in and out; Ray replaces the behaviours with its routing."""
    def unused(request, context):  # never called: the proxy routes to the replicas
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "routed by Ray Serve")

    handlers = {name: grpc.unary_unary_rpc_method_handler(unused) for name in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _deployment(max_batch_size: int, replicas: int, threads: int):
    from ray import serve

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=4 * max_batch_size,
                      ray_actor_options={"num_cpus": 1})
    class InferencePeer:
        def __init__(self, run: str):
            from rpc_train.serve.spec import ModelSpec
            from rpc_train.serve.source import build_served, served_model

            torch.set_num_threads(threads)  # the cores shared among the replicas, as rpc_train's are
            served = served_model(run, None)
            self.spec = ModelSpec.classifier(served.name, served.shape, served.num_classes, max_batch_size)
            self.model = build_served(served).eval()

        async def ModelInfer(self, raw: bytes):  # noqa: N802 - the protocol's method name
            return await self.infer(raw)

        # batch_wait_timeout_s=0: a batch leaves with what is queued, as serve.max_queue_delay_ms=0 does.
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.0)
        async def infer(self, raws: List[bytes]):
            from rpc_train.serve.codec import decode, encode
            from rpc_train.serve.protocol import pb

            requests = [pb.ModelInferRequest.FromString(raw) for raw in raws]
            inputs = [decode(r, self.spec) for r in requests]
            with torch.no_grad():
                logits = self.model(torch.cat(inputs))
            rows, out, start = len(logits), [], 0
            for request, x in zip(requests, inputs):
                out.append(encode(request, self.spec, logits[start : start + len(x)], rows))
                start += len(x)
            return out

    return InferencePeer


@contextmanager
def ray_serving(run: str, replicas: int, max_batch_size: int, port: int, cores: int) -> Iterator[str]:
    """Ray Serve on this machine's cores, the model of `run` deployed and ready; its gRPC address."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port + 1},
                    grpc_options={"port": port, "grpc_servicer_functions": [f"{__name__}:add_inference_servicer"]})
        app = _deployment(max_batch_size, replicas, max(1, cores // replicas)).bind(run)
        serve.run(app, name="peer")  # returns once every replica is up
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
