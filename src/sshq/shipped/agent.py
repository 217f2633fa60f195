# sshq remote agent.
#
# One file, Python 3.6+ standard library only.  sshq sends it over the SSH
# channel on every call, never installs it: the remote command is always
#
#     python3 -c "<BOOTSTRAP>"   (sshq.remote.protocol.BOOTSTRAP: reads this file
#     from stdin, compiles and runs it)
#
# and stdin carries: the length of this file in bytes, a newline, this file,
# then one JSON request.  The agent performs a batch of operations and writes
# its reply on stdout between fence lines carrying the request's nonce, so
# that whatever a login shell prints cannot be taken for the reply:
#
#     SSHQ-BEGIN-<nonce>\n  (<length>\n<json>)*  0\n  SSHQ-END-<nonce>\n
#
# Operations (the "op" field): init, submit, poll, kill, read, follow,
# listing, tidy, procs, pyenv, read_many, install_agent (`sshq agent install`:
# the installed agent's files, which sshq_restricted.py describes), fs (sshq
# serve's FirecREST filesystem operations, confined to the directories named).
# Nothing here builds shell text: every command is an argument vector run
# without a shell.  The job status file, its keys, the job log layout (Cylc's,
# seed 001: <run_dir>/log/job/<name>/<NN>/{job,job.out,...}, NN -> latest) and
# the array-element id are sshq_jobstatus's, shipped ahead of this file: poll,
# kill and follow reply with its JobStatus fields, never with raw file text.

import base64
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import sshq_jobstatus as js
import sshq_procs

TYPE_CHECKING = False  # typing is not imported at run time: 4 ms of every agent call
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List  # noqa: F401  (type comments)

IDS = "{ids}"
MAX_ARGS_BYTES = 65536  # far below any ARG_MAX; id lists are chunked to fit
#: Caps on what this agent reads (bytes): a job runner command's stdout and
#: stderr, and one `read` of a log file.
MAX_COMMAND_OUTPUT = 16 * 1024 * 1024
MAX_READ_BYTES = 16 * 1024 * 1024


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def text(data):
    return data.decode("utf-8", "replace")


def b64(data):
    return base64.b64encode(data).decode("ascii")


class Writer(object):
    def __init__(self, nonce):
        self.out = sys.stdout.buffer
        self.nonce = nonce
        self.out.write(("\nSSHQ-BEGIN-%s\n" % nonce).encode("ascii"))

    def frame(self, obj):
        data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        self.out.write(("%d\n" % len(data)).encode("ascii") + data)
        self.out.flush()

    def close(self):
        self.out.write(("0\nSSHQ-END-%s\n" % self.nonce).encode("ascii"))
        self.out.flush()


def _bounded(data, what):
    if len(data) > MAX_COMMAND_OUTPUT:
        return data[:MAX_COMMAND_OUTPUT], "\n(%s cut at %d bytes)" % (what, MAX_COMMAND_OUTPUT)
    return data, ""


def run(argv, cwd=None, stdin_path=None, timeout=None):
    """Run an argv (no shell); return a JSON-ready result dict (output bounded)."""
    stdin = subprocess.DEVNULL  # type: Any
    fh = None
    try:
        if stdin_path:
            fh = open(stdin_path, "rb")
            stdin = fh
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = err[:MAX_COMMAND_OUTPUT]
            return {"exit": 124, "stdout": text(out[:MAX_COMMAND_OUTPUT]),
                    "stderr": text(err) + "\n(timed out)"}
        out, cut = _bounded(out, "stdout")
        err, cut_err = _bounded(err, "stderr")
        return {"exit": proc.returncode, "stdout": text(out), "stderr": text(err) + cut + cut_err}
    except OSError as exc:
        return {"exit": 127, "stdout": "", "stderr": "%s: %s" % (argv[0], exc.strerror)}
    finally:
        if fh is not None:
            fh.close()


