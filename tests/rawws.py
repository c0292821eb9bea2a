"""A tiny raw WebSocket client for tests that must misbehave or stop reading.

It does the HTTP/1.1 upgrade by hand, sends frames with any opcode / FIN / RSV / mask flags and
parses the server's frames. Nothing is automatic: it never answers pings and never replies to a
close frame unless told to, so a test sees exactly what the server put on the wire.

>>> client = await RawWebSocket.connect(srv.port)
>>> await client.send_frame(OP_TEXT, b"hi")
>>> frame = await client.recv_frame()
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from brioche import MessageBackpressured, MessageDropped

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` (RFC 6455 section 5.3); fast for large payloads."""
    if not payload:
        return b""
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    mask_key: bytes | None = None,
) -> bytes:
    """One frame on the wire. ``rsv`` is the 3 reserved bits as an int 0..7 (RSV1 is 4)."""
    assert 0 <= opcode <= 0xF and 0 <= rsv <= 7
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n <= 0xFFFF:
        head.append(mask_bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack(">Q", n)
    if not mask:
        return bytes(head) + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return bytes(head) + key + mask_payload(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack(">H", code) + reason.encode()


@dataclasses.dataclass(frozen=True)
class Frame:
    """A frame as the server sent it."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The code of a close frame (None for an empty close payload)."""
        assert self.opcode == OP_CLOSE, f"not a close frame: {self}"
        if len(self.payload) < 2:
            return None
        return int(struct.unpack(">H", self.payload[:2])[0])

    @property
    def close_reason(self) -> str:
        assert self.opcode == OP_CLOSE, f"not a close frame: {self}"
        return self.payload[2:].decode()

    def __repr__(self) -> str:
        shown = self.payload if len(self.payload) <= 40 else self.payload[:40] + b"..."
        return (f"Frame(op={self.opcode:#x}, fin={self.fin}, rsv={self.rsv}, masked={self.masked}, "
                f"len={len(self.payload)}, payload={shown!r})")


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split server bytes into complete frames and the incomplete tail (if the stream was cut)."""
    frames: list[Frame] = []
    pos = 0
    while True:
        if len(data) - pos < 2:
            break
        b0, b1 = data[pos], data[pos + 1]
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if len(data) - pos < 4:
                break
            (n,) = struct.unpack_from(">H", data, pos + 2)
            head = 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            (n,) = struct.unpack_from(">Q", data, pos + 2)
            head = 10
        masked = bool(b1 & 0x80)
        if masked:
            head += 4
        if len(data) - pos < head + n:
            break
        payload = data[pos + head:pos + head + n]
        if masked:
            payload = mask_payload(payload, data[pos + head - 4:pos + head])
        frames.append(Frame(fin=bool(b0 & 0x80), rsv=(b0 >> 4) & 7, opcode=b0 & 0x0F, masked=masked,
                            payload=payload))
        pos += head + n
    return frames, data[pos:]


class ConnectionEnded(Exception):
    """The server ended the TCP connection (EOF or reset) while a frame was expected."""

    def __init__(self, partial: bytes, how: str) -> None:
        super().__init__(f"connection ended ({how}) with {len(partial)} bytes of a partial frame")
        self.partial = partial
        self.how = how


def _check_upgrade_response(head: bytes, key: bytes) -> None:
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        raise AssertionError(f"upgrade refused: {head!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise AssertionError(f"bad Sec-WebSocket-Accept in {head!r}")


class RawWebSocket:
    """A client connection after a successful handshake to ``/ws``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # The server's 101, head only: what a test checks of the negotiation.
        self.response_head = b""

    @property
    def local_port(self) -> int:
        """This client's own port: what the server's log lines name it by, after its IP."""
        port: int = self.writer.get_extra_info("sockname")[1]
        return port

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/ws",
        *,
        rcvbuf: int | None = None,
        limit: int = 2**16,
        timeout: float = 5.0,
        headers: Iterable[tuple[str, str]] = (),
    ) -> RawWebSocket:
        """Connect to 127.0.0.1:``port`` and upgrade ``path``.

        ``rcvbuf`` sets SO_RCVBUF before connecting (so the TCP window is small from the start);
        with :meth:`pause_reading` the kernel buffers then fill after a few KiB. ``limit`` is the
        StreamReader's buffer limit (it also stops reading once it holds ``2 * limit`` bytes).
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # A frame written in two pieces must not wait for the server's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._handshake(path, headers), timeout)
        except BaseException:
            writer.close()
            raise
        return client

    async def _handshake(self, path: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        key = base64.b64encode(os.urandom(16))
        self.writer.write(upgrade_request(path, key, headers))
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        _check_upgrade_response(head, key)
        self.response_head = head

    # -- sending ----------------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(
        self,
        opcode: int,
        payload: bytes = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
    ) -> None:
        await self.send_raw(encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask))

    async def send_text(self, text: str) -> None:
        await self.send_frame(OP_TEXT, text.encode())

    async def send_bytes(self, data: bytes) -> None:
        await self.send_frame(OP_BINARY, data)

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        await self.send_frame(OP_CLOSE, close_payload(code, reason))

    # -- receiving --------------------------------------------------------------------------

    async def _read_exactly(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionEnded(exc.partial, "eof") from None
        except ConnectionResetError:
            raise ConnectionEnded(b"", "reset") from None

    async def _recv_frame(self) -> Frame:
        b0, b1 = await self._read_exactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", await self._read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", await self._read_exactly(8))
        masked = bool(b1 & 0x80)
        key = await self._read_exactly(4) if masked else b""
        payload = await self._read_exactly(n) if n else b""
        if masked:
            payload = mask_payload(payload, key)
        return Frame(fin=bool(b0 & 0x80), rsv=(b0 >> 4) & 7, opcode=b0 & 0x0F, masked=masked,
                     payload=payload)

    async def recv_frame(self, timeout: float = 5.0) -> Frame:
        """The next frame, whatever its opcode. Raises ConnectionEnded on EOF/reset."""
        return await asyncio.wait_for(self._recv_frame(), timeout)

    async def recv_data_frame(self, timeout: float = 5.0) -> Frame:
        """The next frame that is not a ping or pong."""
        async def loop() -> Frame:
            for _ in range(10_000):
                frame = await self._recv_frame()
                if frame.opcode not in (OP_PING, OP_PONG):
                    return frame
            raise AssertionError("10,000 control frames in a row")

        return await asyncio.wait_for(loop(), timeout)

    async def frames_until_end(self, timeout: float = 5.0, max_frames: int = 100_000) -> tuple[list[Frame], str]:
        """Every frame until the server ends the connection, and how it ended ("eof"/"reset").

        Raises AssertionError if the connection ends in the middle of a frame, TimeoutError if it
        has not ended within ``timeout``.
        """
        frames: list[Frame] = []

        async def loop() -> str:
            for _ in range(max_frames):
                try:
                    frames.append(await self._recv_frame())
                except ConnectionEnded as ended:
                    if ended.partial:
                        raise AssertionError(f"connection ended inside a frame: {ended}") from None
                    return ended.how
            raise AssertionError(f"more than {max_frames} frames before the end")

        how = await asyncio.wait_for(loop(), timeout)
        return frames, how

    async def expect_close_then_eof(self, timeout: float = 5.0) -> Frame:
        """Read frames until the end: the last one must be a close frame, then TCP EOF.

        Returns the close frame. Pings before it are allowed; any other frame is an error.
        """
        frames, how = await self.frames_until_end(timeout)
        assert how == "eof", f"connection was reset instead of closed after {frames}"
        non_ping = [f for f in frames if f.opcode != OP_PING]
        assert non_ping, f"connection ended ({how}) without a close frame"
        assert [f.opcode for f in non_ping] == [OP_CLOSE], f"expected only a close frame, got {non_ping}"
        return non_ping[0]

    def pause_reading(self) -> None:
        """Stop taking bytes from the kernel: its receive buffer fills and the TCP window closes."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        self.writer.transport.resume_reading()  # type: ignore[attr-defined]

    async def read_until_end(self, timeout: float = 5.0, max_bytes: int = 64 * 1024 * 1024) -> tuple[bytes, str]:
        """Every byte until the server ends the connection, and how it ended ("eof"/"reset")."""
        chunks: list[bytes] = []
        total = 0

        async def loop() -> str:
            nonlocal total
            while total <= max_bytes:
                try:
                    chunk = await self.reader.read(1 << 20)
                except ConnectionResetError:
                    return "reset"
                if not chunk:
                    return "eof"
                chunks.append(chunk)
                total += len(chunk)
            raise AssertionError(f"more than {max_bytes} bytes before the end")

        how = await asyncio.wait_for(loop(), timeout)
        return b"".join(chunks), how

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError):
            pass

    async def __aenter__(self) -> RawWebSocket:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def blocking_connect(port: int, path: str = "/ws", timeout: float = 5.0) -> socket.socket:
    """A blocking socket upgraded to a WebSocket, for a reader thread that must see each recv.

    An asyncio client shares the server's loop, so it only reads once the loop is free, by when
    several writes have merged in the kernel buffer; a thread blocked in recv() wakes at the
    first segment. Raises AssertionError if the upgrade is refused.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        finish_upgrade(sock, start_upgrade(sock, path))
    except BaseException:
        sock.close()
        raise
    return sock


def start_upgrade(sock: socket.socket, path: str = "/ws") -> bytes:
    """Send an upgrade request on a blocking socket; its key, for ``finish_upgrade``."""
    key = base64.b64encode(os.urandom(16))
    sock.sendall(upgrade_request(path, key))
    return key


def upgrade_request(path: str, key: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A WebSocket upgrade request for ``path`` with ``key`` (base64) and extra ``headers``."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers)
        + "\r\n"
    ).encode()


def finish_upgrade(sock: socket.socket, key: bytes) -> None:
    """Read the answer to ``start_upgrade``'s request and check it is the 101 for ``key``."""
    head = b""
    for _ in range(4096):  # one byte at a time: no frame byte after the head is consumed
        if head.endswith(b"\r\n\r\n"):
            break
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed during the upgrade: {head!r}")
        head += byte
    else:
        raise AssertionError(f"response head too long: {head[:200]!r}")
    _check_upgrade_response(head, key)


