"""``sshq.Executor(..., hosts=[...])`` on real hosts in network namespaces (issue 13).

The three hosts of tests/netns.py (each its own network namespace, veth link
and sshd, the test bed's user and files) are the Executor's ``hosts``: the
calls run as farm tasks there, one dispatcher per host, and each call says
which host it ran on from the address its task's SSH connection reached
(``SSH_CONNECTION``, inherited from the dispatcher's session).  The remote
interpreter is the test user's venv (tests/test_executor.py's
``remote_python``: same Python minor and cloudpickle as the client).
"""
# ruff: noqa: F401, F811  (the fixture imported from test_executor)

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from netns import NetnsHosts
from test_executor import ensure_venv, remote_python

from sshq import Executor

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(600)]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LABELS = ("n1", "n2", "n3")


def where(x: int) -> dict[str, Any]:
    """The call's value and where it ran: the sshd address of its session."""
    conn = os.environ.get("SSH_CONNECTION", "").split()
    return {"x": x, "square": x * x, "address": conn[2] if len(conn) == 4 else None,
            "farm_run": os.environ.get("SSHQ_FARM_RUN"), "hostname": socket.gethostname()}


@pytest.fixture
def config(netns_hosts: NetnsHosts, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "platforms.toml"
    path.write_text("".join(
        h.platform_toml(label, "~/sshq-test/executor-netns", connect_timeout=5)
        for label, h in zip(LABELS, netns_hosts, strict=True)))
    yield path
    netns_hosts.restore()


def test_hosts_runs_calls_on_the_network_namespace_hosts(
        config: Path, state_dir: Path, remote_python: str,
        netns_hosts: NetnsHosts) -> None:
    addresses = {h.address for h in netns_hosts}
    with Executor("n1", hosts=list(LABELS), python=remote_python, config=config,
                  state_dir=state_dir) as ex:
        got = list(ex.map(where, range(30)))
        assert [g["x"] for g in got] == list(range(30))          # in order, each once
        assert [g["square"] for g in got] == [x * x for x in range(30)]
        assert {g["address"] for g in got} <= addresses, got
        # one farm run for the map; its calls spread over the hosts
        assert len({g["farm_run"] for g in got}) == 1
        assert len({g["address"] for g in got}) >= 2, got
        one = ex.submit(where, 7).result(timeout=300)
        assert one["square"] == 49 and one["address"] in addresses
        assert ex._loop.call(ex.client.jobs()) == []              # no batch job anywhere
