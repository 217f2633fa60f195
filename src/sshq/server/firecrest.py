"""The FirecREST v2 subset of ``sshq serve``, mounted under ``/firecrest``.

What a job-submitting FirecREST client uses, as ``shared/firecrest-v2-subset.md``
lists it (from eth-cscs/firecrest-v2 and pyfirecrest 3.10): status/systems,
compute jobs (submit, list, get, metadata, cancel) and the filesystem ops
ls, head, tail, view, stat, mkdir, rm, upload and download for small files.
pyfirecrest's v2 client works unchanged with
``firecrest_url="http://127.0.0.1:8622/firecrest"``.

Mapping: a system is a platform; a ``jobId`` is the job runner's job id
(``(platform, job id)`` resolves to the newest sshq job with it; the sshq id
is in ``sshqId``).  Errors have FirecREST's shape (``errorType``,
``message``, ...); no ``F7T-AppVersion`` header is sent (pyfirecrest then
assumes 2.6.0).  Filesystem operations run in the agent (its ``fs``
operation), confined to the platform's run directory and the work
directories of the jobs the token submitted (symbolic links resolved on the
host): anything else is 403.  Transfers above 5 MiB (FirecREST's staged
``/transfer`` routes) are not offered: 413.
"""

from __future__ import annotations

import base64
import posixpath
import signal as signals
import time
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Path, Query, Request, Response, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..config import Platform
from ..exceptions import InvalidInputError, SshqError
from ..model import Job, JobSpec, JobState
from ..shipped import sshq_jobstatus as js
from ..transport import Transport
from .api import GatewayDep
from .gateway import ApiError, Gateway, _api_error
from .state import TokenInfo

__all__ = ["router", "MAX_DIRECT_BYTES"]

#: The largest direct upload or download (FirecREST's ops limit), in bytes.
MAX_DIRECT_BYTES = 5 * 1024 * 1024

_bearer = HTTPBearer(auto_error=False)


async def _token(request: Request,
                 _creds: Annotated[HTTPAuthorizationCredentials | None,
                                   Depends(_bearer)]) -> TokenInfo:
    gw: Gateway = request.app.state.gateway
    token = gw.authenticate(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "Access token is invalid.")
    return token


Token = Annotated[TokenInfo, Depends(_token)]

router = APIRouter(tags=["firecrest"])


def _system(gw: Gateway, token: TokenInfo, name: str) -> Platform:
    plat = gw.served(name)
    if plat is None:
        raise ApiError(404, "System not found")
    if not token.allows(name):
        raise ApiError(403, f"Permission denied: this token may not use system {name!r}")
    return plat


# ---------------------------------------------------------------- status


@router.get("/status/systems", summary="The systems (sshq platforms) this token may use")
async def systems(token: Token, gw: GatewayDep) -> dict[str, Any]:
    out = []
    for name in gw.visible_platforms(token):
        plat = gw.client.config.platform(name)
        info = gw.store.remote_init(plat.name, plat.run_dir)
        out.append({
            "name": plat.name,
            "ssh": {"host": plat.hosts[0], "port": plat.port or 22},
            "scheduler": {"type": plat.job_runner, "version": ""},
            "servicesHealth": [],
            "fileSystems": [{"path": info.run_dir if info else plat.run_dir,
                             "dataType": "scratch", "defaultWorkDir": True}],
        })
    return {"systems": out}


# ---------------------------------------------------------------- compute


class _JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    working_directory: str = Field(validation_alias=AliasChoices("workingDirectory",
                                                                 "working_directory"))
    script: str | None = None
    script_path: str | None = Field(None, validation_alias=AliasChoices("scriptPath",
                                                                         "script_path"))
    env: dict[str, str] | None = None
    name: str | None = None
    account: str | None = None
    partition: str | None = None
    reservation: str | None = None
    standard_output: str | None = Field(None, validation_alias=AliasChoices(
        "standardOutput", "standard_output"))
    standard_error: str | None = Field(None, validation_alias=AliasChoices(
        "standardError", "standard_error"))
    standard_input: str | None = Field(None, validation_alias=AliasChoices(
        "standardInput", "standard_input"))
    constraints: str | None = None


