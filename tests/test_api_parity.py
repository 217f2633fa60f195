"""The public API is whole: ``Client`` mirrors ``AsyncClient``; every error is exported.

The comparison tests need no host.  The others drive the sync ``Client``
against a real ``localhost`` platform (local transport, background job
runner, run directory under the test's tmp dir): real jobs, real files.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import sshq
import sshq.exceptions
from sshq import AsyncClient, Client, JobSpec, JobState
from sshq.remote.staging import Installation
from sshq.transport import CommandResult

ROOT = Path(__file__).resolve().parent.parent

#: AsyncClient methods the sync Client leaves out, and why.
ASYNC_ONLY = {
    "transport": "plumbing: its transport is usable only inside the client's event loop",
}


def _public_methods(cls: type) -> dict[str, object]:
    """Public methods (and ``__init__``) of a class, inherited ones included."""
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") or name == "__init__"}


def _sync_return(fn: object) -> str:
    """The return annotation a sync twin of ``fn`` must have (annotations are strings)."""
    ret = str(inspect.signature(fn).return_annotation)  # type: ignore[arg-type]
    if inspect.isasyncgenfunction(inspect.unwrap(fn)):  # an async iterator: a plain one
        return re.sub(r"^Async(Iterator|Generator)\[", r"\1[", ret)
    return ret


def test_client_has_every_public_method_of_async_client() -> None:
    sync = set(_public_methods(Client))
    wanted = set(_public_methods(AsyncClient)) - set(ASYNC_ONLY)
    assert sync - wanted == set(), f"Client methods AsyncClient lacks: {sorted(sync - wanted)}"
    assert wanted - sync == set(), f"AsyncClient methods Client lacks: {sorted(wanted - sync)}"
    assert set(ASYNC_ONLY) <= set(_public_methods(AsyncClient)), "stale ASYNC_ONLY entry"


@pytest.mark.parametrize("name", sorted(set(_public_methods(AsyncClient)) - set(ASYNC_ONLY)))
def test_client_method_has_the_async_signature(name: str) -> None:
    a = getattr(AsyncClient, name)
    s = getattr(Client, name, None)
    assert s is not None, f"Client.{name} is missing"
    assert not inspect.iscoroutinefunction(s) and not inspect.isasyncgenfunction(s), (
        f"Client.{name} must be synchronous")
    a_params = [(p.name, p.kind, p.default, p.annotation)
                for p in inspect.signature(a).parameters.values()]
    s_params = [(p.name, p.kind, p.default, p.annotation)
                for p in inspect.signature(s).parameters.values()]
    assert s_params == a_params, f"Client.{name} parameters differ from AsyncClient.{name}"
    if name != "__init__":
        assert str(inspect.signature(s).return_annotation) == _sync_return(a), (
            f"Client.{name} returns something else than AsyncClient.{name}")


def test_every_exception_is_exported_from_sshq() -> None:
    classes = {name for name, obj in inspect.getmembers(sshq.exceptions, inspect.isclass)
               if issubclass(obj, sshq.SshqError) and obj.__module__ == "sshq.exceptions"}
    assert "JobNotRunningError" in classes  # the walk sees them all
    assert classes - set(sshq.__all__) == set(), (
        f"not in sshq.__all__: {sorted(classes - set(sshq.__all__))}")
    for name in classes:
        assert getattr(sshq, name) is getattr(sshq.exceptions, name)
    assert set(sshq.exceptions.__all__) == classes


def test_every_name_in_all_exists() -> None:
    missing = [name for name in sshq.__all__ if not hasattr(sshq, name)]
    assert missing == []


# ---------------------------------------------------------------- one version source


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml writes the version again"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sshq.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|(a|b|rc)\d+)?", sshq.__version__)


@pytest.mark.filterwarnings("ignore:Support for .*tool.setuptools.* is still")
def test_setuptools_reads_the_version_from_the_package() -> None:
    """The version a build (installed or editable) records, as setuptools
    itself computes it from pyproject.toml: statically, without running sshq."""
    from setuptools.config.pyprojecttoml import read_configuration

    conf = read_configuration(ROOT / "pyproject.toml", expand=True)
    assert conf["project"]["version"] == sshq.__version__


# ---------------------------------------------------------------- real calls


@pytest.fixture
def local(tmp_path: Path, state_dir: Path) -> Iterator[tuple[Client, Path]]:
    """A sync Client whose ``localhost`` platform runs under ``tmp_path/run``."""
    run_dir = tmp_path / "run"
    config = tmp_path / "platforms.toml"
    config.write_text(f'[platforms.localhost]\nhosts = ["localhost"]\ntransport = "local"\n'
                      f'job_runner = "background"\nrun_dir = "{run_dir}"\n')
    with Client(config, state_dir=state_dir) as c:
        yield c, run_dir


def test_sync_follow_log_streams_a_short_job(local: tuple[Client, Path]) -> None:
    c, _ = local
    (job,) = c.submit(JobSpec(command="echo one; sleep 1; echo two >&2; echo three",
                              name="follow"))
    it = c.follow_log(job.id, poll_every=1.0)
    assert isinstance(it, Iterator) and not inspect.isasyncgen(it)
    got: dict[str, bytes] = {"out": b"", "err": b""}
    for file, data in it:
        assert isinstance(data, bytes)
        got[file] += data
    assert got == {"out": b"one\nthree\n", "err": b"two\n"}
    (job,) = c.jobs([job.id])
    assert job.state is JobState.SUCCEEDED  # the stream ended with the job


def test_sync_follow_log_left_early_leaves_the_client_usable(
        local: tuple[Client, Path]) -> None:
    c, _ = local
    (job,) = c.submit(JobSpec(command="echo started; sleep 600", name="long"))
    try:
        for file, data in c.follow_log(job.id, files=["out"]):
            assert (file, data) == ("out", b"started\n")
            break  # closes the async stream on the client's loop
        loop = c._runner.get_loop()
        assert [t for t in asyncio.all_tasks(loop) if not t.done()] == [], (
            "the stream's tasks outlived the iteration")
        (job,) = c.poll([job.id])
        assert job.state is JobState.RUNNING
        result = c.ssh_to_job(job.id, "pwd; echo $SSHQ_JOB_NAME", timeout=60)
        assert isinstance(result, CommandResult) and result.exit_status == 0
        assert result.stdout.decode().splitlines()[-1] == "long"
        argv = c.ssh_to_job_argv(job.id)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    finally:
        (job,) = c.kill([job.id], settle=2.0)
    assert job.state.is_final


def test_sync_install_retrieve_tidy(local: tuple[Client, Path], tmp_path: Path) -> None:
    c, run_dir = local
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.txt").write_text("payload\n")
    done = c.install(src, platform="localhost", excludes=["/skip.txt"])
    assert isinstance(done, Installation)
    assert (Path(done.remote_dir) / "data.txt").read_text() == "payload\n"

    polls: list[list[int]] = []
    (job,) = c.submit(JobSpec(command="cat data.txt", name="staged", work_dir=done.remote_dir))
    (job,) = c.wait([job.id], timeout=120, interval=0.2, max_interval=0.5,
                    on_poll=lambda jobs: polls.append([j.id for j in jobs]))
    assert job.state is JobState.SUCCEEDED, job.message
    assert polls and polls[-1] == [job.id]

    (where,) = c.retrieve([job.id], dest=tmp_path / "back")
    assert (where / "job.out").read_bytes() == b"payload\n"

    service = run_dir / ".sshq"
    assert service.is_dir()  # left by remote-init on the first submission
    removed = c.tidy(platform="localhost")
    assert str(service) in removed and not service.exists()
    assert (Path(job.job_log_dir) / "job.out").exists()  # results stay