def append_status(log_dir, pairs):
    data = "".join("%s=%s\n" % (k, v) for k, v in pairs).encode("utf-8")
    fd = os.open(os.path.join(log_dir, js.STATUS_FILE),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def expand(template, ids, sep):
    """Expand the "{ids}" word of a command template, in chunks that fit."""
    chunks = []  # type: List[List[str]]
    cur = []  # type: List[str]
    size = 0
    for i in ids:
        if cur and size + len(i) + 1 > MAX_ARGS_BYTES:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += len(i) + 1
    if cur:
        chunks.append(cur)
    out = []
    for chunk in chunks:
        argv = []
        for word in template:
            if word == IDS:
                if sep is None:
                    argv.extend(chunk)
                else:
                    argv.append(sep.join(chunk))
            else:
                argv.append(word)
        out.append(argv)
    return out


# ---------------------------------------------------------------- operations


SERVICE_DIR = ".sshq"  # under the run dir: sshq's own files, removed by tidy
#: Modes of the directories sshq creates: never group/other-writable, and
#: private where they hold job inputs, job.env or sshq's own files.  (mkdir's
#: mode is narrowed by the umask, never widened.)
SHARED_DIR_MODE = 0o755
PRIVATE_DIR_MODE = 0o700


def make_dirs(path, mode=SHARED_DIR_MODE):
    """mkdir -p, each directory it creates with ``mode`` (os.makedirs gives
    only the last one its mode, the others the umask's default)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            pass


def write_input(path, data, mode):
    """Write a staged input file with exactly the local file's permission bits.

    A new file renamed over the old one: a read-only input of an earlier
    submission is replaced (not refused), and a link a job left there is
    replaced, never written through."""
    tmp = "%s.sshq-%s.tmp" % (path, os.urandom(6).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, mode & 0o777)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remote_init(run_dir_spec):
    """remote-init (seed 001): resolve the run dir, write its UUID file; the facts."""
    import shutil  # (here, as in the other operations that use it: 3 ms of start-up)
    run_dir = os.path.abspath(os.path.expanduser(run_dir_spec))
    service = os.path.join(run_dir, SERVICE_DIR)
    make_dirs(run_dir)
    make_dirs(service, PRIVATE_DIR_MODE)
    uuid_file = os.path.join(service, "uuid")
    try:
        with open(uuid_file) as fh:
            uuid = fh.read().strip()
    except (IOError, OSError):
        uuid = ""
    if not uuid:
        uuid = base64.b32encode(os.urandom(15)).decode("ascii").lower()
        tmp = "%s.%d" % (uuid_file, os.getpid())
        with open(tmp, "w") as fh:
            fh.write(uuid + "\n")
        os.rename(tmp, uuid_file)
    return {
        "home": os.path.expanduser("~"),
        "run_dir": run_dir,
        "uuid_file": uuid_file,
        "uuid": uuid,
        "rsync": bool(shutil.which("rsync")),
        "hostname": os.uname()[1],  # gethostname(), without importing socket
        "python": sys.version.split()[0],
        "user": os.environ.get("USER") or os.environ.get("LOGNAME") or "",
    }


def op_init(req, w):
    w.frame(remote_init(req["run_dir"]))


def op_listing(req, w):
    """Files under a directory: {relative path: [size, mtime]} (for SFTP sync)."""
    top = req["path"]
    out = {}
    for root, dirs, files in os.walk(top):
        for name in files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[os.path.relpath(p, top)] = [st.st_size, int(st.st_mtime)]
    w.frame({"files": out})


def op_tidy(req, w):
    """Remove what sshq left in the run dir (never job logs or work dirs)."""
    import shutil
    run_dir = req["run_dir"]
    removed = []
    service = os.path.join(run_dir, SERVICE_DIR)
    if os.path.isdir(service):
        shutil.rmtree(service)
        removed.append(service)
    job_logs = os.path.join(run_dir, js.LOG_JOB_DIR)
    for root, dirs, files in os.walk(job_logs):
        for name in files + dirs:
            if name.startswith(js.NN_LINK + ".tmp"):  # a link an interrupted submit left
                p = os.path.join(root, name)
                os.remove(p)
                removed.append(p)
    w.frame({"removed": removed})


def highest_submit_num(parent):
    """The highest NN directory under a job's log directory (0 if none)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    nums = [int(n) for n in names if n.isdigit()]
    return max(nums) if nums else 0


def link_latest(log_dir):
    """Point the NN link at this submit, unless a later one exists already."""
    parent, nn = os.path.split(log_dir)
    link = os.path.join(parent, js.NN_LINK)
    try:
        current = os.readlink(link)
        if current.isdigit() and int(current) > int(nn):
            return
    except OSError:
        pass
    tmp = "%s.tmp%d.%d" % (link, os.getpid(), threading.get_ident())
    try:
        os.remove(tmp)
    except OSError:
        pass
    os.symlink(nn, tmp)
    os.rename(tmp, link)


def submit_one(job):
    log_dir = job["log_dir"]
    try:
        make_dirs(os.path.dirname(log_dir))
        try:
            os.mkdir(log_dir, PRIVATE_DIR_MODE)
        except FileExistsError:
            return {"key": job["key"], "ok": False, "code": "exists",
                    "max_submit_num": highest_submit_num(os.path.dirname(log_dir)),
                    "error": "job log directory %s exists already" % log_dir}
        job_file = os.path.join(log_dir, js.JOB_FILE)
        fd = os.open(job_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        try:
            os.write(fd, base64.b64decode(job["job_b64"]))
        finally:
            os.close(fd)
        link_latest(log_dir)
        for index in job.get("array") or ():  # each element logs in <NN>/<index>/
            os.mkdir(js.element_log_dir(log_dir, index), PRIVATE_DIR_MODE)
        inputs = job.get("inputs") or {}
        make_dirs(job["work_dir"], PRIVATE_DIR_MODE if inputs else SHARED_DIR_MODE)
        for name, item in inputs.items():  # staged input files, with their modes
            write_input(os.path.join(job["work_dir"], name),
                        base64.b64decode(item["data_b64"]), int(item["mode"]))
    except OSError as exc:
        return {"key": job["key"], "ok": False, "code": "io",
                "error": "%s: %s" % (exc.filename or log_dir, exc.strerror)}
    res = run(job["submit_argv"], cwd=job["work_dir"],
              stdin_path=job_file if job.get("stdin_job_file") else None,
              timeout=job.get("timeout"))
    res["key"] = job["key"]
    submit_time = now_iso()
    m = re.search(job["id_regex"], res["stdout"], re.MULTILINE)
    if res["exit"] != 0 or not m:
        res["ok"] = False
        res["code"] = "runner"
        append_status(log_dir, [(js.RUNNER_NAME, job["runner"]),
                                (js.RUNNER_SUBMIT_FAILED, submit_time)])
        return res
    res["ok"] = True
    res["job_id"] = m.group("id")
    res["groups"] = dict((k, v) for k, v in m.groupdict().items() if v is not None)
    res["submit_time"] = submit_time
    # more of the job's identity than its number (e.g. Slurm's cluster)
    extra = [(js.JOB_ID_PREFIX + k.upper(), v) for k, v in sorted(res["groups"].items())
             if k != "id"]
    append_status(log_dir, [(js.RUNNER_NAME, job["runner"]),
                            (js.JOB_ID, res["job_id"])] + extra
                  + [(js.RUNNER_SUBMIT_TIME, submit_time)])
    for index in job.get("array") or ():
        element_id = js.array_element_id(job["array_element_id"], res["job_id"], index)
        append_status(js.element_log_dir(log_dir, index), [
            (js.RUNNER_NAME, job["runner"]), (js.JOB_ID, element_id)] + extra
            + [(js.RUNNER_SUBMIT_TIME, submit_time)])
    return res


#: A run dir that may replace the client's placeholder inside job scripts and
#: directives: nothing any shell, directive parser (PBS ':', LSF '%') or
#: quoting could read differently.
SAFE_RUN_DIR = re.compile(r"/[A-Za-z0-9+=,._/-]*\Z")


def resolve_run_dir(jobs, token, run_dir):
    """Replace the placeholder ``token`` (the client did not know the run dir
    yet) by ``run_dir`` in each job's paths, argv and job script."""
    raw, real = token.encode("ascii"), run_dir.encode("utf-8")
    for job in jobs:
        for key in ("log_dir", "work_dir"):
            job[key] = job[key].replace(token, run_dir)
        job["submit_argv"] = [a.replace(token, run_dir) for a in job["submit_argv"]]
        job["job_b64"] = b64(base64.b64decode(job["job_b64"]).replace(raw, real))


def op_submit(req, w):
    # Once a job runner has accepted a job, its id must reach job.status even if
    # the client (and its connection) dies now: the next poll adopts it from there.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    jobs = req["jobs"]
    init = req.get("init")
    if init:  # remote-init in the same call: the scripts name the run dir by a token
        info = remote_init(init["run_dir"])
        if not SAFE_RUN_DIR.match(info["run_dir"]):
            w.frame({"init": info, "results": [], "render_again": True})
            return
        resolve_run_dir(jobs, init["token"], info["run_dir"])
        w.frame({"init": info, "results": submit_all(req, jobs)})
        return
    w.frame({"results": submit_all(req, jobs)})


def submit_all(req, jobs):
    workers = max(1, min(int(req.get("concurrency", 4)), len(jobs) or 1))
    if workers == 1:
        return [submit_one(j) for j in jobs]
    return thread_map(submit_one, jobs, workers)


def thread_map(fn, items, workers):
    # type: (Callable[[Any], Any], List[Any], int) -> List[Any]
    """[fn(x) for x in items] on ``workers`` threads: every item is done, the
    results in order; an exception (the first in order) is raised at the end.
    (ThreadPoolExecutor's map, without importing concurrent.futures: 10 ms of
    every agent call's start-up.)"""
    results = [None] * len(items)  # type: List[Any]
    errors = {}  # type: Dict[int, BaseException]
    todo = iter(range(len(items)))
    lock = threading.Lock()

    def work():
        # type: () -> None
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except Exception as exc:  # raised in the caller's thread, below
                errors[i] = exc

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[min(errors)]
    return results


GROUP = "{group}"


def query_runners(req, pending, kind):
    """Run each runner's command template once per chunk for its pending jobs.

    Jobs are grouped by runner and by their "group" words (e.g. Slurm's
    --clusters=NAME), which replace the "{group}" word of the template.
    """
    out = {}  # type: Dict[str, List[Dict[str, Any]]]
    groups = {}  # type: Dict[Any, List[str]]
    for job in pending:
        if job.get("job_id"):
            key = (job["runner"], tuple(job.get("group") or ()))
            groups.setdefault(key, []).append(job.get("bare_id") or job["job_id"])
    for (runner, group), ids in sorted(groups.items()):
        spec = req["runners"][runner]
        template = []
        for word in spec[kind]:
            if word == GROUP:
                template.extend(group)
            else:
                template.append(word)
        for argv in expand(template, ids, spec.get("sep")):
            result = run(argv, timeout=req.get("timeout", 60))
            result["group"] = list(group)
            out.setdefault(runner, []).append(result)
    return out


def read_statuses(jobs):
    return dict((j["key"], js.read_status_file(j["log_dir"])) for j in jobs)


def wire(statuses):
    return dict((k, st.to_wire()) for k, st in statuses.items())


def op_poll(req, w):
    jobs = req["jobs"]
    status = read_statuses(jobs)
    for j in jobs:  # intents whose submission sshq did not see through: adopt
        if not j.get("job_id"):
            j["job_id"] = status[j["key"]].job_id or ""
    missing = [j["key"] for j in jobs if not os.path.isdir(j["log_dir"])]
    pending = [j for j in jobs if not status[j["key"]].exited]
    if req.get("skip_runner"):  # rate-limited: status files only
        pending = []
    runners = query_runners(req, pending, "poll")
    # Re-read after the runner query: a job that ended meanwhile must be seen
    # with its exit, not as "vanished".
    status.update(read_statuses(pending))
    reply = {
        "status": wire(status),
        "queried": [j["key"] for j in pending if j.get("job_id")],
        "runners": runners,
        "missing": missing,
    }
    # Files a job's poll asks for ("files", read_many's form: sshq.Executor's
    # result and job.err tail) come with the reply once its status file records
    # an exit (or at once with "files_now": a job the client knows is final),
    # all of them within one budget: the caller reads on with read_many.
    asked = [j for j in jobs if j.get("files")]
    if asked:
        budget = min(int(req.get("files_budget", MAX_POLL_FILES)), MAX_POLL_FILES)
        files = {}
        for j in asked:
            if status[j["key"]].exited or j.get("files_now"):
                files[j["key"]], budget = read_files(j["files"], budget)
        reply["files"] = files
    w.frame(reply)


def op_kill(req, w):
    jobs = req["jobs"]
    status = read_statuses(jobs)
    pending = [j for j in jobs if not status[j["key"]].exited]
    runners = query_runners(req, pending, "kill")
    deadline = time.time() + float(req.get("settle", 0))
    while True:
        status.update(read_statuses(pending))
        if all(status[j["key"]].exited for j in pending) or time.time() >= deadline:
            break
        time.sleep(0.1)
    w.frame({"status": wire(status), "runners": runners,
             "killed": [j["key"] for j in pending if j.get("job_id")]})


def op_read(req, w):
    path = req["path"]
    try:
        item = read_regular(path, req.get("offset", 0),
                            min(int(req.get("max_bytes", MAX_READ_BYTES)), MAX_READ_BYTES))
        w.frame({"ok": True, "data_b64": item["data_b64"], "size": item["size"]})
    except (IOError, OSError) as exc:
        w.frame({"ok": False, "error": "%s: %s" % (path, exc.strerror)})


def op_follow(req, w):
    """Stream appended bytes of several files until the status file records an exit."""
    files = req["files"]
    offsets = dict((f, 0) for f in files)
    interval = float(req.get("interval", 0.2))
    status_dir = req.get("log_dir")
    last_beat = time.time()
    while True:
        done = bool(status_dir) and js.read_status_file(status_dir).exited
        sent = False
        for name, path in files.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(offsets[name])
                    data = fh.read(1024 * 1024)
            except (IOError, OSError):
                continue
            if data:
                offsets[name] += len(data)
                w.frame({"file": name, "data_b64": b64(data)})
                sent = True
        if done and not sent:
            w.frame({"done": True, "status": js.read_status_file(status_dir).to_wire()})
            return
        if not sent:
            if time.time() - last_beat > 5:
                w.frame({"beat": True})  # notices a client that went away
                last_beat = time.time()
            time.sleep(interval)


def op_procs(req, w):
    """farm find/killall: the login user's processes whose command line holds
    the pattern (hex), signalled when "signal" is a name; see sshq_procs."""
    w.frame(sshq_procs.reply(req["pattern"], req.get("signal")))


# ---- sshq.Executor's operations: the pre-flight check and the batched result read

#: The mark of pyenv's line: "\n<PYENV_MARK><json>\n" on stdout.
PYENV_MARK = "SSHQ-PYENV "
#: What "pyenv" runs with the interpreter asked about (no shell): its version
#: and the version of cloudpickle it imports, on one marked line.  (The
#: restricted agent answers from files instead: sshq_restricted.pyenv_facts.)
PYENV_PROBE = (
    "import json, sys\n"
    "out = {'version': list(sys.version_info[:3]), 'executable': sys.executable}\n"
    "try:\n"
    "    import cloudpickle\n"
    "    out['cloudpickle'] = str(getattr(cloudpickle, '__version__', ''))\n"
    "except BaseException as exc:\n"
    "    out['cloudpickle_error'] = '%%s: %%s' %% (type(exc).__name__, exc)\n"
    "sys.stdout.write('\\n%s' + json.dumps(out) + '\\n')\n"
) % PYENV_MARK


def op_pyenv(req, w):
    """The Python version and cloudpickle version of interpreter req["python"]
    (run as an argv, without a shell); with "run_dir", remote-init's facts too."""
    res = run([req["python"], "-c", PYENV_PROBE], timeout=float(req.get("timeout", 60)))
    reply = {"exit": res["exit"], "stdout": res["stdout"][-65536:],
             "stderr": res["stderr"][-4096:]}
    if req.get("run_dir"):
        reply["init"] = remote_init(req["run_dir"])
    w.frame(reply)


#: The most bytes one "read_many" reply carries, over all its files; and
#: the most the files of one "poll" reply carry (beside the job statuses).
MAX_READ_MANY = 24 * 1024 * 1024
MAX_POLL_FILES = 16 * 1024 * 1024


def op_read_many(req, w):
    """Several regular files in one call, each from an offset (or its last
    "max_bytes" with "tail"), each at most "max_bytes", all together at most
    MAX_READ_MANY: the caller reads on from "offset" + the bytes it got."""
    budget = min(int(req.get("budget", MAX_READ_MANY)), MAX_READ_MANY)
    w.frame({"files": read_files(req["files"], budget)[0]})


def read_regular(path, offset=0, max_bytes=MAX_READ_BYTES, tail=False):
    """At most ``max_bytes`` of a regular file, from ``offset`` (or its last
    ``max_bytes`` with ``tail``): {"data_b64", "size", "offset"}.  Opened
    non-blocking (a FIFO cannot block the agent); raises OSError, EISDIR or
    EINVAL for what is no regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        want = max(0, int(max_bytes))
        offset = max(0, st.st_size - want) if tail else max(0, int(offset))
        os.lseek(fd, offset, os.SEEK_SET)
        chunks, left = [], want
        while left > 0:
            data = os.read(fd, min(left, 1024 * 1024))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        return {"data_b64": b64(b"".join(chunks)), "size": st.st_size, "offset": offset}
    finally:
        os.close(fd)


def read_files(files, budget):
    """read_many's reading (and poll's): one item per file of ``files``, at
    most ``budget`` bytes in all; returns (items, the budget left)."""
    out = []
    for f in files:
        path = f["path"]
        want = max(0, min(int(f.get("max_bytes", MAX_READ_BYTES)), MAX_READ_BYTES, budget))
        try:
            item = read_regular(path, f.get("offset", 0), want, f.get("tail"))
        except OSError as exc:
            out.append({"ok": False, "missing": exc.errno == errno.ENOENT,
                        "error": "%s: %s" % (path, exc.strerror)})
            continue
        budget -= min(want, max(0, item["size"] - item["offset"]))  # the bytes read
        item["ok"] = True
        out.append(item)
    return out, budget


# ---- sshq serve's FirecREST filesystem operations (src/sshq/server/firecrest.py)

#: The most bytes one "fs" read returns (FirecREST's direct transfer limit).
FS_MAX_BYTES = 5 * 1024 * 1024
#: The most entries one recursive listing returns.
FS_MAX_ENTRIES = 10000


class FsOutside(Exception):
    """A path outside the directories the request allows."""


def fs_inside(path, roots):
    """``path`` (resolved) is one of ``roots`` (resolved here) or below one."""
    for root in roots:
        root = os.path.realpath(root).rstrip("/") or "/"
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _fs_entry(path, name, deref, numeric):
    """One `ls -l`-like entry, as FirecREST's ops/ls reports it."""
    import grp
    import pwd

    st = os.stat(path) if deref else os.lstat(path)
    kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "-"
    user, group = str(st.st_uid), str(st.st_gid)
    if not numeric:
        try:
            user = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            pass
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            pass
    return {"name": name, "type": kind,
            "linkTarget": os.readlink(path) if kind == "l" else None,
            "user": user, "group": group, "permissions": stat.filemode(st.st_mode)[1:],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime)),
            "size": str(st.st_size)}


