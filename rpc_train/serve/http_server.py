"""The HTTP/REST door: the Open Inference Protocol's HTTP routes (KServe v2, as Triton serves them),
and /metrics behind the same TLS and token.

Each route translates (`http_codec.py`) and maps a `ServeError`'s code to Triton's HTTP status;
every answer comes from the core (`core.py`), whose calls block, so they run in a pool of
serve.threads threads; an inference instead awaits its answer on the loop (`infer_async`),
unless its body is large (`LOOP_BODY_BYTES`). aiohttp serves in a thread with its own event loop
(`HttpServer`), started and stopped by the driver next to the gRPC server. Errors are `{"error": "..."}`. A body
the door cannot read (not JSON, not laid out as the protocol says) is a 400 counted in
rpc_train_serve_malformed_requests_total{door="http"}; our own bug is a 500 whose traceback is
logged at most once every BUG_LOG_EVERY_S seconds.
"""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rpc_train.serve import http_codec
from rpc_train.serve.core import BUG_LOG_EVERY_S, ServingCore
from rpc_train.serve.ratelimit import RateLimitedLog
from rpc_train.serve.security import bearer, ssl_context, token_matches
from rpc_train.serve.tensors import ServeError

log = logging.getLogger(__name__)
bugs = RateLimitedLog(log, BUG_LOG_EVERY_S)

# gRPC's codes as Triton's HTTP server answers them.
STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
          grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
          grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
          grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 504}
# An inference body over this is decoded and answered on a pool thread: decoding megabytes of JSON
# on the event loop would hold every other connection of the door meanwhile. Under it, decoding
# costs less than the thread handoff (a few hundred µs), so the call stays on the loop.
LOOP_BODY_BYTES = 32 << 10
HEALTH = ("/v2/health/live", "/v2/health/ready")  # open to load balancers and orchestrators, as gRPC's health
MODEL = ["/v2/models/{model}", "/v2/models/{model}/versions/{version}"]


def _response(reply, call) -> web.Response:
    body, headers = http_codec.reply_body(reply, call)
    return web.Response(body=body, headers=headers)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ProtocolRoutes:
    """The protocol's HTTP routes, answered by the core."""

    def __init__(self, core: ServingCore, threads: int):
        self.core = core
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/stats", self.statistics)  # before /v2/models/{model}
        for path in MODEL:
            app.router.add_get(path, self.model_metadata)
            app.router.add_get(path + "/ready", self.model_ready)
            app.router.add_get(path + "/config", self.model_config)
            app.router.add_get(path + "/stats", self.statistics)
            app.router.add_post(path + "/infer", self.infer)
        app.router.add_post("/v2/repository/index", self.repository_index)
        app.router.add_post("/v2/repository/models/{model}/load", self.load)
        app.router.add_post("/v2/repository/models/{model}/unload", self.unload)

    async def _call(self, method: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, method, *args)

    async def live(self, request):
        return web.Response(status=200 if self.core.live() else 503)

    async def ready(self, request):
        return web.Response(status=200 if self.core.ready() else 503)

    async def server_metadata(self, request):
        return web.json_response(self.core.server_metadata())

    async def model_metadata(self, request):
        return web.json_response(await self._call(self.core.model_metadata, *_model(request)))

    async def model_ready(self, request):
        return web.Response(status=200 if await self._call(self.core.model_ready, *_model(request)) else 503)

    async def model_config(self, request):
        # HTTP answers the ModelConfig itself, gRPC's ModelConfigResponse wraps it in `config`.
        return web.json_response((await self._call(self.core.model_config, *_model(request)))["config"])

    async def statistics(self, request):
        name, version = _model(request) if "model" in request.match_info else ("", "")
        return web.json_response(await self._call(self.core.model_statistics, name, version))

    def _read(self, decode: Callable, *args):
        """`decode(*args)`; a body the door cannot read is counted as malformed, and its error raised."""
        try:
            return decode(*args)
        except ServeError as err:
            self.core.metrics.malformed_request("http", err.message)
            raise

    async def infer(self, request):
        body, length = await request.read(), request.headers.get(http_codec.HEADER_LENGTH)
        if len(body) > LOOP_BODY_BYTES:
            return await self._call(self._infer_blocking, body, length, *_model(request))
        call = self._read(http_codec.request_of, body, length, *_model(request))
        return _response(await self.core.infer_async(call.request, self.executor), call)

    def _infer_blocking(self, body: bytes, length: Optional[str], *model) -> web.Response:
        call = self._read(http_codec.request_of, body, length, *model)
        return _response(self.core.infer(call.request), call)

    async def repository_index(self, request):
        document = self._read(http_codec.json_body, await request.read())
        return web.json_response(await self._call(self.core.repository_index, bool(document.get("ready", False))))

    async def load(self, request):
        return await self._repository(request, self.core.load)

    async def unload(self, request):
        return await self._repository(request, self.core.unload)

    async def _repository(self, request, method):
        document = self._read(http_codec.json_body, await request.read())
        await self._call(method, request.match_info["model"], document.get("parameters") or {})
        return web.Response()


