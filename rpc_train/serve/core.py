"""The one request path behind both doors: every protocol method, protocol-neutral.

gRPC (`frontend.py`) and HTTP (`http_server.py`) translate their messages into the calls
here and map `ServeError`'s code to their own status; neither decides anything. Answers that
the protocol defines as documents (metadata, config, statistics, the repository index) are
returned as dicts in the protocol's JSON form: HTTP sends them as they are, gRPC parses them
into its messages (`json_format.ParseDict`), so the two cannot disagree.

A ModelInfer: size check -> the version that answers (`Repository.resolve`) -> rows checked
against it (`ModelSpec.rows`) -> the cache -> the dispatcher's queue of that (model, version)
and batcher -> a replica -> the reply, naming the version. A text generator's (a GPT run's)
request goes to the generation scheduler instead (`generation.py`), which decodes it step by
step beside the others: ModelInfer gets the whole text, ModelStreamInfer (`stream`) each byte
as it is drawn.
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import grpc

import rpc_train
from rpc_train.serve.admission import arrived
from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.dispatch import Dispatcher, Pending, Refused
from rpc_train.serve.generation import GenerationScheduler
from rpc_train.serve.observe import ServeMetrics
from rpc_train.serve.ratelimit import RateLimitedLog
from rpc_train.serve.repository import Repository, Version
from rpc_train.serve.rollout import Rollout
from rpc_train.serve.spec import InferReply, InferRequest, ModelSpec
from rpc_train.serve.statistics import RequestTimes
from rpc_train.serve.tensors import BadRequest, ServeError

log = logging.getLogger(__name__)
BUG_LOG_EVERY_S = 60.0  # our own bug may fail every request: its traceback once, then once a minute
bugs = RateLimitedLog(log, BUG_LOG_EVERY_S)

EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "model_repository"]


class ServingCore:
    def __init__(self, repository: Repository, dispatcher: Dispatcher, metrics: ServeMetrics, max_message_mb: float,
                 cache: Optional[ResponseCache] = None, rollout: Optional[Rollout] = None,
                 instance_kind: str = "KIND_CPU", generation: Optional[GenerationScheduler] = None):
        """`instance_kind`: where the replicas compute, as ModelConfig's instance_group says it
        (KIND_CPU, KIND_GPU); `generation`: the decode steps of text generators (GPT runs)."""
        self.repository, self.dispatcher, self.metrics, self.cache = repository, dispatcher, metrics, cache
        self.generation = generation
        self.rollout, self.instance_kind = rollout, instance_kind
        self.max_message_mb, self.max_message_bytes = max_message_mb, message_bytes(max_message_mb)
        self.loaded = False  # every model of the start-up answered its warm-up (the driver says so)
        self.draining = False
        self._active, self._active_lock = 0, threading.Lock()  # ModelInfer calls being answered

    # -- health and metadata
    def live(self) -> bool:
        return True  # never depends on a model: a process that answers is alive

    def ready(self) -> bool:
        return self.loaded and not self.draining and self.dispatcher.ready()

    def version_of(self, name: str, version: str = "") -> Version:
        """The version that answers (name, version): NOT_FOUND for a model or version not loaded."""
        return self.repository.resolve(name, version, self.dispatcher.loaded_everywhere,
                                       self.dispatcher.loaded_anywhere)

    def model_ready(self, name: str, version: str = "") -> bool:
        self.version_of(name, version)
        return self.ready()

    def server_metadata(self) -> dict:
        return {"name": "rpc_train", "version": rpc_train.__version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str = "") -> dict:
        return self.version_of(name, version).spec.metadata(self.repository.ready_versions(name))

    def model_config(self, name: str, version: str = "") -> dict:
        """ModelConfig in Triton's schema (its JSON form: {"config": {...}}, proto field names)."""
        spec, limits = self.version_of(name, version).spec, self.dispatcher.limits
        return {"config": {
            "name": spec.name, "platform": "pytorch", "backend": "pytorch",
            "version_policy": {"latest": {"num_versions": self.repository.keep_versions}},
            "max_batch_size": spec.max_batch_size,
            "input": [t.config() for t in spec.inputs], "output": [t.config() for t in spec.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": round(limits.max_queue_delay_s * 1e6),
                                 "preferred_batch_size": []},
            "instance_group": [{"count": len(self.dispatcher.replicas), "kind": self.instance_kind}],
            "response_cache": {"enable": self.cache is not None},
            "model_transaction_policy": {"decoupled": spec.decoupled}}}

    def model_statistics(self, name: str = "", version: str = "") -> dict:
        """ModelStatistics in the protocol's JSON form: {"model_stats": [...]}, one entry a version
        loaded (or once loaded): every model's for an empty name, every version's for an empty version."""
        if name and version:
            versions = [self.version_of(name, version)]
        else:
            versions = self.repository.versions(name)
        return {"model_stats": [v.statistics.document() for v in versions]}

    # -- the model repository extension
    def repository_index(self, ready_only: bool = False) -> list:
        """[{"name", "version", "state", "reason"}] of every model (version) known."""
        return self.repository.index(ready_only)

    def load(self, name: str, parameters: dict) -> None:
        """A new version of `name` from the run dir in the parameter `run` (without it: the run
        its newest version came from), rolled out one replica at a time."""
        if self.rollout is None:
            raise _unsupported("RepositoryModelLoad")
        run = parameters.get("run")
        if run is not None and not isinstance(run, str):
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"parameter 'run' is {type(run).__name__}; give the "
                                                               "run directory as a string")
        self.rollout.load(name, run)

    def unload(self, name: str, parameters: dict) -> None:
        if self.rollout is None:
            raise _unsupported("RepositoryModelUnload")
        self.rollout.unload(name)

    # -- inference
    def infer(self, request: InferRequest) -> InferReply:
        """The reply, or ServeError with the status the caller gets; every call is counted. A
        text generator's reply is the whole generated text."""
        started, times = arrived(), RequestTimes()  # a wait for a gRPC thread counts too
        with self._counted(started, times):
            if self._decoupled(request):
                _, tokens, spec, shape = self._generation(request, times)
                return spec.text_reply(request, bytes(tokens), shape, {"generated_tokens": tokens.sequence.made})
            call = self._begin(request, times, started)
            if call.reply is None:
                call.wait()
            return self._end(call, times)

    async def infer_async(self, request: InferRequest, executor: Executor) -> InferReply:
        """`infer` for a caller on an asyncio event loop (the HTTP door): the loop is woken when
        the rows are answered, so no thread waits for them, and the call costs no thread
        handoff. A text generator's request runs on `executor`'s threads: it waits step by step."""
        if self._decoupled(request):
            return await asyncio.get_running_loop().run_in_executor(executor, self.infer, request)
        started, times = time.monotonic(), RequestTimes()
        with self._counted(started, times):
            loop, answered = asyncio.get_running_loop(), asyncio.Event()
            call = self._begin(request, times, started, lambda: loop.call_soon_threadsafe(answered.set))
            if call.reply is None:
                try:
                    await asyncio.wait_for(answered.wait(), timeout=call.seconds_left())
                except asyncio.TimeoutError:
                    call.give_up()
            return self._end(call, times)

    @contextmanager
    def _counted(self, started: float, times: RequestTimes) -> Iterator[None]:
        """A ModelInfer answered inside: counted as active meanwhile, then OK, or as the error
        its caller gets (`_failed`)."""
        self._enter()
        try:
            yield
        except Exception as err:  # noqa: BLE001 - counted, and our own bugs said so
            raise self._failed(err, started, times) from err
        finally:
            self._leave()
        self._count("OK", started, times)

    def stream(self, request: InferRequest) -> "ReplyStream":
        """ModelStreamInfer's replies to one request: a text generator's one per generated byte,
        as each is drawn (the parameter triton_final_response true on the last, or on an empty
        reply after it when the request's triton_enable_empty_final_response asks), any other
        model's one reply. `cancel()` ends a generation whose caller left."""
        if not self._decoupled(request):
            return ReplyStream(iter([self.infer(request)]))
        started, times = arrived(), RequestTimes()
        self._enter()
        try:
            request, tokens, spec, shape = self._generation(request, times)
        except Exception as err:  # noqa: BLE001
            self._leave()
            raise self._failed(err, started, times) from err
        empty_final = bool(request.parameters.get("triton_enable_empty_final_response", False))
        last = tokens.sequence.sampling.max_tokens

        def replies() -> Iterator[InferReply]:
            code = "CANCELLED"
            try:
                for n, token in enumerate(tokens, 1):
                    final = n == last and not empty_final
                    yield spec.text_reply(request, bytes([token]), shape,
                                          {"generated_tokens": n, "triton_final_response": final})
                if empty_final and tokens.sequence.made == last:
                    yield InferReply(spec.name, spec.version, request.id, [], {"triton_final_response": True})
                code = "OK" if tokens.sequence.made == last else code
            except ServeError as err:
                code = err.code.name
                raise
            finally:
                tokens.cancel()
                self._leave()
                self._count(code, started, times)

        return ReplyStream(replies(), tokens.cancel)

    def _generation(self, request: InferRequest, times: RequestTimes) -> tuple:
        """A text generator's request, started: (request, its TokenStream, spec, the prompt's shape)."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        version = self.version_of(request.model, request.version)
        times.statistics = version.statistics
        request, spec = replace(request, version=version.version), version.spec
        prompt, shape, sampling = spec.prompt(request)
        tokens = self.generation.submit(version.key, prompt, sampling, spec.context, request.deadline)
        return request, tokens, spec, shape

    def _decoupled(self, request: InferRequest) -> bool:
        try:
            return self.version_of(request.model, request.version).spec.decoupled
        except ServeError:
            return False  # _infer answers NOT_FOUND, and counts it

    def _failed(self, err: Exception, started: float, times: RequestTimes) -> ServeError:
        """The error the caller gets, counted: a ServeError as it is, anything else INTERNAL."""
        if isinstance(err, ServeError):
            self._count(err.code.name, started, times)
            return err
        bugs.log(logging.ERROR, "ModelInfer failed", exc_info=err)  # our own bug: say so, keep serving the others
        self._count(grpc.StatusCode.INTERNAL.name, started, times)
        return ServeError(grpc.StatusCode.INTERNAL, "the server failed on this request (its log says why)")

    def _enter(self) -> None:
        with self._active_lock:
            self._active += 1

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _count(self, code: str, started: float, times: RequestTimes) -> None:
        """The call in the Prometheus counters and, once it found its model's version, in that
        version's statistics."""
        seconds = time.monotonic() - started
        self.metrics.request(code, seconds, times.queue if code == "OK" else None)
        if times.statistics is not None:
            times.statistics.request(code == "OK", seconds, times)

    def idle(self) -> bool:
        with self._active_lock:
            return self._active == 0

    def _begin(self, request: InferRequest, times: RequestTimes, arrived_at: float,
               notify: Callable[[], None] = lambda: None) -> "InferCall":
        """The request checked and queued, or answered from the cache (`InferCall.reply`);
        `notify()` once its rows are answered. `times` says where the time goes as it goes."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another")
        asked = request
        version = self.version_of(request.model, request.version)
        times.statistics = version.statistics
        if request.size > self.max_message_bytes:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the request is {request.size} bytes, over serve.max_message_mb="
                             f"{self.max_message_mb:g} MiB; send fewer rows per request")
        request, spec = replace(request, version=version.version), version.spec
        began = time.monotonic()
        rows = spec.rows(request)
        times.compute_input = time.monotonic() - began
        key = self.cache.key(version.digest, rows) if self.cache is not None else None
        if key is not None:
            began = time.monotonic()
            answer = self.cache.get(key)
            self.metrics.cache_lookup(answer is not None)
            if answer is not None:
                times.cache_hit = time.monotonic() - began
                return InferCall(request, spec, reply=spec.reply(request, answer, {"cache_hit": True}))
            times.cache_miss = time.monotonic() - began
        try:
            pending = self.dispatcher.submit(version.key, rows, request.deadline, notify, arrived_at)
        except Refused as err:
            if asked.version or err.code != grpc.StatusCode.NOT_FOUND:
                raise
            # The default version was unloaded between its choice and the queue: a newer one is the default now.
            return self._begin(asked, times, arrived_at, notify)
        return InferCall(request, spec, pending, key)

    def _end(self, call: "InferCall", times: RequestTimes) -> InferReply:
        """The reply to an answered call (`_begin`'s)."""
        if call.reply is not None:
            return call.reply
        pending = call.pending
        if pending.error is not None:
            raise pending.error
        if call.cache_key is not None:
            began = time.monotonic()
            self.cache.put(call.cache_key, pending.logits)
            times.cache_miss += time.monotonic() - began
        times.queue, times.compute_infer = pending.sent - pending.enqueued, pending.compute_s
        began = time.monotonic()
        reply = call.spec.reply(call.request, pending.logits, {"batch_rows": pending.batch_rows})
        times.compute_output = time.monotonic() - began
        return reply


@dataclass
class InferCall:
    """A request between `_begin` and `_end`: queued (`pending`), or answered already (`reply`)."""

    request: InferRequest
    spec: ModelSpec
    pending: Optional[Pending] = None
    cache_key: Optional[bytes] = None
    reply: Optional[InferReply] = None

    def seconds_left(self) -> Optional[float]:
        deadline = self.request.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def wait(self) -> None:
        """Block until the rows are answered, or give up at the deadline."""
        if not self.pending.done.wait(timeout=self.seconds_left()):
            self.give_up()

    def give_up(self) -> None:
        self.pending.abandoned = True  # the batcher drops it if it is still queued
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer")


class ReplyStream:
    """The replies to one streamed request, and how to end them early (the client left)."""

    def __init__(self, replies: Iterator[InferReply], cancel: Callable[[], None] = lambda: None):
        self._replies, self.cancel = replies, cancel

    def __iter__(self) -> Iterator[InferReply]:
        return self._replies


def _unsupported(method: str) -> ServeError:
    return ServeError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by rpc_train")


def message_bytes(mb: float) -> int:
    return int(mb * 2 ** 20)
