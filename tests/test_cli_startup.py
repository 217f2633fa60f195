"""What one ``sshq`` command costs before and after its work (bench/RESULTS.md).

Each CLI command is a new process: what it imports and what the interpreter
does at exit are paid by every command.  ``sshq submit`` imports only its own
command module (every command is imported when it runs), and no transport it
does not use; at exit, the objects are frozen so that the interpreter's last
garbage collections do not walk them.
"""

from __future__ import annotations

import subprocess
import sys

import click

from sshq.cli.main import COMMANDS, cli

#: What ``sshq submit`` never needs to import.
NOT_FOR_SUBMIT = (
    "sshq.cli.farm", "sshq.cli.serve", "sshq.cli.agent", "sshq.cli.hosts", "sshq.cli.logs",
    "sshq.cli.staging", "sshq.server", "sshq.farm", "sshq.executor",
    "sshq.transport.openssh", "asyncssh", "rich",
)


def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_submit_imports_only_what_it_uses() -> None:
    out = run_python(
        "import sys, sshq.cli.main as m\n"
        "try:\n    m.main(['submit', '--help'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(repr(sorted(sys.modules)))\n")
    loaded = eval(out.strip().splitlines()[-1])  # noqa: S307 (our own repr)
    assert "sshq.cli.jobs" in loaded  # (the probe saw the command run)
    assert [m for m in loaded if m.startswith(NOT_FOR_SUBMIT)] == []


def test_every_command_is_listed_and_found() -> None:
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        assert command.help, f"{name} has no help"
    assert cli.get_command(ctx, "no-such-command") is None


def test_help_lists_every_command() -> None:
    out = run_python("from sshq.cli.main import main\nmain(['--help'])\n")
    listed = out.split("Commands:", 1)[1].split()
    assert [n for n in COMMANDS if n not in listed] == []


def test_objects_are_frozen_at_exit() -> None:
    """An exit handler that runs after the CLI's (registered before it) sees them frozen."""
    out = run_python(
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
        "from sshq.cli.main import main\n"
        "main(['--version'])\n")
    assert out.splitlines()[0].startswith("sshq, version")
    assert int(out.split("frozen")[1]) > 1000
