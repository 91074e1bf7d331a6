"""Pace a stream by how fast its client reads: the peer's TCP receive window.

A client that stops reading is invisible to the app for as long as the kernel buffers absorb
its events (its receive buffer plus our send buffer: hundreds of events), and meanwhile its
sequence decodes in every batch, slowing every other stream. The peer's window says it at once:
while a client reads, the right edge of the window it advertises (`bytes_acked + snd_wnd`)
advances with the data it acknowledges; when it stops, the edge freezes and the gap grows.

`Pacer` polls that gap for every stream (Linux `sock_diag` netlink, looked up by the connection's
4-tuple from the ASGI scope, so it needs nothing from Hypercorn). Past `--stream_pause_bytes`
unread bytes the sequence is held out of the decode batch (its KV kept); it is let go when the
client reads again, and probed with one more token at growing intervals (a window reopening
by less than half is announced only with the next ACK). A client that reads nothing for
`--stream_stall_s` gets its request aborted. Where the lookup fails (no netlink, a Unix socket,
a kernel without `tcpi_snd_wnd`) pacing is off and the `--stream_buffer_events` bound remains.
Behind a buffering proxy the window is the proxy's: the bound still holds.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

POLL_S = 0.02  # how often a stream's window is read
PROBE_FIRST_S = 0.1  # a held stream is let go for one token after this, doubling ...
PROBE_MAX_S = 2.0  # ... up to this
HELD_POLL_S = 0.1  # a held stream's window is read this often (its client may read again)

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_INFO = 2
_TCP_ESTABLISHED = 1
_SENDING_STATES = (_TCP_ESTABLISHED, 8)  # and CLOSE_WAIT: the client half-closed, still reads
_REQ = struct.Struct("=IHHII BBBBI HH16s16sI II")  # nlmsghdr + inet_diag_req_v2
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_MSG_BYTES = 72  # struct inet_diag_msg
_BYTES_ACKED_AT = 120  # struct tcp_info: u64 tcpi_bytes_acked
_SND_WND_AT = 228  # struct tcp_info: u32 tcpi_snd_wnd (Linux >= 6.2)


@dataclass(frozen=True)
class TcpConn:
    """One accepted TCP connection: our (host, port) and the client's."""

    family: int
    local_ip: bytes  # 16 bytes, zero-padded for IPv4
    local_port: int
    peer_ip: bytes
    peer_port: int


def tcp_conn(scope: Mapping[str, Any]) -> TcpConn | None:
    """The connection of an ASGI HTTP scope, or None (a Unix socket, no addresses)."""
    server, client = scope.get("server"), scope.get("client")
    if not server or not client or server[1] is None or client[1] is None:
        return None
    try:
        local, peer = ipaddress.ip_address(server[0]), ipaddress.ip_address(client[0])
    except ValueError:
        return None
    if local.version != peer.version:
        return None
    family = socket.AF_INET if local.version == 4 else socket.AF_INET6
    return TcpConn(
        family, local.packed.ljust(16, b"\0"), int(server[1]), peer.packed.ljust(16, b"\0"),
        int(client[1]),
    )  # fmt: skip


class SockDiag:
    """`(bytes_acked, snd_wnd)` of our end of a TCP connection, through one netlink socket."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self.broken = False  # the kernel or the sandbox refused: pacing is off

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def window(self, conn: TcpConn) -> tuple[int, int] | None:
        """The connection's acknowledged bytes and the peer's window; None if it is gone."""
        if self.broken:
            return None
        try:
            sock = self._socket()
            self._seq += 1
            req = _REQ.pack(
                _REQ.size, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, self._seq, 0,
                conn.family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 0,
                1 << _TCP_ESTABLISHED,
                socket.htons(conn.local_port), socket.htons(conn.peer_port),
                conn.local_ip, conn.peer_ip, 0, 0xFFFFFFFF, 0xFFFFFFFF,
            )  # fmt: skip
            sock.send(req)
            reply = sock.recv(4096)
        except OSError:
            self.broken = True
            return None
        return self._parse(reply)

    def _parse(self, reply: bytes) -> tuple[int, int] | None:
        """The tcp_info figures out of one inet_diag_msg reply (None: no such socket)."""
        if len(reply) < _NLMSG_HDR.size:
            return None
        length, kind = _NLMSG_HDR.unpack_from(reply)[:2]
        if kind == _NLMSG_ERROR or len(reply) < _NLMSG_HDR.size + _DIAG_MSG_BYTES:
            return None
        state = reply[_NLMSG_HDR.size + 1]
        if state not in _SENDING_STATES:  # e.g. the listener, which a missed lookup returns
            return None
        at = _NLMSG_HDR.size + _DIAG_MSG_BYTES
        while at + 4 <= min(length, len(reply)):
            rta_len, rta_type = struct.unpack_from("=HH", reply, at)
            if rta_len < 4:
                return None
            if rta_type == _INET_DIAG_INFO:
                info = reply[at + 4 : at + rta_len]
                if len(info) < _SND_WND_AT + 4:
                    self.broken = True  # this kernel has no tcpi_snd_wnd
                    return None
                acked = struct.unpack_from("=Q", info, _BYTES_ACKED_AT)[0]
                return acked, struct.unpack_from("=I", info, _SND_WND_AT)[0]
            at += (rta_len + 3) & ~3
        return None

    def close(self) -> None:
        """Close the netlink socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ReadLag:
    """Bytes the client was sent and acknowledged but has not read (from the window edge)."""

    def __init__(self) -> None:
        self._base: tuple[int, int] | None = None  # (bytes_acked, right edge) when caught up

    def update(self, acked: int, window: int) -> int:
        """The lag after one reading of the connection's figures."""
        edge = acked + window
        if self._base is None:
            self._base = (acked, edge)
            return 0
        lag = (acked - self._base[0]) - (edge - self._base[1])
        if lag <= 0:  # the edge moved at least as far as the data: the client reads
            self._base = (acked, edge)
            return 0
        return lag


