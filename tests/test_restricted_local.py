"""The installed agent and its restricted mode, run as local processes (no sshd).

The agent is installed into a temporary home by the shipped agent's own
``install_agent`` operation, then its entry (``~/.sshq/sshq-agent``) is run
as sshd's forced command would run it: ``SSH_ORIGINAL_COMMAND`` in the
environment, the request on stdin.  The sshd tests (tests/test_restricted.py)
cover the same through a real key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sshq.exceptions import RemoteError
from sshq.remote import protocol
from sshq.remote.installed import ENTRY_SCRIPT, bundle, bundle_version, runner_table
from sshq.shipped import sshq_jobstatus as js
from sshq.shipped import sshq_restricted as restricted


class Home:
    """A home directory with the agent installed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run_dir = path / "run"
        self.entry = path / ".sshq" / "sshq-agent"

    def env(self, command: str | None, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(self.path),
               "SSH_CONNECTION": "192.0.2.7 50000 192.0.2.1 22", **extra}
        if command is not None:
            env["SSH_ORIGINAL_COMMAND"] = command
        return env

    def run(self, stdin: bytes, *args: str, command: str | None = "python3 .sshq/sshq-agent"
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["python3", str(self.entry), *args], input=stdin,
                              capture_output=True, timeout=60, env=self.env(command),
                              cwd=self.path)

    def call(self, op: str, payload: dict[str, Any], *args: str,
             **kw: Any) -> dict[str, Any]:
        nonce, stdin = protocol.encode_request(op, payload, installed=True,
                                               path_prepend=kw.pop("path_prepend", ()))
        r = self.run(stdin, *(args or ("--restricted", "--run-dir", str(self.run_dir))), **kw)
        frames = list(protocol.FrameParser(nonce, host="h").feed(r.stdout))
        assert frames, r.stderr
        return frames[0]

    def audit(self) -> list[str]:
        return (self.path / ".sshq" / "audit.log").read_text().splitlines()


def install(home: Path) -> dict[str, Any]:
    """The shipped agent's install_agent, run here with HOME=home."""
    files = {n: {"data_b64": base64.b64encode(d).decode(), "sha256": hashlib.sha256(d).hexdigest(),
                 "mode": 0o700 if n == "sshq-agent" else 0o600} for n, d in bundle().items()}
    nonce, stdin = protocol.encode_request("install_agent", {
        "dir": ".sshq", "entry": "sshq-agent", "version": bundle_version(), "files": files})
    r = subprocess.run(["python3", "-c", protocol.BOOTSTRAP], input=stdin, capture_output=True,
                       timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(home)})
    (frame,) = protocol.FrameParser(nonce).feed(r.stdout)
    return frame


@pytest.fixture
def home(tmp_path: Path) -> Home:
    h = tmp_path / "home"
    h.mkdir()
    assert install(h)["changed"] is True
    (h / "run").mkdir()
    return Home(h)


def test_install_is_idempotent_and_atomic(home: Home) -> None:
    again = install(home.path)
    assert again["changed"] is False and again["version"] == bundle_version()
    assert os.readlink(home.entry) == f"agent-{bundle_version()}/sshq-agent"
    assert (home.entry.parent / os.readlink(home.entry)).read_bytes() == ENTRY_SCRIPT
    # a call caches bytecode beside the installed files, which stay the bundle
    home.call("init", {"run_dir": str(home.run_dir)})
    installed = set(os.listdir(home.entry.resolve().parent))
    assert installed == set(bundle()) | {"__pycache__"}
    assert install(home.path)["changed"] is False


