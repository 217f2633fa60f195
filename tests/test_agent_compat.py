"""The remote agent runs on old login nodes: Python 3.6+, standard library only."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sshq.shipped
from sshq.remote import protocol

SHIPPED = Path(sshq.shipped.__file__).parent
AGENT = SHIPPED / "agent.py"
#: Every file shipped to remote hosts: the agent, the farm's dispatcher and the
#: shared modules bundled with the agent.
REMOTE_FILES = sorted(p for p in SHIPPED.glob("*.py") if p.name != "__init__.py")

#: Standard library modules added after Python 3.6 (vermin knows most; this
#: list keeps the import check meaningful on its own).
NEWER_THAN_36 = {
    "contextvars", "dataclasses", "graphlib", "zoneinfo", "tomllib", "_bootsubprocess",
}
#: The one import outside the standard library a shipped file may make: the
#: runner of sshq.Executor's calls needs the cloudpickle the calls were made with
#: (checked on the remote side before anything is queued).
ALLOWED_NON_STDLIB = {"sshq_call.py": {"cloudpickle"}}


def vermin(*args: str, src: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("vermin") is None:
        if os.environ.get("SSHQ_REQUIRE_TESTBED") == "1":
            pytest.fail("vermin is required (pip install -e '.[test]')")
        pytest.skip("vermin is not installed (it comes with the 'test' extra)")
    return subprocess.run(
        [sys.executable, "-c", "import vermin, sys; sys.argv[0] = 'vermin'; vermin.main()",
         *args, str(src)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("src", REMOTE_FILES, ids=lambda p: p.name)
def test_agent_is_python36_compatible(src: Path) -> None:
    # vermin exits 0 even on a file it cannot parse: parse it with 3.6's grammar first
    ast.parse(src.read_text(), feature_version=(3, 6))
    res = vermin("-t=3.6-", "--no-tips", "--violations", src=src)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Minimum required versions: 3." in res.stdout, res.stdout


def test_vermin_check_can_fail(tmp_path: Path) -> None:
    # the check above is only worth something if vermin flags 3.7+ code
    bad = tmp_path / "bad.py"
    bad.write_text("import dataclasses\nx = 1\nprint(f'{x=}')\n")
    res = vermin("-t=3.6-", "--no-tips", "--violations", src=bad)
    assert res.returncode != 0, res.stdout


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            found.append(("__import__", -1))
    return found


@pytest.mark.parametrize("src", REMOTE_FILES, ids=lambda p: p.name)
def test_agent_imports_only_stdlib(src: Path) -> None:
    tree = ast.parse(src.read_bytes(), str(src))
    imports = _imports(tree)
    assert imports, "the agent imports nothing?"
    for name, level in imports:
        assert level == 0, f"relative or dynamic import in the agent: {name!r}"
        top = name.split(".")[0]
        if top in protocol.BUNDLED_MODULES:  # shipped beside it, itself checked here
            continue
        if top in ALLOWED_NON_STDLIB.get(src.name, ()):
            continue
        assert top in sys.stdlib_module_names, f"agent imports non-stdlib module {name!r}"
        assert top not in NEWER_THAN_36, f"agent imports {name!r}, newer than Python 3.6"
        assert top != "sshq"


def test_import_check_can_fail() -> None:
    tree = ast.parse("import os\nfrom asyncssh import connect\nfrom . import x\n")
    names = _imports(tree)
    assert ("asyncssh", 0) in names and ("", 1) in names
    assert "asyncssh" not in sys.stdlib_module_names


def test_shipped_agent_is_the_file_and_compiles_as_bootstrap_does() -> None:
    src = protocol.agent_source()
    assert src.endswith(AGENT.read_bytes())
    for name in protocol.BUNDLED_MODULES:  # each bundled module, byte for byte
        assert repr((SHIPPED / f"{name}.py").read_bytes()).encode() in src
    code = compile(src, "sshq-agent", "exec")
    assert code.co_filename == "sshq-agent"
    ast.parse(src, feature_version=(3, 6))


def test_agent_runs_without_site_packages(tmp_path: Path) -> None:
    """With -I -S (no site, no user packages, no PYTHONPATH) the agent still works."""
    nonce, stdin = protocol.encode_request("init", {"run_dir": str(tmp_path / "r")})
    res = subprocess.run(["python3", "-I", "-S", "-c", protocol.BOOTSTRAP], input=stdin,
                         capture_output=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert res.returncode == 0, res.stderr
    frames = list(protocol.FrameParser(nonce).feed(res.stdout))
    assert frames and frames[0]["run_dir"] == str(tmp_path / "r")