def _fs_read(path, req):
    """Bytes of a regular file: from "offset", or its last "max" with "tail"."""
    return read_regular(path, req.get("offset", 0),
                        min(int(req.get("max", FS_MAX_BYTES)), FS_MAX_BYTES), req.get("tail"))


def fs_paths(req):
    """The paths an "fs" request acts on: (the entry itself -- a symbolic link
    not followed --, what it leads to, whether the action is on the entry
    itself: rm, and ls or stat without "dereference").  A "." or ".."
    component is refused (EINVAL): "<root>/x/../.." must not pass for an
    entry of <root>."""
    path = req["path"]
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise OSError(errno.EINVAL, "not an absolute path")
    if set(path.split("/")) & set((".", "..")):
        raise OSError(errno.EINVAL, "a '.' or '..' component")
    parent, base = os.path.split(path.rstrip("/") or "/")
    own = os.path.join(os.path.realpath(parent), base) if base else "/"  # a link itself
    real = os.path.realpath(path)  # what it leads to
    action = req["action"]
    itself = action == "rm" or (action in ("stat", "ls") and not req.get("dereference"))
    return own, real, itself


def _fs(req):
    action, path, roots = req["action"], req["path"], req["roots"]
    own, real, itself = fs_paths(req)
    deref = bool(req.get("dereference"))
    if not fs_inside(own, roots) or not (itself or fs_inside(real, roots)):
        raise FsOutside(path)
    if action == "ls":
        numeric = bool(req.get("numeric"))
        if not os.path.isdir(real if deref else own) or os.path.islink(own) and not deref:
            return {"output": [_fs_entry(own, os.path.basename(own), deref, numeric)]}
        out = []
        for top, dirs, files in os.walk(real):
            rel = os.path.relpath(top, real)
            names = sorted(dirs + files)
            if not req.get("hidden"):
                names = [n for n in names if not n.startswith(".")]
                dirs[:] = [d for d in dirs if not d.startswith(".")]
            for n in names:
                out.append(_fs_entry(os.path.join(top, n), n if rel == "." else
                                     os.path.join(rel, n), deref, numeric))
                if len(out) >= FS_MAX_ENTRIES:
                    return {"output": out, "truncated": True}
            if not req.get("recursive"):
                break
        return {"output": out}
    if action == "stat":
        st = os.stat(real) if deref else os.lstat(own)
        return {"output": dict((k, int(getattr(st, "st_" + k))) for k in (
            "mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime", "mtime", "ctime"))}
    if action == "read":
        return _fs_read(real, req)
    if action == "mkdir":
        if req.get("parent"):
            os.makedirs(real, exist_ok=True)
        else:
            os.mkdir(real)
        return {"output": _fs_entry(real, os.path.basename(real), False, False)}
    if action == "rm":
        import shutil
        if os.path.isdir(own) and not os.path.islink(own):
            shutil.rmtree(own)
        else:
            os.unlink(own)
        return {}
    if action == "upload":
        name = req["name"]
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise OSError(errno.EINVAL, "bad file name %r" % name)
        if not os.path.isdir(real):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        target = os.path.join(real, name)
        tmp = os.path.join(real, ".%s.sshq-upload-%d" % (name[:100], os.getpid()))
        with open(tmp, "wb") as fh:
            fh.write(base64.b64decode(req["data_b64"]))
        os.rename(tmp, target)
        return {}
    raise ValueError("unknown fs action %r" % action)


