"""The Executor's data, without I/O: calls pickled and bounded, results
parsed, the pre-flight verdict, errors built.

The file names and the result format are :mod:`sshq.shipped.sshq_call`'s
(the remote runner), imported here: one definition on both sides.
"""

from __future__ import annotations

import json
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..exceptions import (
    EnvironmentMismatchError,
    InvalidInputError,
    JobFailedError,
    RemoteError,
    RemoteFunctionError,
)
from ..farm.output import printable
from ..model import Job, JobState
from ..quoting import join
from ..shipped import sshq_call

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Call",
    "CallResult",
    "Outcome",
    "PickledCalls",
    "PyEnv",
    "check_pyenv",
    "cloudpickle_version",
    "job_failed",
    "parse_pyenv",
    "parse_result",
    "pickle_calls",
    "runner_argv",
    "settle",
    "task_failed",
]

#: The default limit on the pickled function, the pickled arguments of one
#: job, and one pickled return value (bytes).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Bytes of a job's job.err (a task's stderr) kept in a :class:`JobFailedError`.
ERR_TAIL_BYTES = 4096
#: Longest line of a result file's header or of one record's fields (bytes).
_MAX_RECORD_LINE = 1024 * 1024
_MAX_CALLS = 10_000_000

#: One call: positional arguments and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


def cloudpickle_version() -> str:
    """This client's cloudpickle version (imported on first use)."""
    import cloudpickle

    return str(cloudpickle.__version__)


def _dumps(obj: object, what: str) -> bytes:
    import cloudpickle

    try:
        return bytes(cloudpickle.dumps(obj))
    except Exception as exc:  # PicklingError, TypeError, RecursionError, ...
        raise InvalidInputError(
            f"cannot pickle {what}: {type(exc).__name__}: {printable(str(exc), 300)}"
        ) from exc


def _fn_name(fn: object) -> str:
    return printable(getattr(fn, "__qualname__", None) or repr(fn), 80)


@dataclass(frozen=True, slots=True, kw_only=True)
class PickledCalls:
    """Calls ready to stage: the function once, each job's calls apart.

    Attributes:
        fn: the function, cloudpickled.
        jobs: per job, its calls file (:func:`sshq_call.calls_file`) bytes.
        counts: per job, how many calls it runs.
        chunk: True when a job's result is a list of its calls' values
            (``map`` with ``chunksize`` > 1).
    """

    fn: bytes
    jobs: tuple[bytes, ...]
    counts: tuple[int, ...]
    chunk: bool

    @property
    def total_bytes(self) -> int:
        """What staging all of it takes, in bytes (the function once)."""
        return len(self.fn) + sum(len(j) for j in self.jobs)


def pickle_calls(fn: Callable[..., Any], calls: Sequence[Call], *, chunksize: int,
                 max_call_bytes: int) -> PickledCalls:
    """Pickle ``fn`` and its ``calls``, ``chunksize`` calls per job.

    Args:
        fn: the function (cloudpickle: lambdas and ``__main__`` functions
            travel by value).
        calls: ``(args, kwargs)`` per call.
        chunksize: calls per job (the last job may hold fewer).
        max_call_bytes: the most bytes of the pickled function and of one
            job's pickled arguments.

    Returns:
        A :class:`PickledCalls`.

    Raises:
        InvalidInputError: something cannot be pickled, or is over
            ``max_call_bytes`` (the message names which and both sizes).
    """
    name = _fn_name(fn)
    fn_blob = _dumps(fn, f"the function {name}")
    if len(fn_blob) > max_call_bytes:
        raise InvalidInputError(
            f"the function {name} pickles to {len(fn_blob)} bytes, over the limit of"
            f" {max_call_bytes} bytes (max_call_bytes): pass large data as files")
    chunk = chunksize > 1
    jobs: list[bytes] = []
    counts: list[int] = []
    for start in range(0, len(calls), chunksize):
        part = list(calls[start:start + chunksize])
        which = (f"call {start + 1}" if len(part) == 1
                 else f"calls {start + 1}-{start + len(part)}")
        blob = _dumps({"calls": part, "chunk": chunk}, f"the arguments of {which} of {name}")
        if len(blob) > max_call_bytes:
            raise InvalidInputError(
                f"the arguments of {which} of {name} pickle to {len(blob)} bytes, over the"
                f" limit of {max_call_bytes} bytes (max_call_bytes): pass large data as files")
        jobs.append(blob)
        counts.append(len(part))
    return PickledCalls(fn=fn_blob, jobs=tuple(jobs), counts=tuple(counts), chunk=chunk)