# -- a client socket's TCP state: FIN or reset --------------------------------------------------

# tcpi_state values (include/net/tcp_states.h): after the server's FIN the client's socket is in
# CLOSE_WAIT; after a reset, in CLOSE.
TCP_ESTABLISHED, TCP_CLOSE, TCP_CLOSE_WAIT = 1, 7, 8


def tcp_state(sock: socket.socket) -> int:
    state: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return state


def holders_of_server_end(port: int, client_port: int, pids: Iterable[int | str]) -> list[int | str]:
    """Which of ``pids`` (``"self"`` for this process) hold a descriptor on the server's end of
    the connection from ``client_port`` to 127.0.0.1:``port``: its inode in /proc/net/tcp, then
    each one's descriptor table. A socket closed with unsent data stays in the TCP table,
    orphaned, with inode 0 and no holder."""
    ends = f"0100007F:{port:04X} 0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as f:
        links = {f"socket:[{fields[9]}]" for fields in map(str.split, f)
                 if " ".join(fields[1:3]) == ends and fields[9] != "0"}
    holders: list[int | str] = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in links:
                    holders.append(pid)
                    break
            except OSError:  # a descriptor closed meanwhile
                pass
    return holders


def read_until_eof(sock: socket.socket, timeout: float = 5) -> bytes:
    """In a thread: every byte until the server's FIN."""
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    for _ in range(10_000):
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise AssertionError("more than 10,000 reads")


