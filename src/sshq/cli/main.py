"""The ``sshq`` command: a thin layer over :class:`sshq.AsyncClient`.

Errors exit non-zero with one line on stderr (a traceback with ``--debug``).
Every command takes ``--json``.  Progress is drawn on stderr, only when it
is a terminal.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import sys
from collections.abc import Sequence

import click

from .. import __version__
from ..exceptions import SshqError
from .common import STATE, set_debug
from .render import CleanFormatter, clean

# ---------------------------------------------------------------- the group

#: Every command: ``module:attribute`` in ``sshq.cli``, imported when the command
#: runs (or ``--help`` lists it), so that ``sshq submit`` does not import the
#: farm, the server or the other commands (bench/RESULTS.md).  A new command
#: (a function in a command module) is one line here.
COMMANDS = {
    "submit": "jobs:submit", "poll": "jobs:poll", "wait": "jobs:wait", "kill": "jobs:kill",
    "jobs": "jobs:jobs", "cat-log": "logs:cat_log", "ssh-to-job": "logs:ssh_to_job",
    "retrieve": "staging:retrieve", "install": "staging:install", "tidy": "staging:tidy",
    "hosts": "hosts:hosts", "farm": "farm:farm", "agent": "agent:agent",
    "serve": "serve:serve", "token": "serve:token",
}


class _Commands(click.Group):
    """The group of :data:`COMMANDS`, each imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attr = COMMANDS[cmd_name].split(":")
            command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
            assert isinstance(command, click.Command) and command.name == cmd_name, cmd_name
            self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="sshq")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="Platforms file (default: $SSHQ_CONFIG, then the user config dir).")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=set_debug,
              help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """Manage jobs on clusters and hosts you can only reach by SSH.

    sshq submits jobs to a platform's job runner (Slurm, or background
    processes on a host) over SSH, polls and kills them in batches (one SSH
    command per host, however many jobs), and reads their logs.  A job
    wrapper writes a job status file, so a job's end is known even after the
    batch system has forgotten it.

    \b
    Platforms live in a TOML file (see `sshq submit --help`); the built-in
    platform "localhost" runs background jobs on this machine and needs no
    configuration.  Local state: an SQLite database in the user state dir
    ($SSHQ_STATE_DIR overrides).

    \b
    Examples:
      sshq submit --wait examples/hello.sh
      sshq submit -p mycluster --walltime 0:10:00 --cpus 4 job.sh
      sshq poll --all
      sshq cat-log 3 --follow
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; errors become one line on stderr and an exit status."""
    # At exit, the interpreter's last garbage collections walk every object the
    # imports made (asyncssh, cryptography, click: ~0.05-0.1 s of each command's
    # wall time, bench/RESULTS.md).  The CLI closes what it opened (connections,
    # the state database, files); frozen objects are left to the process's end.
    atexit.unregister(gc.freeze)  # (once, however often main runs in a process)
    atexit.register(gc.freeze)
    handler = logging.StreamHandler()
    handler.setFormatter(CleanFormatter("sshq: %(levelname)s: %(message)s"))
    logging.getLogger("sshq").addHandler(handler)
    logging.getLogger("sshq").setLevel(logging.WARNING)
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, prog_name="sshq",
                      standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("sshq: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("sshq: interrupted", err=True)
        sys.exit(130)
    except SshqError as exc:
        if STATE["debug"]:
            raise
        click.echo(f"sshq: error: {clean(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an unexpected bug: one line unless --debug
        if STATE["debug"]:
            raise
        click.echo(f"sshq: internal error: {type(exc).__name__}: {clean(str(exc))} (run with"
                   " --debug)", err=True)
        sys.exit(70)
    sys.exit(rc if isinstance(rc, int) else 0)

