# sshq installed agent: the program behind ~/.sshq/sshq-agent, and its
# restricted mode.
#
# Python 3.6+, standard library only.  `sshq agent install` copies this file,
# the agent (as sshq_agent.py), the dispatcher (sshq_dispatcher.py), the
# modules they import and the job runners' commands (sshq_runners.json) into
# ~/.sshq/agent-<version>/, each checked against its sha256, and points
# ~/.sshq/sshq-agent (a small entry script) at them with one rename.
#
# Two modes, and a pilot job's worker:
#
# - unrestricted (`python3 ~/.sshq/sshq-agent`): the client of a platform with
#   agent = "installed" sends one JSON request line on stdin and no program:
#   the agent's operations run as when shipped;
# - `python3 ~/.sshq/sshq-agent --farm-worker SPOOL`, the command of a pilot
#   job (`sshq farm --via`) of such a platform: the installed dispatcher works
#   on the spool (no dispatcher source travels); never with --restricted;
# - restricted (`--restricted --run-dir DIR`), the forced command of an
#   authorized_keys line `restrict,command="..." KEY`: whatever the client asked
#   to run is only read from SSH_ORIGINAL_COMMAND, never run:
#     * `rsync --server ...` is handed to the system's rrsync, confined to the run
#       directory (its absolute paths rewritten as rrsync's relative ones; a path
#       outside, or with "..", is refused); without rrsync rsync is refused;
#     * an sshq call (the shipped bootstrap `python3 -c ...sshq-agent...`, whose
#       program on stdin is skipped unread, or `python3 .sshq/sshq-agent`) has its
#       request on stdin (at most MAX_REQUEST bytes): job management only (init,
#       submit to a batch job runner -- "background" only with
#       --allow-background --, poll, kill, log reads, listing, tidy, the
#       prepare/collect calls of pilot farm runs, sshq.Executor's pyenv check
#       answered from files: the interpreter named is never run, sshq serve's
#       filesystem operations), every path
#       inside the run directory (symbolic links resolved), every job runner
#       command exactly the installed one (sshq_runners.json, written by the
#       client at install from its job runner handlers: a request's commands
#       are compared with it, never taken from it);
#     * anything else (a shell command, `ssh -t`, an sftp subsystem, ssh-to-job)
#       is refused with one line on stderr and exit status 1.
#   Each request is logged, one line, in ~/.sshq/audit.log (mode 0600) and, where
#   `logger` exists, in syslog: time, SSH_CONNECTION source, operation, job ids,
#   outcome.
#
# A request carries the protocol version its client needs ("protocol"); an
# older installed agent refuses it, naming its own version, and the client says
# to run `sshq agent install`.

import base64
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional  # noqa: F401  (type comments)

import sshq_jobstatus as js

#: The wire protocol of installed agents; a client sends the one it needs.
#: 2: pyenv and fs in restricted mode, --farm-worker (pilot jobs' worker).
PROTOCOL = 2
#: `python3 ~/.sshq/sshq-agent --farm-worker SPOOL`: a pilot job's worker on
#: a spool, the installed dispatcher's (never a forced command's: refused
#: with --restricted).
FARM_WORKER = "--farm-worker"
#: Where the installed agent lives, under the home directory.
INSTALL_DIR = ".sshq"
ENTRY = "sshq-agent"
RUNNERS_FILE = "sshq_runners.json"
AUDIT_LOG = "audit.log"
#: The installed names of the shipped programs the entry loads.
AGENT_MODULE = "sshq_agent"
DISPATCHER_MODULE = "sshq_dispatcher"
#: Caps (bytes): one request (the JSON line, or a farm preparation's frames),
#: and a shipped program skipped unread.
MAX_REQUEST = 64 * 1024 * 1024
MAX_PROGRAM = 16 * 1024 * 1024
#: Stands for a job's log directory in the installed job runner commands.
LOG_DIR_PLACEHOLDER = "/sshq-log-dir-placeholder"
SYSLOG_TAG = "sshq-agent"
_GROUP_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_NONCE = re.compile(r"[0-9a-f]{8,64}\Z")
_FILE_NAME = re.compile(r"[^/\0]{1,255}\Z")


class Refused(Exception):
    """A request the restricted agent does not carry out (one-line reason)."""


class Options(object):
    def __init__(self):
        self.restricted = False
        self.run_dir = None  # type: Optional[str]
        self.allow_background = False
        self.path = []  # type: List[str]
        self.login_shell = False
        self.farm_worker = None  # type: Optional[str]


