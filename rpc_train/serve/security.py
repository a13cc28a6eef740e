"""Who may call the front end: TLS (mutual with a client CA) and a bearer token, the same for
gRPC (credentials, an interceptor) and HTTP (an `ssl.SSLContext`, `token_matches`).

What this protects and what it does not is in the README ("Serving", security): the front end
only; torch RPC between the ranks has no authentication and stays on loopback or
`runtime.interface`.
"""

import hmac
import os
import ssl
from typing import Optional

import grpc
from omegaconf import DictConfig

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # open to load balancers and orchestrators


def _read(path: str) -> bytes:
    with open(os.path.expanduser(path), "rb") as f:
        return f.read()


def server_credentials(tls: DictConfig) -> Optional[grpc.ServerCredentials]:
    """TLS with serve.tls.cert/key, mutual when serve.tls.client_ca is set; None: plaintext."""
    if not tls.cert:
        return None
    ca = _read(tls.client_ca) if tls.client_ca else None
    return grpc.ssl_server_credentials([(_read(tls.key), _read(tls.cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def ssl_context(tls: DictConfig) -> Optional[ssl.SSLContext]:
    """The HTTP side of `server_credentials`: the same certificate, key and client CA."""
    if not tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.expanduser(tls.cert), os.path.expanduser(tls.key))
    if tls.client_ca:
        context.load_verify_locations(os.path.expanduser(tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bearer(token_file: str) -> bytes:
    """What the `authorization` header must say: `Bearer <token>`."""
    return b"Bearer " + _read(token_file).strip()


def token_matches(given, expected: bytes) -> bool:
    """In constant time (hmac.compare_digest), whatever the header held."""
    return hmac.compare_digest(given.encode() if isinstance(given, str) else (given or b""), expected)


class TokenAuth(grpc.ServerInterceptor):
    """Every call but the health service's must carry `authorization: Bearer <token>`.

    Compared in constant time (hmac.compare_digest); the token itself is never logged or echoed.
    """

    def __init__(self, token_file: str):
        self._expected = bearer(token_file)

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send the metadata 'authorization: Bearer <token>'")

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        given = next((value for key, value in details.invocation_metadata or () if key == "authorization"), "")
        if token_matches(given, self._expected):
            return continuation(details)
        return self._refuse