def runner_argv(python: str, mode: str, *, max_result_bytes: int,
                index: int | None) -> list[str]:
    """The argv that runs the calls of one job (``mode`` ``job``) or farm
    task (``task``) with the remote ``python``, in the directory of the inputs.

    ``index`` None: an array element, whose index the runner takes from
    ``SSHQ_ARRAY_INDEX``.
    """
    argv = [python, sshq_call.RUNNER_FILE, mode, "--max-result-bytes", str(max_result_bytes)]
    if index is not None:
        argv += ["--index", str(index)]
    return argv


def runner_command(python: str, mode: str, *, max_result_bytes: int,
                   index: int | None) -> str:
    """:func:`runner_argv` as one shell command line (quoted by :mod:`sshq.quoting`)."""
    return join(runner_argv(python, mode, max_result_bytes=max_result_bytes, index=index))


# ---- results ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one call ended with (a record of the result file).

    Attributes:
        ok: True for a return value.
        blob: the pickled value, or the pickled exception (b'' if it could
            not be pickled there).
        type, message, traceback: the exception's class (``module.Name``),
            ``str()`` and remote traceback text (errors only).
    """

    ok: bool
    blob: bytes
    type: str = ""
    message: str = ""
    traceback: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallResult:
    """A parsed result file.

    Attributes:
        calls: calls the job ran (0 with ``load_error``).
        chunk: the job holds a chunk of a ``map`` (its value is a list).
        python: the remote Python's version.
        load_error: the function or the calls could not be loaded; the one
            outcome stands for every call.
        outcomes: one per call (one with ``load_error``).
    """

    calls: int
    chunk: bool
    python: str
    load_error: bool
    outcomes: tuple[Outcome, ...]

    def outcome(self, position: int) -> Outcome:
        """The outcome of the job's call at ``position`` (0-based)."""
        return self.outcomes[0] if self.load_error else self.outcomes[position]


def _line(data: bytes, pos: int, where: str) -> tuple[dict[str, Any], int]:
    end = data.find(b"\n", pos, pos + _MAX_RECORD_LINE + 1)
    if end < 0:
        raise RemoteError(f"{where}: malformed call result (a record line is missing or"
                          f" over {_MAX_RECORD_LINE} bytes)")
    try:
        obj = json.loads(data[pos:end])
    except ValueError:
        raise RemoteError(f"{where}: malformed call result (a record is not JSON)") from None
    if not isinstance(obj, dict):
        raise RemoteError(f"{where}: malformed call result (a record is not an object)")
    return obj, end + 1


def _text(obj: dict[str, Any], key: str, limit: int) -> str:
    v = obj.get(key, "")
    return v[:limit] if isinstance(v, str) else ""


def parse_result(data: bytes, *, where: str) -> CallResult:
    """Parse a result file (:mod:`sshq.shipped.sshq_call`'s format), untrusted.

    Every field is checked for type and range; text is cut to
    :data:`sshq_call.MAX_TEXT` characters.  Nothing is unpickled here
    (:func:`settle` does that, one call at a time).

    Args:
        data: the file's bytes.
        where: names the job or task in error messages.

    Raises:
        RemoteError: the bytes are not a whole result file.
    """
    if not data.startswith(sshq_call.RESULT_MAGIC):
        raise RemoteError(f"{where}: not an sshq call result (bad header)")
    head, pos = _line(data, len(sshq_call.RESULT_MAGIC), where)
    calls, chunk, load_error = head.get("calls"), head.get("chunk"), head.get("load_error")
    if (not isinstance(calls, int) or isinstance(calls, bool) or not 0 <= calls <= _MAX_CALLS
            or not isinstance(chunk, bool) or not isinstance(load_error, bool)):
        raise RemoteError(f"{where}: malformed call result header")
    want = 1 if load_error else calls
    outcomes: list[Outcome] = []
    for _ in range(want):
        rec, pos = _line(data, pos, where)
        size, ok = rec.get("size"), rec.get("ok")
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or pos + size > len(data) or not isinstance(ok, bool)):
            raise RemoteError(f"{where}: malformed call result record (cut short?)")
        blob = data[pos:pos + size]
        pos += size
        limit = sshq_call.MAX_TEXT
        outcomes.append(Outcome(ok=ok, blob=blob, type=_text(rec, "type", 300),
                                message=_text(rec, "message", limit),
                                traceback=_text(rec, "traceback", limit)))
    if pos != len(data):
        raise RemoteError(f"{where}: malformed call result (bytes after the last record)")
    return CallResult(calls=calls, chunk=chunk, python=_text(head, "python", 40),
                      load_error=load_error, outcomes=tuple(outcomes))


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return printable(lines[0] if lines else "", 300)