def parse_args(argv):
    opts = Options()
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--restricted":
            opts.restricted = True
        elif a == "--allow-background":
            opts.allow_background = True
        elif a == "--login-shell":
            opts.login_shell = True
        elif a in ("--run-dir", "--path", FARM_WORKER) and args:
            value = args.pop(0)
            if not value.startswith("/"):
                raise Refused("%s %s: an absolute path is needed" % (a, value))
            if a == "--run-dir":
                opts.run_dir = value.rstrip("/") or "/"
            elif a == FARM_WORKER:
                opts.farm_worker = value
            else:
                opts.path.append(value)
        else:
            raise Refused("unknown argument %r" % a)
    if opts.restricted and not opts.run_dir:
        raise Refused("--restricted needs --run-dir DIR")
    if opts.restricted and opts.farm_worker:
        raise Refused("%s is a pilot job's command, never a restricted key's" % FARM_WORKER)
    return opts


def one_line(text, limit=400):
    """``text`` printable, on one line, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- the audit log


def home():
    return os.path.expanduser("~")


def audit(op, ids=(), outcome="ok", detail=""):
    """One line in ~/.sshq/audit.log (0600) and, where logger exists, in syslog."""
    conn = os.environ.get("SSH_CONNECTION", "").split()
    source = "%s:%s" % (conn[0], conn[1]) if len(conn) >= 2 else "local"
    ids = list(ids)
    shown = ",".join(one_line(i, 64) for i in ids[:50]) + (",..." if len(ids) > 50 else "")
    line = "%s src=%s op=%s jobs=%s outcome=%s" % (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), one_line(source, 80),
        one_line(op, 40), shown or "-", one_line(outcome, 300))
    if detail:
        line += " " + one_line(detail, 300)
    try:
        fd = os.open(os.path.join(home(), INSTALL_DIR, AUDIT_LOG),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (line + "\n").encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass
    logger = shutil.which("logger")
    if logger:
        try:
            subprocess.run([logger, "-t", SYSLOG_TAG, "--", line], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)
        except (OSError, subprocess.SubprocessError):
            pass


def refuse_command(opts, command, why):
    """Refuse what the key's user asked to run: one line on stderr, exit 1."""
    audit("command", outcome="refused: %s" % why, detail="command=%s" % command)
    sys.stderr.write("sshq-agent: refused %s: this key is restricted to sshq job management"
                     " under %s (%s)\n" % (one_line(repr(command), 200), opts.run_dir, why))
    sys.stderr.flush()
    return 1


# ---------------------------------------------------------------- paths