@dataclass(eq=False)
class Watched:
    """One stream under watch: its connection, its switch, and where its client stands."""

    conn: TcpConn
    hold: Callable[[bool], None]  # hold the request out of the decode batch, or let it go
    on_stall: Callable[[], None]  # abort it: the client read nothing for --stream_stall_s
    lag: ReadLag = field(default_factory=ReadLag)
    held: bool = False
    held_at: float = 0.0
    probe_s: float = PROBE_FIRST_S
    stalled_at: float = 0.0  # since when it lags without reading (0: it does not lag)
    last_behind: int = 0

    def update(self, behind: int, pause_bytes: int, stall_s: float, now: float) -> None:
        """One reading: hold, let go, probe or give up."""
        if behind <= pause_bytes // (2 if self.held else 1):
            self.stalled_at, self.probe_s, self.last_behind = 0.0, PROBE_FIRST_S, 0
            if self.held:
                self._set(False)
            return
        if behind < self.last_behind or not self.stalled_at:  # it read something
            self.stalled_at = now
        self.last_behind = behind
        if now - self.stalled_at >= stall_s:
            self.on_stall()
        elif not self.held:
            self.held_at = now
            self._set(True)
        elif now - self.held_at >= self.probe_s:  # one more token: its ACK brings the window
            self.probe_s = min(2 * self.probe_s, PROBE_MAX_S)
            self._set(False)

    def _set(self, held: bool) -> None:
        self.held = held
        self.hold(held)


class Pacer:
    """Every paced stream, read by one task (`run`, in the app's nursery) every `POLL_S`: one
    wake-up for all, since the Trio thread shares two cores and the GIL with the engine."""

    def __init__(self, pause_bytes: int, stall_s: float, diag: SockDiag | None = None) -> None:
        self.pause_bytes, self.stall_s = pause_bytes, stall_s
        self.diag = diag or SockDiag()
        self._watched: dict[int, Watched] = {}

    @property
    def enabled(self) -> bool:
        return self.pause_bytes > 0 and not self.diag.broken

    def watch(self, entry: Watched) -> None:
        """Start pacing a stream (until `unwatch`)."""
        self._watched[id(entry)] = entry

    def unwatch(self, entry: Watched) -> None:
        """Stop pacing a stream; a held one is let go."""
        if self._watched.pop(id(entry), None) is not None and entry.held:
            entry._set(False)

    def poll(self) -> None:
        """Read every watched connection once."""
        now = trio.current_time()
        for entry in list(self._watched.values()):
            if entry.held and now - entry.held_at < min(entry.probe_s, HELD_POLL_S):
                continue  # held: nothing is sent, so there is little to see
            figures = self.diag.window(entry.conn)
            if figures is None:  # gone, or unreadable: the buffer bound remains
                self.unwatch(entry)
                continue
            behind = entry.lag.update(*figures)
            if figures[1] == 0:  # a closed window: behind past any bound
                behind = max(behind, self.pause_bytes + 1)
            entry.update(behind, self.pause_bytes, self.stall_s, now)
            if now - entry.stalled_at >= self.stall_s and entry.stalled_at:
                self.unwatch(entry)

    async def run(self) -> None:
        """Poll until cancelled."""
        try:
            while True:
                await trio.sleep(POLL_S)
                self.poll()
        finally:
            self.diag.close()
