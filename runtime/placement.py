"""Where a room lives, in cluster mode: what the host, the cluster's directory
(``runtime.cluster``) and the links between nodes (``runtime.link``) agree on.

Embedded mode has no placement: every room lives in the one process.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from rooms import Request, Response


@attrs.frozen
class Owner:
    """Where a room lives in a cluster: its node (``address`` is how peers reach it) and the
    epoch of the node's claim."""

    node_id: str
    address: str
    epoch: int


class ClusterUnavailable(Exception):
    """A room cannot be placed now (this node lost the cluster database, or the room's node
    cannot be reached or stopped answering): the client gets 503 or 1012 and retries."""


class OwnerUnreachable(ClusterUnavailable):
    """The room's node is alive in the directory but cannot be reached from here: until its
    link comes back, or its lease runs out and the room is claimed again, nothing here can
    serve the room."""


class NotHere(Exception):
    """The node asked does not hold the room (any more): find where it lives and retry."""


class Directory(Protocol):
    """Where rooms live (``runtime.cluster.Cluster``)."""

    node_id: str
    epochs: dict[str, int]  # the rooms this node holds, and the epoch of each claim
    dead_within: float  # seconds within which a node that stops renewing is found dead

    async def locate(self, key: str) -> Owner: ...

    def forget(self, key: str) -> None: ...

    async def renewing(self, node_id: str) -> bool: ...

    async def due_alarms(self) -> list[tuple[str, float, str | None]]: ...


Room3 = tuple[str, str, str | None]
"""A room as it crosses a link: its class's namespace, its id's hex and name."""


class RemoteRooms(Protocol):
    """The rooms other nodes hold, as this node reaches them (``runtime.outlink.Links``)."""

    async def call(
        self,
        owner: Owner,
        room: Room3,
        method: str,
        payload: bytes,
        chain: list[str],
    ) -> Any: ...

    async def request(self, owner: Owner, room: Room3, request: Request) -> Response: ...
