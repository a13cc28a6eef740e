"""Where the ranks listen (runtime/interface.py): loopback on one machine, runtime.interface
across machines, for TensorPipe and gloo alike."""

import os

import pytest

from rpc_train.runtime.interface import set_listen_interface

pytestmark = pytest.mark.timeout(60)

VARIABLES = ("TP_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


@pytest.fixture
def clean_env(monkeypatch):
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_tensorpipe_and_gloo_listen_on_loopback_on_one_machine_and_on_the_named_interface_otherwise(clean_env):
    set_listen_interface(None, one_machine=True)
    assert [os.environ[v] for v in VARIABLES] == ["lo", "lo"]
    set_listen_interface("eth1", one_machine=False)
    assert [os.environ[v] for v in VARIABLES] == ["eth1", "eth1"]


def test_several_machines_without_an_interface_leave_the_choice_to_torch(clean_env):
    set_listen_interface(None, one_machine=False)
    assert not any(v in os.environ for v in VARIABLES)
