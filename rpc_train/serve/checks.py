"""What the launcher checks before a serving job starts: runs to serve, whose files fit, and free ports."""

import socket

from omegaconf import DictConfig

from rpc_train.config.errors import ConfigError
from rpc_train.serve.source import build_served, served_models


def check_serving(conf: DictConfig) -> None:
    for served in served_models(conf).values():
        build_served(served)
        if served.is_dlrm and conf.stages > 1:
            raise ConfigError(f"serve.stages={conf.stages}: {served.run_dir} is a DLRM (a mode=hybrid run), served "
                              "whole on each replica; use serve.stages=1")
    check_port_free(conf.host, conf.port)
    if conf.metrics_port:
        check_port_free(conf.host, conf.metrics_port, "serve.metrics_port")
    if conf.http_port:
        check_port_free(conf.host, conf.http_port, "serve.http_port")


def check_port_free(host: str, port: int, setting: str = "serve.port") -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ConfigError(f"{setting}={port}: {host}:{port} is taken or not ours to bind ({err.strerror}); "
                              f"choose a free {setting}, or stop what listens there") from err
