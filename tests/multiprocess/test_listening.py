"""A single-machine job of every mode listens on loopback only, apart from torchrun's stores
(the agent's rendezvous store and the TCPStore rank 0 hosts on MASTER_PORT).

torch RPC runs pickles from anyone who reaches its port (docs/security.md). TensorPipe follows
TP_SOCKET_IFNAME, and the gloo groups (the one init_rpc makes, the hybrid trainers' DDP group)
follow GLOO_SOCKET_IFNAME; without it gloo binds to whatever the hostname resolves to. Each job
runs where the hostname resolves to this machine's network address, as on most clusters (a UTS
namespace of its own, where allowed), while a thread reads its processes' sockets from /proc.
"""

import signal
import subprocess
import time

import pytest

from helpers.datasets import write_imagefolder
from helpers.launching import REPO, SMOKE, launch, launch_env, ok
from helpers.sockets import ListenWatch, hostname_prefix, network_address
from rpc_train.runtime.local_world import free_service_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HYBRID = ["experiment=dlrm_synthetic", "data.size=4000", "trainer.epochs=1", "trainer.max_steps=12",
          "trainer.batch_size=64", "trainer.log_every=4"]
IMAGES = ["data=imagefolder", "data.num_classes=3", "data.image_size=16"]
# mode -> (overrides, NPROC); serve and predict also take a trained run (added in the test)
JOBS = {
    "pipeline": (SMOKE, 3),
    "parameter_server": (SMOKE + ["mode=parameter_server"], 4),
    "hybrid": (HYBRID, 4),
    "data_service": (SMOKE + ["loader=service", "loader.workers=1"], 4),
    "serve": (["mode=serve"], 3),
    "predict": (["mode=predict", *IMAGES, "predict.split_size=10"], 3),
}


def _prefix():
    address = network_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    prefix = hostname_prefix(address)
    if prefix is None:
        pytest.skip("no UTS namespace here (needs root): the hostname resolves where the machine says")
    return prefix


@pytest.mark.parametrize("mode", list(JOBS))
def test_a_single_machine_job_listens_on_loopback_only(tmp_path, request, mode):
    prefix = _prefix()
    args, nproc = JOBS[mode]
    args = list(args)
    if mode == "serve":
        args += [f"serve.run={request.getfixturevalue('trained')}", f"serve.port={free_service_port()}",
                 f"serve.metrics_port={free_service_port()}", f"serve.http_port={free_service_port()}"]
    if mode == "predict":
        root, run = tmp_path / "images", tmp_path / "trained"
        write_imagefolder(str(root), classes=3, per_class=8, size=(20, 16))
        ok(launch([*IMAGES, f"data.root={root}", "trainer.batch_size=4", "trainer.max_steps=2"], run))
        args += [f"data.root={root}", f"serve.run={run}", f"predict.out={tmp_path / 'predictions'}"]
    run_dir = tmp_path / "run"
    with ListenWatch(run_dir) as watch:
        proc = subprocess.Popen([*prefix, str(REPO / "launch.sh"), *args], cwd=REPO,
                                env=launch_env(run_dir, NPROC=str(nproc)), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if mode == "serve":  # runs until stopped: let every rank come up, then drain it as a user would
            _wait_for(lambda: "ready: " in _read(run_dir / "rank0.log"), proc)
            time.sleep(2)
            proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert any(not store for *_, store in watch.seen), "the watch saw no rank's listening socket at all"
    assert watch.beyond_loopback() == [], output[-2000:]


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(condition, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended or never became ready"
        time.sleep(0.3)
