"""The native API of ``sshq serve``, mounted under ``/api/v1``.

Job objects are the JSON of ``sshq ... --json`` (:meth:`sshq.model.Job.to_dict`)
plus ``last_poll``, the time of the job's last successful poll.  Reads are
answered from the state database; only submit, kill and logs reach a host.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ..exceptions import InvalidInputError
from ..model import JobSpec
from .gateway import ApiError, Gateway
from .state import TokenInfo

__all__ = ["router", "JobIn", "SubmitIn", "MAX_JOBS"]

#: The most jobs one POST may submit.
MAX_JOBS = 1000

_bearer = HTTPBearer(auto_error=False, description="A token from `sshq token create`.")


async def gateway_of(request: Request) -> Gateway:
    """The request's :class:`Gateway`.

    (Every dependency and route is ``async``: FastAPI would run a plain
    function in a thread, and the database connections belong to the
    event loop's thread.)
    """
    gw: Gateway = request.app.state.gateway
    return gw


async def require_token(request: Request,
                  _creds: Annotated[HTTPAuthorizationCredentials | None,
                                    Depends(_bearer)]) -> TokenInfo:
    """The request's token (401 if missing, unknown, revoked or expired)."""
    token = (await gateway_of(request)).authenticate(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "missing or invalid token")
    return token


Token = Annotated[TokenInfo, Depends(require_token)]
GatewayDep = Annotated[Gateway, Depends(gateway_of)]

router = APIRouter()


class JobIn(BaseModel):
    """One job: the fields of :class:`sshq.JobSpec` (exactly one of ``script``
    and ``command``).  Local input files are not accepted over HTTP."""

    model_config = ConfigDict(extra="forbid")

    script: str | None = Field(None, description="The job script (text; a #! line"
                               " chooses its interpreter).")
    command: str | None = Field(None, description="A shell command line instead of a script.")
    arguments: list[str] = Field(default_factory=list)
    name: str | None = Field(None, description="Job name (default 'job').")
    environment: dict[str, str] = Field(default_factory=dict)
    walltime: str | int | None = Field(None, description="HH:MM:SS, or seconds.")
    nodes: int | None = Field(None, ge=1)
    tasks: int | None = Field(None, ge=1)
    cpus: int | None = Field(None, ge=1)
    memory: str | int | None = Field(None, description="Bytes, or e.g. '2G'.")
    queue: str | None = None
    account: str | None = None
    mail_user: str | None = None
    mail_events: list[str] = Field(default_factory=list)
    directives: list[str] = Field(default_factory=list)
    work_dir: str | None = Field(None, description="Absolute remote working directory.")
    outputs: list[str] = Field(default_factory=list)
    array: str | None = None
    container_image: str | None = None

    def spec(self) -> JobSpec:
        """The :class:`JobSpec`, checked (``normalized``).

        Raises:
            InvalidInputError: a field was refused.
        """
        fields = self.model_dump()
        for k in ("arguments", "mail_events", "directives", "outputs"):
            fields[k] = tuple(fields[k])
        spec = JobSpec(**fields)
        spec.normalized()
        return spec


class SubmitIn(BaseModel):
    """A batch of jobs for one platform, submitted in one SSH command."""

    model_config = ConfigDict(extra="forbid")

    platform: str
    jobs: list[JobIn] = Field(min_length=1)
    callback_url: str | None = Field(
        None, max_length=2048, description="Each state change of these jobs is POSTed here"
        " (the job object), signed X-Sshq-Signature: sha256=<HMAC-SHA256 of the body with"
        " the token's webhook secret>; at least once, retried with backoff.")


_URL = re.compile(r"https?://[^\s/?#]+(/[^\s]*)?")
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@router.get("/platforms", summary="The platforms this token may use")
async def platforms(token: Token, gw: GatewayDep) -> list[dict[str, Any]]:
    return gw.platforms(token)


@router.post("/jobs", status_code=201, summary="Submit a batch of jobs (one SSH command)")
async def submit(body: SubmitIn, token: Token, gw: GatewayDep, response: Response,
                 idempotency_key: Annotated[str | None, Header()] = None
                 ) -> list[dict[str, Any]]:
    """Submit the jobs; returns the job objects in order.

    With an ``Idempotency-Key`` header, a repeated request (same token, key
    and body) returns the jobs of the first one and submits nothing, also
    after a server restart; the header ``Idempotent-Replayed: true`` says so.
    """
    if len(body.jobs) > MAX_JOBS:
        raise ApiError(413, f"{len(body.jobs)} jobs in one request; at most {MAX_JOBS}")
    if idempotency_key is not None and not _KEY.fullmatch(idempotency_key):
        raise ApiError(422, "Idempotency-Key: 1 to 255 printable ASCII characters")
    if body.callback_url is not None and not _URL.fullmatch(body.callback_url):
        raise ApiError(422, f"callback_url {body.callback_url[:100]!r}: an http(s) URL")
    gw.check_platform(token, body.platform)
    specs = []
    for n, job in enumerate(body.jobs):
        try:
            specs.append(job.spec())
        except InvalidInputError as exc:
            raise ApiError(422, f"jobs[{n}]: {exc}") from None
    body_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True)
                               .encode()).hexdigest()
    jobs, replayed = await gw.submit(token, body.platform, specs,
                                     callback_url=body.callback_url,
                                     key=idempotency_key, body_hash=body_hash)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return gw.objects(jobs)


