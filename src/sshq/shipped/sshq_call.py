# sshq remote call runner: runs the Python calls of sshq.Executor on a remote host.
#
# One file, Python 3.6+: the standard library, plus cloudpickle when it runs
# calls (imported then, never at import time: the client imports this module
# for its file names and its result format, sshq.shipped.sshq_call).
#
# In a job (`Executor(platform)`), the job's command is, in its work directory:
#
#     <python> sshq_call.py job --max-result-bytes N [--index K]
#
# The work directory holds what the submission staged there (JobSpec.inputs,
# in the submit request itself):
#
#     sshq_call.py          this file
#     sshq-fn.pkl           the function, cloudpickled
#     sshq-calls-<K>.pkl    job K's calls: cloudpickled {"calls": [(args, kwargs), ...],
#                           "chunk": bool}
#
# K is the array element's index ($SSHQ_ARRAY_INDEX) or --index.  The result
# goes to $SSHQ_JOB_LOG_DIR/sshq-call.result (the job's own log directory, one
# per job and per array element), written to a temporary file, synced and
# renamed: a result file is whole or absent.
#
# In a farm task (`Executor(platform, hosts=[...])`), in the --deps copy:
#
#     <python> sshq_call.py task --max-result-bytes N --index K
#
# writes the result to standard output instead; what the function prints goes
# to standard error.
#
# The result format (RESULT_MAGIC, then records; a record is one JSON line
# and, after it, "size" bytes):
#
#     SSHQ-CALL-RESULT 1\n
#     {"calls": n, "chunk": bool, "python": "3.11.2", "load_error": bool}\n
#     per call: {"ok": true, "size": S}\n <S bytes: the value, cloudpickled>
#           or  {"ok": false, "type": "mod.Name", "message": ..., "traceback": ...,
#                "size": S}\n <S bytes: the exception, pickled; 0 bytes if it could not be>
#
# With "load_error" (the function or the calls could not be loaded), one
# error record follows, which stands for every call of the job.

import json
import os
import pickle
import sys
import traceback

RESULT_MAGIC = b"SSHQ-CALL-RESULT 1\n"
RUNNER_FILE = "sshq_call.py"
FN_FILE = "sshq-fn.pkl"
RESULT_FILE = "sshq-call.result"
#: Exit status of a job whose result could not be written at all.
NO_RESULT_EXIT = 3
#: Longest exception message and traceback text kept (characters).
MAX_TEXT = 64 * 1024


def calls_file(index):
    # type: (int) -> str
    """The file holding job ``index``'s calls."""
    return "sshq-calls-%d.pkl" % int(index)


def _cut(text):
    if len(text) > MAX_TEXT:
        return text[:MAX_TEXT // 2] + "\n[... cut ...]\n" + text[-MAX_TEXT // 2:]
    return text


def _type_name(exc):
    t = type(exc)
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__qualname__", t.__name__)
    return name if mod in ("builtins", "__main__", "") else "%s.%s" % (mod, name)


def _record(fields, blob):
    fields = dict(fields, size=len(blob))
    return json.dumps(fields, separators=(",", ":")).encode("utf-8") + b"\n" + blob


def _error_record(exc, dumps, skip_frames=0):
    tb = exc.__traceback__
    for _ in range(skip_frames):  # our own frames: the user's start below them
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # a pickle that cannot be loaded here will not load there
    except BaseException:
        blob = b""
    try:
        message = str(exc)
    except BaseException:
        message = "(str() of the exception failed)"
    return _record({"ok": False, "type": _type_name(exc), "message": _cut(message),
                    "traceback": _cut(text)}, blob)


def _too_large(n, limit):
    return _record({"ok": False, "type": "sshq.ResultTooLarge",
                    "message": "the return value pickles to %d bytes, over the limit of %d"
                               " bytes (max_result_bytes)" % (n, limit),
                    "traceback": ""}, b"")


def run_calls(index, max_result_bytes):
    """Load and run job ``index``'s calls from the current directory.

    Returns the result bytes (RESULT_MAGIC, header, records)."""
    python = "%d.%d.%d" % sys.version_info[:3]
    dumps = pickle.dumps
    try:
        import cloudpickle
        dumps = cloudpickle.dumps
        with open(FN_FILE, "rb") as fh:
            fn = pickle.load(fh)
        with open(calls_file(index), "rb") as fh:
            spec = pickle.load(fh)
        calls = list(spec["calls"])
        chunk = bool(spec.get("chunk"))
    except BaseException as exc:
        head = {"calls": 0, "chunk": False, "python": python, "load_error": True}
        return (RESULT_MAGIC + json.dumps(head).encode("utf-8") + b"\n"
                + _error_record(exc, dumps))
    head = {"calls": len(calls), "chunk": chunk, "python": python, "load_error": False}
    out = [RESULT_MAGIC, json.dumps(head).encode("utf-8"), b"\n"]
    for args, kwargs in calls:
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            out.append(_error_record(exc, dumps, skip_frames=1))
            continue
        try:
            blob = dumps(value)
        except BaseException as exc:
            out.append(_error_record(exc, dumps))
            continue
        if len(blob) > max_result_bytes:
            out.append(_too_large(len(blob), max_result_bytes))
            continue
        out.append(_record({"ok": True}, blob))
        del value, blob
    return b"".join(out)


def write_atomically(path, data):
    """Write ``data`` to ``path`` through a synced temporary file and a rename."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _args(argv):
    mode = argv[0] if argv else ""
    opts = {}
    i = 1
    while i + 1 < len(argv):
        opts[argv[i]] = argv[i + 1]
        i += 2
    return mode, opts


def main(argv=None):
    mode, opts = _args(sys.argv[1:] if argv is None else argv)
    if mode not in ("job", "task") or "--max-result-bytes" not in opts:
        sys.stderr.write("usage: sshq_call.py job|task --max-result-bytes N [--index K]\n")
        return 2
    limit = int(opts["--max-result-bytes"])
    index = opts.get("--index") or os.environ.get("SSHQ_ARRAY_INDEX") or ""
    if not index.isdigit():
        sys.stderr.write("sshq_call.py: no --index and no SSHQ_ARRAY_INDEX\n")
        return 2
    if mode == "task":
        # The function's prints go to stderr: stdout carries the result alone.
        sys.stdout.flush()
        result_fd = os.dup(1)
        os.dup2(2, 1)
        data = run_calls(int(index), limit)
        sys.stdout.flush()
        with os.fdopen(result_fd, "wb") as out:
            out.write(data)
        return 0
    log_dir = os.environ.get("SSHQ_JOB_LOG_DIR")
    if not log_dir:
        sys.stderr.write("sshq_call.py: SSHQ_JOB_LOG_DIR is not set (not in an sshq job?)\n")
        return 2
    data = run_calls(int(index), limit)
    try:
        write_atomically(os.path.join(log_dir, RESULT_FILE), data)
    except (IOError, OSError) as exc:
        sys.stderr.write("sshq_call.py: cannot write the result: %s\n" % exc)
        return NO_RESULT_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
