"""Who may call the front end: TLS (mutual with a client CA) and a bearer token.

What this protects and what it does not is in the README ("Serving", security): the front end
only; torch RPC between the ranks has no authentication and stays on loopback or
`runtime.interface`.
"""

import hmac
import os
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


class TokenAuth(grpc.ServerInterceptor):
    """Every call but the health service's must carry `authorization: Bearer <token>`.

    Compared in constant time (hmac.compare_digest); the token itself is never logged or echoed.
    """

    def __init__(self, token_file: str):
        self._expected = b"Bearer " + _read(token_file).strip()

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong token: send the metadata 'authorization: Bearer <token>'")

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        given = next((value for key, value in details.invocation_metadata or () if key == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return continuation(details)
        return self._refuse
