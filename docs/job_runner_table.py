#!/usr/bin/env python3
"""Print the JobSpec field -> directive table of docs/job-runners.md.

Each cell is what the job runner's handler writes for one field of a sample
spec (``refused`` when it raises InvalidInputError, ``wrapper`` when the job
wrapper enforces it).  tests/test_docs.py checks the docs hold this output.

    python docs/job_runner_table.py > /tmp/table.md
"""

from __future__ import annotations

from datetime import timedelta

from sshq.exceptions import InvalidInputError
from sshq.job_runners import HANDLERS
from sshq.model import JobSpec

LOG = "/run/log/job/sim/01"
SAMPLES: list[tuple[str, dict[str, object]]] = [
    ("walltime `0:10:00`", {"walltime": timedelta(minutes=10)}),
    ("nodes `2`", {"nodes": 2}),
    ("tasks `4`", {"tasks": 4}),
    ("cpus (per task) `8`", {"cpus": 8}),
    ("memory `2G`", {"memory": 2 * 1024**3}),
    ("queue `debug`", {"queue": "debug"}),
    ("account `proj1`", {"account": "proj1"}),
    ("mail user", {"mail_user": "me@example.org"}),
    ("mail events `begin,end,fail`", {"mail_user": "me@example.org",
                                      "mail_events": ("begin", "end", "fail")}),
    ("raw directive `--exclusive`", {"directives": ("--exclusive",)}),
]


def cell(runner: str, fields: dict[str, object]) -> str:
    h = HANDLERS[runner]
    base_fields = {k: v for k, v in fields.items() if k == "mail_user" and "mail_events" in fields}
    try:
        base = set(h.directives(JobSpec(command="true", name="sim", **base_fields)  # type: ignore[arg-type]
                                .normalized(), LOG))
        lines = h.directives(JobSpec(command="true", name="sim", **fields)  # type: ignore[arg-type]
                             .normalized(), LOG)
    except InvalidInputError:
        return "refused"
    new = [line for line in lines if line not in base]
    if not new and h.wrapper_walltime and "walltime" in fields:
        return "wrapper (XCPU)"
    return "<br>".join(f"`{line}`" for line in new) or "—"


def table() -> str:
    runners = sorted(HANDLERS)
    out = ["| field | " + " | ".join(runners) + " |",
           "|---" * (len(runners) + 1) + "|"]
    for label, fields in SAMPLES:
        out.append(f"| {label} | " + " | ".join(cell(r, fields) for r in runners) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(table(), end="")
