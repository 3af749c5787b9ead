"""The engine that runs a ``rooms.App``: ``rooms serve`` and ``rooms.testing`` both run it.

General layout. Four layers; a module imports only from its own layer or an earlier one
(``tests/test_layers.py`` checks it, and that there is no import cycle):

1. sans-I/O, no sockets and no tasks: ``frames`` (the RFC 6455 codec), ``handshake`` (the
   opening handshake both ways, the closing states), ``config`` (settings), ``metrics``,
   ``placement`` (where a room lives in a cluster: the terms host, cluster and links share),
   ``seats`` (a room's seats and lock, and seat tickets).
2. the engine core, trio but no sockets: ``gate`` (the output gate and the burst batch),
   ``events`` (a room's events, one class per kind), ``activation`` (one room: mailbox,
   task, instance), ``host`` (every room: lifecycle, calls, alarms), ``storage`` (the
   backend interface and a room's view), ``writer`` (a backend's database in a process of
   its own, no trio) and ``sqlite`` (the embedded backend's database, run there); cluster mode's
   ``postgres`` (the fenced backend) and ``cluster`` (membership, leases, who holds which
   room), the only modules that import psycopg (an optional extra).
3. I/O: ``stream`` (socket bytes, TLS, the epoll read set), ``websocket`` (one connection's
   data path), ``http`` (the HTTP/1.1 phase), ``router`` (which answer a request gets),
   ``admission`` (upgrade-time rules), ``dial`` (WebSockets the engine opens as a client),
   ``proxy`` (proxied routes), ``usage``, ``admin`` (the live admin page), ``link`` (the
   protocol of the links between a cluster's nodes; ``outlink``: a client's node,
   ``inlink``: a room's), and ``edge``, which takes each connection through those phases.
4. assembly: ``server`` (``run_engine``, the one assembly, and ``serve``), ``local`` (the
   engine in process, for ``rooms.testing``), ``cli``, ``connect`` and ``console`` (the
   ``rooms connect`` client).

A message's path: socket -> ``Stream`` (bytes) -> ``WebSocket`` (frames) -> ``Peer`` (the
connection inside its room) -> ``Activation.post`` (the room's mailbox) -> the room's hook,
which sees a ``rooms.Connection`` -> ``Activation.send`` -> the output gate -> the recipients'
``WebSocket.write`` -> sockets.

The SDK boundary: ``runtime`` imports the public names of ``rooms`` and ``rooms._engine`` (the
contract) only; ``rooms`` imports ``runtime.local`` only, from ``rooms.testing``.
"""
