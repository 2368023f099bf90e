"""A live, read-only web dashboard of a run (``start_server(dashboard_address=...)``).

:func:`start_dashboard` subscribes a :class:`DashboardState` to a server's run events
and serves it with a :class:`DashboardServer` on a thread of its own: a page with the
connected nodes, the run's progress and charts of losses and metrics per round, updated
live by server-sent events, and the JSON endpoints behind it (``docs/dashboard.md``).
"""

from __future__ import annotations

import logging

from ..events import RunEvents
from .server import TOKEN_ENV, DashboardServer, dashboard_address
from .state import DashboardState

__all__ = [
    "TOKEN_ENV",
    "Dashboard",
    "DashboardServer",
    "DashboardState",
    "dashboard_address",
    "start_dashboard",
]

logger = logging.getLogger("stamen.server")


class Dashboard:
    """A running dashboard: its state, its web server and its address (``url``)."""

    def __init__(self, events: RunEvents, server: DashboardServer) -> None:
        self.state = server.state
        self.server = server
        self._unsubscribe = events.subscribe(self.state)

    @property
    def url(self) -> str:
        """The page's address, with ``?token=`` when a token is required."""
        return self.server.url

    def stop(self) -> None:
        """Stop receiving events and serving; open event streams end."""
        self._unsubscribe()
        self.server.stop()


def start_dashboard(
    events: RunEvents, address: str = "127.0.0.1:0", *, token: str | None = None
) -> Dashboard:
    """Serve a live dashboard of the run published on ``events`` at ``address``.

    Args:
        events: The run's events (``Server.events``); subscribe before the fleet starts
            so that every node is seen joining.
        address: ``host:port`` (``PORT`` alone: ``127.0.0.1:PORT``). On an address
            other than loopback a token is required.
        token: The access token (default: ``STAMEN_DASHBOARD_TOKEN``, else generated when
            one is required); the page's address with it is logged.

    Raises:
        ConfigError: the address is invalid or cannot be bound, or the token is empty.
    """
    server = DashboardServer(DashboardState(), dashboard_address(address), token=token)
    dashboard = Dashboard(events, server)
    try:
        server.start()
    except BaseException:
        dashboard.stop()
        raise
    if server.generated_token:
        logger.warning(
            "dashboard: a token was generated (the address is not loopback); open %s",
            server.url,
        )
    elif server.token is not None:  # the token given is not written to the log
        logger.info("dashboard: open %s with its token", server.url.split("?", 1)[0])
    else:
        logger.info("dashboard: open %s", server.url)
    return dashboard
