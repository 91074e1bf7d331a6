"""An ASGI layer in front of Quart that keeps every kept-alive connection answerable.

The hang it prevents (Quart-Trio 0.12 on Hypercorn 0.18, h11): a route that answers without
reading its request body (`HEAD /health` with a 200 KB body) finishes its response while the
body is still arriving. Hypercorn then closes the connection from inside the app's last
`send`: it first hands the app `http.disconnect`, on which Quart-Trio cancels the request's
nursery, so the cancellation lands on Hypercorn's own close (`TCPServer._close`, at the
checkpoint in `send_eof`) and the socket is neither closed nor recycled. The rest of the body
is parsed, the client's next request lands in h11's buffer, the reader waits on `can_read`
forever: no answer, a task and a socket held until the client gives up.

The guard, per HTTP request:
- drains: when the response starts before the body is complete, it waits (up to
  `body_timeout_s`, and only while at most `max_body_bytes` arrived) for the rest, which
  Quart's message reader keeps consuming; the connection then stays kept-alive;
- closes otherwise: a body that is too large, too slow or still incomplete gets
  `Connection: close` on the response, so h11 ends the connection after it;
- shields the response's last `send` from the cancellation above, so Hypercorn's close or
  recycle always completes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

log = logging.getLogger("nurserve.server")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]  # Quart's asgi_app, in Hypercorn's types


class BodyProgress:
    """What has arrived of one request's body; `settled` is set once waiting is pointless."""

    def __init__(self, declared: int | None, limit: int) -> None:
        self.declared = declared
        self.limit = limit
        self.received = 0
        self.complete = declared == 0
        self.gone = False
        self.settled = trio.Event()
        if self.complete or self.too_large():
            self.settled.set()

    def too_large(self) -> bool:
        """More than `limit` bytes declared or received."""
        return self.received > self.limit or (self.declared or 0) > self.limit

    def note(self, message: Message) -> None:
        """Account for one ASGI message the app received."""
        kind = message.get("type")
        if kind == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.disconnect":
            self.gone = True
        if self.complete or self.gone or self.too_large():
            self.settled.set()


def declared_length(scope: MutableMapping[str, Any]) -> int | None:
    """The request's Content-Length (0 when it has no body framing at all), None if chunked."""
    length: int | None = 0
    for name, value in scope.get("headers", ()):
        low = name.lower()
        if low == b"transfer-encoding":
            return None
        if low == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


class ConnectionGuard:
    """Wraps an ASGI app (Quart's `asgi_app`); see the module docstring."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.closed_unread = 0  # responses that closed their connection over an unread body

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        body = BodyProgress(declared_length(scope), self.max_body_bytes)

        async def guarded_receive() -> Message:
            message = await receive()
            body.note(message)
            return message

        async def guarded_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "http.response.start":
                await self._settle(scope, body, message)
            if kind == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):  # Hypercorn's close/recycle runs in here
                    await send(message)
                return
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    async def _settle(
        self, scope: MutableMapping[str, Any], body: BodyProgress, message: Message
    ) -> None:
        """Before the status line: drain the unread body, or mark the connection to close."""
        if not body.settled.is_set():
            with trio.move_on_after(self.body_timeout_s):
                await body.settled.wait()
        if body.complete and not body.too_large():
            return
        headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"]
        message["headers"] = [*headers, (b"connection", b"close")]
        self.closed_unread += 1
        log.debug(
            "%s %s: body not read (%d bytes arrived); closing the connection after the answer",
            scope.get("method"),
            scope.get("path"),
            body.received,
        )
