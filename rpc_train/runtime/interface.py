"""The network interface the ranks listen on.

torch RPC runs the pickles it receives with no authentication: anyone who reaches a rank's
port can run code in the job (docs/security.md). So TensorPipe and gloo listen on loopback on
one machine and on `runtime.interface` across machines.
"""

import os
from typing import Optional


def set_listen_interface(interface: Optional[str], one_machine: bool) -> None:
    """TensorPipe (TP_SOCKET_IFNAME) and gloo (GLOO_SOCKET_IFNAME: the group init_rpc makes, the
    hybrid trainers' DDP group) listen on `interface` if set, else on loopback for one machine.
    Across machines without it TensorPipe picks an address itself and gloo binds to what the
    hostname resolves to."""
    for variable in ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
        if interface:
            os.environ[variable] = interface
        elif one_machine:
            os.environ.setdefault(variable, "lo")