def inside(opts, path, what="path"):
    """``path`` if it is inside the run directory (symbolic links resolved, no
    ".." component); else Refused."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise Refused("restricted: %s %r is not a path" % (what, one_line(path, 100)))
    p = os.path.expanduser(path)
    if ".." in p.split("/"):
        raise Refused("restricted: %s %s has a '..' component" % (what, one_line(path, 200)))
    real = os.path.realpath(p)
    for root in roots(opts):
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return path
    raise Refused("restricted: %s %s is outside the run directory %s"
                  % (what, one_line(path, 200), opts.run_dir))


def roots(opts):
    return [os.path.realpath(opts.run_dir)]


def check_run_dir(opts):
    """The run directory may neither hold the home directory nor be inside ~/.ssh
    or ~/.sshq: a key that may write into it could change what it may do."""
    root = os.path.realpath(opts.run_dir)
    h = os.path.realpath(home())
    if h == root or h.startswith(root.rstrip("/") + "/"):
        raise Refused("the run directory %s holds the home directory" % opts.run_dir)
    for d in (".ssh", INSTALL_DIR):
        d = os.path.realpath(os.path.join(home(), d))
        if root == d or root.startswith(d + "/"):
            raise Refused("the run directory %s is inside %s" % (opts.run_dir, d))


# ---------------------------------------------------------------- the runner table


def load_runners():
    """The installed job runner commands (sshq_runners.json beside this file)."""
    here = os.path.dirname(os.path.realpath(__file__))
    with open(os.path.join(here, RUNNERS_FILE)) as fh:
        return json.load(fh)


def instantiate(template, log_dir):
    return [w.replace(LOG_DIR_PLACEHOLDER, log_dir) for w in template]


def runner_of(opts, runners, name):
    spec = runners.get(name) if isinstance(name, str) else None
    if spec is None:
        raise Refused("restricted: unknown job runner %r" % one_line(name, 40))
    if spec.get("on_login_node") and not opts.allow_background:
        raise Refused("restricted: job runner %r runs jobs on the login node; its key's"
                      " command line does not say --allow-background" % name)
    return spec


def stale(what):
    return Refused("restricted: the request's %s differs from the installed agent's (sshq"
                   " was upgraded? run `sshq agent install` again)" % what)


def check_ids(spec, job):
    for key in ("job_id", "bare_id"):
        value = job.get(key)
        if value and not js.valid_job_id(value):
            raise Refused("restricted: invalid job id %r" % one_line(value, 60))
    for word in job.get("group") or ():
        prefix = [p for p in spec.get("group", ()) if isinstance(word, str) and
                  word.startswith(p)]
        if not prefix or not _GROUP_VALUE.match(word[len(prefix[0]):]):
            raise Refused("restricted: job id word %r refused" % one_line(word, 60))


# ---------------------------------------------------------------- request checks


def check_init(opts, req, runners):
    inside(opts, req.get("run_dir"), "run directory")


def check_tidy(opts, req, runners):
    inside(opts, req.get("run_dir"), "run directory")


def check_read(opts, req, runners):
    inside(opts, req.get("path"), "file")


def check_read_many(opts, req, runners):
    for f in req.get("files") or ():
        inside(opts, f.get("path") if isinstance(f, dict) else None, "file")


def check_listing(opts, req, runners):
    inside(opts, req.get("path"), "directory")


def check_follow(opts, req, runners):
    files = req.get("files")
    if not isinstance(files, dict):
        raise Refused("restricted: no files to follow")
    for path in files.values():
        inside(opts, path, "log file")
    if req.get("log_dir"):
        inside(opts, req["log_dir"], "job log directory")


def check_agent_info(opts, req, runners):
    pass


def check_submit(opts, req, runners):
    agent = load(AGENT_MODULE)
    jobs = req.get("jobs")
    if not isinstance(jobs, list):
        raise Refused("restricted: no jobs")
    init = req.get("init")
    view = [dict(log_dir=j.get("log_dir"), work_dir=j.get("work_dir"), job_b64="",
                 submit_argv=list(j.get("submit_argv") or ())) for j in jobs]
    if init:
        run_dir = inside(opts, init.get("run_dir"), "run directory")
        token = init.get("token")
        if not isinstance(token, str) or not re.match(r"/SSHQ-RUN-DIR-[0-9a-f]{8,64}\Z", token):
            raise Refused("restricted: malformed run directory placeholder")
        # (the agent resolves the run directory so: agent.remote_init)
        agent.resolve_run_dir(view, token, os.path.abspath(os.path.expanduser(run_dir)))
    for job, seen in zip(jobs, view):
        spec = runner_of(opts, runners, job.get("runner"))
        log_dir = inside(opts, seen["log_dir"], "job log directory")
        inside(opts, seen["work_dir"], "work directory")
        if seen["submit_argv"] != instantiate(spec["submit"], log_dir):
            raise stale("submit command for %s" % job.get("runner"))
        if (job.get("id_regex") != spec["id_regex"]
                or bool(job.get("stdin_job_file")) != bool(spec["stdin"])
                or job.get("array_element_id", spec["array_element_id"])
                != spec["array_element_id"]):
            raise stale("job id pattern or submit input for %s" % job.get("runner"))
        for index in job.get("array") or ():
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 10**7:
                raise Refused("restricted: array index %r refused" % one_line(index, 20))
        for name in job.get("inputs") or {}:
            if not _FILE_NAME.match(name) or name in (".", ".."):
                raise Refused("restricted: input file name %r refused" % one_line(name, 60))
        timeout = job.get("timeout")
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise Refused("restricted: malformed timeout")


def check_runner_query(opts, req, runners):
    jobs = req.get("jobs")
    if not isinstance(jobs, list):
        raise Refused("restricted: no jobs")
    asked = req.get("runners") or {}
    if not isinstance(asked, dict):
        raise Refused("restricted: malformed runners")
    for name, templates in asked.items():
        spec = runner_of(opts, runners, name)
        if templates != {"poll": spec["poll"], "kill": spec["kill"], "sep": spec["sep"]}:
            raise stale("poll or kill command for %s" % name)
    for job in jobs:
        if not isinstance(job, dict):
            raise Refused("restricted: malformed job")
        inside(opts, job.get("log_dir"), "job log directory")
        spec = runner_of(opts, runners, job.get("runner"))
        if job.get("job_id") and job.get("runner") not in asked:
            raise Refused("restricted: no command for job runner %r" % job.get("runner"))
        check_ids(spec, job)


def check_poll(opts, req, runners):
    check_runner_query(opts, req, runners)
    # Files a poll brings home with the statuses (read_many's form): inside
    # the run directory, as read_many's.
    for job in req["jobs"]:
        files = job.get("files", [])
        if not isinstance(files, list):
            raise Refused("restricted: malformed files of a job")
        check_read_many(opts, {"files": files}, runners)


def check_kill(opts, req, runners):
    check_runner_query(opts, req, runners)
    # Only a job whose status file (under the run directory) records this id.
    for job in req["jobs"]:
        if job.get("job_id"):
            recorded = js.read_status_file(job["log_dir"]).job_id
            if not recorded or recorded != (job.get("bare_id") or job["job_id"]):
                job["job_id"] = ""
                job["bare_id"] = ""


# ---------------------------------------------------------------- pyenv, from data
#
# sshq.Executor's pre-flight check asks for an interpreter's Python version and
# cloudpickle version.  The shipped agent runs the interpreter named; here a
# request never makes the login node run anything it names: the answer is
# read from files (bounded reads), for the agent's own interpreter or a
# virtual environment's, and anything else is refused.

#: The most bytes read of one pyvenv.cfg, METADATA or cloudpickle/__init__.py.
MAX_FACT_FILE = 256 * 1024
_VERSION3 = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_DIST = re.compile(r"cloudpickle-([^-]+?)(?:-py[^-]*)?\.(dist-info|egg-info)\Z", re.I)
_META_VERSION = re.compile(r"^Version:[ \t]*(\S+)[ \t]*$", re.M)
_INIT_VERSION = re.compile(r"^__version__[ \t]*=[ \t]*[\"']([^\"'\n]{1,64})[\"']", re.M)


def read_text(path):
    """At most MAX_FACT_FILE bytes of a regular file, as text; None if unreadable."""
    agent = load(AGENT_MODULE)
    try:
        item = agent.read_regular(path, 0, MAX_FACT_FILE)
    except (OSError, ValueError):
        return None
    return base64.b64decode(item["data_b64"]).decode("utf-8", "replace")


def cloudpickle_version(dirs):
    """The version of the cloudpickle the first of ``dirs`` holding one would
    import (read from its metadata, else from its __init__.py): (version, None)
    or (None, why)."""
    for d in dirs:
        init = os.path.join(d, "cloudpickle", "__init__.py")
        if not (os.path.isfile(init) or os.path.isfile(os.path.join(d, "cloudpickle.py"))):
            continue
        try:
            names = os.listdir(d)
        except OSError:
            names = []
        found = set()
        for name in names:
            m = _DIST.match(name)
            if not m:
                continue
            meta = os.path.join(d, name)
            if os.path.isdir(meta):
                meta = os.path.join(meta, "METADATA" if m.group(2).lower() == "dist-info"
                                    else "PKG-INFO")
            v = _META_VERSION.search(read_text(meta) or "")
            if v:
                found.add(v.group(1))
        if len(found) == 1:
            return found.pop(), None
        v = _INIT_VERSION.search(read_text(init) or "")  # (several metadata: stale ones)
        if v:
            return v.group(1), None
        return None, "cloudpickle in %s has no version the restricted agent can read" % d
    return None, ("ModuleNotFoundError: No module named 'cloudpickle' (looked in %s)"
                  % (", ".join(dirs) or "no site-packages"))


def _own_dirs():
    """The agent's own import path, but its own directory."""
    here = os.path.dirname(os.path.realpath(__file__))
    return [d for d in sys.path if d and os.path.isdir(d) and os.path.realpath(d) != here]


