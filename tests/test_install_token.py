"""``install``'s shared-file-system test cannot be fooled by the remote side.

The remote (user ``sshqtest`` on the test bed's sshd) runs a wrapper as its
``python``: it answers ``init`` with a forged reply naming a directory of the
*client* (root's private pytest directory) and a client-owned file whose
content it knows, and runs the real agent for every other operation.  Before
the token probe, sshq took such a reply as proof of a shared file system and
copied the source tree into the directory the remote chose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import platform_toml

from sshq import AsyncClient
from sshq.exceptions import SshqError
from sshq.remote import staging
from sshq.remote.protocol import agent_source

WRAPPER = r'''#!/usr/bin/python3
import io, json, sys
FORGED = json.loads(%(forged)r)
LOG = %(log)r
b = sys.stdin.buffer
src = b.read(int(b.readline()))
raw = b.read()
req = json.loads(raw.decode("utf-8"))
with open(LOG, "a") as fh:
    fh.write(json.dumps({"op": req["op"], "path": req.get("path")}) + "\n")
if req["op"] == "init":
    body = json.dumps(dict(FORGED, rsync=True, home="/", hostname="h", python="3",
                           user="u")).encode()
    nonce = req["nonce"].encode()
    out = sys.stdout.buffer
    out.write(b"\nSSHQ-BEGIN-" + nonce + b"\n" + str(len(body)).encode() + b"\n" + body
              + b"0\nSSHQ-END-" + nonce + b"\n")
    out.flush()
else:
    sys.stdin = io.TextIOWrapper(io.BytesIO(raw))
    exec(compile(src, "sshq-agent", "exec"), {"__name__": "__main__"})
'''


@pytest.fixture
def wrapper_dir() -> Iterator[Path]:
    """A directory the remote user can read (the wrapper) and write (its log)."""
    d = Path(tempfile.mkdtemp(prefix="sq-forge-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def forging_platform(testbed: dict[str, str], wrapper_dir: Path, forged: dict[str, str],
                     transport: str) -> Path:
    log = wrapper_dir / "ops.log"
    log.touch()
    log.chmod(0o666)
    w = wrapper_dir / "python"
    w.write_text(WRAPPER % {"forged": json.dumps(forged), "log": str(log)})
    w.chmod(0o755)
    cfg = wrapper_dir / "platforms.toml"
    cfg.write_text(platform_toml(testbed, "forge", job_runner="background", transport=transport,
                                 run_dir="~/sshq-test/forge", python=str(w)))
    return cfg


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every path under d with its content (None for directories)."""
    return {str(p.relative_to(d)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(d.rglob("*"))}


def ops(wrapper_dir: Path) -> list[str]:
    return [json.loads(line)["op"] for line in (wrapper_dir / "ops.log").read_text().splitlines()]


def test_the_service_directory_name_is_the_agents() -> None:
    m = re.search(rb'^SERVICE_DIR = "([^"]+)"', agent_source(), re.MULTILINE)
    assert m is not None and m.group(1).decode() == staging.SERVICE_DIR


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
@pytest.mark.parametrize("target", ["any-file", "other-run-dir"])
async def test_a_forged_init_reply_does_not_aim_install_at_a_local_directory(
        testbed: dict[str, str], state_dir: Path, tmp_path: Path, wrapper_dir: Path,
        target: str, transport: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "evil.txt").write_text("installed\n")
    victim = tmp_path / "victim"
    if target == "any-file":
        # any client-owned file whose content the remote knows
        victim.mkdir()
        (victim / "notes.txt").write_text("known-content\n")
        forged = {"run_dir": str(victim), "uuid_file": str(victim / "notes.txt"),
                  "uuid": "known-content"}
    else:
        # another sshq run directory of the client, uuid file and all (a
        # probe is written there, and the remote cannot read it back)
        (victim / ".sshq").mkdir(parents=True)
        (victim / ".sshq" / "uuid").write_text("abcdefgh\n")
        forged = {"run_dir": str(victim), "uuid_file": str(victim / ".sshq" / "uuid"),
                  "uuid": "abcdefgh"}
    before = snapshot(victim)
    cfg = forging_platform(testbed, wrapper_dir, forged, transport)
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        try:
            done = await c.install(src, platform="forge")
        except SshqError:
            pass   # rsync as sshqtest into root's private directory fails: fine
        else:
            assert not done.shared_filesystem and done.method != "local"
    assert snapshot(victim) == before     # nothing written, nothing left behind
    # no round trip is spent on a reply that cannot be a shared file system;
    # one (a read of the probe) on one that might be
    assert ops(wrapper_dir) == (["init"] if target == "any-file" else ["init", "read"])


async def test_a_forged_init_reply_on_the_local_transport_copies_nothing(
        testbed: dict[str, str], state_dir: Path, tmp_path: Path, wrapper_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "evil.txt").write_text("installed\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("known-content\n")
    before = snapshot(victim)
    cfg = forging_platform(testbed, wrapper_dir, {
        "run_dir": str(victim), "uuid_file": str(victim / "notes.txt"),
        "uuid": "known-content"}, "local")
    async with AsyncClient(cfg, state_dir=state_dir) as c:
        with pytest.raises(SshqError, match="not the directory"):
            await c.install(src, platform="forge")
    assert snapshot(victim) == before


async def test_a_real_shared_file_system_is_still_detected(
        config_file: Path, state_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    async with AsyncClient(config_file, state_dir=state_dir) as c:
        done = await c.install(src, platform="local")
    assert done.shared_filesystem and done.method == "local"
    rd = Path(done.remote_dir)
    assert (rd / "a.txt").read_text() == "one\n"
    service = rd / staging.SERVICE_DIR
    assert sorted(p.name for p in service.iterdir()) == ["uuid"]  # the probe is gone


async def test_the_probe_file_is_private_and_its_name_does_not_carry_the_token(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "rd"
    (run_dir / ".sshq").mkdir(parents=True)
    (run_dir / ".sshq" / "uuid").write_text("u1\n")
    init = {"run_dir": str(run_dir), "uuid_file": str(run_dir / ".sshq" / "uuid"), "uuid": "u1"}
    seen: list[tuple[str, bytes, int]] = []

    async def read(path: str) -> bytes | None:
        data = Path(path).read_bytes()
        seen.append((path, data, stat.S_IMODE(os.stat(path).st_mode)))
        return data

    assert await staging.shared_run_dir(init, read)
    ((path, token, mode),) = seen
    assert token.decode() not in path and len(token) >= 32 and mode == 0o600
    assert not Path(path).exists()

    async def wrong(path: str) -> bytes | None:
        return b"0" * 32

    assert not await staging.shared_run_dir(init, wrong)
    # another user's uuid file, or a symlinked service directory: no probe at all
    init_other = dict(init, uuid="u2")
    assert not await staging.shared_run_dir(init_other, read)
    link = tmp_path / "link"
    (link / "").mkdir()
    os.symlink(run_dir / ".sshq", link / ".sshq")
    assert not await staging.shared_run_dir(
        {"run_dir": str(link), "uuid_file": str(link / ".sshq" / "uuid"), "uuid": "u1"}, read)
    assert len(seen) == 1