def _remote_error(o: Outcome, what: str) -> RemoteFunctionError:
    head = f"{printable(o.type, 200)}: {_first_line(o.message)}" if o.message else printable(
        o.type, 200)
    err = RemoteFunctionError(f"{what}: {head}", remote_type=o.type, remote_message=o.message,
                              remote_traceback=o.traceback)
    if o.traceback:
        err.add_note("Remote traceback:\n" + o.traceback.rstrip())
    return err


def settle(o: Outcome, *, where: str) -> tuple[bool, Any]:
    """Unpickle one outcome: ``(True, value)`` or ``(False, exception)``.

    The exception is the remote one, rebuilt, when it unpickles to an
    :class:`Exception` here, with the remote traceback as a note (and as
    ``remote_traceback`` where the class lets one set it); else a
    :class:`RemoteFunctionError` carrying the type, message and traceback.
    A ``SystemExit`` or ``KeyboardInterrupt`` raised remotely comes back as a
    :class:`RemoteFunctionError` too, never as itself.

    Unpickling runs code named by the pickle: results come from your own
    account on the remote host, and are trusted as much as it is.
    """
    if o.ok:
        try:
            return True, pickle.loads(o.blob)
        except Exception as exc:
            return False, RemoteFunctionError(
                f"{where}: the return value could not be unpickled here:"
                f" {type(exc).__name__}: {printable(str(exc), 300)}",
                remote_type=type(exc).__name__, remote_message=str(exc))
    if o.blob:
        try:
            rebuilt = pickle.loads(o.blob)
        except Exception:
            rebuilt = None
        if isinstance(rebuilt, Exception):
            if o.traceback:
                rebuilt.add_note("Remote traceback:\n" + o.traceback.rstrip())
                try:
                    rebuilt.remote_traceback = o.traceback  # type: ignore[attr-defined]
                except (AttributeError, TypeError):
                    pass
            return False, rebuilt
    return False, _remote_error(o, f"{where}: the remote call raised")


# ---- failures without a result -----------------------------------------------------


def _tail_line(err_tail: str) -> str:
    lines = [ln for ln in err_tail.splitlines() if ln.strip()]
    return printable(lines[-1].strip(), 200) if lines else ""


def job_failed(job: Job, err_tail: bytes, *, why: str = "") -> JobFailedError:
    """The error for a job that ended without a result.

    Args:
        job: the job, final.
        err_tail: the last bytes of its job.err (b'' if none).
        why: what else is known (e.g. that the result file was unreadable).
    """
    tail = err_tail[-ERR_TAIL_BYTES:].decode("utf-8", "replace")
    how = (f" by signal {job.signal}" if job.signal
           else f" with exit status {job.exit_status}" if job.exit_status is not None else "")
    state = job.state.value
    msg = (f"job {job.id} ({job.job_runner} {job.job_id or 'with no id'}) on {job.platform}"
           f" ended {state}{how} without a result")
    if job.state is JobState.SUBMIT_FAILED and job.message:
        msg += f": {printable(job.message.strip(), 300)}"
    if why:
        msg += f"; {why}"
    line = _tail_line(tail)
    if line:
        msg += f"; job.err ends: {line}"
    return JobFailedError(msg, id=job.id, state=state, exit_status=job.exit_status,
                          signal=job.signal, err_tail=tail, job=job)


def task_failed(label: str, *, exit_status: int | None, signal: str | None,
                error: str | None, stderr: bytes) -> JobFailedError:
    """The error for a farm task that ended without a result."""
    tail = stderr[-ERR_TAIL_BYTES:].decode("utf-8", "replace")
    how = (f" by signal {signal}" if signal
           else f" with exit status {exit_status}" if exit_status is not None else "")
    msg = f"farm task {label} ended{how} without a result"
    if error:
        msg += f": {printable(error, 300)}"
    line = _tail_line(tail)
    if line:
        msg += f"; stderr ends: {line}"
    return JobFailedError(msg, state="failed", exit_status=exit_status, signal=signal,
                          err_tail=tail)


