"""The transport-agnostic side of the fleet: nodes, their mailboxes and proxies.

Every transport's servicer is a thin adapter over :class:`Fleet`: it opens a node, takes
the node's next task, hands back the reply bytes, and closes the node. All of it runs on
the fleet's event loop thread, which owns every mailbox.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from ...errors import ConnectionLost, DecodeError
from ...messages import Reply
from ...protocol.mailbox import Mailbox, Task
from ...wire import decode_reply
from ..client_manager import ClientManager
from ..client_proxy import RemoteClientProxy

__all__ = ["Fleet", "Node"]

logger = logging.getLogger("stamen.server")


@dataclass(eq=False)
class Node:
    """One connected client node."""

    cid: str
    transport: str
    peer: str
    mailbox: Mailbox
    proxy: RemoteClientProxy
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Fleet:
    """Registry of connected nodes, shared by every transport."""

    def __init__(
        self,
        client_manager: ClientManager,
        loop: asyncio.AbstractEventLoop,
        *,
        max_message_length: int,
    ) -> None:
        self._client_manager = client_manager
        self._loop = loop
        self._max_message_length = max_message_length
        self._nodes: dict[str, Node] = {}
        self.closing = False

    def __len__(self) -> int:
        return len(self._nodes)

    def open_node(self, transport: str, peer: str) -> Node:
        """Register a new node and make it available to the server's rounds."""
        cid = uuid.uuid4().hex
        mailbox = Mailbox(cid)
        proxy = RemoteClientProxy(
            cid, mailbox, self._loop, max_message_length=self._max_message_length
        )
        node = Node(cid=cid, transport=transport, peer=peer, mailbox=mailbox, proxy=proxy)
        mailbox.set_wakeup(node.wake.set)
        self._nodes[cid] = node
        self._client_manager.register(proxy)
        logger.debug("node %s joined over %s from %s", cid, transport, peer)
        return node

    async def next_task(self, node: Node) -> Task:
        """Wait for the node's next instruction."""
        while True:
            task = node.mailbox.take()
            if task is not None:
                return task
            if node.mailbox.closed:
                raise ConnectionLost(f"node {node.cid} is closed")
            node.wake.clear()
            await node.wake.wait()

    def deliver(self, node: Node, task: Task, data: bytes) -> Reply:
        """Decode reply bytes for ``task`` and resolve it.

        Raises:
            DecodeError: the bytes are not a valid reply (the task fails with it too).
        """
        try:
            reply = decode_reply(data)
        except DecodeError as exc:
            node.mailbox.fail(task.task_id, exc)
            raise
        if not node.mailbox.deliver(task.task_id, reply):
            logger.info("node %s: late reply to task %d discarded", node.cid, task.task_id)
        return reply

    def close_node(self, node: Node, error: BaseException | None = None) -> None:
        """Remove the node: fail its tasks and drop it from the client manager."""
        if self._nodes.pop(node.cid, None) is None:
            return
        self._client_manager.unregister(node.proxy)
        node.mailbox.close(error)
        node.wake.set()
        logger.debug("node %s left: %s", node.cid, error)

    def close_all(self, reason: str) -> None:
        """Close every node (server shutdown)."""
        self.closing = True
        for node in list(self._nodes.values()):
            self.close_node(node, ConnectionLost(f"node {node.cid}: {reason}"))
