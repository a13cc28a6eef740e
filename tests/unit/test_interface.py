"""Where the ranks listen (runtime/interface.py): loopback on one machine, runtime.interface
across machines, for TensorPipe and gloo alike; a public interface refused in one line."""

import os

import pytest

from rpc_train.config.errors import ConfigError
from rpc_train.preflight import main as preflight
from rpc_train.runtime import interface
from rpc_train.runtime.interface import check_interface, interface_addresses, is_public, set_listen_interface

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


def test_loopback_and_private_ranges_are_not_public():
    for address in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "fd00::2", "fe80::1"):
        assert not is_public(address), address
    for address in ("8.8.8.8", "2001:4860:4860::8888"):
        assert is_public(address), address


def test_the_loopback_interface_passes_and_a_missing_one_is_named():
    assert "127.0.0.1" in interface_addresses("lo")
    check_interface("lo", allow_public=False)
    check_interface(None, allow_public=False)
    with pytest.raises(ConfigError, match=r"^runtime.interface=nosuch0: this machine has no such network interface; "
                                          r"use one of .*\blo\b"):
        check_interface("nosuch0", allow_public=False)


def test_preflight_refuses_a_public_interface_in_one_line_naming_its_address_unless_allowed(monkeypatch, capsys):
    monkeypatch.setattr(interface, "interface_addresses", lambda name: ["10.0.0.5", "8.8.4.4"] if name == "eth9" else None)
    assert preflight(["runtime.interface=eth9"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runtime.interface=eth9 has the public address 8.8.4.4, "), lines
    assert "runtime.allow_public_interface=true" in lines[0]
    assert preflight(["runtime.interface=eth9", "runtime.allow_public_interface=true"]) == 0