# -- server-side helpers for tests that stall a client -------------------------------------------


def unread_by_server(port: int) -> int:
    """Bytes the established connections to ``port`` hold that the server has not read yet
    (the receive queues of /proc/net/tcp)."""
    unread = 0
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
                unread += int(fields[4].split(":")[1], 16)
    return unread


async def loop_turns(count: int) -> None:
    """Let the loop run ``count`` turns: what was due a turn or two away has run by then."""
    for _ in range(count):
        await asyncio.sleep(0)


async def poll_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Check ``predicate`` every millisecond for up to ``timeout`` seconds; whether it held.

    Only for state that has no event to wait on (``ws.buffered_amount``); never raises.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    for _ in range(int(timeout * 1000) + 1):
        if predicate():
            return True
        if asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.001)
    return predicate()


@dataclasses.dataclass(frozen=True)
class SendRecord:
    index: int
    status: object
    buffered_before: int


async def fill(
    ws: Any,
    messages: Iterable[bytes],
    *,
    records: list[SendRecord] | None = None,
    stop_when: Callable[[object], bool] | None = None,
    pace_timeout: float = 0.3,
) -> list[SendRecord]:
    """``ws.send_bytes`` each message to a client that is not reading, recording every status.

    Stops early after the first status for which ``stop_when(status)`` is true. ``records`` (if
    given) is appended to as the loop goes, so other handlers can see its progress.

    The writer runs on another thread, so a tight loop could push past the backpressure limit
    before the writer has even tried (and got EAGAIN): every status would be Sent then Dropped.
    So while sends report Sent, each one waits until the writer has handed everything to the
    kernel (``buffered_amount == 0``); the send whose write the kernel refuses never gets there,
    and the next status is Backpressured. From then on the loop does not pause.
    """
    if records is None:
        records = []
    congested = False
    for i, message in enumerate(messages):
        before = ws.buffered_amount
        status = ws.send_bytes(message)
        records.append(SendRecord(i, status, before))
        if stop_when is not None and stop_when(status):
            break
        if isinstance(status, MessageBackpressured):
            congested = True
        elif not congested and not isinstance(status, MessageDropped):
            await poll_until(lambda: ws.buffered_amount == 0, pace_timeout)
    return records


def numbered(i: int, size: int) -> bytes:
    """A binary message that says which one it is: a 4-byte sequence number, then a pattern."""
    return struct.pack(">I", i) + bytes([(i * 7 + 1) % 256]) * (size - 4)