class _SubmitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: _JobIn


def _spec(job: _JobIn, plat: Platform) -> JobSpec:
    """The JobSpec of a FirecREST job; what sshq cannot express is refused (400)."""
    refused = [f for f, v in (("scriptPath", job.script_path),
                              ("standardOutput", job.standard_output),
                              ("standardError", job.standard_error),
                              ("standardInput", job.standard_input)) if v]
    if refused:
        raise ApiError(400, f"{', '.join(refused)}: not supported by sshq serve (the job's"
                       " output goes to job.out and job.err in its job log directory; send"
                       " the script itself)")
    if job.script is None:
        raise ApiError(400, "the job needs a script")
    directives = []
    for field, value, opt in (("reservation", job.reservation, "--reservation"),
                              ("constraints", job.constraints, "--constraint")):
        if value:
            if plat.job_runner != "slurm":
                raise ApiError(400, f"{field}: not expressible for job runner"
                               f" {plat.job_runner}")
            directives.append(f"{opt}={value}")
    try:
        spec = JobSpec(script=job.script.encode("utf-8", "surrogateescape"),
                       name=job.name or "firecrest",
                       environment=job.env or {}, work_dir=job.working_directory,
                       account=job.account or None, queue=job.partition or None,
                       directives=tuple(directives))
        spec.normalized()
    except InvalidInputError as exc:
        raise ApiError(400, str(exc)) from None
    return spec


def _epoch(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def _status(job: Job, killed: bool) -> dict[str, Any]:
    """FirecREST's status of a job (the mapping of firecrest-v2-subset.md)."""
    sig = None
    if job.signal:
        try:
            sig = int(signals.Signals["SIG" + job.signal].value)
        except KeyError:
            sig = None
    code: int | None = None
    if job.state is JobState.SUBMITTED:
        state = "PENDING"
    elif job.state is JobState.RUNNING:
        state = "RUNNING"
    elif job.state is JobState.SUCCEEDED:
        state, code = "COMPLETED", 0
    elif killed:  # (failed or submit-failed after a kill, started or not)
        state, code, sig = "CANCELLED", 0, 15
    elif job.signal == "XCPU":
        state, code = "TIMEOUT", 0
    elif job.signal:
        state, code = "FAILED", 0
    else:
        state, code = "FAILED", job.exit_status
    return {"state": state, "stateReason": job.message or None, "exitCode": code,
            "interruptSignal": sig}


def _job_model(gw: Gateway, job: Job, killed: bool) -> dict[str, Any]:
    spec = gw.store.spec(job.id)
    start, end = _epoch(job.start_time), _epoch(job.exit_time)
    elapsed = None if start is None else max(0, (end or int(time.time())) - start)
    walltime = spec.get("walltime")
    return {
        "jobId": job.job_id,
        "name": job.name,
        "status": _status(job, killed),
        "tasks": None,
        "time": {"elapsed": elapsed, "start": start, "end": end, "suspended": 0,
                 "limit": int(walltime) if isinstance(walltime, int | float) else None},
        "account": spec.get("account") if isinstance(spec.get("account"), str) else None,
        "allocationNodes": spec.get("nodes") if isinstance(spec.get("nodes"), int) else 1,
        "cluster": job.platform,
        "group": None,
        "nodes": "",
        "partition": spec.get("queue") if isinstance(spec.get("queue"), str) else "",
        "killRequestUser": None,
        "user": None,
        "workingDirectory": job.work_dir,
        "priority": None,
        "sshqId": job.id,
    }


def _find(gw: Gateway, plat: Platform, job_id: str) -> Job:
    """The newest sshq job of ``plat`` with this job runner id (404 if none)."""
    for job in reversed(gw.store.query(platform=plat.name)):
        if job.job_id == job_id:
            return job
    raise ApiError(404, "Job not found.")


_JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\[\]-]{0,63}$"
_WINDOWS = {"1h": 3600, "8h": 8 * 3600, "24h": 86400, "3d": 3 * 86400, "7d": 7 * 86400}


