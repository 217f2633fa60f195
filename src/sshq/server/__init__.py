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
- :mod:`sshq.server.poller`: the one background poller and the webhook
  sender.

Importing this package imports no web framework; :mod:`sshq.server.app`
does.
"""

from __future__ import annotations
