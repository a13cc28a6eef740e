"""`python -m rpc_train.serve.client [--url localhost:8001]`: ask a serving job about digits.

Sends images of scikit-learn's bundled 8x8 digits (the validation split training held out,
standardised as training saw them) to the Open Inference Protocol's ModelInfer, one request of
--batch-size rows at a time, and prints a few predictions, the accuracy and the latency.
"""

import argparse
import statistics
import sys
import time
from typing import List, Optional

import grpc
import numpy as np

from rpc_train.config.compose import compose
from rpc_train.data.datasets import load_datasets
from rpc_train.serve.protocol import Stub, pb


def infer_request(model: str, rows: np.ndarray) -> "pb.ModelInferRequest":
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))
    return pb.ModelInferRequest(model_name=model, inputs=[tensor],
                                raw_input_contents=[rows.astype("<f4").tobytes()])


def logits_of(reply: "pb.ModelInferResponse") -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(list(reply.outputs[0].shape))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_train.serve.client", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="localhost:8001", help="host:port of the front end")
    p.add_argument("--model", default="mlp", help="the served model's name (ModelMetadata)")
    p.add_argument("--count", type=int, default=100, help="images to send")
    p.add_argument("--batch-size", type=int, default=1, help="images per request")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds each request may take")
    args = p.parse_args(argv)
    data = compose(["data=digits"])
    _, val = load_datasets(data.data, data.seed)
    images, labels = val.tensors[0][:args.count].numpy(), val.tensors[1][:args.count].numpy()
    stub = Stub(grpc.insecure_channel(args.url))
    predictions, latencies = [], []
    try:
        for start in range(0, len(images), args.batch_size):
            began = time.perf_counter()
            reply = stub.ModelInfer(infer_request(args.model, images[start:start + args.batch_size]),
                                    timeout=args.timeout)
            latencies.append(1e3 * (time.perf_counter() - began))
            predictions.extend(logits_of(reply).argmax(1).tolist())
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    print(f"predictions (first 10): {predictions[:10]}; labels: {labels[:10].tolist()}")
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    print(f"accuracy {correct / len(labels):.3f} on {len(labels)} images; latency per request "
          f"p50 {statistics.median(latencies):.2f} ms, p99 {cuts[98]:.2f} ms over {len(latencies)} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
