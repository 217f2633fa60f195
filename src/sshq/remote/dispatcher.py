# sshq task-farm dispatcher.
#
# One file, Python 3.6+ standard library only, sent over the SSH channel like
# the agent (sshq.remote.protocol.BOOTSTRAP reads it from stdin and runs it);
# nothing is installed on the host.  One dispatcher per host runs up to
# `slots` shell commands at once and reports each result as soon as that task
# ends.  After the source, stdin carries one JSON header line, then frames.
#
# Frame (both directions): 4-byte big-endian header length, 4-byte big-endian
# payload length, a JSON object (the header), then the payload bytes.
#
#   client -> dispatcher                 dispatcher -> client (after the fence
#                                        line "SSHQ-BEGIN-<nonce>\n")
#   {"t":"task","id","seq","cmd",        {"t":"hello","slots","cores","pid"}
#    "timeout","attempt"}                {"t":"s","id","t0","pid"}   started
#   {"t":"kill","id"}                    {"t":"o","id","s":1|2} + bytes
#   {"t":"close"}  finish, then exit     {"t":"d","id","rc","sig","t0","t1",
#                                         "to","k","n1"} + stdout+stderr
#                                        {"t":"hb"}  every 5 s of silence
#                                        {"t":"bye"}
#
# A task's output is kept in memory up to SPILL bytes per stream, then spilled
# to a file in a private temporary directory and sent in chunks ("o" frames)
# before its "d" frame, read from the file only as fast as the channel takes
# it: memory stays bounded whatever a task prints.  Taking new frames from
# stdin never waits on writing results, and writing results never waits on
# stdin (one non-blocking loop over both), so neither side can deadlock.
#
# The dispatcher dies with its channel: on EOF of stdin or a broken stdout it
# kills its tasks' process groups and exits; the client re-runs them.

import errno
import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

SPILL = 1 << 20        # bytes of one stream kept in memory before spilling
CHUNK = 1 << 18        # bytes per "o" frame
OUT_HIGH = 4 << 20     # stop pulling spilled output while this much is queued
KILL_GRACE = 2.0       # seconds between SIGTERM and SIGKILL
HEARTBEAT = 5.0        # seconds of silence after which {"t":"hb"} is sent
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


class Stream(object):
    """One output stream of a task: memory, then a spill file."""

    def __init__(self, spool, name):
        self.spool = spool
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
            self.path = os.path.join(self.spool, self.name)
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
    def __init__(self, head, slot, spool):
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
        self.out = Stream(spool, "%d.1" % self.id)
        self.err = Stream(spool, "%d.2" % self.id)