def op_fs(req, w):
    """One filesystem operation of sshq serve's FirecREST API (ls, stat, read,
    mkdir, rm, upload) on "path", refused outside the directories "roots"
    (symbolic links resolved): the reply names the errno, never raises."""
    try:
        w.frame(dict(_fs(req), ok=True))
    except FsOutside:
        w.frame({"ok": False, "code": "outside",
                 "error": "%s: outside the directories allowed" % req["path"]})
    except (IOError, OSError) as exc:
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        w.frame({"ok": False, "code": code, "error": "%s: %s" % (req["path"], exc.strerror or exc)})


# ---- `sshq agent install`: the installed agent's files (see sshq_restricted.py)

_INSTALL_NAME = re.compile(r"\.?[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")  # never ".."
_INSTALL_VERSION = re.compile(r"[0-9a-f]{12,64}\Z")


def _installed_ok(vdir, files):
    """Whether ``vdir`` holds exactly ``files`` (and Python's bytecode cache),
    each with its sha256."""
    import hashlib
    try:
        if sorted(set(os.listdir(vdir)) - {"__pycache__"}) != sorted(files):
            return False
        for name, item in files.items():
            with open(os.path.join(vdir, name), "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() != item["sha256"]:
                    return False
    except OSError:
        return False
    return True


def op_install_agent(req, w):
    """Install req["files"] ({name: {"data_b64", "sha256", "mode"}}) into
    ~/<dir>/agent-<version>/ (written aside, each checked against its sha256,
    then renamed into place), point ~/<dir>/<entry> at that directory's entry
    with one rename, and remove older versions but the one it replaces.
    Re-running it with the same files changes nothing."""
    import hashlib
    import shutil
    name_ok = _INSTALL_NAME.match
    if not (name_ok(req["dir"]) and name_ok(req["entry"])
            and _INSTALL_VERSION.match(req["version"])):
        raise ValueError("malformed install request")
    files = req["files"]
    top = os.path.join(os.path.expanduser("~"), req["dir"])
    make_dirs(top, PRIVATE_DIR_MODE)
    os.chmod(top, PRIVATE_DIR_MODE)
    version = "agent-" + req["version"]
    vdir = os.path.join(top, version)
    changed = False
    if not _installed_ok(vdir, files):
        tmp = "%s.tmp-%s" % (vdir, os.urandom(6).hex())
        os.mkdir(tmp, PRIVATE_DIR_MODE)
        try:
            for name, item in sorted(files.items()):
                data = base64.b64decode(item["data_b64"])
                if not name_ok(name) or hashlib.sha256(data).hexdigest() != item["sha256"]:
                    raise ValueError("%s: sha256 mismatch or bad name" % name)
                fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             int(item["mode"]) & 0o755)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if os.path.isdir(vdir):  # a damaged copy
                shutil.rmtree(vdir)
            os.rename(tmp, vdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        changed = True
    link = os.path.join(top, req["entry"])
    target = os.path.join(version, req["entry"])
    try:
        current = os.readlink(link)
    except OSError:
        current = None
    if current != target:
        tmp = "%s.tmp-%s" % (link, os.urandom(6).hex())
        os.symlink(target, tmp)
        os.rename(tmp, link)
        changed = True
    keep = (version, (current or "").split("/")[0])
    for name in os.listdir(top):
        if name.startswith("agent-") and name not in keep:
            shutil.rmtree(os.path.join(top, name), ignore_errors=True)
    if not _installed_ok(vdir, files):
        raise ValueError("the installed files do not read back with their sha256")
    w.frame({"home": os.path.expanduser("~"), "python": sys.executable, "dir": top,
             "version": req["version"], "changed": changed,
             "rsync": bool(shutil.which("rsync")), "rrsync": bool(shutil.which("rrsync"))})


OPS = {"init": op_init, "submit": op_submit, "poll": op_poll, "kill": op_kill,
       "read": op_read, "follow": op_follow, "listing": op_listing, "tidy": op_tidy,
       "procs": op_procs, "pyenv": op_pyenv, "read_many": op_read_many,
       "install_agent": op_install_agent, "fs": op_fs}


def handle(req, w, ops=None):
    """Run one request's operation into Writer ``w`` (an error frame if it
    fails) and close the reply; False if the client went away.  (The installed
    agent, sshq_restricted.py, serves its requests through here too, with
    ``ops`` in place of OPS in restricted mode.)"""
    if req.get("path_prepend"):
        os.environ["PATH"] = os.pathsep.join(
            list(req["path_prepend"]) + [os.environ.get("PATH", os.defpath)])
    try:
        (ops or OPS)[req["op"]](req, w)
    except BrokenPipeError:
        return False
    except Exception as exc:  # reported, not hidden: the client raises RemoteError
        w.frame({"agent_error": "%s: %s" % (type(exc).__name__, exc)})
    w.close()
    return True


def main():
    raw = sys.stdin.buffer.read()
    req = json.loads(raw.decode("utf-8"))
    handle(req, Writer(req["nonce"]))


if __name__ == "__main__":
    main()
