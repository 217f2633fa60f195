"""``sshq.Executor``: call Python functions on a cluster, from a laptop.

A :class:`concurrent.futures.Executor` whose calls run as jobs of a
platform's job runner (``map``: one job array), or as farm tasks on hosts,
over plain SSH::

    from sshq import Executor

    with Executor("mycluster", walltime="0:30:00", cpus=4,
                  python="/home/me/venvs/sim/bin/python") as ex:
        fut = ex.submit(simulate, 3, steps=10)
        print(fut.result(timeout=3600))
        values = list(ex.map(simulate, range(200)))

The environment rule: the remote ``python`` has this client's Python
major.minor version and this client's cloudpickle version (checked once
before anything is queued).  The remote side of a call is
:mod:`sshq.shipped.sshq_call`; the pure data work (pickling, the result
format, the pre-flight verdict) is :mod:`sshq.executor._wire`.
"""

from ._executor import CallFuture, Executor, MapResults

__all__ = ["CallFuture", "Executor", "MapResults"]