def test_a_file_with_another_sha256_is_refused(tmp_path: Path) -> None:
    data = b"print('x')\n"
    nonce, stdin = protocol.encode_request("install_agent", {
        "dir": ".sshq", "entry": "sshq-agent", "version": "0" * 20,
        "files": {"sshq-agent": {"data_b64": base64.b64encode(data).decode(),
                                 "sha256": "0" * 64, "mode": 0o700}}})
    r = subprocess.run(["python3", "-c", protocol.BOOTSTRAP], input=stdin, capture_output=True,
                       timeout=60, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    with pytest.raises(RemoteError, match="sha256 mismatch"):
        list(protocol.FrameParser(nonce).feed(r.stdout))
    assert not (tmp_path / ".sshq" / "sshq-agent").exists()
    assert [p.name for p in (tmp_path / ".sshq").iterdir()] == []  # nothing half-written


def test_the_runner_table_is_every_handler_with_its_commands() -> None:
    from sshq.job_runners import HANDLERS

    table = runner_table()
    assert set(table) == set(HANDLERS)
    assert table["slurm"]["submit"] == ["sbatch", "--ignore-pbs",
                                        f"{restricted.LOG_DIR_PLACEHOLDER}/job"]
    assert table["slurm"]["group"] == ["--clusters="]
    assert table["background"]["on_login_node"] is True
    assert table["slurm"]["on_login_node"] is False


def _submit_request(home: Home, runner: str) -> dict[str, Any]:
    from sshq.job_runners import HANDLERS

    h = HANDLERS[runner]
    log_dir = js.job_log_dir(str(home.run_dir), "j", 1)
    return {"jobs": [{
        "key": "1", "log_dir": log_dir, "work_dir": js.default_work_dir(str(home.run_dir), "j"),
        "job_b64": base64.b64encode(b"#!/bin/sh\necho hi\n").decode(),
        "submit_argv": h.submit_argv(f"{log_dir}/job", log_dir), "id_regex": h.job_id_regex,
        "stdin_job_file": h.submit_stdin, "inputs": {}, "runner": runner, "timeout": 60,
        "array": [], "array_element_id": h.array_element_id}]}


def test_background_jobs_only_with_allow_background(home: Home) -> None:
    req = _submit_request(home, "background")
    with pytest.raises(RemoteError, match="refused by the restricted sshq agent: .*"
                                          "--allow-background"):
        home.call("submit", req)
    assert not Path(req["jobs"][0]["log_dir"]).exists()  # nothing written
    ok = home.call("submit", req, "--restricted", "--run-dir", str(home.run_dir),
                   "--allow-background")
    (result,) = ok["results"]
    assert result["ok"] is True and result["job_id"].isdigit(), result
    assert "outcome=refused" in home.audit()[-2]
    assert f"jobs={result['job_id']} outcome=ok" in home.audit()[-1]
    assert " src=192.0.2.7:50000 " in home.audit()[-1]


def test_a_run_dir_holding_the_home_is_refused(home: Home) -> None:
    for run_dir in (str(home.path), str(home.path.parent), "/"):
        r = home.run(b"", "--restricted", "--run-dir", run_dir)
        assert r.returncode == 1 and b"holds the home directory" in r.stderr, r.stderr
    r = home.run(b"", "--restricted", "--run-dir", str(home.path / ".ssh" / "x"))
    assert r.returncode == 1 and b"is inside" in r.stderr


def test_path_prepend_is_the_command_line_s(home: Home) -> None:
    args = ("--restricted", "--run-dir", str(home.run_dir), "--path", "/opt/slurm/bin")
    with pytest.raises(RemoteError, match="path_prepend .* `sshq agent install`"):
        home.call("init", {"run_dir": str(home.run_dir)}, *args, path_prepend=["/tmp/evil"])
    frame = home.call("init", {"run_dir": str(home.run_dir)}, *args,
                      path_prepend=["/opt/slurm/bin"])
    assert frame["run_dir"] == str(home.run_dir)


def test_not_restricted_the_installed_agent_serves_every_operation(home: Home,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"anywhere")
    frame = home.call("read", {"path": str(tmp_path / "f")}, "--run-dir", str(home.run_dir),
                      command=None)
    assert base64.b64decode(frame["data_b64"]) == b"anywhere"
    info = home.call("agent_info", {}, "--run-dir", str(home.run_dir), command=None)
    assert info["restricted"] is False and info["protocol"] == restricted.PROTOCOL
    assert info["version"] == bundle_version()


def test_a_newer_client_is_told_to_install_again(home: Home) -> None:
    nonce, stdin = protocol.encode_request("init", {"run_dir": str(home.run_dir)},
                                           installed=True)
    req = json.loads(stdin)
    req["protocol"] = restricted.PROTOCOL + 1
    r = home.run(json.dumps(req).encode() + b"\n", "--restricted", "--run-dir",
                 str(home.run_dir))
    with pytest.raises(RemoteError, match=f"installed sshq agent speaks protocol"
                                          f" {restricted.PROTOCOL}, .* run `sshq agent"
                                          " install`"):
        list(protocol.FrameParser(nonce).feed(r.stdout))


def test_a_shipped_program_is_skipped_not_run(home: Home, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    program = f"open({str(marker)!r}, 'w').close()\n".encode()
    nonce, request = protocol.encode_request("init", {"run_dir": str(home.run_dir)},
                                             installed=True)
    r = home.run(b"%d\n" % len(program) + program + request,
                 "--restricted", "--run-dir", str(home.run_dir),
                 command="python3 -c 'import sys;b=sys.stdin.buffer #sshq-agent'")
    (frame,) = protocol.FrameParser(nonce).feed(r.stdout)
    assert frame["run_dir"] == str(home.run_dir)
    assert not marker.exists()


@pytest.mark.parametrize("arg, rel", [
    ("{run}/log/job/a/01/", "log/job/a/01/"),
    ("{run}/work/a/./out/x.txt", "work/a/./out/x.txt"),
    ("{run}", "."),
    ("{run}/", "./"),
    ("~/run/data", "data"),
    ("run/data/", "data/"),
])
def test_rsync_paths_inside_become_relative(home: Home, arg: str, rel: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home.path))
    monkeypatch.chdir(home.path)
    opts = restricted.parse_args(["--restricted", "--run-dir", str(home.run_dir)])
    assert restricted.rsync_path(opts, arg.format(run=home.run_dir)) == rel


@pytest.mark.parametrize("arg", ["/etc/passwd", "{run}/../x", "{run}-other/x", "~/.ssh/",
                                 "{run}/link/passwd", ".ssh/authorized_keys"])
def test_rsync_paths_outside_are_refused(home: Home, arg: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home.path))
    monkeypatch.chdir(home.path)
    (home.run_dir / "link").symlink_to("/etc")
    opts = restricted.parse_args(["--restricted", "--run-dir", str(home.run_dir)])
    with pytest.raises(restricted.Refused, match="restricted"):
        restricted.rsync_path(opts, arg.format(run=home.run_dir))