def _model(request) -> tuple:
    return request.match_info["model"], request.match_info.get("version", "")


@web.middleware
async def protocol_errors(request, handler):
    """A ServeError as its HTTP status; aiohttp's own refusals (no such route, too large) as JSON
    too; anything else is our bug: a 500, and its traceback in the log (rate-limited)."""
    try:
        return await handler(request)
    except ServeError as err:
        return error(STATUS.get(err.code, 500), err.message)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        if err.status in (404, 405):
            return error(err.status, f"{request.method} {request.path}: not a route of the Open Inference "
                                     "Protocol served here")
        return error(err.status, err.text or err.reason)
    except Exception as err:  # noqa: BLE001 - our own bug: say so, keep serving the others
        bugs.log(logging.ERROR, "%s %s failed", request.method, request.path, exc_info=err)
        return error(500, "the server failed on this request (its log says why)")


def token_check(expected: bytes, open_paths=()) -> Callable:
    """Every route but `open_paths` needs the header `authorization: Bearer <token>`."""

    @web.middleware
    async def check(request, handler):
        if request.path in open_paths or token_matches(request.headers.get("authorization", ""), expected):
            return await handler(request)
        return error(401, "missing or wrong token: send the header 'authorization: Bearer <token>'")

    return check


def _app(conf, open_paths, client_max_size: int = 2 ** 20) -> web.Application:
    middlewares = [protocol_errors]
    if conf.auth_token_file:
        middlewares.insert(0, token_check(bearer(conf.auth_token_file), open_paths))
    return web.Application(middlewares=middlewares, client_max_size=client_max_size)


def protocol_app(core: ServingCore, conf) -> web.Application:
    # aiohttp's own body limit sits well above ours, so that a request over ours still reaches the
    # core and gets 400 naming serve.max_message_mb (as on gRPC); past aiohttp's, it answers 413.
    app = _app(conf, HEALTH, client_max_size=4 * core.max_message_bytes)
    ProtocolRoutes(core, conf.threads).add_to(app)
    return app


def metrics_app(registry: CollectorRegistry, conf) -> web.Application:
    """/metrics in Prometheus' text format; with a token set, the scraper sends it too."""
    async def metrics(request):
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = _app(conf, ())
    app.router.add_get("/metrics", metrics)
    return app


class HttpServer:
    """An aiohttp application on host:port, in a thread with its own event loop."""

    def __init__(self, app: web.Application, host: str, port: int, tls, name: str):
        self.app, self.host, self.port, self.ssl = app, host, port, ssl_context(tls)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._runner: Optional[web.AppRunner] = None

    def start(self) -> "HttpServer":
        """Listening when it returns; a port that cannot be bound raises OSError."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self._end()
            raise
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl, reuse_port=False).start()

    def stop(self) -> None:
        """Stop listening, let calls being answered finish (up to 5 s), end the thread."""
        if self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=15)
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.warning("the HTTP server on %s:%d did not stop cleanly", self.host, self.port, exc_info=True)
        self._end()

    def _end(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def start_http(core: ServingCore, conf) -> HttpServer:
    """The protocol over HTTP on serve.host:serve.http_port."""
    return HttpServer(protocol_app(core, conf), conf.host, conf.http_port, conf.tls, "http").start()


def start_metrics(registry: CollectorRegistry, conf) -> HttpServer:
    """/metrics on serve.host:serve.metrics_port, with serve.tls and serve.auth_token_file when set."""
    return HttpServer(metrics_app(registry, conf), conf.host, conf.metrics_port, conf.tls, "metrics").start()
