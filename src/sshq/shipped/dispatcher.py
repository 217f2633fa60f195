# sshq task-farm dispatcher.
#
# One file, Python 3.6+ standard library only, sent over the SSH channel like
# the agent (sshq.remote.protocol.BOOTSTRAP reads it from stdin and runs it);
# nothing is installed on the host.  After the source, stdin carries one JSON
# header line; its "mode" says what this run of the file does:
#
#   "stream" (default)  run tasks the client sends as frames, and send back
#                       each one's start and result as soon as they happen;
#   "prepare"           write tasks to a spool directory (and start a
#                       detached worker on it);
#   "collect"           send a spool's results that the client has not
#                       acknowledged yet.
#
# `python3 dispatcher.py worker SPOOL` (inside a pilot job) runs a spool's
# tasks.  One task runner (Runner) serves both the stream and the spool: it
# runs up to `slots` shell commands at once, each in its own session, with a
# timeout, and hands each one, when it starts and when it ends, to its sink:
# StreamSink (tasks from the client's frames, results to the client as
# frames) or SpoolSink (tasks from the spool, results to files in it).
#
# Header: "nonce" (the fence's), "slots" (None: the core count), "env"
# (extra environment variables for tasks), "cwd" (tasks' directory, "~"
# expanded), "path_prepend" (directories put before the tasks' PATH: the
# platform's path_prepend, as the agent does).
#
# Frame (both directions): 4-byte big-endian header length, 4-byte big-endian
# payload length, a JSON object (the header), then the payload bytes.
#
#   client -> dispatcher                   dispatcher -> client (after the fence
#                                          line "SSHQ-BEGIN-<nonce>\n")
#   {"type":"task","id","seq","cmd",       {"type":"hello","slots","cores","pid",
#    "timeout","attempt"}                   "python"}
#   {"type":"kill","id"}                   {"type":"started","id","start","pid"}
#   {"type":"close"}  finish, then exit    {"type":"output","id","stream":1|2}
#   {"type":"pause"}, {"type":"resume"}     + bytes
#     hold / start queued tasks            {"type":"done","id","exit_status",
#                                           "signal","start","end","timed_out",
#                                           "killed","stdout_bytes"}
#                                           + stdout then stderr
#                                          {"type":"heartbeat"}  every 5 s of
#                                           silence
#                                          {"type":"bye"}
#
# In "done", exit_status is null when a signal (its number) ended the task;
# start and end are epoch seconds; the payload's first stdout_bytes bytes are
# stdout, the rest stderr.
#
# A task's output is kept in memory up to SPILL bytes per stream, then spilled
# to a file in a private temporary directory and sent in chunks ("output"
# frames) before its "done" frame, read from the file only as fast as the
# channel takes it: memory stays bounded whatever a task prints.  Taking new
# frames from stdin never waits on writing results, and writing results never
# waits on stdin (one non-blocking loop over both), so neither side can
# deadlock.
#
# Detached runs and pilot jobs (the ANet seed's wish: the file system as the
# mediator).  "prepare" reads task frames and the dispatcher's own source
# ({"type":"source"} + bytes) until {"type":"close"}, writes them to a spool
# directory (tasks.jsonl, header.json, dispatcher.py) and, with "detach",
# starts a daemon worker on it; it replies {"type":"prepared","spool","pid"}.
# A worker (that daemon, or `python3 dispatcher.py worker SPOOL` inside a
# pilot job) runs the spool's tasks that have no result yet, writes
# results/<seq>.out, .err and, last, .json (the "done" fields with "seq",
# "attempt", "node", "host"), honours a "paused" file, and writes "done" at
# the end.  "collect" sends the results of several spools that the client
# has not reported yet, as "output" and "done" frames with id = seq, then
# {"type":"state","spool","done","alive","exists","tasks","results"} per
# spool.  Tasks can write into their spool: a results/*.json that is not the
# result of one of the spool's tasks (name, size up to META_MAX, JSON, its
# "seq") is renamed to .bad and reported as {"type":"warn","message"}.
#
# The stream dispatcher dies with its channel: on EOF of stdin or a broken
# stdout it kills its tasks' process groups and exits; the client re-runs
# them.