def venv_config(python):
    """(the venv directory, its pyvenv.cfg as a dict) for an interpreter
    inside a virtual environment (pyvenv.cfg beside it or one up); else None."""
    bindir = os.path.dirname(python)
    for d in (bindir, os.path.dirname(bindir)):
        text = read_text(os.path.join(d, "pyvenv.cfg"))
        if text is not None:
            cfg = {}
            for line in text.splitlines():
                key, eq, value = line.partition("=")
                if eq:
                    cfg[key.strip().lower()] = value.strip()
            return d, cfg
    return None


def pyenv_facts(python):
    """pyenv's answer for ``python`` from files only (nothing is run): the
    shipped agent's reply shape, its stdout the PYENV_MARK line.

    Raises:
        Refused: ``python`` is neither the agent's own interpreter nor a
            virtual environment's."""
    agent = load(AGENT_MODULE)
    if not isinstance(python, str) or not python or "\0" in python:
        raise Refused("restricted: malformed python")
    path = python if "/" in python else shutil.which(python)  # (a PATH look-up)
    if not path or not os.path.exists(path):
        return {"exit": 127, "stdout": "", "stderr": "%s: No such file or directory" % python}
    path = os.path.abspath(path)
    own = os.path.abspath(sys.executable)
    venv = None if path == own else venv_config(path)
    if path == own or (venv is None and os.path.realpath(path) == os.path.realpath(own)
                       and sys.prefix == getattr(sys, "base_prefix", sys.prefix)):
        out = {"version": list(sys.version_info[:3]), "executable": sys.executable}
        dirs = _own_dirs()
    elif venv is not None:
        top, cfg = venv
        m = _VERSION3.match(cfg.get("version_info") or cfg.get("version") or "")
        if not m:
            raise Refused("restricted: %s/pyvenv.cfg names no Python version (x.y.z)" % top)
        version = [int(m.group(i)) for i in (1, 2, 3)]
        out = {"version": version, "executable": path}
        dirs = [os.path.join(top, lib, "python%d.%d" % tuple(version[:2]), "site-packages")
                for lib in ("lib", "lib64")]
        dirs = [d for d in dirs if os.path.isdir(d)]
        if (cfg.get("include-system-site-packages", "").lower() == "true"
                and version[:2] == list(sys.version_info[:2])):
            dirs += [d for d in _own_dirs() if d not in dirs]
    else:
        raise Refused("restricted: the python %s is neither the agent's own (%s) nor a virtual"
                      " environment's (its pyvenv.cfg): a restricted key runs no interpreter"
                      " to ask it; use the platform's python or a venv's bin/python"
                      % (one_line(python, 200), sys.executable))
    version, why = cloudpickle_version(dirs)
    if version is not None:
        out["cloudpickle"] = version
    else:
        out["cloudpickle_error"] = why
    return {"exit": 0, "stdout": "\n%s%s\n" % (agent.PYENV_MARK, json.dumps(out)),
            "stderr": "", "read_only": True}