@router.get("/jobs", summary="Jobs, from the state database (no SSH)")
async def list_jobs(token: Token, gw: GatewayDep, response: Response,
                    platform: str | None = None, state: str | None = None,
                    limit: Annotated[int | None, Query(ge=1, le=100000)] = None
                    ) -> list[dict[str, Any]]:
    """The jobs, oldest first.  The header ``Sshq-Last-Event-Id`` is the newest
    event id before the list was read: ``/events?after=`` it misses nothing."""
    response.headers["Sshq-Last-Event-Id"] = str(gw.state.last_event_id())
    return gw.objects(gw.list_jobs(token, platform=platform, state=state, limit=limit))


@router.get("/jobs/{id}", summary="One job, from the state database (no SSH)")
async def get_job(id: int, token: Token, gw: GatewayDep) -> dict[str, Any]:
    return gw.objects([gw.job(token, id)])[0]


@router.delete("/jobs/{id}", summary="Kill a job with its job runner")
async def kill_job(id: int, token: Token, gw: GatewayDep) -> dict[str, Any]:
    return gw.objects([await gw.kill(token, id)])[0]


@router.get("/jobs/{id}/log/{file}", summary="A job log file (raw bytes)",
            response_class=Response)
async def job_log(id: int, file: Literal["out", "err", "status", "job"], token: Token,
                  gw: GatewayDep, offset: Annotated[int, Query(ge=0)] = 0,
                  follow: bool = False) -> Response:
    """The bytes of ``job.out``, ``job.err``, ``job.status`` or the job script from
    ``offset``; with ``follow=true``, streamed as they are written until the job ends."""
    if follow:
        gw.job(token, id)
        return StreamingResponse(gw.follow_log(token, id, file, offset),
                                 media_type="application/octet-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    data = await gw.cat_log(token, id, file, offset)
    return Response(data, media_type="application/octet-stream")


@router.get("/events", summary="Server-sent events: one per job state change",
            response_class=StreamingResponse)
async def events(request: Request, token: Token, gw: GatewayDep,
                 last_event_id: Annotated[str | None, Header()] = None,
                 after: Annotated[int | None, Query(ge=0)] = None) -> StreamingResponse:
    """``event: job``, ``id: <event id>``, ``data: <job object>`` for each state
    change of a job on the token's platforms.  ``Last-Event-ID`` (or
    ``?after=``) resumes after that event, without loss (events are kept in the
    state database); without either, the stream starts with the next change."""
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise ApiError(422, "Last-Event-ID: an event id (a number)")
        start = int(last_event_id)
    elif after is not None:
        start = after
    else:
        start = gw.state.last_event_id()
    platforms = gw.visible_platforms(token)

    async def stream() -> AsyncIterator[bytes]:
        last = start
        yield b"retry: 2000\n\n"
        while True:
            batch = gw.state.events_after(last, platforms)
            for eid, data in batch:
                yield f"id: {eid}\nevent: job\ndata: {data}\n\n".encode()
                last = eid
            if len(batch) < 500:
                await gw.wait_changed(10.0)
                if not gw.state.events_after(last, platforms, limit=1):
                    yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
