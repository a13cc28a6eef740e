"""The network interface the ranks listen on, and the refusal of a public one.

torch RPC runs the pickles it receives with no authentication: anyone who reaches a rank's
port can run code in the job (docs/security.md). So TensorPipe and gloo listen on loopback on
one machine and on `runtime.interface` across machines, and an interface with an address
reachable from the internet is refused unless `runtime.allow_public_interface=true` says the
network is firewalled. Standard library only: preflight imports this without torch.
"""

import fcntl
import ipaddress
import os
import socket
import struct
from typing import List, Optional

from rpc_train.config.errors import ConfigError

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


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


def interface_addresses(name: str) -> Optional[List[str]]:
    """The IPv4 and IPv6 addresses of interface `name` on this machine; None if there is no such
    interface."""
    if name not in {n for _, n in socket.if_nameindex()}:
        return None
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            request = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            addresses.append(socket.inet_ntoa(request[20:24]))
        except OSError:  # no IPv4 address
            pass
    try:
        with open("/proc/net/if_inet6") as table:  # address, index, prefix, scope, flags, name
            for line in table:
                fields = line.split()
                if len(fields) == 6 and fields[5] == name:
                    addresses.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except OSError:  # no IPv6 on this machine
        pass
    return addresses


def is_public(address: str) -> bool:
    """Neither loopback nor a private or link-local range (RFC 1918, RFC 4193, ...)."""
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_private or ip.is_link_local)


def check_interface(interface: Optional[str], allow_public: bool) -> None:
    """A ConfigError naming `interface` if this machine has no such interface, or naming its
    address if that is public and `allow_public` is not set."""
    if not interface:
        return
    addresses = interface_addresses(interface)
    if addresses is None:
        names = ", ".join(sorted(n for _, n in socket.if_nameindex()))
        raise ConfigError(f"runtime.interface={interface}: this machine has no such network interface; "
                          f"use one of {names}")
    public = [a for a in addresses if is_public(a)]
    if public and not allow_public:
        raise ConfigError(f"runtime.interface={interface} has the public address {public[0]}, and anyone who "
                          "reaches a torch RPC port can run code in the job (README, Security); use an interface "
                          "on a private network (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7) or loopback, "
                          "or set runtime.allow_public_interface=true if a firewall admits only the job's machines")
