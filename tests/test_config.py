"""sshq.config: the platforms file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sshq.config import (
    LOCALHOST,
    Config,
    Platform,
    default_config_path,
    load_config,
    parse_config,
)
from sshq.exceptions import ConfigError

FULL = """
[platforms.hpc]
hosts = ["login1.example.org", "login2.example.org"]
port = 2222
user = "me"
identity_file = "~/.ssh/id_ed25519"
known_hosts = "/etc/ssh/known"
job_runner = "slurm"
run_dir = "/scratch/me/sshq"
transport = "openssh"
python = "/usr/bin/python3.6"
connect_timeout = 5
bad_host_seconds = 60.5
batch_mode = false
submit_concurrency = 8
"""


def test_full_platform() -> None:
    p = parse_config(FULL)["hpc"]
    assert p.name == "hpc"
    assert p.hosts == ("login1.example.org", "login2.example.org")
    assert p.port == 2222
    assert p.user == "me"
    assert p.identity_file == os.path.expanduser("~/.ssh/id_ed25519")
    assert not p.identity_file.startswith("~")
    assert p.known_hosts == "/etc/ssh/known"
    assert p.job_runner == "slurm"
    assert p.run_dir == "/scratch/me/sshq"
    assert p.transport == "openssh"
    assert p.python == "/usr/bin/python3.6"
    assert p.connect_timeout == 5.0 and isinstance(p.connect_timeout, float)
    assert p.bad_host_seconds == 60.5
    assert p.batch_mode is False
    assert p.submit_concurrency == 8
    hp = p.host_params("login2.example.org")
    assert (hp.host, hp.port, hp.user, hp.identity_file, hp.known_hosts, hp.connect_timeout) == (
        "login2.example.org", 2222, "me", p.identity_file, "/etc/ssh/known", 5.0)


def test_defaults() -> None:
    p = parse_config("[platforms.cluster1]\n")["cluster1"]
    assert p.hosts == ("cluster1",)  # hosts defaults to [NAME]
    assert p.port is None and p.user is None
    assert p.identity_file is None and p.known_hosts is None
    assert p.job_runner == "background"
    assert p.transport == "asyncssh"
    assert p.run_dir == "~/sshq-run"  # remote: not expanded locally
    assert p.python == "python3"
    assert p.batch_mode is True
    assert p.submit_concurrency >= 1


def test_hosts_as_one_string() -> None:
    assert parse_config('[platforms.x]\nhosts = "h1"\n')["x"].hosts == ("h1",)


def test_localhost_in_file_defaults_to_local_transport() -> None:
    p = parse_config('[platforms.localhost]\nrun_dir = "/tmp/r"\n')["localhost"]
    assert p.transport == "local"
    assert p.run_dir == "/tmp/r"


def test_several_platforms() -> None:
    got = parse_config('[platforms.a]\n[platforms.b]\njob_runner = "slurm"\n')
    assert set(got) == {"a", "b"}
    assert got["b"].job_runner == "slurm"


def test_empty_text() -> None:
    assert parse_config("") == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[platforms.a\n", "invalid TOML"),
        ("[platforms.a]\nport = \n", "invalid TOML"),
        ("[platforms.a]\nport = 1\nport = 2\n", "invalid TOML"),
        ("[platform.a]\n", "unknown top-level key"),
        ("hosts = ['x']\n", "unknown top-level key"),
        ("platforms = 3\n", r"\[platforms\] must be a table"),
        ("[platforms]\na = 3\n", "must be a table"),
        ("[platforms.a]\nhost = 'x'\n", "unknown key"),
        ("[platforms.a]\nHosts = ['x']\nfoo = 1\n", "Hosts, foo"),
        ("[platforms.a]\nhosts = []\n", "hosts"),
        ("[platforms.a]\nhosts = [1]\n", "hosts"),
        ("[platforms.a]\nhosts = 5\n", "hosts"),
        ("[platforms.a]\nhosts = ['-oProxyCommand=touch x']\n", "invalid host name"),
        ("[platforms.a]\nhosts = ['a b']\n", "invalid host name"),
        ("[platforms.a]\nhosts = ['a;b']\n", "invalid host name"),
        ("[platforms.a]\nhosts = ['']\n", "invalid host name"),
        ("[platforms.a]\nhosts = ['h\\n']\n", "invalid host name"),
        ("[platforms.a]\nport = 0\n", "port"),
        ("[platforms.a]\nport = 65536\n", "port"),
        ("[platforms.a]\nport = '22'\n", "port"),
        ("[platforms.a]\nport = 22.0\n", "port"),
        ("[platforms.a]\njob_runner = 'nqs'\n", "unknown job_runner 'nqs'"),
        ("[platforms.a]\ntransport = 'telnet'\n", "unknown transport 'telnet'"),
        ("[platforms.a]\nuser = ''\n", "user"),
        ("[platforms.a]\nuser = 5\n", "user"),
        ("[platforms.a]\nrun_dir = ''\n", "run_dir"),
        ("[platforms.a]\npython = []\n", "python"),
        ("[platforms.a]\nidentity_file = ''\n", "identity_file"),
        ("[platforms.a]\nknown_hosts = 5\n", "known_hosts"),
        ("[platforms.a]\nconnect_timeout = -1\n", "connect_timeout"),
        ("[platforms.a]\nconnect_timeout = '10'\n", "connect_timeout"),
        ("[platforms.a]\nbad_host_seconds = -0.5\n", "bad_host_seconds"),
        ("[platforms.a]\nbatch_mode = 'yes'\n", "batch_mode"),
        ("[platforms.a]\nbatch_mode = 1\n", "batch_mode"),
        ("[platforms.a]\nsubmit_concurrency = 0\n", "submit_concurrency"),
        ("[platforms.a]\nsubmit_concurrency = 2.5\n", "submit_concurrency"),
    ],
)
def test_invalid(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(text, "my.toml")


def test_error_names_source_and_platform() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config("[platforms.hpc]\nport = 0\n", "/etc/x.toml")
    assert "/etc/x.toml" in str(ei.value)
    assert "[platforms.hpc]" in str(ei.value)


@pytest.mark.parametrize("value", ['["slurm"]', '{ name = "slurm" }'])
def test_job_runner_of_wrong_type_is_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="job_runner"):
        parse_config(f"[platforms.a]\njob_runner = {value}\n")


@pytest.mark.parametrize("key", ["port", "submit_concurrency", "connect_timeout"])
def test_boolean_for_number_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(f"[platforms.a]\n{key} = true\n")


# ------------------------------------------------------------- load_config


def test_load_missing_file(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "none.toml")
    assert cfg.path is None
    assert set(cfg.platforms) == {"localhost"}
    lh = cfg.platform("localhost")
    assert lh == LOCALHOST
    assert lh.transport == "local"
    assert lh.job_runner == "background"


def test_load_missing_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", must_exist=True)


def test_load_file(tmp_path: Path) -> None:
    p = tmp_path / "platforms.toml"
    p.write_text(FULL)
    for must_exist in (False, True):
        cfg = load_config(p, must_exist=must_exist)
        assert cfg.path == p
        assert set(cfg.platforms) == {"localhost", "hpc"}
        assert cfg.platform("hpc").job_runner == "slurm"
        assert cfg.platform("localhost") == LOCALHOST


def test_load_file_overrides_localhost(tmp_path: Path) -> None:
    p = tmp_path / "platforms.toml"
    p.write_text('[platforms.localhost]\njob_runner = "slurm"\n')
    lh = load_config(str(p)).platform("localhost")
    assert lh.job_runner == "slurm"
    assert lh.transport == "local"


def test_load_invalid_file_names_path(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[platforms.a]\nnope = 1\n")
    with pytest.raises(ConfigError, match=str(p).replace(".", r"\.")):
        load_config(p)


def test_load_non_utf8_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b"[platforms.a]\nuser = \"\xff\"\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(p)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_default_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_config_path() == tmp_path / "sshq" / "platforms.toml"
    assert load_config().path is None
    (tmp_path / "sshq").mkdir()
    (tmp_path / "sshq" / "platforms.toml").write_text("[platforms.xdg]\n")
    cfg = load_config()
    assert cfg.path == tmp_path / "sshq" / "platforms.toml"
    assert "xdg" in cfg.platforms


def test_unknown_platform_lists_known(tmp_path: Path) -> None:
    cfg = Config(platforms={"b": Platform(name="b", hosts=("b",)), "a": LOCALHOST},
                 path=tmp_path / "p.toml")
    with pytest.raises(ConfigError) as ei:
        cfg.platform("nope")
    msg = str(ei.value)
    assert "'nope'" in msg and "a, b" in msg and str(tmp_path / "p.toml") in msg