def test_rsync_outside_is_refused_on_one_line(home: Home) -> None:
    r = home.run(b"", "--restricted", "--run-dir", str(home.run_dir),
                 command="rsync --server --sender -logDtpre.iLsfxCIvu . /etc/passwd")
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.count(b"\n") == 1 and b"outside the run directory" in r.stderr
    assert "op=command" in home.audit()[-1] and "outcome=refused" in home.audit()[-1]


def test_login_shell_serves_from_a_login_environment(home: Home) -> None:
    (home.path / ".bash_profile").write_text("export SSHQ_TEST_LOGIN_ENV=yes\n")
    frame = home.call("init", {"run_dir": str(home.run_dir)}, "--restricted", "--run-dir",
                      str(home.run_dir), "--login-shell")
    assert frame["run_dir"] == str(home.run_dir)
    # the agent ran under bash -l: its job runner commands see the login environment
    req = _submit_request(home, "background")
    req["jobs"][0]["job_b64"] = base64.b64encode(
        b"#!/bin/sh\necho \"$SSHQ_TEST_LOGIN_ENV\" > login-env\n").decode()
    home.call("submit", req, "--restricted", "--run-dir", str(home.run_dir),
              "--allow-background", "--login-shell")
    out = Path(req["jobs"][0]["work_dir"]) / "login-env"
    for _ in range(100):  # the background job writes it (bounded: 10 s)
        if out.exists() and out.read_text():
            break
        time.sleep(0.1)
    assert out.read_text() == "yes\n"


