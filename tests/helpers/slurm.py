"""A real one-node Slurm cluster on loopback (Debian's slurm-wlm): munged, slurmctld and slurmd,
each with its files under one directory and the machine's own /etc/slurm and /etc/munge untouched."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

from rpc_train.runtime.local_world import free_port

# slurmctld and slurmd live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "squeue"]


def missing_programs() -> List[str]:
    return [name for name in PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]


def slurm_conf(root: Path, cpus: int) -> str:
    """One node named localhost on 127.0.0.1, the controller beside it, ports free now."""
    return f"""\
ClusterName=rpctest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
# Root runs every daemon here, so no slurm user or file ownership is involved.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged's socket: the machine's munged (if any) has another key.
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
# Not /etc/slurm/plugstack.conf: nothing of the machine's Slurm setup leaks in.
PlugStackConfig={root}/plugstack.conf
# No cgroups: a container may not let slurmd create them. Processes are tracked through /proc
# and tasks are not bound to cores (each rank sizes its threads from its affinity mask).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
# Cores are the only resource counted: a job asks for no memory.
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Start with start(); stop() ends the jobs, then the daemons, whatever state they are in."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        # Nothing of a Slurm job this may run in: the daemons and the jobs see only this cluster.
        outer = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env: Dict[str, str] = {**outer, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}
        self.daemons: Dict[str, subprocess.Popen] = {}
        for sub in ("munge", "state", "spool", "logs"):
            (root / sub).mkdir(parents=True)
        (root / "plugstack.conf").write_text("")
        self.conf.write_text(slurm_conf(root, os.cpu_count() or 1))

    def start(self, timeout: float = 60) -> None:
        munge = self.root / "munge"
        key = munge / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # --force: munged wants every directory above its socket searchable by all users (for
        # non-root clients); pytest's tmp dirs are 0700, and every client here is root.
        self._daemon("munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={munge}/socket", f"--pid-file={munge}/pid", f"--seed-file={munge}/seed",
                     f"--log-file={self.root}/logs/munged.log")
        self._wait(lambda: (munge / "socket").exists(), "munged's socket", timeout)
        self._daemon("slurmctld", "-D")
        # -N: the node's name in slurm.conf, whatever this machine's hostname is.
        self._daemon("slurmd", "-D", "-N", "localhost")
        self._wait(lambda: self.run("sinfo", "--noheader", "--format=%t").stdout.strip() == "idle",
                   "the node to be idle in sinfo", timeout)

    def run(self, *args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs)

    def logs(self) -> str:
        logs = sorted((self.root / "logs").iterdir())
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in logs)

    def stop(self) -> None:
        if "slurmctld" in self.daemons:
            # Jobs first, so slurmd ends their processes before it goes.
            try:
                self.run("scancel", "--full", "--user=root")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run("squeue", "--noheader").stdout.strip():
                    time.sleep(0.2)
            except subprocess.TimeoutExpired:  # a controller that does not answer: stop it all the same
                pass
        for name, proc in reversed(list(self.daemons.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _daemon(self, name: str, *args: str) -> None:
        """`name` in the foreground of its own session, its output in logs/<name>.out."""
        with open(self.root / "logs" / f"{name}.out", "w") as log:
            self.daemons[name] = subprocess.Popen([shutil.which(name, path=SEARCH_PATH), *args], env=self.env,
                                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True)

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self.daemons.items() if proc.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"waiting for {what}; exited: {dead}\n{self.logs()}"
            time.sleep(0.2)
