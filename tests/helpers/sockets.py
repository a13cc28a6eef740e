"""What a running job listens on, read from /proc, and a way to run it where the machine's
hostname resolves to a network address (as on most clusters) rather than to loopback.

`/proc/net/tcp` and `tcp6` list every TCP socket of this network namespace with its state and
inode; `/proc/<pid>/fd` links name the inodes a process holds.
"""

import ipaddress
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

LISTEN = "0A"
Listener = Tuple[str, int]  # (address, port)


def _address(hex_address: str) -> str:
    """/proc/net/tcp's little-endian hex (per 32-bit word) as an address."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_by_inode() -> Dict[int, Listener]:
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN:
                host, port = fields[1].split(":")
                found[int(fields[9])] = (_address(host), int(port, 16))
    return found


def socket_inodes(pid: int) -> Set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = str(fd.readlink())
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    except OSError:  # the process is gone
        pass
    return inodes


# torchrun's agent, and the serving job's (rpc_train.serve.agent: torchrun that passes signals on).
AGENTS = ("torch.distributed.run", "rpc_train.serve.agent")


def job_processes(run_dir: Path) -> Dict[int, Tuple[str, Optional[int]]]:
    """pid -> (command line, MASTER_PORT) of every process of the launch whose run dir is `run_dir`."""
    wanted = f"RUN_DIR={run_dir}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if wanted in environ:
                port = next((int(e[len(b"MASTER_PORT="):]) for e in environ if e.startswith(b"MASTER_PORT=")), None)
                found[int(proc.name)] = ((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(), port)
        except OSError:
            continue
    return found


class ListenWatch:
    """Polls, until stopped, what every process of a job listens on: {(command line, address,
    port, whether it is torchrun's store)}."""

    def __init__(self, run_dir: Path, every_s: float = 0.1):
        self.run_dir, self.every_s = run_dir, every_s
        self.seen: Set[Tuple[str, str, int, bool]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ListenWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            listeners = listening_by_inode()
            for pid, (cmdline, master_port) in job_processes(self.run_dir).items():
                for inode in socket_inodes(pid) & set(listeners):
                    host, port = listeners[inode]
                    store = any(agent in cmdline for agent in AGENTS) or port == master_port
                    self.seen.add((cmdline, host, port, store))
            time.sleep(self.every_s)

    def beyond_loopback(self) -> List[Tuple[str, str, int]]:
        """What the job listens on beyond loopback, torchrun's stores apart: the agent's
        rendezvous store, and the TCPStore rank 0 hosts on the MASTER_PORT torchrun hands out
        (both listen on every interface, whatever they are asked: torch has no setting)."""
        return sorted((cmd, host, port) for cmd, host, port, store in self.seen if not store and not _loopback(host))


def _loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    # gRPC binds 127.0.0.1 as the IPv4-mapped ::ffff:127.0.0.1, which Python 3.11 does not call loopback.
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def network_address() -> Optional[str]:
    """One of this machine's IPv4 addresses that is not loopback, or None."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=10).stdout
    except OSError:
        return None
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        with socket.socket() as s:
            try:
                s.bind((address, 0))
                return address
            except OSError:
                continue
    return None


def hostname_prefix(address: str) -> Optional[List[str]]:
    """A command prefix that runs the rest in a UTS namespace of its own whose hostname is
    `address`, so the hostname resolves to the network (what torch's gloo falls back to without
    GLOO_SOCKET_IFNAME); None where namespaces are not allowed (not root)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "true"], capture_output=True).returncode != 0:
        return None
    return [unshare, "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', address]