import errno
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SPILL = 1 << 20        # bytes of one stream kept in memory before spilling
CHUNK = 1 << 18        # bytes per "output" frame
OUT_HIGH = 4 << 20     # stop pulling spilled output while this much is queued
KILL_GRACE = 2.0       # seconds between SIGTERM and SIGKILL
HEARTBEAT = 5.0        # seconds of silence after which a heartbeat frame is sent
SIGNAL_GRACE = 1.0     # seconds a task killed by someone else's signal waits to be
                       # reported: if the host (or pilot job) is going down, the
                       # dispatcher dies first and the task is re-run, not failed
STALE = 60.0           # seconds without a heartbeat after which a worker is dead
BEAT = 5.0             # seconds between a worker's heartbeats
META_MAX = 65536       # bytes: a result's .json is larger only if it is not ours
HEAD = struct.Struct(">II")


def frame(head, payload=b""):
    hb = json.dumps(head, separators=(",", ":")).encode("utf-8")
    return HEAD.pack(len(hb), len(payload)) + hb + payload


def spawn(cmd, env):
    """Start ``/bin/sh -c cmd`` in its own session, stdin from /dev/null.

    Returns ``(pid, (stdout_read_fd, stderr_read_fd))``.  posix_spawn
    (Python 3.8+) is markedly cheaper than subprocess for tiny tasks.
    """
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        for fd in (r1, r2):
            os.set_inheritable(fd, False)
        if hasattr(os, "posix_spawn"):
            pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", cmd], env, file_actions=[  # novermin
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, w1, 1), (os.POSIX_SPAWN_DUP2, w2, 2),
                (os.POSIX_SPAWN_CLOSE, w1), (os.POSIX_SPAWN_CLOSE, w2)], setsid=True)
        else:
            pid = subprocess.Popen(
                ["/bin/sh", "-c", cmd], stdin=subprocess.DEVNULL, stdout=w1, stderr=w2,
                env=env, start_new_session=True, close_fds=True).pid
    except BaseException:
        for fd in (r1, r2):
            os.close(fd)
        raise
    finally:
        os.close(w1)
        os.close(w2)
    return pid, (r1, r2)


def core_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def task_env(header):
    """The environment tasks start from: ours, the header's "env", and its
    "path_prepend" directories before PATH (as the agent does)."""
    env = dict(os.environ)
    for k, v in (header.get("env") or {}).items():
        env[k] = v
    dirs = [d for d in header.get("path_prepend") or () if isinstance(d, str) and d]
    if dirs:
        env["PATH"] = os.pathsep.join(dirs + [env.get("PATH", os.defpath)])
    return env