# ---------------------------------------------------------------- pyenv, from files


def shipped_pyenv(home: Home, python: str) -> dict[str, Any]:
    """The shipped agent's pyenv (which runs ``python``), here with HOME=home."""
    nonce, stdin = protocol.encode_request("pyenv", {"python": python})
    r = subprocess.run(["python3", "-c", protocol.BOOTSTRAP], input=stdin, capture_output=True,
                       timeout=60, env=home.env(None), cwd=home.path)
    (frame,) = protocol.FrameParser(nonce).feed(r.stdout)
    return frame


def _facts(reply: dict[str, Any], python: str) -> Any:
    from sshq.executor._wire import parse_pyenv

    env = parse_pyenv(reply, host="h", python=python)
    return env.version, env.executable, env.cloudpickle, bool(env.cloudpickle_error)


def make_venv(root: Path, *, with_cloudpickle: bool) -> Path:
    """A venv (no pip) of this interpreter; cloudpickle copied in from here."""
    import sys

    import cloudpickle

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    if with_cloudpickle:
        src = Path(cloudpickle.__file__).parent
        (site,) = root.glob("lib/python*/site-packages")
        import shutil

        shutil.copytree(src, site / "cloudpickle")
        for info in src.parent.glob("cloudpickle-*.dist-info"):
            shutil.copytree(info, site / info.name)
    return root / "bin" / "python"


def test_pyenv_of_the_agent_s_own_python_is_the_interpreter_s_answer(home: Home) -> None:
    own = home.call("agent_info", {})["python"]
    restricted_reply = home.call("pyenv", {"python": own})
    assert restricted_reply["read_only"] is True
    assert _facts(restricted_reply, own) == _facts(shipped_pyenv(home, own), own)
    assert "op=pyenv" in home.audit()[-1] and "outcome=ok" in home.audit()[-1]
    assert f"python={own}" in home.audit()[-1]


@pytest.mark.parametrize("with_cloudpickle", [True, False])
def test_pyenv_of_a_venv_is_read_from_its_files(home: Home, tmp_path: Path,
                                                with_cloudpickle: bool) -> None:
    import cloudpickle

    python = str(make_venv(tmp_path / "venv", with_cloudpickle=with_cloudpickle))
    reply = home.call("pyenv", {"python": python})
    facts = _facts(reply, python)
    assert facts == _facts(shipped_pyenv(home, python), python)
    assert facts[2] == (cloudpickle.__version__ if with_cloudpickle else "")


def test_pyenv_runs_nothing_the_request_names(home: Home, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = f"#!/bin/sh\ntouch {marker}\necho '\nSSHQ-PYENV {{\"version\": [3, 99, 0]}}'\n"
    # a "venv" whose python is a script: its pyvenv.cfg is read, the script is not run
    venv = tmp_path / "fake-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion_info = 3.10.4.final.0\n")
    (venv / "bin" / "python").write_text(script)
    (venv / "bin" / "python").chmod(0o755)
    reply = home.call("pyenv", {"python": str(venv / "bin" / "python")})
    assert _facts(reply, "p") == ((3, 10, 4), str(venv / "bin" / "python"), "", True)
    # anything else is refused, saying how to proceed
    plain = tmp_path / "bin" / "python3"
    plain.parent.mkdir()
    plain.write_text(script)
    plain.chmod(0o755)
    for python in (str(plain), "sh", "/bin/sh"):
        with pytest.raises(RemoteError, match="restricted: the python .* is neither the"
                                              " agent's own .* use the platform's python or"
                                              " a venv's bin/python"):
            home.call("pyenv", {"python": python})
        assert "op=pyenv" in home.audit()[-1] and "outcome=refused" in home.audit()[-1]
    assert not marker.exists()
    # the shipped agent (not restricted) does run it: the marker shows the test can fail
    assert _facts(shipped_pyenv(home, str(plain)), "p")[0] == (3, 99, 0)
    assert marker.exists()


