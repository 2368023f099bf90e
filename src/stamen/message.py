"""``Message``: what a client mod sees -- a :class:`~stamen.records.RecordSet` plus metadata.

Flower 1.12's ``Message``, ``Metadata`` and ``Error``, for client mods
(``ClientApp(mods=[...])``): a mod receives the instruction as a ``Message`` whose content
holds the legacy records (``fitins.parameters``, ``fitins.config``, ... see
:mod:`stamen.recordset_compat`) and returns the reply as a ``Message``. Stamen's own
transports carry the classic messages; a ``Message`` exists only while mods run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from .records import RecordSet

__all__ = ["DEFAULT_TTL", "Error", "Message", "MessageType", "MessageTypeLegacy", "Metadata", "now"]

DEFAULT_TTL = 3600
"""Seconds a message stays valid by default (as in Flower)."""


def now() -> datetime:
    """The current time, timezone-aware, in UTC (Flower's ``now``)."""
    return datetime.now(tz=timezone.utc)


class MessageType:
    """Message types of Flower's Message API."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    QUERY = "query"


class MessageTypeLegacy:
    """Message types of the classic calls that have no Message API equivalent."""

    GET_PARAMETERS = "get_parameters"
    GET_PROPERTIES = "get_properties"


@dataclass
class Error:
    """An error a message carries instead of content.

    Attributes:
        code: A numeric error code.
        reason: Why, in words (optional).
    """

    code: int
    reason: str | None = None


class Metadata:
    """Who sent a message to whom, about what, and how long it stays valid.

    ``run_id``, ``message_id``, ``src_node_id``, ``reply_to_message`` and ``created_at``
    are read-only (as in Flower 1.12); ``dst_node_id``, ``group_id``, ``ttl`` and
    ``message_type`` can be set.
    """

    __slots__ = (
        "_created_at",
        "_message_id",
        "_reply_to_message",
        "_run_id",
        "_src_node_id",
        "dst_node_id",
        "group_id",
        "message_type",
        "ttl",
    )

    def __init__(
        self,
        run_id: int,
        message_id: str,
        src_node_id: int,
        dst_node_id: int,
        reply_to_message: str,
        group_id: str,
        ttl: float,
        message_type: str,
    ) -> None:
        self._run_id = run_id
        self._message_id = message_id
        self._src_node_id = src_node_id
        self.dst_node_id = dst_node_id
        self._reply_to_message = reply_to_message
        self.group_id = group_id
        self.ttl = ttl
        self.message_type = message_type
        self._created_at = time.time()

    @property
    def run_id(self) -> int:
        """The run the message belongs to."""
        return self._run_id

    @property
    def message_id(self) -> str:
        """The message's id (``""`` until a server assigns one)."""
        return self._message_id

    @property
    def src_node_id(self) -> int:
        """The sending node."""
        return self._src_node_id

    @property
    def reply_to_message(self) -> str:
        """The id of the message this one answers (``""`` for an instruction)."""
        return self._reply_to_message

    @property
    def created_at(self) -> float:
        """When the message was created (Unix time, seconds)."""
        return self._created_at

    def _fields(self) -> tuple[object, ...]:
        return (
            self._run_id,
            self._message_id,
            self._src_node_id,
            self.dst_node_id,
            self._reply_to_message,
            self.group_id,
            self.ttl,
            self.message_type,
            self._created_at,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Metadata):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Metadata(run_id={self._run_id!r}, message_id={self._message_id!r}, "
            f"src_node_id={self._src_node_id!r}, dst_node_id={self.dst_node_id!r}, "
            f"reply_to_message={self._reply_to_message!r}, group_id={self.group_id!r}, "
            f"ttl={self.ttl!r}, message_type={self.message_type!r}, "
            f"created_at={self._created_at!r})"
        )


class Message:
    """Content (a :class:`RecordSet`) or an :class:`Error`, with :class:`Metadata`.

    Args:
        metadata: Who, what, how long.
        content: The records (exactly one of ``content`` and ``error``).
        error: The error (exactly one of ``content`` and ``error``).

    Raises:
        ValueError: both or neither of ``content`` and ``error`` given.
    """

    __slots__ = ("_content", "_error", "_metadata")

    def __init__(
        self, metadata: Metadata, content: RecordSet | None = None, error: Error | None = None
    ) -> None:
        if (content is None) == (error is None):
            raise ValueError(
                "Message: expected exactly one of `content` and `error`, received "
                + ("both" if content is not None else "neither")
            )
        if not isinstance(metadata, Metadata):
            raise TypeError(f"Message: expected Metadata, received {type(metadata).__name__}")
        self._metadata = metadata
        self._content = content
        self._error = error

    @property
    def metadata(self) -> Metadata:
        """The message's metadata."""
        return self._metadata

    @property
    def content(self) -> RecordSet:
        """The records.

        Raises:
            ValueError: the message carries an error, not content.
        """
        if self._content is None:
            raise ValueError(
                "Message.content: this message carries an error, not content; check "
                "has_content() first"
            )
        return self._content

    @content.setter
    def content(self, value: RecordSet) -> None:
        if self._error is not None:
            raise ValueError("Message.content: a message with an error cannot have content")
        if not isinstance(value, RecordSet):
            raise TypeError(
                f"Message.content: expected a RecordSet, received {type(value).__name__}"
            )
        self._content = value

    @property
    def error(self) -> Error:
        """The error.

        Raises:
            ValueError: the message carries content, not an error.
        """
        if self._error is None:
            raise ValueError(
                "Message.error: this message carries content, not an error; check has_error() first"
            )
        return self._error

    @error.setter
    def error(self, value: Error) -> None:
        if self._content is not None:
            raise ValueError("Message.error: a message with content cannot have an error")
        self._error = value

    def has_content(self) -> bool:
        """Whether the message carries content."""
        return self._content is not None

    def has_error(self) -> bool:
        """Whether the message carries an error."""
        return self._error is not None

    def _reply_metadata(self, ttl: float | None) -> Metadata:
        if ttl is None:
            # What is left of this message's time to live (as in Flower).
            ttl = self._metadata.ttl - (time.time() - self._metadata.created_at)
        return Metadata(
            run_id=self._metadata.run_id,
            message_id="",
            src_node_id=self._metadata.dst_node_id,
            dst_node_id=self._metadata.src_node_id,
            reply_to_message=self._metadata.message_id,
            group_id=self._metadata.group_id,
            ttl=ttl,
            message_type=self._metadata.message_type,
        )

    def create_reply(self, content: RecordSet, ttl: float | None = None) -> Message:
        """A reply to this message carrying ``content``, back to its sender.

        Args:
            content: The reply's records.
            ttl: Its time to live (default: what is left of this message's).
        """
        return Message(metadata=self._reply_metadata(ttl), content=content)

    def create_error_reply(self, error: Error, ttl: float | None = None) -> Message:
        """A reply to this message carrying ``error``, back to its sender."""
        return Message(metadata=self._reply_metadata(ttl), error=error)

    def __repr__(self) -> str:
        if self._content is not None:
            body = f"content={self._content!r}"
        else:
            body = f"error={self._error!r}"
        return f"Message(metadata={self._metadata!r}, {body})"