@router.post("/compute/{system}/jobs", status_code=201, summary="Submit a job")
async def submit(system: str, body: _SubmitIn, token: Token, gw: GatewayDep
                 ) -> dict[str, Any]:
    plat = _system(gw, token, system)
    spec = _spec(body.job, plat)
    jobs, _ = await gw.submit(token, plat.name, [spec], callback_url=None, key=None,
                              body_hash="")
    (job,) = jobs
    if job.state is JobState.SUBMIT_FAILED or not job.job_id:
        raise ApiError(400, f"the job runner refused the job: {job.message}")
    return {"jobId": job.job_id}


@router.get("/compute/{system}/jobs", summary="Jobs of a system")
async def list_jobs(system: str, token: Token, gw: GatewayDep, allusers: bool = False,
                    account: str | None = None, name: str | None = None,
                    time_window: str | None = None) -> dict[str, Any]:
    plat = _system(gw, token, system)
    if time_window and time_window not in _WINDOWS:
        raise ApiError(400, f"time_window {time_window!r}: one of {', '.join(_WINDOWS)}")
    since = time.time() - _WINDOWS[time_window or "24h"]
    jobs = [j for j in gw.store.query(platform=plat.name) if j.job_id and (
        not j.state.is_final or (j.submit_time and j.submit_time.timestamp() >= since))]
    if name:
        jobs = [j for j in jobs if j.name == name]
    if account:
        jobs = [j for j in jobs if gw.store.spec(j.id).get("account") == account]
    killed = gw.state.killed(j.id for j in jobs)
    return {"jobs": [_job_model(gw, j, j.id in killed) for j in jobs]}


@router.get("/compute/{system}/jobs/{job_id}", summary="One job (a list of one)")
async def get_job(system: str, job_id: Annotated[str, Path(pattern=_JOB_ID)], token: Token,
                  gw: GatewayDep) -> dict[str, Any]:
    plat = _system(gw, token, system)
    job = _find(gw, plat, job_id)
    return {"jobs": [_job_model(gw, job, bool(gw.state.killed([job.id])))]}


@router.get("/compute/{system}/jobs/{job_id}/metadata", summary="A job's script and files")
async def job_metadata(system: str, job_id: str, token: Token, gw: GatewayDep
                       ) -> dict[str, Any]:
    plat = _system(gw, token, system)
    job = _find(gw, plat, job_id)
    script = (await gw.cat_log(token, job.id, "job", 0)).decode("utf-8", "replace")
    return {"jobs": [{"jobId": job.job_id, "script": script, "standardInput": "/dev/null",
                      "standardOutput": f"{job.job_log_dir}/{js.LOG_FILES['out']}",
                      "standardError": f"{job.job_log_dir}/{js.LOG_FILES['err']}"}]}


@router.delete("/compute/{system}/jobs/{job_id}", status_code=204, summary="Cancel a job")
async def cancel_job(system: str, job_id: str, token: Token, gw: GatewayDep) -> Response:
    plat = _system(gw, token, system)
    job = _find(gw, plat, job_id)
    await gw.kill(token, job.id)
    return Response(status_code=204)


# ---------------------------------------------------------------- filesystem ops


_ERRORS = {"ENOENT": (404, "No such file or directory"), "EACCES": (403, "Permission denied"),
           "EPERM": (403, "Permission denied"), "EEXIST": (400, "File exists"),
           "ENOTDIR": (400, "Not a directory"), "EISDIR": (400, "Is a directory"),
           "EINVAL": (400, "Invalid argument"), "ENOTEMPTY": (400, "Directory not empty"),
           "outside": (403, "Permission denied")}