def test_pyenv_of_a_missing_python_and_a_run_dir(home: Home, tmp_path: Path) -> None:
    from sshq.exceptions import EnvironmentMismatchError
    from sshq.executor._wire import parse_pyenv

    missing = str(tmp_path / "nowhere" / "bin" / "python")
    with pytest.raises(EnvironmentMismatchError, match="cannot run the remote python"):
        parse_pyenv(home.call("pyenv", {"python": missing}), host="h", python=missing)
    own = home.call("agent_info", {})["python"]
    reply = home.call("pyenv", {"python": own, "run_dir": str(home.run_dir)})
    assert reply["init"]["run_dir"] == str(home.run_dir)
    with pytest.raises(RemoteError, match="restricted: run directory /tmp/elsewhere is"
                                          " outside"):
        home.call("pyenv", {"python": own, "run_dir": "/tmp/elsewhere"})


# ---------------------------------------------------------------- fs


def test_fs_dot_dot_cannot_pass_for_an_entry_of_a_root(tmp_path: Path) -> None:
    """The shipped agent's fs (sshq serve's, any agent mode): "<root>/x/../.."
    once passed the roots check as an entry of <root> and rm removed the
    root's parent."""
    from sshq.shipped import agent

    root = tmp_path / "home" / "run"
    (root / "x").mkdir(parents=True)
    (tmp_path / "home" / "precious").write_text("keep")
    frames: list[dict[str, Any]] = []

    class W:
        def frame(self, obj: dict[str, Any]) -> None:
            frames.append(obj)

    for path in (f"{root}/x/../..", f"{root}/..", f"{root}/x/.", f"{root}/./x"):
        for action in ("rm", "stat", "ls", "mkdir"):
            agent.op_fs({"action": action, "path": path, "roots": [str(root)]}, W())
            assert frames[-1]["ok"] is False and frames[-1]["code"] == "EINVAL", frames[-1]
    assert (tmp_path / "home" / "precious").read_text() == "keep" and (root / "x").is_dir()
    agent.op_fs({"action": "rm", "path": f"{root}/x", "roots": [str(root)]}, W())
    assert frames[-1]["ok"] is True and not (root / "x").exists()


def test_fs_upload_cap_in_restricted_mode(home: Home) -> None:
    from sshq.shipped import agent

    for size, ok in ((agent.FS_MAX_BYTES, True), (agent.FS_MAX_BYTES + 1, False)):
        req = {"action": "upload", "path": str(home.run_dir), "name": "f",
               "roots": [str(home.run_dir)], "data_b64": base64.b64encode(b"x" * size).decode()}
        if ok:
            assert home.call("fs", req)["ok"] is True
            assert (home.run_dir / "f").stat().st_size == size
        else:
            with pytest.raises(RemoteError, match="restricted: an upload over 5242880 bytes"):
                home.call("fs", req)


# ---------------------------------------------------------------- pilot jobs


def test_the_farm_worker_is_no_forced_command(home: Home) -> None:
    with pytest.raises(restricted.Refused, match="pilot job's command, never a restricted"):
        restricted.parse_args(["--restricted", "--run-dir", str(home.run_dir),
                               restricted.FARM_WORKER, str(home.run_dir / "spool")])
    r = home.run(b"", restricted.FARM_WORKER, "spool", command=None)
    assert r.returncode == 2 and b"an absolute path is needed" in r.stderr


def test_a_farm_call_needing_a_newer_agent_is_refused(home: Home) -> None:
    from sshq.farm.wire import dispatcher_stdin

    header = {"mode": "prepare", "spool": str(home.run_dir / "spool"), "detach": False}
    _, stdin = dispatcher_stdin(header, installed=True)
    assert json.loads(stdin)["protocol"] == restricted.PROTOCOL
    req = dict(json.loads(stdin), protocol=restricted.PROTOCOL + 1)
    r = home.run(json.dumps(req).encode() + b"\n", "--restricted", "--run-dir",
                 str(home.run_dir))
    assert r.returncode == 1 and b"run `sshq agent install` again" in r.stderr, r.stderr
    assert not (home.run_dir / "spool").exists()
