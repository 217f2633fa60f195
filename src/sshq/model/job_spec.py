"""The portable job spec: what to run and what it needs, for any job runner."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from ..exceptions import InvalidInputError
from ..quoting import check_directive_value, check_env_key, check_env_value, check_job_name
from .resources import parse_array, parse_memory, parse_walltime

__all__ = ["JobSpec", "MAIL_EVENTS", "MAX_INPUT_BYTES"]

#: Mail events a job spec may ask for (the runners map them to their own).
MAIL_EVENTS = frozenset({"begin", "end", "fail", "all"})


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One job to submit.

    Exactly one of ``script`` and ``command`` says what runs.

    Attributes:
        script: the user's script, bytes exactly as on disk (a ``str`` is
            encoded as UTF-8). A ``#!`` line
            chooses its interpreter; without one it runs under ``/bin/sh``
            semantics of bash.
        command: a shell command line, run by ``/bin/bash -c``-like semantics
            (it becomes a two-line bash script).
        arguments: arguments passed to the script, each byte-exact.
        name: the job name (also the job's directory in the job log layout);
            defaults to the script's file stem, or ``job``.
        environment: variables exported to the job, values byte-exact.
        walltime: the run time limit (a ``timedelta``; ``"HH:MM:SS"`` strings
            and seconds are converted on construction).
        nodes, tasks, cpus: nodes, tasks, and CPUs per task.
        memory: memory per node in bytes (``"2G"``-style strings are
            converted on construction, powers of 1024).
        queue: the queue or partition.
        account: the account or project charged.
        mail_user: address for the job runner's mail.
        mail_events: subset of ``begin``, ``end``, ``fail``, ``all``.
        directives: raw extra directives, passed to the runner as written
            (e.g. ``--constraint=gpu`` for Slurm).
        work_dir: absolute remote working directory; defaults to
            ``<run_dir>/work/<name>``.
        inputs: local files staged into the work directory (under their base
            names) before submission, in the same SSH round trip; at most
            :data:`MAX_INPUT_BYTES` in all (use ``sshq install`` for trees).
        outputs: paths relative to the work directory, brought back by
            ``retrieve`` once the job has succeeded.
        array: an array range (``1-100``, ``1-99:2``, ``1,3,5-7``, ``%N``
            throttle): one submission, and one sshq job per element, polled
            on its own.  Each element has its own job log directory
            ``<NN>/<index>/`` and sees ``SSHQ_ARRAY_INDEX``.
        container_image: run the script inside this image (an Apptainer
            ``.sif`` path or a registry reference such as
            ``docker://alpine:3.20``; for podman an image name), with the
            platform's ``container_runtime``.  ``sshq ssh-to-job`` then opens
            its shell in the same image (podman: the same container).
    """

    script: bytes | None = None
    command: str | None = None
    arguments: tuple[str, ...] = ()
    name: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    walltime: timedelta | None = None
    nodes: int | None = None
    tasks: int | None = None
    cpus: int | None = None
    memory: int | None = None
    queue: str | None = None
    account: str | None = None
    mail_user: str | None = None
    mail_events: tuple[str, ...] = ()
    directives: tuple[str, ...] = ()
    work_dir: str | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    array: str | None = None
    container_image: str | None = None

    def __post_init__(self) -> None:
        # Accept the forms people write ("0:10:00", 600, "2G"); store the types.
        # The one place walltime and memory are parsed (and checked).
        if self.walltime is not None:
            object.__setattr__(self, "walltime", parse_walltime(self.walltime))
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_memory(self.memory))
        if isinstance(self.script, str):
            object.__setattr__(self, "script", self.script.encode("utf-8", "surrogateescape"))
        for name in ("arguments", "mail_events", "directives", "inputs", "outputs"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InvalidInputError(f"{name} must be a sequence of strings, not one string")
            object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_file(cls, path: str | Path, **fields: object) -> JobSpec:
        """Build a spec from a local script file; the name defaults to its stem.

        Raises:
            InvalidInputError: the file cannot be read.
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read job script {str(p)!r}: {exc.strerror}") from None
        if "name" not in fields or fields["name"] is None:
            fields["name"] = default_name(p.stem)
        return cls(script=data, **fields)  # type: ignore[arg-type]

    @property
    def array_indices(self) -> tuple[int, ...]:
        """The array element indices (empty for a plain job)."""
        return parse_array(self.array) if self.array is not None else ()

    @property
    def job_name(self) -> str:
        """The effective job name."""
        return self.name or "job"

    def normalized(self) -> JobSpec:
        """Return a validated copy, with walltime/memory coerced to their types.

        Raises:
            InvalidInputError: naming the first bad field.
        """
        if (self.script is None) == (self.command is None):
            raise InvalidInputError("a job needs exactly one of a script or a command")
        if self.script is not None and b"\x00" in self.script:
            raise InvalidInputError("the job script contains a NUL byte")
        if self.command is not None:
            if "\x00" in self.command:
                raise InvalidInputError("the command contains a NUL byte")
            if not self.command.strip():
                raise InvalidInputError("the command is empty")
        check_job_name(self.job_name)
        for a in self.arguments:
            if "\x00" in a:
                raise InvalidInputError(f"argument {a!r} contains a NUL byte")
        for k, v in self.environment.items():
            check_env_key(k)
            check_env_value(k, v)
        for fname in ("queue", "account", "mail_user", "work_dir"):
            value = getattr(self, fname)
            if value is not None:
                check_directive_value(fname.replace("_", "-"), value)
                if not value:
                    raise InvalidInputError(f"{fname.replace('_', '-')}: empty value")
        if self.work_dir is not None and not self.work_dir.startswith("/"):
            raise InvalidInputError(f"work-dir must be an absolute path, got {self.work_dir!r}")
        for d in self.directives:
            check_directive_value("directive", d)
        _check_inputs(self.inputs)
        if self.array is not None:
            check_directive_value("array", self.array)
            parse_array(self.array)
        if self.container_image is not None:
            img = self.container_image
            check_directive_value("container-image", img)
            if not img or img.startswith("-") or any(c.isspace() for c in img):
                raise InvalidInputError(
                    f"container-image {img!r}: an image path or reference, without spaces,"
                    " not starting with '-'")
        for out in self.outputs:
            check_directive_value("output", out)
            parts = out.split("/")
            if not out or out.startswith(("/", "-")) or ".." in parts:
                raise InvalidInputError(
                    f"output {out!r} must be a path relative to the work directory,"
                    " without '..'")
        events = tuple(e.strip().lower() for e in self.mail_events if e.strip())
        bad = [e for e in events if e not in MAIL_EVENTS]
        if bad:
            raise InvalidInputError(
                f"unknown mail event(s) {', '.join(bad)}: use {', '.join(sorted(MAIL_EVENTS))}"
            )
        if events and not self.mail_user:
            raise InvalidInputError("mail events need a mail user (--mail-user)")
        for fname in ("nodes", "tasks", "cpus"):
            value = getattr(self, fname)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{fname} must be a positive integer, got {value!r}")
        return replace(
            self,
            mail_events=events,
            environment=dict(self.environment),
            arguments=tuple(self.arguments),
            directives=tuple(self.directives),
        )

    def user_script(self) -> bytes:
        """The bytes of the program the job wrapper runs."""
        if self.script is not None:
            return self.script
        assert self.command is not None
        return b"#!/bin/bash\n" + self.command.encode("utf-8", "surrogateescape") + b"\n"


#: The most input file bytes one job may stage inline (64 MiB).
MAX_INPUT_BYTES = 64 * 1024 * 1024


def _check_inputs(inputs: Sequence[str]) -> None:
    names: set[str] = set()
    total = 0
    for path in inputs:
        p = Path(path)
        if not p.is_file():
            raise InvalidInputError(f"input file {path!r} does not exist or is not a file")
        if p.name in names:
            raise InvalidInputError(f"two input files are named {p.name!r}")
        names.add(p.name)
        total += p.stat().st_size
    if total > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"input files total {total} bytes, more than {MAX_INPUT_BYTES}; use `sshq install`")


_NAME_BAD = re.compile(r"[^A-Za-z0-9_.+-]")


def default_name(stem: str) -> str:
    """Turn a file stem into a valid job name (bad characters become ``_``)."""
    name = _NAME_BAD.sub("_", stem).lstrip(".+-")[:100]
    return name or "job"


def specs_from_files(paths: Sequence[str | Path], **fields: object) -> list[JobSpec]:
    """One spec per script file, sharing the other fields."""
    return [JobSpec.from_file(p, **fields) for p in paths]