def check_pyenv(opts, req, runners):
    if req.get("run_dir"):
        inside(opts, req["run_dir"], "run directory")
    req["facts"] = pyenv_facts(req.get("python"))


def op_pyenv(req, w):
    """pyenv in restricted mode: what check_pyenv read; with "run_dir",
    remote-init's facts too."""
    reply = req["facts"]
    if req.get("run_dir"):
        reply["init"] = load(AGENT_MODULE).remote_init(req["run_dir"])
    w.frame(reply)


# ---------------------------------------------------------------- fs (sshq serve)

#: The fs actions of sshq serve's FirecREST routes (agent._fs).
FS_ACTIONS = ("ls", "stat", "read", "mkdir", "rm", "upload")


def check_fs(opts, req, runners):
    """sshq serve's filesystem operations, inside the run directory only: the
    entry acted on and (unless the action is on the entry itself) what it
    leads to, as agent._fs reads them; never the run directory's removal; an
    upload at most agent.FS_MAX_BYTES (as a read)."""
    agent = load(AGENT_MODULE)
    action = req.get("action")
    if action not in FS_ACTIONS:
        raise Refused("restricted: fs action %r refused" % one_line(action, 20))
    try:
        own, real, itself = agent.fs_paths(req)
    except OSError as exc:
        raise Refused("restricted: fs path %r refused (%s)"
                      % (one_line(req.get("path"), 200), exc.strerror))
    for p in (own,) if itself else (own, real):
        if not agent.fs_inside(p, [opts.run_dir]):
            raise Refused("restricted: fs path %s is outside the run directory %s"
                          % (one_line(req["path"], 200), opts.run_dir))
    if action == "rm" and own == os.path.realpath(opts.run_dir):
        raise Refused("restricted: the run directory itself is not removed")
    data = req.get("data_b64", "")
    if action == "upload" and (not isinstance(data, str) or len(data) // 4 * 3
                               - (len(data) - len(data.rstrip("="))) > agent.FS_MAX_BYTES):
        raise Refused("restricted: an upload over %d bytes" % agent.FS_MAX_BYTES)