# ---- the pre-flight check -------------------------------------------------------------

_PYENV_MARK = "SSHQ-PYENV "


@dataclass(frozen=True, slots=True, kw_only=True)
class PyEnv:
    """What the pre-flight check found of a remote interpreter.

    Attributes:
        version: ``(major, minor, micro)``.
        cloudpickle: its cloudpickle version ('' when it cannot import one).
        cloudpickle_error: why it cannot ('' when it can).
        executable: ``sys.executable`` there.
    """

    version: tuple[int, int, int]
    cloudpickle: str
    cloudpickle_error: str
    executable: str


def _fix(local_python: str, local_cp: str) -> str:
    major_minor = ".".join(local_python.split(".")[:2])
    return (f"fix: give python= an interpreter of Python {major_minor} with"
            f" `pip install cloudpickle=={local_cp}` (e.g. `python{major_minor} -m venv"
            f" ~/venvs/sshq && ~/venvs/sshq/bin/pip install cloudpickle=={local_cp}`)")


def _local() -> tuple[str, str]:
    return ".".join(str(v) for v in sys.version_info[:3]), cloudpickle_version()


def parse_pyenv(reply: dict[str, Any], *, host: str, python: str) -> PyEnv:
    """Read a ``pyenv`` agent reply (untrusted).

    Raises:
        EnvironmentMismatchError: the interpreter could not be started or
            printed no version.
    """
    local_py, local_cp = _local()
    stdout = reply.get("stdout") if isinstance(reply.get("stdout"), str) else ""
    stderr = reply.get("stderr") if isinstance(reply.get("stderr"), str) else ""
    found: dict[str, Any] | None = None
    for line in reversed(str(stdout).splitlines()):
        if line.startswith(_PYENV_MARK):
            try:
                obj = json.loads(line[len(_PYENV_MARK):])
            except ValueError:
                break
            found = obj if isinstance(obj, dict) else None
            break
    version = found.get("version") if found else None
    if not (isinstance(version, list) and len(version) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1000
                    for v in version)):
        why = _first_line(str(stderr)) or f"exit {reply.get('exit')!r}"
        raise EnvironmentMismatchError(
            f"{host}: cannot run the remote python {printable(python, 200)!r} ({why}); "
            + _fix(local_py, local_cp),
            host=host, python=python, local_python=local_py, local_cloudpickle=local_cp)
    assert found is not None
    cp = found.get("cloudpickle")
    cp_err = found.get("cloudpickle_error")
    exe = found.get("executable")
    return PyEnv(version=(version[0], version[1], version[2]),
                 cloudpickle=printable(cp, 64) if isinstance(cp, str) else "",
                 cloudpickle_error=printable(cp_err, 300) if isinstance(cp_err, str) else "",
                 executable=printable(exe, 300) if isinstance(exe, str) else "")


def check_pyenv(env: PyEnv, *, host: str, python: str,
                local: tuple[str, str] | None = None) -> None:
    """The environment rule: the remote Python's major.minor and cloudpickle
    version equal this client's.

    Args:
        env: what the remote side has.
        host, python: named in the error.
        local: ``(python version, cloudpickle version)`` of this client
            (default: this process's).

    Raises:
        EnvironmentMismatchError: naming both sides' versions and the fix.
    """
    local_py, local_cp = local or _local()
    remote_py = ".".join(str(v) for v in env.version)
    same_py = list(env.version[:2]) == [int(x) for x in local_py.split(".")[:2]]
    if same_py and env.cloudpickle == local_cp:
        return
    remote_cp = (f"cloudpickle {env.cloudpickle}" if env.cloudpickle
                 else f"no cloudpickle ({env.cloudpickle_error or 'not importable'})")
    raise EnvironmentMismatchError(
        f"{host}: the remote python {printable(python, 200)!r} is Python {remote_py} with"
        f" {remote_cp}; this client is Python {local_py} with cloudpickle {local_cp}: the"
        " Python major.minor and the cloudpickle version must be the same; "
        + _fix(local_py, local_cp),
        host=host, python=python, remote_python=remote_py,
        remote_cloudpickle=env.cloudpickle, local_python=local_py,
        local_cloudpickle=local_cp)
