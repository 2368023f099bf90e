"""grpc errors -> Stamen errors, in one place."""

from __future__ import annotations

import grpc

from ..errors import (
    AuthError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    StamenError,
    Timeout,
)

__all__ = ["map_rpc_error"]

_LINK_FAILED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
}


def map_rpc_error(exc: grpc.RpcError, where: str) -> StamenError:
    """Translate a failed RPC into the matching Stamen error (raise it ``from exc``)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    text = f"{where}: {code.name if code else 'error'}: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MessageTooLarge(f"{text} (raise grpc_max_message_length on both sides?)")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(text)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ProtocolError(
            f"{text} (a gRPC server that does not serve this method: not a Stamen or "
            "Flower server, or not this transport's service)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(text)
    if code in _LINK_FAILED:
        return ConnectionLost(text)
    return ProtocolError(text)