async def _fs(gw: Gateway, token: TokenInfo, system: str, action: str, path: str,
              **params: Any) -> dict[str, Any]:
    """One agent ``fs`` call on the system, confined to the token's directories.

    Raises:
        ApiError: 400/403/404 from the host's errno, 413, 503/502 SSH.
    """
    plat = _system(gw, token, system)
    if "\x00" in path or not path.startswith("/"):
        raise ApiError(400, f"{path[:200]!r}: an absolute path is needed")
    # '.' and '..' are resolved here, by name (the agent refuses them: a
    # '<root>/x/../..' must not pass for an entry of <root>); the path acted
    # on is the normalized one, and the agent confines it as usual (403)
    path = posixpath.normpath(path)
    pool = gw.client.pool

    async def op(host: str, t: Transport) -> dict[str, Any]:
        info = await pool.remote_init(plat, host, t)
        roots = [info.run_dir, *gw.state.token_work_dirs(token.name, plat.name)]
        return await pool.agent(plat, t, "fs", dict(params, action=action, path=path,
                                                    roots=roots), timeout=120)

    try:
        reply = await pool.with_failover(plat, op)
    except SshqError as exc:
        raise _api_error(exc) from None
    if not reply.get("ok"):
        status, what = _ERRORS.get(str(reply.get("code")), (500, "Error"))
        detail = str(reply.get("error") or "")[:500]
        raise ApiError(status, f"{what}: {detail}" if detail else what)
    return reply