class Capture(object):
    """One output stream of a task: memory, then a spill file."""

    def __init__(self, scratch, name):
        self.scratch = scratch
        self.name = name
        self.buf = bytearray()
        self.path = None
        self.fh = None
        self.size = 0

    def add(self, data):
        self.size += len(data)
        if self.fh is None and len(self.buf) + len(data) <= SPILL:
            self.buf += data
            return
        if self.fh is None:
            self.path = os.path.join(self.scratch, self.name)
            self.fh = open(self.path, "wb")
            self.fh.write(self.buf)
            self.buf = bytearray()
        self.fh.write(data)

    def finish(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def discard(self):
        self.finish()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class Task(object):
    def __init__(self, head, slot, scratch):
        self.id = head["id"]
        self.head = head
        self.slot = slot
        self.pid = None
        self.t0 = None
        self.t1 = None
        self.rc = None
        self.sig = None
        self.open_pipes = 0
        self.deadline = None
        self.kill_at = None
        self.timed_out = False
        self.killed = False
        self.defer = None
        self.out = Capture(scratch, "%d.1" % self.id)
        self.err = Capture(scratch, "%d.2" % self.id)

    def outcome(self):
        """The fields of its result: the "done" frame's, a spool's .json's."""
        return {"exit_status": None if self.sig else self.rc, "signal": self.sig,
                "start": self.t0, "end": self.t1 or time.time(),
                "timed_out": self.timed_out, "killed": self.killed}


class Runner(object):
    """Runs shell commands, up to `slots` at once, each in its own session.

    Where tasks come from and where their results go is the sink's: the
    runner takes `sink.next_task()` heads while it has a free slot, and
    calls `sink.started(task)` and `sink.task_done(task)`.  Its loop
    (`run`) also waits on what the sink registered in `sel` and asks it
    `finished()` and `timeout(seconds)` each round.
    """

    def __init__(self, header, scratch, sink):
        self.slots = int(header.get("slots") or core_count())
        self.env_base = task_env(header)
        self.cwd = os.path.expanduser(header.get("cwd") or "~")
        self.scratch = scratch
        self.sink = sink
        self.sel = selectors.DefaultSelector()
        self.running = {}       # id -> Task
        self.by_fd = {}         # pipe fd -> (Task, Capture)
        self.by_pid = {}        # pid -> running Task
        self.deferred = []      # tasks ended by a foreign signal, reported later
        self.free_slots = list(range(self.slots, 0, -1))
        self.wake_r, self.wake_w = os.pipe()

    # ------------------------------------------------------------ tasks
    def start(self, head):
        slot = self.free_slots.pop()
        task = Task(head, slot, self.scratch)
        env = dict(self.env_base)
        env["SSHQ_FARM_SEQ"] = str(head.get("seq", ""))
        env["SSHQ_FARM_SLOT"] = str(slot)
        env["SSHQ_FARM_ATTEMPT"] = str(head.get("attempt", 1))
        try:
            task.pid, fds = spawn(head["cmd"], env)
        except OSError as exc:
            task.t0 = task.t1 = time.time()
            task.err.add(("sshq: cannot start the task: %s\n" % exc).encode("utf-8"))
            task.rc = 127
            self.running[task.id] = task
            self.sink.started(task)
            self.finish(task)
            return
        task.t0 = time.time()
        timeout = head.get("timeout")
        if timeout:
            task.deadline = time.monotonic() + float(timeout)
        self.running[task.id] = task
        self.by_pid[task.pid] = task
        for fd, capture in zip(fds, (task.out, task.err)):
            os.set_blocking(fd, False)
            self.by_fd[fd] = (task, capture)
            self.sel.register(fd, selectors.EVENT_READ, "pipe")
            task.open_pipes += 1
        self.sink.started(task)

    def signal_task(self, task, sig):
        if task.pid is None or task.pid not in self.by_pid:
            return
        try:
            os.killpg(task.pid, sig)
        except OSError:
            try:
                os.kill(task.pid, sig)
            except OSError:
                pass

    def stop_task(self, task):
        """SIGTERM now, SIGKILL after KILL_GRACE seconds."""
        self.signal_task(task, signal.SIGTERM)
        if task.kill_at is None:
            task.kill_at = time.monotonic() + KILL_GRACE

    def kill(self, task_id):
        """Stop a running task (its result says "killed")."""
        task = self.running.get(task_id)
        if task is not None:
            task.killed = True
            self.stop_task(task)

    def kill_all(self):
        for task in list(self.running.values()):
            self.signal_task(task, signal.SIGKILL)

    def read_pipe(self, fd):
        task, capture = self.by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = b""
        if data:
            capture.add(data)
            return
        self.sel.unregister(fd)
        del self.by_fd[fd]
        os.close(fd)
        task.open_pipes -= 1
        self.maybe_finish(task)

    def reap(self):
        while self.by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.by_pid.pop(pid, None)
            if task is None:
                continue
            task.t1 = time.time()
            if os.WIFSIGNALED(status):
                task.sig = os.WTERMSIG(status)
                task.rc = -1
            else:
                task.rc = os.WEXITSTATUS(status)
            self.maybe_finish(task)

    def maybe_finish(self, task):
        if task.open_pipes == 0 and task.rc is not None and task.defer is None:
            if task.sig and not task.killed and not task.timed_out:
                task.defer = time.monotonic() + SIGNAL_GRACE
                self.deferred.append(task)
                return
            self.finish(task)

    def finish(self, task):
        del self.running[task.id]
        self.free_slots.append(task.slot)
        for capture in (task.out, task.err):
            capture.finish()
        self.sink.task_done(task)

    def timers(self):
        """Handle deadlines; return seconds until the next one (None: none).

        0 when a deferred task was finished here: the loop must come round
        at once, not wait in select, to flush its result (queued by the
        sink) and fill its slot.
        """
        now = time.monotonic()
        nxt = None
        for task in list(self.deferred):
            if now >= task.defer:
                self.deferred.remove(task)
                self.finish(task)
                nxt = 0.0
            elif nxt is None or task.defer - now < nxt:
                nxt = task.defer - now
        for task in list(self.running.values()):
            if task.pid not in self.by_pid:
                continue
            if task.deadline is not None and not task.timed_out and now >= task.deadline:
                task.timed_out = True
                self.stop_task(task)
            if task.kill_at is not None and now >= task.kill_at:
                self.signal_task(task, signal.SIGKILL)
                task.kill_at = None
            for t in (None if task.timed_out else task.deadline, task.kill_at):
                if t is not None and (nxt is None or t - now < nxt):
                    nxt = max(0.0, t - now)
        return nxt

    # ------------------------------------------------------------ loop
    def run(self):
        os.chdir(self.cwd)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        sink = self.sink
        sink.begin()
        while True:
            if sink.stopping:
                self.kill_all()
                return
            sink.tick()
            while self.free_slots:
                head = sink.next_task()
                if head is None:
                    break
                self.start(head)
            if sink.finished():
                return
            for key, _ in self.sel.select(sink.timeout(self.timers())):
                what = key.data
                if what == "pipe":
                    self.read_pipe(key.fd)
                elif what == "wake":
                    try:
                        os.read(self.wake_r, 4096)
                    except OSError:
                        pass
                else:
                    sink.ready(what)
            self.reap()


class StreamSink(object):
    """Tasks from the client's frames on stdin; starts and results to it as
    frames on stdout ("stream" mode)."""

    stopping = False

    def __init__(self, header):
        self.nonce = header["nonce"]
        self.scratch = tempfile.mkdtemp(prefix="sshq-farm-")
        self.runner = Runner(header, self.scratch, self)
        self.inbuf = bytearray()
        self.outq = []          # bytes and pending spilled-output readers
        self.outq_bytes = 0
        self.pending = []       # task headers not yet started (FIFO)
        self.closing = False
        self.paused = False
        self.stdin_open = True
        self.writing = False
        self.last_send = time.monotonic()

    def run(self):
        try:
            self.runner.run()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.runner.kill_all()
            shutil.rmtree(self.scratch, ignore_errors=True)

    # ------------------------------------------------------------ output
    def send(self, data):
        self.last_send = time.monotonic()
        self.outq.append(data)
        self.outq_bytes += len(data)

    def flush(self):
        """Write what the channel takes now; True if everything was written."""
        while self.outq:
            item = self.outq[0]
            if isinstance(item, tuple):
                if self.outq_bytes >= OUT_HIGH:
                    return False
                task_id, stream_no, fh = item
                data = fh.read(CHUNK)
                if not data:
                    fh.close()
                    self.outq.pop(0)
                    continue
                chunk = frame({"type": "output", "id": task_id, "stream": stream_no}, data)
                self.outq.insert(0, chunk)
                self.outq_bytes += len(chunk)
                # keep the reader right behind its chunk
                continue
            try:
                n = os.write(1, item)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return False
                raise
            self.outq_bytes -= n
            if n < len(item):
                self.outq[0] = item[n:]
                return False
            self.outq.pop(0)
        return True

    # ------------------------------------------------------------ the runner's sink
    def begin(self):
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        self.runner.sel.register(0, selectors.EVENT_READ, "stdin")
        out = sys.stdout.buffer
        out.write(("\nSSHQ-BEGIN-%s\n" % self.nonce).encode("ascii"))
        out.flush()
        self.send(frame({"type": "hello", "slots": self.runner.slots, "cores": core_count(),
                         "pid": os.getpid(), "python": sys.version.split()[0]}))

    def tick(self):
        pass

    def next_task(self):
        if self.pending and not self.paused:
            return self.pending.pop(0)
        return None

    def started(self, task):
        self.send(frame({"type": "started", "id": task.id, "start": task.t0, "pid": task.pid}))

    def task_done(self, task):
        inline = []
        for no, capture in ((1, task.out), (2, task.err)):
            if capture.path:
                self.outq.append((task.id, no, open(capture.path, "rb")))
                inline.append(b"")
            else:
                inline.append(bytes(capture.buf))
        head = task.outcome()
        head["type"] = "done"
        head["id"] = task.id
        head["stdout_bytes"] = len(inline[0])
        self.send(frame(head, inline[0] + inline[1]))
        for capture in (task.out, task.err):
            if capture.path:   # the open reader keeps the data until it is sent
                os.unlink(capture.path)

    def finished(self):
        done = self.flush()
        if not self.stdin_open and not self.closing:
            return True  # the client is gone
        if self.closing and not self.pending and not self.runner.running and done:
            self.send(frame({"type": "bye"}))
            while not self.flush():
                time.sleep(0.01)
            return True
        if done == self.writing:
            self.writing = not done
            if self.writing:
                self.runner.sel.register(1, selectors.EVENT_WRITE, "stdout")
            else:
                self.runner.sel.unregister(1)
        return False

    def timeout(self, timeout):
        hb = self.last_send + HEARTBEAT - time.monotonic()
        if hb <= 0:
            self.send(frame({"type": "heartbeat"}))
            return 0
        return hb if timeout is None or hb < timeout else timeout

    def ready(self, what):
        if what == "stdin":
            self.read_stdin()

    # ------------------------------------------------------------ input
    def read_stdin(self):
        try:
            data = os.read(0, 262144)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = b""
        if not data:
            self.stdin_open = False
            self.runner.sel.unregister(0)
            return
        self.inbuf += data
        while len(self.inbuf) >= 8:
            hl, pl = HEAD.unpack_from(self.inbuf)
            if len(self.inbuf) < 8 + hl + pl:
                break
            head = json.loads(bytes(self.inbuf[8:8 + hl]).decode("utf-8"))
            del self.inbuf[:8 + hl + pl]
            kind = head.get("type")
            if kind == "task":
                self.pending.append(head)
            elif kind == "kill":
                self.kill(head["id"])
            elif kind == "close":
                self.closing = True
            elif kind == "pause":
                self.paused = True
            elif kind == "resume":
                self.paused = False

    def kill(self, task_id):
        for i, head in enumerate(self.pending):
            if head["id"] == task_id:
                del self.pending[i]
                now = time.time()
                self.send(frame({"type": "done", "id": task_id, "exit_status": None,
                                 "signal": None, "start": now, "end": now,
                                 "timed_out": False, "killed": True, "stdout_bytes": 0}))
                return
        self.runner.kill(task_id)


class SpoolSink(object):
    """Tasks from a spool directory; results to files in it (a worker).

    A spool made with "shared" (pilot jobs) is worked on by several workers,
    possibly on several nodes of a shared file system: each claims a task by
    creating claims/<seq> with O_EXCL (atomic, NFS included) before running
    it.  Every worker touches workers/<id> every BEAT seconds; a claim whose
    worker has been silent for STALE seconds and has no result is taken over
    (renaming the claim away is atomic, so only one worker wins it).
    """

    def __init__(self, spool_dir, label=None):
        self.dir = os.path.abspath(spool_dir)
        with open(os.path.join(self.dir, "header.json")) as fh:
            header = json.load(fh)
        self.label = label or header.get("label")
        if self.label:   # several hosts may share the spool: each says who it is
            header["env"] = dict(header.get("env") or {}, SSHQ_FARM_HOST=self.label)
        self.wid = "%s-%d" % (socket.gethostname(), os.getpid())
        self.scratch = os.path.join(self.dir, "tmp", self.wid)
        self.results = os.path.join(self.dir, "results")
        self.claims = os.path.join(self.dir, "claims")
        self.workers = os.path.join(self.dir, "workers")
        for d in (self.scratch, self.results, self.claims, self.workers):
            os.makedirs(d, exist_ok=True)   # pilots start at the same moment
        self.runner = Runner(header, self.scratch, self)
        self.retries = int(header.get("retries") or 0)
        self.shared = bool(header.get("shared"))
        self.tasks_fh = open(os.path.join(self.dir, "tasks.jsonl"))
        self.paused_flag = os.path.join(self.dir, "paused")
        self.pending = []       # retries of failed tasks
        self.paused = False
        self.exhausted = False
        self.stopping = False
        self.last_beat = 0.0
        self.last_steal = 0.0
        self.began = time.monotonic()

    def run(self):
        with open(os.path.join(self.dir, "worker.pid"), "w") as fh:
            fh.write("%d\n" % os.getpid())
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for name in ("SIGTERM", "SIGINT", "SIGXCPU", "SIGUSR1", "SIGUSR2"):
            # a job runner ending a pilot job: stop, leave unfinished claims
            signal.signal(getattr(signal, name), self.on_stop)
        try:
            self.runner.run()
        finally:
            with open(os.path.join(self.workers, self.wid + ".done"), "w") as fh:
                fh.write("%f\n" % time.time())
            shutil.rmtree(self.scratch, ignore_errors=True)
        if not self.stopping and self.all_done():
            with open(os.path.join(self.dir, "done"), "w") as fh:
                fh.write("%f\n" % time.time())

    def on_stop(self, signum, frame):
        self.stopping = True

    # ------------------------------------------------------------ the runner's sink
    def begin(self):
        self.began = time.monotonic()

    def tick(self):
        self.beat()
        self.paused = os.path.exists(self.paused_flag)

    def next_task(self):
        """The next task this worker may run, or None."""
        if self.paused:
            return None
        if self.pending:
            return self.pending.pop(0)
        while not self.exhausted:
            line = self.tasks_fh.readline()
            if not line:
                self.exhausted = True
                break
            head = json.loads(line)
            if self.has_result(head["seq"]):
                continue
            if not self.shared or self.claim(head["seq"]):
                return head
        if self.shared and time.monotonic() - self.last_steal > BEAT:
            self.last_steal = time.monotonic()
            return self.steal()
        return None

    def started(self, task):
        pass

    def task_done(self, task):
        if self.stopping:   # its claim stays: another worker runs it again
            for capture in (task.out, task.err):
                capture.discard()
            return
        seq = task.head["seq"]
        attempt = int(task.head.get("attempt", 1))
        if (task.rc != 0 or task.sig) and attempt <= self.retries:
            self.pending.append(dict(task.head, attempt=attempt + 1))
            for capture in (task.out, task.err):
                capture.discard()
            return
        base = os.path.join(self.results, str(seq))
        for ext, capture in ((".out", task.out), (".err", task.err)):
            if capture.path:
                os.rename(capture.path, base + ext)
            else:
                with open(base + ext, "wb") as fh:
                    fh.write(capture.buf)
        meta = task.outcome()
        meta.update(seq=seq, attempt=attempt, node=socket.gethostname(), host=self.label)
        with open(base + "." + self.wid + ".tmp", "w") as fh:
            json.dump(meta, fh)
        os.rename(base + "." + self.wid + ".tmp", base + ".json")

    def finished(self):
        if self.runner.running or self.pending or not self.exhausted:
            return False
        # a pilot that starts while others' claims are fresh waits until they
        # finish or go stale, so lost tasks are re-run
        return not (self.waiting_on_others() and time.monotonic() - self.began < STALE + 10)

    def timeout(self, timeout):
        return 0.5 if timeout is None else min(timeout, 0.5)

    def ready(self, what):
        pass

    # ------------------------------------------------------------ the spool
    def has_result(self, seq):
        base = os.path.join(self.results, str(seq))
        return os.path.exists(base + ".json") or os.path.exists(base + ".acked")

    def claim(self, seq):
        try:
            fd = os.open(os.path.join(self.claims, str(seq)),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        os.write(fd, self.wid.encode("utf-8"))
        os.close(fd)
        return True

    def orphans(self):
        """Claims without a result whose worker is gone: [(seq, owner)]."""
        found = []
        for name in os.listdir(self.claims):
            if not name.isdigit() or self.has_result(int(name)):
                continue
            try:
                with open(os.path.join(self.claims, name)) as fh:
                    owner = fh.read().strip()
            except OSError:
                continue
            if owner != self.wid:
                found.append((int(name), owner))
        return found

    def steal(self):
        for seq, owner in self.orphans():
            if fresh(self.workers, owner):
                continue
            path = os.path.join(self.claims, str(seq))
            try:
                os.rename(path, "%s.lost-%s" % (path, self.wid))
            except OSError:
                continue  # another worker took it over first
            if not self.claim(seq):
                continue
            self.tasks_fh.seek(0)
            for line in self.tasks_fh:
                head = json.loads(line)
                if head["seq"] == seq:
                    return head
        return None

    def waiting_on_others(self):
        """Tasks claimed by live workers are still unfinished (pilot start-up)."""
        return self.shared and any(not self.has_result(seq) for seq, _ in self.orphans())

    def beat(self):
        now = time.monotonic()
        if now - self.last_beat >= BEAT:
            self.last_beat = now
            with open(os.path.join(self.workers, self.wid), "w") as fh:
                fh.write("%d\n" % os.getpid())

    def all_done(self):
        self.tasks_fh.seek(0)
        return all(self.has_result(json.loads(line)["seq"]) for line in self.tasks_fh)


# ---------------------------------------------------------------- spools


def resolve_spool(path):
    return os.path.abspath(os.path.expanduser(path))


def read_frames(stream):
    """Blocking frame reader (prepare mode)."""
    while True:
        head = stream.read(8)
        if len(head) < 8:
            return
        hl, pl = HEAD.unpack(head)
        h = json.loads(stream.read(hl).decode("utf-8"))
        yield h, stream.read(pl)


def reply(nonce, frames):
    out = sys.stdout.buffer
    out.write(("\nSSHQ-BEGIN-%s\n" % nonce).encode("ascii"))
    for f in frames:
        out.write(f)
    out.flush()


def prepare(header):
    spool = resolve_spool(header["spool"])
    os.makedirs(spool, 0o700, exist_ok=True)
    with open(os.path.join(spool, "tasks.jsonl"), "a") as tasks:
        for head, payload in read_frames(sys.stdin.buffer):
            kind = head.get("type")
            if kind == "task":
                tasks.write(json.dumps(head) + "\n")
            elif kind == "source":
                with open(os.path.join(spool, "dispatcher.py"), "wb") as fh:
                    fh.write(payload)
            elif kind == "close":
                break
    worker_header = dict(header)
    worker_header.pop("nonce", None)
    with open(os.path.join(spool, "header.json"), "w") as fh:
        json.dump(worker_header, fh)
    pid = None
    if header.get("detach"):
        pid = daemon(spool, header.get("label"))
    reply(header["nonce"], [frame({"type": "prepared", "spool": spool, "pid": pid})])


def daemon(spool, label=None):
    """Start a worker on ``spool`` that outlives this SSH session; its pid."""
    r, w = os.pipe()
    first = os.fork()
    if first:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(first, 0)
        return int(data) if data.strip() else None
    # first child: new session, then the grandchild is the daemon
    try:
        os.close(r)
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        log = os.open(os.path.join(spool, "worker.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                      0o600)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log, 2)
        try:
            worker = SpoolSink(spool, label)
            worker.beat()     # alive before the client hears of it
            os.write(w, str(os.getpid()).encode("ascii"))
            os.close(w)
            worker.run()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(0)
    except BaseException:
        os._exit(1)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, someone else's
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fresh(workers, wid):
    """Whether worker ``wid`` (``host-pid``) is alive: by its pid when it runs
    on this host, else by its heartbeat file's age."""
    if os.path.exists(os.path.join(workers, wid + ".done")):
        return False
    host, _, pid = wid.rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        return pid_alive(int(pid))
    try:
        return time.time() - os.stat(os.path.join(workers, wid)).st_mtime < STALE
    except OSError:
        return False


def worker_alive(spool):
    """Whether some worker of the spool is alive."""
    workers = os.path.join(spool, "workers")
    try:
        names = os.listdir(workers)
    except OSError:
        return False
    return any(fresh(workers, n) for n in names if not n.endswith(".done"))


def spool_seqs(spool):
    """The seqs of a spool's tasks (a set)."""
    seqs = set()
    try:
        with open(os.path.join(spool, "tasks.jsonl")) as tf:
            for line in tf:
                try:
                    seqs.add(int(json.loads(line)["seq"]))
                except (ValueError, KeyError, TypeError):
                    pass
    except OSError:
        pass
    return seqs


#: A result's .json keys as workers wrote them before the keys became whole
#: words (a spool's worker is its own copy of the dispatcher, so a run
#: detached before an upgrade still has them): old -> new.
OLD_META_KEYS = {"rc": "exit_status", "sig": "signal", "t0": "start", "t1": "end",
                 "to": "timed_out"}


def read_meta(path, seq):
    """A result's .json, checked: a dict for task ``seq``, or None (not ours)."""
    try:
        with open(path, "rb") as mf:
            data = mf.read(META_MAX + 1)
    except OSError:
        return None
    if len(data) > META_MAX:
        return None
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("seq") != seq:
        return None
    for old, new in OLD_META_KEYS.items():
        if old in meta and new not in meta:
            meta[new] = meta.pop(old)
    return meta


def collect(header):
    """Send the spools' unacknowledged results; a file in results/ that is
    not a result of one of the spool's tasks (a task may write there) is
    renamed to .bad and reported in a "warn" frame, never sent."""
    out = sys.stdout.buffer
    out.write(("\nSSHQ-BEGIN-%s\n" % header["nonce"]).encode("ascii"))
    for item in header["spools"]:
        spool = resolve_spool(item["spool"])
        results = os.path.join(spool, "results")
        for seq in item.get("ack") or ():      # reported by the client: forget them
            base = os.path.join(results, str(int(seq)))
            try:
                os.rename(base + ".json", base + ".acked")
            except OSError:
                pass
            for ext in (".out", ".err"):
                try:
                    os.unlink(base + ext)
                except OSError:
                    pass
        done = os.path.exists(os.path.join(spool, "done"))
        alive = worker_alive(spool)
        try:
            names = os.listdir(results)
        except OSError:
            names = []
        seqs = spool_seqs(spool)
        count = 0
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(results, name)
            digits = name[:-5]
            seq = int(digits) if digits.isdigit() and len(digits) <= 18 else None
            meta = read_meta(path, seq) if seq in seqs else None
            if meta is None:
                try:
                    os.rename(path, path + ".bad")
                except OSError:
                    pass
                out.write(frame({"type": "warn", "message": "%s: not a result of one of the"
                                 " spool's tasks; renamed to %s.bad" % (path[-200:],
                                                                         name[-60:])}))
                continue
            count += 1
            for no, ext in ((1, ".out"), (2, ".err")):
                try:
                    fh = open(os.path.join(results, str(seq) + ext), "rb")
                except OSError:
                    continue
                with fh:
                    while True:
                        data = fh.read(CHUNK)
                        if not data:
                            break
                        out.write(frame({"type": "output", "id": seq, "stream": no}, data))
            head = {"type": "done", "id": seq, "stdout_bytes": 0, "killed": False,
                    "attempt": meta.get("attempt", 1)}
            for key in ("exit_status", "signal", "start", "end", "timed_out", "node", "host"):
                head[key] = meta.get(key)
            out.write(frame(head))
        out.write(frame({"type": "state", "spool": spool, "done": done, "alive": alive,
                         "exists": os.path.isdir(spool),
                         "tasks": len(seqs), "results": count}))
        if item.get("tidy") and (done or not alive):
            shutil.rmtree(spool, ignore_errors=True)
    out.write(frame({"type": "bye"}))
    out.flush()


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":   # inside a pilot job
        SpoolSink(sys.argv[2]).run()
        return
    header = json.loads(sys.stdin.buffer.readline().decode("utf-8"))
    mode = header.get("mode", "stream")
    if mode == "prepare":
        prepare(header)
    elif mode == "collect":
        collect(header)
    else:
        StreamSink(header).run()


if __name__ == "__main__":
    main()
