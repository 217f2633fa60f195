"""``sshq farm`` end to end: the real command over the test bed's loopback sshd.

Platform ``bg`` (asyncssh) unless a test says otherwise; a few also run over
``bg-openssh`` and ``local``.  The tasks run as the test bed's user on this
machine, so the tests can look at what they leave behind (marker files in
/tmp, the --deps copy in the user's home, processes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import platform_toml

from sshq.exceptions import ConfigError

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(120)]

#: The CLI's exit status for a configuration / usage error (sshq's own scheme).
CONFIG_RC = ConfigError.exit_code

Sshq = Callable[..., subprocess.CompletedProcess[bytes]]

#: The keys of a plain jsonl result (no output dir, no timeout, no error).
KEYS = {"seq", "command", "host", "exit_status", "signal", "stdout", "stderr", "start", "end",
        "attempts"}


def write_batch(tmp_path: Path, lines: list[str | bytes], name: str = "batch.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


def jsonl(stdout: bytes) -> list[dict[str, Any]]:
    """Every line of stdout is one JSON object (stdout carries nothing else)."""
    if not stdout:
        return []
    assert stdout.endswith(b"\n"), stdout[-200:]
    out = []
    for line in stdout.split(b"\n")[:-1]:
        obj = json.loads(line.decode("utf-8"))
        assert isinstance(obj, dict)
        out.append(obj)
    return out


def by_seq(results: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    seqs = [r["seq"] for r in results]
    assert len(seqs) == len(set(seqs)), f"a task reported twice: {seqs}"
    return {r["seq"]: r for r in results}


def out_bytes(r: dict[str, Any], name: str = "stdout") -> bytes:
    if f"{name}_b64" in r:
        assert name not in r
        return base64.b64decode(r[f"{name}_b64"])
    return r[name].encode("utf-8")


def run_name(stderr: bytes) -> str:
    m = re.search(rb"sshq: farm run (\S+)", stderr)
    assert m, stderr
    return m.group(1).decode()


def journal(state_dir: Path, name: str) -> list[dict[str, Any]]:
    p = state_dir / "farm" / name / "journal"
    if not p.exists():
        return []
    events = []
    for line in p.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def ok(p: subprocess.CompletedProcess[bytes], rc: int = 0) -> subprocess.CompletedProcess[bytes]:
    assert p.returncode == rc, (p.returncode, p.stderr.decode(errors="replace")[-3000:])
    return p


def bed_user_home(testbed: dict[str, str]) -> Path:
    return Path(pwd.getpwnam(testbed["SSHQ_TEST_USER"]).pw_dir)


# ---------------------------------------------------------------- formats

def test_jsonl_fields(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, [
        "echo out; echo err >&2",
        "",
        "# a comment",
        "exit 3",
        "kill -TERM $$",
        'echo "unterminated',
        "echo " + "y" * 200000,            # longer than the kernel takes for one argument
    ])
    t0 = time.time()
    p = ok(sshq("farm", str(b), "--hosts", "bg"), 1)
    t1 = time.time()
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == {1, 4, 5, 6, 7}
    r7 = rs.pop(7)
    assert r7["exit_status"] == 127 and "Argument list too long" in r7["stderr"]
    for r in rs.values():
        assert set(r) == KEYS, r
        assert r["host"] == "bg" and r["attempts"] == 1
        assert isinstance(r["start"], float) and isinstance(r["end"], float)
        assert t0 - 5 <= r["start"] <= r["end"] <= t1 + 5   # same machine, same clock
    assert rs[1] | {"start": 0, "end": 0} == {
        "seq": 1, "command": "echo out; echo err >&2", "host": "bg", "exit_status": 0,
        "signal": None, "stdout": "out\n", "stderr": "err\n", "start": 0, "end": 0,
        "attempts": 1}
    assert rs[4]["command"] == "exit 3"
    assert (rs[4]["exit_status"], rs[4]["signal"], rs[4]["stdout"]) == (3, None, "")
    assert (rs[5]["exit_status"], rs[5]["signal"]) == (None, "TERM")
    assert rs[6]["exit_status"] == 2 and rs[6]["signal"] is None and rs[6]["stderr"]
    assert b"4 of 5 task(s) failed" in p.stderr


def test_invalid_utf8_output_is_base64(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, [
        r"printf '\377\376ok'",
        r"printf 'fine'; printf '\300\200' >&2",
        r"printf '\342\234'",              # a multi-byte character cut short
        r"printf '\342\234\223'",          # the whole of it
    ])
    rs = by_seq(jsonl(ok(sshq("farm", str(b), "--hosts", "bg")).stdout))
    assert "stdout" not in rs[1] and out_bytes(rs[1]) == b"\xff\xfeok"
    assert rs[1]["stderr"] == ""
    assert rs[2]["stdout"] == "fine" and "stderr" not in rs[2]
    assert out_bytes(rs[2], "stderr") == b"\xc0\x80"
    assert "stdout" not in rs[3] and out_bytes(rs[3]) == b"\xe2\x9c"
    assert rs[4]["stdout"] == "✓" and "stdout_b64" not in rs[4]


def parse_anet(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 8, "a frame header cut short"
        seq, n = struct.unpack_from("<II", data, pos)
        assert pos + 8 + n <= len(data), "a frame cut short"
        frames.append((seq, data[pos + 8: pos + 8 + n]))
        pos += 8 + n
    return frames


@pytest.mark.parametrize("outdir", [False, True], ids=["inline", "output-dir"])
def test_anet_framing(sshq: Sshq, tmp_path: Path, outdir: bool) -> None:
    b = write_batch(tmp_path, [
        "printf one",
        "true",
        "# skipped",
        r"printf '\000\377two\n'; echo 'not in anet' >&2",
        "echo failed too; exit 3",
        "printf '%s' " + "0123456789" * 10000,
    ])
    extra = ["--output-dir", str(tmp_path / "out")] if outdir else []
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--format", "anet", *extra), 1)
    frames = parse_anet(p.stdout)
    got = dict(frames)
    assert len(frames) == len(got) == 5
    assert got == {1: b"one", 2: b"", 4: b"\0\xfftwo\n", 5: b"failed too\n",
                   6: b"0123456789" * 10000}


def test_keep_order(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, [
        "sleep 1.5; echo 1",
        "sleep 0.8; echo 2",
        "echo 3",
        "",
        "echo 5",
        "sleep 0.3; echo 6",
    ])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--slots", "5", "--keep-order"))
    rs = jsonl(p.stdout)
    assert [r["seq"] for r in rs] == [1, 2, 3, 5, 6]
    assert [r["stdout"] for r in rs] == ["1\n", "2\n", "3\n", "5\n", "6\n"]
    # without --keep-order, results come as tasks end: the slow first line is last
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--slots", "5"))
    seqs = [r["seq"] for r in jsonl(p.stdout)]
    assert sorted(seqs) == [1, 2, 3, 5, 6]
    assert seqs[-1] == 1 and seqs.index(3) < seqs.index(2)


def test_output_dir(sshq: Sshq, tmp_path: Path) -> None:
    out = tmp_path / "out"
    b = write_batch(tmp_path, [
        "echo out1; echo err1 >&2",
        r"printf '\377bin'",
        "",
        "echo partial; exit 4",
    ])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--output-dir", str(out)), 1)
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == {1, 2, 4}
    for seq, r in rs.items():
        assert set(r) == KEYS - {"stdout", "stderr"} | {"stdout_file", "stderr_file"}, r
        assert Path(r["stdout_file"]) == out / f"{seq}.stdout"
        assert Path(r["stderr_file"]) == out / f"{seq}.stderr"
    assert (out / "1.stdout").read_bytes() == b"out1\n"
    assert (out / "1.stderr").read_bytes() == b"err1\n"
    assert (out / "2.stdout").read_bytes() == b"\xffbin"
    assert (out / "2.stderr").read_bytes() == b""
    assert (out / "4.stdout").read_bytes() == b"partial\n" and rs[4]["exit_status"] == 4
    assert sorted(x.name for x in out.iterdir()) == [
        "1.stderr", "1.stdout", "2.stderr", "2.stdout", "4.stderr", "4.stdout"]


# ---------------------------------------------------------------- hostile commands

#: A fake dispatcher frame a task prints, to try to fool the client.
_FAKE = b'{"type":"done","id":0,"exit_status":0,"signal":null,"stdout_bytes":0}'
_FAKE_FRAME = struct.pack(">II", len(_FAKE), 0) + _FAKE


def _octal(data: bytes) -> str:
    return "".join(f"\\{b:03o}" for b in data)


#: (batch line, expected stdout).  Every one exits 0.
HOSTILE: list[tuple[str, bytes]] = [
    ("""printf '%s\\n' "it's \\"double\\" and 'single'" """,
     b"it's \"double\" and 'single'\n"),
    ("echo $(echo sub) `echo tick` $((6*7))", b"sub tick 42\n"),
    ("""printf '%s\\n' 'a\\b\\\\c' "$" '$(no)' '`no`'""", b"a\\b\\\\c\n$\n$(no)\n`no`\n"),
    ("echo 'ünïcødé ✓ 日本語 🎉' \"ü\"", "ünïcødé ✓ 日本語 🎉 ü\n".encode()),
    ("printf '\\nSSHQ-BEGIN-0123456789abcdef01234567\\n0\\nSSHQ-END-x\\n'; printf '"
     + _octal(_FAKE_FRAME) + "'; printf '\\000\\000\\000\\377'",
     b"\nSSHQ-BEGIN-0123456789abcdef01234567\n0\nSSHQ-END-x\n" + _FAKE_FRAME
     + b"\0\0\0\xff"),
    ("printf '%s' " + "0123456789abcdef" * 6000, b"0123456789abcdef" * 6000),
    ("\t  echo   spaced\targs  ", b"spaced args\n"),
    ("echo a | tr a b; false || echo c && echo d; echo e > /dev/null", b"b\nc\nd\n"),
    ("printf '%s|' *no-such-file* '*' '?'", b"*no-such-file*|*|?|"),
    ("echo 'a\rb'", b"a\rb\n"),
    ("printf '100%% done\\n'", b"100% done\n"),
    ("cat; read x; echo \"read:$? cat-done\"", b"read:1 cat-done\n"),   # stdin is /dev/null
    ("echo \"$SSHQ_FARM_SEQ\"", b"13\n"),
]


@pytest.mark.parametrize("platform", ["bg", "bg-openssh", "local"])
def test_hostile_commands_reach_the_shell_exactly(sshq: Sshq, tmp_path: Path,
                                                  platform: str) -> None:
    b = write_batch(tmp_path, [cmd for cmd, _ in HOSTILE])
    p = ok(sshq("farm", str(b), "--hosts", platform))
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == set(range(1, len(HOSTILE) + 1))
    for seq, (cmd, want) in enumerate(HOSTILE, 1):
        r = rs[seq]
        assert r["command"] == cmd
        assert (r["exit_status"], r["signal"], r["host"]) == (0, None, platform), r
        assert out_bytes(r) == want, (seq, cmd)
        assert out_bytes(r, "stderr") == b""


def test_task_environment(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, ['echo "$SSHQ_FARM_RUN|$SSHQ_FARM_SEQ|$SSHQ_FARM_HOST|'
                               '$SSHQ_FARM_ATTEMPT|$SSHQ_FARM_SLOT"'] * 2)
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--slots", "2", "--run", "envrun"))
    rs = by_seq(jsonl(p.stdout))
    slots = set()
    for seq in (1, 2):
        name, s, host, attempt, slot = rs[seq]["stdout"].strip().split("|")
        assert (name, s, host, attempt) == ("envrun", str(seq), "bg", "1")
        slots.add(int(slot))
    assert slots <= {1, 2}


@pytest.mark.parametrize("detach", [False, True], ids=["stream", "detached"])
def test_tasks_see_the_platforms_path_prepend(sshq: Sshq, tmp_path: Path, config_file: Path,
                                              testbed: dict[str, str], run_id: str,
                                              detach: bool) -> None:
    dirs = ["/opt/sshq-pp/bin", "/usr/local/sshq pp"]
    with open(config_file, "a") as fh:
        fh.write(platform_toml(testbed, "bgpp", job_runner="background", transport="asyncssh",
                               run_dir=f"~/sshq-test/{run_id}", path_prepend=dirs))
    b = write_batch(tmp_path, ['echo "$PATH"'] * 2)
    if detach:
        ok(sshq("farm", str(b), "--hosts", "bgpp", "--detach", "--run", f"pp-{run_id}"))
        p = ok(sshq("farm", "attach", f"pp-{run_id}"))
    else:
        p = ok(sshq("farm", str(b), "--hosts", "bgpp"))
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == {1, 2}
    for r in rs.values():
        path = r["stdout"].rstrip("\n").split(":")
        assert path[:2] == dirs and len(path) > 2, r["stdout"]


# ---------------------------------------------------------------- big output

@cache
def big_expected() -> tuple[int, str]:
    data = subprocess.run(["seq", "6600000"], capture_output=True, check=True).stdout
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("platform", "outdir"), [("bg", False), ("bg", True),
                                                  ("bg-openssh", False)])
def test_50mb_output_arrives_intact(sshq: Sshq, tmp_path: Path, platform: str,
                                    outdir: bool) -> None:
    n, digest = big_expected()
    assert n > 50_000_000
    b = write_batch(tmp_path, ["seq 6600000; seq 300000 >&2", "echo small"])
    out = tmp_path / "out"
    extra = ["--output-dir", str(out)] if outdir else []
    p = ok(sshq("farm", str(b), "--hosts", platform, *extra))
    rs = by_seq(jsonl(p.stdout))
    err_expected = b"".join(b"%d\n" % i for i in range(1, 300001))
    if outdir:
        data = Path(rs[1]["stdout_file"]).read_bytes()
        err = Path(rs[1]["stderr_file"]).read_bytes()
        assert Path(rs[2]["stdout_file"]).read_bytes() == b"small\n"
        assert not [x for x in out.iterdir() if x.name.startswith(".")]
    else:   # over 4 MiB: in a file of the run's directory, named in the result
        name = run_name(p.stderr)
        assert rs[1]["stdout_file"].endswith(f"/farm/{name}/output/1.stdout")
        assert "stdout" not in rs[1]
        data = Path(rs[1]["stdout_file"]).read_bytes()
        err = rs[1]["stderr"].encode()   # 2 MB: carried in the result
        assert rs[2]["stdout"] == "small\n"
    assert len(data) == n and hashlib.sha256(data).hexdigest() == digest
    assert err == err_expected


# ---------------------------------------------------------------- timeout

def test_timeout_kills_a_task_that_never_ends(sshq: Sshq, tmp_path: Path) -> None:
    mark = f"{1000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"
    b = write_batch(tmp_path, [
        f"sleep {mark}",
        f"trap '' TERM; echo stubborn; sleep {mark}1; echo never",
        "echo quick",
    ])
    t0 = time.monotonic()
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--slots", "3", "--timeout", "1"), 1)
    elapsed = time.monotonic() - t0
    rs = by_seq(jsonl(p.stdout))
    r1, r2, r3 = rs[1], rs[2], rs[3]
    assert r1["timed_out"] is True and r1["signal"] == "TERM" and r1["exit_status"] is None
    assert 0.9 <= r1["end"] - r1["start"] < 2.5
    assert r2["timed_out"] is True and r2["signal"] == "KILL" and r2["exit_status"] is None
    assert r2["stdout"] == "stubborn\n"
    assert 2.9 <= r2["end"] - r2["start"] < 5
    assert r3["exit_status"] == 0 and "timed_out" not in r3
    assert elapsed < 15
    left = subprocess.run(["pgrep", "-f", f"sleep {mark}"], capture_output=True)
    assert left.stdout == b"", "the timed-out task left processes behind"


def test_a_straggler_that_times_out_is_reported_once_and_the_run_ends(
        sshq: Sshq, tmp_path: Path, state_dir: Path) -> None:
    # `sleep 60` straggles (speculated once the three quick tasks set the
    # median), then times out: the timed-out copy is the task's result, its
    # extra copy is killed, nothing is started again (it once looped forever,
    # a new copy every 1.5 s)
    b = write_batch(tmp_path, ["echo one", "echo oops >&2; exit 3", "printf x",
                               "sleep 1; echo y", "sleep 60"])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--slots", "2", "--timeout", "3",
                "--run", "strag", timeout=60), 1)
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == {1, 2, 3, 4, 5}
    assert [rs[s]["exit_status"] for s in (1, 2, 3, 4)] == [0, 3, 0, 0]
    assert (rs[1]["stdout"], rs[2]["stderr"], rs[3]["stdout"], rs[4]["stdout"]) == (
        "one\n", "oops\n", "x", "y\n")
    assert rs[5]["timed_out"] is True and rs[5]["exit_status"] is None
    assert rs[5]["attempts"] <= 2
    ev = journal(state_dir, "strag")
    assert count(ev, "speculate") <= 1
    assert Counter(e["seq"] for e in ev if e.get("e") == "result") == Counter(range(1, 6))
    assert b"2 of 5 task(s) failed" in p.stderr


def test_a_task_killed_by_a_foreign_signal_is_reported_after_the_grace(
        sshq: Sshq, tmp_path: Path, state_dir: Path) -> None:
    # the dispatcher holds such a result SIGNAL_GRACE (1 s), in case its host
    # is going down; it then sat in its queue until the next heartbeat (5 s
    # later).  Measured from the task's own end (the host's clock: this
    # machine) to the client's journalling of the result (ms precision).
    b = write_batch(tmp_path, ["kill -TERM $$"])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--run", "foreign", timeout=60), 1)
    (r,) = jsonl(p.stdout)
    assert (r["signal"], r["exit_status"]) == ("TERM", None)
    (got,) = [e["t"] for e in journal(state_dir, "foreign") if e.get("e") == "result"]
    assert 0.9 <= got - r["end"] < 4.0, got - r["end"]   # the heartbeat is 5 s


# ---------------------------------------------------------------- retries

@pytest.fixture
def marker() -> Any:
    """A fresh path in /tmp (writable by the test bed's user); removed afterwards."""
    made: list[Path] = []

    def new() -> Path:
        p = Path(f"/tmp/sshq-farm-retry-{uuid.uuid4().hex}")
        made.append(p)
        return p

    yield new
    for p in made:
        p.unlink(missing_ok=True)


def flaky(m: Path) -> str:
    """Fails on its first attempt (recording the host), succeeds later."""
    return (f'm={m}; if [ "$SSHQ_FARM_ATTEMPT" = 1 ]; then echo "$SSHQ_FARM_HOST" > $m;'
            f' echo first >&2; exit 7; fi; echo "attempt=$SSHQ_FARM_ATTEMPT first=$(cat $m)'
            f' now=$SSHQ_FARM_HOST"')


def test_retry_succeeds_on_another_host(sshq: Sshq, tmp_path: Path, marker: Any) -> None:
    b = write_batch(tmp_path, [flaky(marker()), "echo steady"])
    p = ok(sshq("farm", str(b), "--hosts", "bg,bg-openssh", "--retries", "1"))
    rs = by_seq(jsonl(p.stdout))
    r = rs[1]
    assert (r["exit_status"], r["attempts"], r["stderr"]) == (0, 2, "")
    m = re.fullmatch(r"attempt=2 first=(\S+) now=(\S+)\n", r["stdout"])
    assert m, r["stdout"]
    assert m[1] != m[2] and m[2] == r["host"]
    assert {m[1], m[2]} == {"bg", "bg-openssh"}
    assert rs[2]["attempts"] == 1 and rs[2]["exit_status"] == 0


def test_no_retries_reports_the_failure(sshq: Sshq, tmp_path: Path, marker: Any) -> None:
    b = write_batch(tmp_path, [flaky(marker()), "echo steady"])
    p = ok(sshq("farm", str(b), "--hosts", "bg"), 1)
    rs = by_seq(jsonl(p.stdout))
    assert (rs[1]["exit_status"], rs[1]["attempts"], rs[1]["stderr"]) == (7, 1, "first\n")
    assert rs[2]["exit_status"] == 0
    assert b"1 of 2 task(s) failed" in p.stderr


def test_retries_exhausted_on_one_host(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, ['echo "try $SSHQ_FARM_ATTEMPT"; exit 9'])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--retries", "2"), 1)
    (r,) = jsonl(p.stdout)
    assert (r["exit_status"], r["attempts"], r["stdout"]) == (9, 3, "try 3\n")


# ---------------------------------------------------------------- runs: names, errors

def test_generated_name_on_stderr_and_only_json_on_stdout(sshq: Sshq, tmp_path: Path,
                                                          state_dir: Path) -> None:
    b = write_batch(tmp_path, ['echo "$SSHQ_FARM_RUN"', "echo second >&2"])
    p = ok(sshq("farm", str(b), "--hosts", "bg"))
    name = run_name(p.stderr)
    rs = by_seq(jsonl(p.stdout))
    assert rs[1]["stdout"] == f"{name}\n" and rs[2]["stderr"] == "second\n"
    assert name.encode() not in p.stdout.replace(f'"{name}\\n"'.encode(), b"")
    assert (state_dir / "farm" / name / "journal").exists()
    # every task was reported: a resume has nothing left to do
    p = ok(sshq("farm", "--resume", name))
    assert p.stdout == b""


def test_run_name_twice_is_an_error(sshq: Sshq, tmp_path: Path) -> None:
    b = write_batch(tmp_path, ["echo once"])
    p = ok(sshq("farm", str(b), "--hosts", "bg", "--run", "twice"))
    assert [r["stdout"] for r in jsonl(p.stdout)] == ["once\n"]
    p = sshq("farm", str(b), "--hosts", "bg", "--run", "twice")
    assert p.returncode == CONFIG_RC and p.stdout == b""
    assert b"exists already" in p.stderr


@pytest.mark.parametrize(("args", "msg"), [
    (["--run", "../evil"], b"invalid run name"),
    (["--hosts", "not a host!"], b"neither a platform nor an SSH destination"),
    (["--hosts", "bg,bg"], b"more than once"),
])
def test_bad_arguments(sshq: Sshq, tmp_path: Path, state_dir: Path, args: list[str],
                       msg: bytes) -> None:
    b = write_batch(tmp_path, ["echo never"])
    if "--hosts" not in args:
        args = [*args, "--hosts", "bg"]
    p = sshq("farm", str(b), *args)
    assert p.returncode == CONFIG_RC and p.stdout == b"" and msg in p.stderr, p.stderr
    assert not list(state_dir.glob("farm/*/options.json")), "a run was created"
    assert not (tmp_path.parent / "evil").exists()


def test_missing_batch_and_unknown_run(sshq: Sshq, tmp_path: Path) -> None:
    p = sshq("farm", str(tmp_path / "missing.txt"), "--hosts", "bg")
    assert p.returncode == CONFIG_RC and p.stdout == b"" and b"cannot read" in p.stderr
    for args in (["pause", "nosuchrun"], ["resume", "nosuchrun"], ["--resume", "nosuchrun"]):
        p = sshq("farm", *args)
        assert p.returncode == CONFIG_RC and b"no farm run" in p.stderr, (args, p.stderr)
    b = write_batch(tmp_path, ["echo nul\0byte"])
    p = sshq("farm", str(b), "--hosts", "bg")
    assert p.returncode == CONFIG_RC and b"NUL" in p.stderr and p.stdout == b""


# ---------------------------------------------------------------- pause / resume, resume

def start_farm(cli_env: dict[str, str], tmp_path: Path, *args: str,
               ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "cli.out", tmp_path / "cli.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", *args], env=cli_env,
                                stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    return proc, out, err


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def count(events: list[dict[str, Any]], kind: str) -> int:
    return sum(1 for e in events if e.get("e") == kind)


def test_pause_and_resume_a_running_run(sshq: Sshq, cli_env: dict[str, str], tmp_path: Path,
                                        state_dir: Path) -> None:
    # Tasks last longer than it takes the client to notice the pause, so
    # tasks queued on the host (beyond the running ones) would start *after*
    # the pause took effect if only the client stopped sending new ones.
    n = 6
    b = write_batch(tmp_path, ['sleep 2; echo "$SSHQ_FARM_SEQ"'] * n)
    proc, out, err = start_farm(cli_env, tmp_path, str(b), "--hosts", "bg", "--slots", "2",
                                "--run", "pz", "--no-speculate")
    try:
        wait_for(lambda: count(journal(state_dir, "pz"), "start") >= 2, 30, "two starts")
        ok(sshq("farm", "pause", "pz"))
        time.sleep(1.0)   # the client notices within half a second
        ev = journal(state_dir, "pz")
        s0 = count(ev, "start")
        assert s0 < n
        time.sleep(2.5)   # every task that had started ends in this window
        ev = journal(state_dir, "pz")
        assert count(ev, "start") == s0, "tasks started while the run was paused"
        assert count(ev, "result") == s0, "the running tasks should have finished"
        assert proc.poll() is None
        ok(sshq("farm", "resume", "pz"))
        assert proc.wait(timeout=60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rs = by_seq(jsonl(out.read_bytes()))
    assert set(rs) == set(range(1, n + 1))
    assert all(r["stdout"] == f"{s}\n" for s, r in rs.items())
    assert count(journal(state_dir, "pz"), "start") == n


def test_killed_client_resumes_every_task_exactly_once(sshq: Sshq, cli_env: dict[str, str],
                                                       tmp_path: Path, state_dir: Path) -> None:
    n = 12
    b = write_batch(tmp_path, ['sleep 0.4; echo "$SSHQ_FARM_SEQ"'] * n)
    proc, out, err = start_farm(cli_env, tmp_path, str(b), "--hosts", "bg", "--slots", "2",
                                "--run", "rk")
    try:
        wait_for(lambda: out.read_bytes().count(b"\n") >= 3, 60, "three results")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = jsonl(out.read_bytes())
    assert 3 <= len(first) < n
    p = ok(sshq("farm", "--resume", "rk"))
    second = jsonl(p.stdout)
    counts = Counter(r["seq"] for r in first + second)
    assert counts == Counter(range(1, n + 1)), counts
    assert all(r["stdout"] == f"{r['seq']}\n" for r in first + second)


# ---------------------------------------------------------------- deps

def test_deps_are_copied_and_updated(sshq: Sshq, tmp_path: Path, testbed: dict[str, str]) -> None:
    name = f"deps-{uuid.uuid4().hex[:8]}"
    deps = tmp_path / name
    deps.mkdir()
    script = deps / "script.sh"
    script.write_text('#!/bin/sh\necho "v1 $(cat data.txt)"\n')
    script.chmod(0o755)
    (deps / "data.txt").write_text("d1")
    (deps / "big.bin").write_bytes(os.urandom(1 << 20))
    home = bed_user_home(testbed)
    remote: Path | None = None
    try:
        b = write_batch(tmp_path, ["./script.sh", "pwd", "sha256sum big.bin"])
        p = ok(sshq("farm", str(b), "--hosts", "bg", "--deps", f"{deps}/"))
        rs = by_seq(jsonl(p.stdout))
        assert rs[1]["stdout"] == "v1 d1\n"
        # the tasks run in the copy: <the platform's run dir>/farm-deps/NAME
        remote = Path(rs[2]["stdout"].strip())
        assert remote.is_relative_to(home) and remote.parts[-2:] == ("farm-deps", name)
        digest = hashlib.sha256((deps / "big.bin").read_bytes()).hexdigest()
        assert rs[3]["stdout"].split()[0] == digest
        ino_big = (remote / "big.bin").stat().st_ino
        ino_data = (remote / "data.txt").stat().st_ino
        ino_script = (remote / "script.sh").stat().st_ino

        script.write_text('#!/bin/sh\necho "v2 $(cat data.txt)"\n')   # same size
        later = time.time() + 5
        os.utime(script, (later, later))
        p = ok(sshq("farm", str(b), "--hosts", "bg", "--deps", f"{deps}/"))
        rs = by_seq(jsonl(p.stdout))
        assert rs[1]["stdout"] == "v2 d1\n"
        # only the changed file travelled (rsync replaces what it copies)
        assert (remote / "script.sh").stat().st_ino != ino_script
        assert (remote / "big.bin").stat().st_ino == ino_big
        assert (remote / "data.txt").stat().st_ino == ino_data
    finally:
        if remote is not None:
            shutil.rmtree(remote, ignore_errors=True)


# ---------------------------------------------------------------- many tasks, several transports

def test_many_small_tasks_over_three_transports(sshq: Sshq, tmp_path: Path) -> None:
    n = 3000
    b = write_batch(tmp_path, ['echo "$SSHQ_FARM_SEQ"'] * n)
    t0 = time.monotonic()
    p = ok(sshq("farm", str(b), "--hosts", "bg,bg-openssh,local", "--slots", "4"))
    elapsed = time.monotonic() - t0
    rs = by_seq(jsonl(p.stdout))
    assert set(rs) == set(range(1, n + 1))
    assert all(r["stdout"] == f"{s}\n" and r["exit_status"] == 0 for s, r in rs.items())
    assert set(Counter(r["host"] for r in rs.values())) == {"bg", "bg-openssh", "local"}
    assert elapsed < 60


def test_reader_gone_ends_the_run_quietly(cli_env: dict[str, str], tmp_path: Path) -> None:
    b = write_batch(tmp_path, ["echo first", "sleep 1; echo second", "sleep 1; echo third"])
    # as on a fresh machine: stdout buffered (what is left in its buffer at exit
    # must not make Python exit 120)
    env = {k: v for k, v in cli_env.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "sshq", "farm", str(b), "--hosts", "bg",
                             "--slots", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["stdout"] == "first\n"
        proc.stdout.close()   # like `| head -n 1`
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert rc == 141, err
    assert b"Traceback" not in err