class Dispatcher(object):
    def __init__(self, header):
        self.nonce = header["nonce"]
        self.slots = int(header.get("slots") or core_count())
        self.env_base = dict(os.environ)
        for k, v in (header.get("env") or {}).items():
            self.env_base[k] = v
        self.cwd = os.path.expanduser(header.get("cwd") or "~")
        self.spool = tempfile.mkdtemp(prefix="sshq-farm-")
        self.sel = selectors.DefaultSelector()
        self.inbuf = bytearray()
        self.outq = []          # bytes and pending spilled-output readers
        self.outq_bytes = 0
        self.pending = []       # task headers not yet started (FIFO)
        self.running = {}       # id -> Task
        self.by_fd = {}         # pipe fd -> (Task, Stream)
        self.by_pid = {}        # pid -> running Task
        self.free_slots = list(range(self.slots, 0, -1))
        self.closing = False
        self.stdin_open = True
        self.wake_r, self.wake_w = os.pipe()
        self.last_send = time.monotonic()

    # ------------------------------------------------------------ output
    def send(self, data):
        self.last_send = time.monotonic()
        self.outq.append(data)
        self.outq_bytes += len(data)

    def send_file(self, task_id, stream_no, path):
        self.outq.append((task_id, stream_no, open(path, "rb")))

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
                chunk = frame({"t": "o", "id": task_id, "s": stream_no}, data)
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

    # ------------------------------------------------------------ tasks
    def start(self, head):
        slot = self.free_slots.pop()
        task = Task(head, slot, self.spool)
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
            self.finish(task)
            return
        task.t0 = time.time()
        timeout = head.get("timeout")
        if timeout:
            task.deadline = time.monotonic() + float(timeout)
        self.running[task.id] = task
        self.by_pid[task.pid] = task
        for fd, stream in zip(fds, (task.out, task.err)):
            os.set_blocking(fd, False)
            self.by_fd[fd] = (task, stream)
            self.sel.register(fd, selectors.EVENT_READ, "pipe")
            task.open_pipes += 1
        self.send(frame({"t": "s", "id": task.id, "t0": task.t0, "pid": task.pid}))

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
        for i, head in enumerate(self.pending):
            if head["id"] == task_id:
                del self.pending[i]
                now = time.time()
                self.send(frame({"t": "d", "id": task_id, "rc": None, "sig": None, "t0": now,
                                 "t1": now, "to": False, "k": True, "n1": 0}))
                return
        task = self.running.get(task_id)
        if task is not None:
            task.killed = True
            self.stop_task(task)

    def read_pipe(self, fd):
        task, stream = self.by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = b""
        if data:
            stream.add(data)
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
        if task.open_pipes == 0 and task.rc is not None:
            self.finish(task)

    def finish(self, task):
        del self.running[task.id]
        self.free_slots.append(task.slot)
        inline = []
        for no, stream in ((1, task.out), (2, task.err)):
            stream.finish()
            if stream.path:
                self.send_file(task.id, no, stream.path)
                inline.append(b"")
            else:
                inline.append(bytes(stream.buf))
        rc = None if task.sig else task.rc
        self.send(frame({"t": "d", "id": task.id, "rc": rc, "sig": task.sig,
                         "t0": task.t0, "t1": task.t1 or time.time(), "to": task.timed_out,
                         "k": task.killed, "n1": len(inline[0])}, inline[0] + inline[1]))
        for stream in (task.out, task.err):
            if stream.path:   # the open reader keeps the data until it is sent
                os.unlink(stream.path)

    def timers(self):
        """Handle deadlines; return seconds until the next one (None: none)."""
        now = time.monotonic()
        nxt = None
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
            self.sel.unregister(0)
            return
        self.inbuf += data
        while len(self.inbuf) >= 8:
            hl, pl = HEAD.unpack_from(self.inbuf)
            if len(self.inbuf) < 8 + hl + pl:
                break
            head = json.loads(bytes(self.inbuf[8:8 + hl]).decode("utf-8"))
            del self.inbuf[:8 + hl + pl]
            kind = head.get("t")
            if kind == "task":
                self.pending.append(head)
            elif kind == "kill":
                self.kill(head["id"])
            elif kind == "close":
                self.closing = True

    # ------------------------------------------------------------ loop
    def run(self):
        os.chdir(self.cwd)
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        out = sys.stdout.buffer
        out.write(("\nSSHQ-BEGIN-%s\n" % self.nonce).encode("ascii"))
        out.flush()
        self.send(frame({"t": "hello", "slots": self.slots, "cores": core_count(),
                         "pid": os.getpid(), "python": sys.version.split()[0]}))
        writing = False
        while True:
            while self.pending and self.free_slots:
                self.start(self.pending.pop(0))
            done = self.flush()
            if not self.stdin_open and not self.closing:
                return  # the client is gone
            if self.closing and not self.pending and not self.running and done:
                self.send(frame({"t": "bye"}))
                while not self.flush():
                    time.sleep(0.01)
                return
            if done == writing:
                writing = not done
                if writing:
                    self.sel.register(1, selectors.EVENT_WRITE, "stdout")
                else:
                    self.sel.unregister(1)
            timeout = self.timers()
            hb = self.last_send + HEARTBEAT - time.monotonic()
            if hb <= 0:
                self.send(frame({"t": "hb"}))
                continue
            if timeout is None or hb < timeout:
                timeout = hb
            for key, _ in self.sel.select(timeout):
                what = key.data
                if what == "pipe":
                    self.read_pipe(key.fd)
                elif what == "stdin":
                    self.read_stdin()
                elif what == "wake":
                    try:
                        os.read(self.wake_r, 4096)
                    except OSError:
                        pass
            self.reap()

    def cleanup(self):
        for task in list(self.running.values()):
            self.signal_task(task, signal.SIGKILL)
        shutil.rmtree(self.spool, ignore_errors=True)


def main():
    header = json.loads(sys.stdin.buffer.readline().decode("utf-8"))
    d = Dispatcher(header)
    try:
        d.run()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        d.cleanup()


if __name__ == "__main__":
    main()
