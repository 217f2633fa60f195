"""Programs that sshq ships to remote hosts: stdlib-only Python 3.6+, never imported
by the client except for the shared modules named ``sshq_*.py``.

- ``agent.py``: the remote agent, one JSON request per SSH command
  (:mod:`sshq.remote.protocol` builds what is sent).
- ``dispatcher.py``: the task farm's per-host dispatcher and spool worker.
- ``sshq_jobstatus.py``: the job status file (key names, bounded parsing,
  the state decision), the job log layout and the array-element id; shipped
  inside the agent and imported by the client.
- ``sshq_procs.py``: process listing for ``sshq farm find``/``killall``.

Each shipped module is bundled ahead of the agent (see
:func:`sshq.remote.protocol.agent_source`), so the agent imports it by its
plain name, exactly as when the files are installed side by side.
"""

import sys

from . import sshq_jobstatus, sshq_procs

# In this process (sshq's own tests import ``sshq.shipped.agent``), the agent's
# ``import sshq_jobstatus`` (``sshq_procs``) finds the same module the client uses.
sys.modules.setdefault("sshq_jobstatus", sshq_jobstatus)
sys.modules.setdefault("sshq_procs", sshq_procs)