async def _read(gw: Gateway, token: TokenInfo, system: str, path: str, *,
                tail: bool = False, offset: int = 0,
                limit: int = MAX_DIRECT_BYTES) -> tuple[bytes, int]:
    reply = await _fs(gw, token, system, "read", path, tail=tail, offset=offset, max=limit)
    try:
        return base64.b64decode(reply["data_b64"], validate=True), int(reply["size"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(502, "malformed agent reply to a read") from None


@router.get("/filesystem/{system}/ops/ls", summary="List a directory")
async def ls(system: str, path: str, token: Token, gw: GatewayDep, showHidden: bool = False,
             recursive: bool = False, numericUid: bool = False,
             dereference: bool = False) -> dict[str, Any]:
    reply = await _fs(gw, token, system, "ls", path, hidden=showHidden, recursive=recursive,
                      numeric=numericUid, dereference=dereference)
    return {"output": reply.get("output", [])}


@router.get("/filesystem/{system}/ops/stat", summary="stat a file")
async def stat(system: str, path: str, token: Token, gw: GatewayDep,
               dereference: bool = False) -> dict[str, Any]:
    reply = await _fs(gw, token, system, "stat", path, dereference=dereference)
    return {"output": reply.get("output")}


def _cut(data: bytes, *, head: bool, lines: int | None, nbytes: int | None,
         skip: bool) -> tuple[bytes, str]:
    """What ``head``/``tail`` print: -n N, -c N, and their +N/-N forms (skip)."""
    if nbytes is not None:
        if head:
            return (data[:max(0, len(data) - nbytes)] if skip else data[:nbytes]), "bytes"
        return (data[nbytes - 1:] if skip and nbytes > 0 else
                data if skip else data[len(data) - nbytes:] if nbytes else b""), "bytes"
    n = 10 if lines is None else lines
    parts = data.splitlines(keepends=True)
    if head:
        kept = parts[:max(0, len(parts) - n)] if skip else parts[:n]
    else:
        kept = parts[max(0, n - 1):] if skip else (parts[-n:] if n else [])
    return b"".join(kept), "lines"


async def _head_tail(gw: Gateway, token: TokenInfo, system: str, path: str, *, head: bool,
                     lines: int | None, nbytes: int | None, skip: bool) -> dict[str, Any]:
    if lines is not None and nbytes is not None:
        raise ApiError(400, "give lines or bytes, not both")
    data, size = await _read(gw, token, system, path, tail=not head and not skip)
    if size > MAX_DIRECT_BYTES and (skip or (nbytes or 0) > MAX_DIRECT_BYTES):
        raise ApiError(413, f"{path}: larger than {MAX_DIRECT_BYTES} bytes")
    start = size - len(data) if not head and not skip else 0
    content, kind = _cut(data, head=head, lines=lines, nbytes=nbytes, skip=skip)
    if head:
        begin = 0
    else:
        begin = start + len(data) - len(content)
    return {"output": {"content": content.decode("utf-8", "replace"), "contentType": kind,
                       "startPosition": begin, "endPosition": begin + len(content)}}


@router.get("/filesystem/{system}/ops/head", summary="The first lines or bytes of a file")
async def head(system: str, path: str, token: Token, gw: GatewayDep,
               lines: Annotated[int | None, Query(ge=0)] = None,
               bytes: Annotated[int | None, Query(ge=0)] = None,
               skipTrailing: bool = False) -> dict[str, Any]:
    return await _head_tail(gw, token, system, path, head=True, lines=lines, nbytes=bytes,
                            skip=skipTrailing)


@router.get("/filesystem/{system}/ops/tail", summary="The last lines or bytes of a file")
async def tail(system: str, path: str, token: Token, gw: GatewayDep,
               lines: Annotated[int | None, Query(ge=0)] = None,
               bytes: Annotated[int | None, Query(ge=0)] = None,
               skipHeading: bool = False) -> dict[str, Any]:
    return await _head_tail(gw, token, system, path, head=False, lines=lines, nbytes=bytes,
                            skip=skipHeading)


@router.get("/filesystem/{system}/ops/view", summary="A file's text (up to 5 MiB)")
async def view(system: str, path: str, token: Token, gw: GatewayDep,
               size: Annotated[int, Query(ge=0, le=MAX_DIRECT_BYTES)] = MAX_DIRECT_BYTES,
               offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    data, total = await _read(gw, token, system, path, offset=offset, limit=size)
    if total - offset > size and size == MAX_DIRECT_BYTES:
        raise ApiError(413, f"{path}: larger than {MAX_DIRECT_BYTES} bytes")
    return {"output": data.decode("utf-8", "replace")}


@router.get("/filesystem/{system}/ops/download", summary="A file's bytes (up to 5 MiB)",
            response_class=Response)
async def download(system: str, path: str, token: Token, gw: GatewayDep) -> Response:
    data, total = await _read(gw, token, system, path)
    if total > MAX_DIRECT_BYTES:
        raise ApiError(413, f"{path}: {total} bytes, larger than the {MAX_DIRECT_BYTES} of a"
                       " direct download (staged transfers are not offered)")
    return Response(data, media_type="application/octet-stream")


class _MkdirIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(validation_alias=AliasChoices("sourcePath", "path"))
    parent: bool = False


@router.post("/filesystem/{system}/ops/mkdir", status_code=201, summary="Make a directory")
async def mkdir(system: str, body: _MkdirIn, token: Token, gw: GatewayDep
                ) -> dict[str, Any]:
    reply = await _fs(gw, token, system, "mkdir", body.path, parent=body.parent)
    return {"output": reply.get("output")}


@router.delete("/filesystem/{system}/ops/rm", status_code=204, summary="Remove a file or tree")
async def rm(system: str, path: str, token: Token, gw: GatewayDep) -> Response:
    await _fs(gw, token, system, "rm", path)
    return Response(status_code=204)


@router.post("/filesystem/{system}/ops/upload", status_code=204,
             summary="Upload a small file into a directory (up to 5 MiB)")
async def upload(system: str, path: str, token: Token, gw: GatewayDep,
                 file: Annotated[UploadFile, File()]) -> Response:
    data = await file.read(MAX_DIRECT_BYTES + 1)
    if len(data) > MAX_DIRECT_BYTES:
        raise ApiError(413, f"upload larger than {MAX_DIRECT_BYTES} bytes (staged transfers"
                       " are not offered)")
    name = file.filename or ""
    await _fs(gw, token, system, "upload", path, name=name,
              data_b64=base64.b64encode(data).decode())
    return Response(status_code=204)