CHECKS = {"init": check_init, "submit": check_submit, "poll": check_poll,
          "kill": check_kill, "read": check_read, "read_many": check_read_many,
          "follow": check_follow, "listing": check_listing, "tidy": check_tidy,
          "agent_info": check_agent_info, "pyenv": check_pyenv, "fs": check_fs}
#: Operations served otherwise than by the agent in restricted mode.
RESTRICTED_OPS = {"pyenv": op_pyenv}

REFUSED_OPS = {
    "procs": "farm find/killall (listing and signalling processes on the login node)",
    "install_agent": "installing the agent (run `sshq agent install` with a key that is not"
                     " restricted)",
}


def check_request(opts, req, runners):
    op = req.get("op")
    if op not in CHECKS:
        what = REFUSED_OPS.get(op) or "operation %r" % one_line(op, 40)
        raise Refused("restricted platform: %s is refused; this key may only manage sshq"
                      " jobs under %s" % (what, opts.run_dir))
    path = req.pop("path_prepend", None)
    if path and list(path) != opts.path:
        raise Refused("restricted: path_prepend %s differs from the installed command line's"
                      " (--path %s); run `sshq agent install` again"
                      % (one_line(path, 200), " ".join(opts.path) or "none"))
    try:
        CHECKS[op](opts, req, runners)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Refused("restricted: malformed %s request (%s: %s)"
                      % (op, type(exc).__name__, one_line(exc, 100)))


def request_ids(req, frame):
    """Job ids to log for a request and its reply frame."""
    if req.get("op") == "submit" and isinstance(frame, dict):
        return [r.get("job_id") or "-" for r in frame.get("results") or ()
                if isinstance(r, dict)]
    return [j.get("job_id") or "-" for j in req.get("jobs") or () if isinstance(j, dict)]


def request_detail(req):
    return " ".join("%s=%s" % (key, req[key]) for key in ("path", "run_dir", "log_dir", "python")
                    if isinstance(req.get(key), str))


# ---------------------------------------------------------------- serving


def load(name):
    return importlib.import_module(name)


def installed_version():
    """The installed version: the name of this file's directory, agent-<version>."""
    name = os.path.basename(os.path.dirname(os.path.realpath(__file__)))
    return name[len("agent-"):] if name.startswith("agent-") else ""


def agent_info(opts):
    return {"protocol": PROTOCOL, "version": installed_version(),
            "restricted": opts.restricted, "run_dir": opts.run_dir,
            "allow_background": opts.allow_background, "path": opts.path,
            "python": sys.executable}


class _CappedReader(object):
    """stdin with a cap on what may still be read (a farm preparation's frames)."""

    def __init__(self, raw, left):
        self.raw = raw
        self.left = left
        self.buffer = self

    def read(self, n=-1):
        if self.left <= 0:
            raise Refused("restricted: the request is over %d bytes" % MAX_REQUEST)
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.raw.read(n)
        self.left -= len(data)
        return data


def serve(opts, program):
    """Read one request from stdin (after a shipped program, skipped unread)."""
    stdin = sys.stdin.buffer
    if program:
        head = stdin.readline(24)
        if not head.strip().isdigit() or int(head) > MAX_PROGRAM:
            raise Refused("restricted: malformed request")
        left = int(head)
        while left > 0:  # the program is never run, only skipped
            chunk = stdin.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
    line = stdin.readline(MAX_REQUEST + 1)
    if len(line) > MAX_REQUEST:
        raise Refused("restricted: the request is over %d bytes" % MAX_REQUEST)
    try:
        req = json.loads(line.decode("utf-8"))
    except ValueError:
        raise Refused("malformed request (not JSON)")
    if not isinstance(req, dict) or not _NONCE.match(str(req.get("nonce", ""))):
        raise Refused("malformed request")
    if "op" in req:
        return agent_request(opts, req)
    return farm_request(opts, req, MAX_REQUEST - len(line))  # the dispatcher's header


class _Recorder(object):
    """The agent's Writer, remembering the first frame (for the audit log)."""

    def __init__(self, writer, init):
        self.writer = writer
        self.init = init
        self.first = None  # type: Any

    def frame(self, obj):
        if self.first is None:
            self.first = obj
        if self.init and isinstance(obj, dict) and obj.get("rsync"):
            obj["rsync"] = find_rrsync() is not None  # rsync works only through rrsync
        self.writer.frame(obj)

    def close(self):
        self.writer.close()


