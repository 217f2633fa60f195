"""``sshq serve``: an HTTP gateway beside a backend (issue 11).

Any language talks HTTP to the server; the server talks SSH to the
platforms through one shared :class:`~sshq._client.core.HostPool`, with
everything the library does underneath.

- :mod:`sshq.server.state`: tokens, idempotency keys, events, webhook
  deliveries, in the state database (no web framework: the ``sshq token``
  commands use it);
- :mod:`sshq.server.app`: the FastAPI application: the native API under
  ``/api/v1``, the FirecREST v2 subset under ``/firecrest``, the page at
  ``/``;
- :mod:`sshq.server.gateway`: the core without HTTP: submit, reads, kill,
  the one background poller and the webhook sender;
- :mod:`sshq.server.farm`: farm runs (``/api/v1/farm``), deleted
  :data:`DEFAULT_FARM_RETENTION` after they end unless ``sshq serve
  --farm-retention`` says otherwise.

Importing this package imports no web framework; :mod:`sshq.server.app`
does.
"""

from __future__ import annotations

__all__ = ["DEFAULT_FARM_RETENTION"]

#: How long a farm run that ended (finished, failed or stopped) is kept, with
#: its results and files, in seconds (7 days; ``sshq serve --farm-retention
#: DAYS``).  A running run is never deleted.
DEFAULT_FARM_RETENTION = 7 * 86400.0