def agent_request(opts, req):
    agent = load(AGENT_MODULE)
    op = str(req.get("op"))
    w = _Recorder(agent.Writer(req["nonce"]), opts.restricted and op == "init")
    need = req.get("protocol", 1)  # (the shipped form carries none)
    if not isinstance(need, int) or need > PROTOCOL:
        w.frame({"agent_error": "the installed sshq agent speaks protocol %d, this sshq needs"
                 " %s: run `sshq agent install` again" % (PROTOCOL, one_line(need, 20)),
                 "agent_protocol": PROTOCOL})
        w.close()
        if opts.restricted:
            audit(op, outcome="refused: protocol %s" % one_line(need, 20))
        return 1
    try:
        if opts.restricted:  # (else the agent puts path_prepend before PATH)
            check_request(opts, req, load_runners())
    except Refused as exc:
        w.frame({"agent_error": str(exc), "restricted": True})
        w.close()
        audit(op, request_ids(req, None), "refused: %s" % exc, request_detail(req))
        return 1
    if op == "agent_info":
        w.frame(agent_info(opts))
        w.close()
        done = True
    elif opts.restricted:
        done = agent.handle(req, w, dict(agent.OPS, **RESTRICTED_OPS))
    else:
        done = agent.handle(req, w)
    if opts.restricted:
        frame = w.first
        outcome = "ok" if done else "client gone"
        if isinstance(frame, dict) and "agent_error" in frame:
            outcome = "error: %s" % frame["agent_error"]
        audit(op, request_ids(req, frame), outcome, request_detail(req))
    return 0


def farm_request(opts, header, left):
    """A pilot farm's prepare and collect calls (the dispatcher's, installed)."""
    need = header.get("protocol", 1)
    if not isinstance(need, int) or need > PROTOCOL:
        raise Refused("the installed sshq agent speaks protocol %d, this sshq needs %s: run"
                      " `sshq agent install` again" % (PROTOCOL, one_line(need, 20)))
    mode = header.get("mode", "stream")
    spools = [header.get("spool")] if mode == "prepare" else \
        [s.get("spool") if isinstance(s, dict) else None for s in header.get("spools") or ()]
    if mode not in ("prepare", "collect"):
        raise Refused("restricted platform: a direct farm (--hosts) is refused: it runs"
                      " commands on the login node; use `sshq farm --via PLATFORM`")
    if mode == "prepare" and header.get("detach"):
        raise Refused("restricted platform: a detached farm is refused: its worker"
                      " runs on the login node; use `sshq farm --via PLATFORM`")
    if opts.restricted:
        for spool in spools:
            inside(opts, spool, "farm spool")
    dispatcher = load(DISPATCHER_MODULE)
    sys.stdin = _CappedReader(sys.stdin.buffer, left)
    try:
        if mode == "prepare":
            dispatcher.prepare(header)
        else:
            dispatcher.collect(header)
    except BrokenPipeError:
        audit("farm-%s" % mode, outcome="client gone", detail="spool=%s" % spools[:1])
        return 0
    audit("farm-%s" % mode, detail="spool=%s" % (spools[0] if spools else "-"))
    return 0


# ---------------------------------------------------------------- rsync


RRSYNC_PLACES = ("/usr/bin/rrsync", "/usr/local/bin/rrsync")
_RSYNC_WORD = re.compile(r"(?:[^\s\\]+|\\.[^\s\\]*)+")  # rrsync's own splitting
_UNESCAPE = re.compile(r"\\(.)")
_PLAIN = re.compile(r"[A-Za-z0-9._/+=:@%,-]")


def find_rrsync():
    found = shutil.which("rrsync")
    if found:
        return found
    for p in RRSYNC_PLACES:
        if os.access(p, os.X_OK):
            return p
    return None


def escape(arg):
    return "".join(c if _PLAIN.match(c) else "\\" + c for c in arg)


def rsync_path(opts, arg):
    """An rsync path argument as rrsync reads it (relative to the run directory)."""
    p = arg
    if p.startswith("~/"):
        p = home() + p[1:]
    elif not p.startswith("/"):
        p = os.path.join(home(), p)  # rsync's own directory is the home directory
    inside(opts, p.replace("/./", "/"), "rsync path")
    root_real = os.path.realpath(opts.run_dir)
    for root in (opts.run_dir, root_real):
        if p == root or p.startswith(root.rstrip("/") + "/"):
            rest = p[len(root):].lstrip("/")
            if not rest:
                return "./" if p.endswith("/") else "."
            return rest
    # another spelling of the run directory (a symbolic link above it)
    rest = os.path.relpath(os.path.realpath(p), root_real)
    if rest == ".." or rest.startswith("../"):
        raise Refused("restricted: rsync path %s is outside the run directory %s"
                      % (one_line(arg, 200), opts.run_dir))
    return rest + "/" if p.endswith("/") and rest != "." else rest


def rsync(opts, command):
    """Hand an `rsync --server` command to rrsync, confined to the run directory."""
    rrsync = find_rrsync()
    if rrsync is None:
        return refuse_command(opts, command, "rsync needs rrsync on this host, which has none")
    words = _RSYNC_WORD.findall(command)
    try:
        dot = words.index(".", 2)
    except ValueError:
        return refuse_command(opts, command, "malformed rsync command")
    sender = "--sender" in words[2:dot]
    try:
        paths = [rsync_path(opts, _UNESCAPE.sub(r"\1", w)) for w in words[dot + 1:]]
    except Refused as exc:
        return refuse_command(opts, command, str(exc))
    new = " ".join(words[:dot + 1] + [escape(p) for p in paths])
    env = dict(os.environ, SSH_ORIGINAL_COMMAND=new)
    try:
        rc = subprocess.call([rrsync, "-munge", "-no-lock", os.path.realpath(opts.run_dir)],
                             env=env)
    except OSError as exc:
        return refuse_command(opts, command, "cannot run rrsync: %s" % exc.strerror)
    audit("rsync-send" if sender else "rsync-receive",
          outcome="ok" if rc == 0 else "exit %d" % rc, detail="paths=%s" % ",".join(paths))
    return rc


# ---------------------------------------------------------------- the entry


def sshq_call(words):
    """How an SSH command line that is an sshq call carries its request:
    "program" (the shipped bootstrap: a program then the request, the program
    skipped), "installed" (the request alone), or None (not an sshq call)."""
    if words[:3] == ["bash", "-l", "-c"] and len(words) > 4:  # a login shell's wrapper
        words = words[4:]
    if len(words) == 3 and words[1] == "-c" and "sshq-agent" in words[2]:
        return "program"
    if len(words) == 2 and os.path.basename(words[1]) == ENTRY:
        return "installed"
    return None


def main(argv):
    """The installed agent's entry; returns the exit status."""
    try:
        opts = parse_args(argv)
    except Refused as exc:
        sys.stderr.write("sshq-agent: %s\n" % exc)
        return 2
    if opts.login_shell:  # a login environment (modules, PATH), once
        rest = [a for a in argv if a != "--login-shell"]
        os.execv("/bin/bash", ["bash", "-l", "-c", 'exec "$0" "$@"', sys.executable,
                               os.path.abspath(sys.argv[0])] + rest)
    if opts.path:
        os.environ["PATH"] = os.pathsep.join(opts.path + [os.environ.get("PATH", os.defpath)])
    if opts.farm_worker:  # inside a pilot job: the installed dispatcher's worker
        load(DISPATCHER_MODULE).SpoolSink(opts.farm_worker).run()
        return 0
    try:
        os.chdir(home())
    except OSError:
        pass
    if not opts.restricted:
        try:
            return serve(opts, program=False)
        except Refused as exc:
            sys.stderr.write("sshq-agent: %s\n" % exc)
            return 1
    command = os.environ.get("SSH_ORIGINAL_COMMAND")
    try:
        check_run_dir(opts)
        if not os.path.isdir(opts.run_dir):
            load(AGENT_MODULE).make_dirs(opts.run_dir)
    except (Refused, OSError) as exc:
        return refuse_command(opts, command, str(exc))
    if command is None:
        return refuse_command(opts, "", "an interactive login")
    try:
        words = shlex.split(command)
    except ValueError:
        return refuse_command(opts, command, "not an sshq call")
    if words[:2] == ["rsync", "--server"]:
        return rsync(opts, command)
    form = sshq_call(words)
    if form is None:
        return refuse_command(opts, command, "not an sshq call")
    try:
        return serve(opts, program=form == "program")
    except Refused as exc:
        return refuse_command(opts, command, str(exc))
