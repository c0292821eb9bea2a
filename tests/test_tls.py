"""TLS: ``server.tls(cert_file, key_file)`` serves ``https://`` and ``wss://`` to real clients.

Certificates are made here with trustme (a CA per test, a server certificate it signs); the
clients trust that CA and nothing else, so a connection that succeeds proves the server
presented the chain it was given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import brioche
from brioche import server, websocket
from conftest import Recorder, ServeFn, free_port, log_lines, upgrade_ws_path
from rawws import poll_until
from test_demo_page import assert_demo_worked, demo_selftest_in_chromium
from test_node_client import run_node_echo_client

class Certs:
    """A CA and a server certificate for 127.0.0.1 it signs, as PEM files in ``directory``."""

    def __init__(self, directory: Path, name: str = "server") -> None:
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file = directory / f"{name}-chain.pem"
        self.key_file = directory / f"{name}-key.pem"
        self.leaf.private_key_pem.write_to_path(str(self.key_file))
        # The full chain: the leaf, then what leads to the root (here the root itself).
        chain = b"".join(blob.bytes() for blob in self.leaf.cert_chain_pems)
        self.cert_file.write_bytes(chain + self.ca.cert_pem.bytes())

    @property
    def files(self) -> tuple[str, str]:
        return str(self.cert_file), str(self.key_file)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


@pytest.fixture
def certs(tmp_dir: Path) -> Certs:
    return Certs(tmp_dir)


def wss_url(srv: brioche.Server[Any], path: str = "/ws") -> str:
    return f"wss://127.0.0.1:{srv.port}{path}"


def echo_config(recorder: Recorder | None = None) -> websocket.Config[Any]:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.send(text)

    def on_bytes(ws: brioche.WebSocket[Any], data: bytes) -> None:
        ws.send_bytes(data)

    def on_close(ws: brioche.WebSocket[Any], code: int, reason: str) -> None:
        if recorder is not None:
            recorder.add("close", code, reason)

    return websocket.init().on_text(on_text).on_bytes(on_bytes).on_close(on_close)


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_wss_echo_is_byte_exact_over_tls_1_2_and_1_3(
    serve: ServeFn, certs: Certs, recorder: Recorder, version: ssl.TLSVersion
) -> None:
    srv = await serve(echo_config(recorder), tls=certs.files)
    assert srv.url == f"https://127.0.0.1:{srv.port}/"
    context = certs.client_context()
    context.minimum_version = context.maximum_version = version
    large = bytes(range(256)) * 8192  # 2 MiB: many records, and the outbound queue's writev
    async with connect(wss_url(srv), ssl=context, max_size=None, open_timeout=5) as client:
        transport = client.transport
        assert transport.get_extra_info("ssl_object").version() == {
            ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"
        }[version]
        assert transport.get_extra_info("ssl_object").selected_alpn_protocol() is None
        for message in ["hello", "héllo wörld ✓ 🥐", "", "x" * 70000]:
            await client.send(message)
            assert await asyncio.wait_for(client.recv(), 5) == message
        await client.send(large)
        assert await asyncio.wait_for(client.recv(), 10) == large
        # A burst: the replies of one batch leave in one flush, many frames in few records.
        for i in range(500):
            await client.send(f"m{i}")
        assert [await asyncio.wait_for(client.recv(), 5) for _ in range(500)] == [f"m{i}" for i in range(500)]
        await client.close(4001, "bye")
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("close") == [(4001, "bye")]


async def test_https_request_negotiates_http_1_1_by_alpn(serve: ServeFn, certs: Certs) -> None:
    srv = await serve(echo_config(), tls=certs.files)
    context = certs.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, ssl=context)
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.write(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        response = await read_until_eof(reader)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nok")


async def test_the_server_closes_with_a_close_frame_and_close_notify(serve: ServeFn, certs: Certs) -> None:
    def on_text(ws: brioche.WebSocket[Any], text: str) -> None:
        ws.close(4010, "done: " + text)

    srv = await serve(websocket.init().on_text(on_text), tls=certs.files)
    async with connect(wss_url(srv), ssl=certs.client_context(), open_timeout=5) as client:
        await client.send("x")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(client.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4010, "done: x")


async def test_a_clients_close_notify_is_answered_with_the_servers(
    serve: ServeFn, certs: Certs, recorder: Recorder
) -> None:
    """RFC 8446 6.1: each side sends close_notify before it closes. A client that ends its
    TLS layer (``unwrap``) waits for the server's; before, the server closed without one and
    the client saw an unexpected EOF. The WebSocket still ends without a close frame: 1006."""
    srv = await serve(echo_config(recorder), tls=certs.files)
    context = certs.client_context()

    def open_then_unwrap() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as plain:
            tls = context.wrap_socket(plain, server_hostname="127.0.0.1")
            tls.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(4096)
                assert chunk, head
                head += chunk
            tls.unwrap()
            return head

    head = await asyncio.to_thread(open_then_unwrap)
    assert head.startswith(b"HTTP/1.1 101 ")
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("close") == [(1006, "")]


async def test_a_plain_http_request_to_the_tls_port_gets_a_plain_400_and_the_close(
    serve: ServeFn, certs: Certs
) -> None:
    srv = await serve(echo_config(), tls=certs.files)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        response = await read_until_eof(reader)
    finally:
        writer.close()
    assert response == (
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 50\r\n\r\nThis port speaks HTTPS: the request was plain HTTP"
    )
    assert srv.stats()["requests_rejected"] == 1


async def test_a_tls_client_on_a_plain_port_is_refused_with_a_plain_400(serve: ServeFn, certs: Certs) -> None:
    srv = await serve(echo_config())
    # The client's hello, as any TLS client sends it.
    hello = ssl.MemoryBIO()
    tls = certs.client_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(hello.read())
        response = await read_until_eof(reader)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    # And an ssl client sees a protocol error at once, not a hang.
    with pytest.raises(ssl.SSLError):
        await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", srv.port, ssl=certs.client_context()), 5
        )


async def test_a_stalled_handshake_is_dropped_at_handshake_timeout(
    serve: ServeFn, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropped at handshake_timeout, as a handshake that fails, counted in
    tls_handshakes_failed and logged at INFO on brioche.http. Each line says why, with rustls's
    reason when rustls refused: a client that does not trust the certificate (what a renewal
    gone wrong looks like) is told from garbage. Before, both read "refused by the TLS layer",
    and a client that gave up with an alert record read "not TLS"."""
    caplog.set_level(logging.INFO, logger="brioche.http")
    srv = await serve(echo_config(), tls=certs.files, handshake_timeout=0.5)
    loop = asyncio.get_running_loop()
    hello = ssl.MemoryBIO()
    tls = certs.client_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    partial = hello.read()[:20]
    garbage = b"\x16\x03\x01\x00\x05hello"  # a handshake record holding no ClientHello
    for sent in (b"", partial):  # silent after connecting; half a ClientHello
        # Timed from before the connect: the server's clock starts at its accept, and on a busy
        # machine open_connection may return here well after that (0.1 s after, once, on CI).
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(sent)
        try:
            assert await read_until_eof(reader) == b""
        finally:
            writer.close()
        assert 0.4 <= loop.time() - started < 5
    # Refused at once: a handshake record rustls rejects (it answers with an alert), and bytes
    # that are not TLS at all (dropped); a client that connects and closes is no failure.
    alert = b"\x15\x03\x01\x00\x02\x02\x28"  # a fatal handshake_failure alert, and nothing else
    for sent in (garbage, b"\x00not tls", alert):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(sent)
        try:
            await read_until_eof(reader)
        except ConnectionResetError:  # closed with what the client sent unread
            pass
        finally:
            writer.close()
    # A client that does not trust the certificate: it answers it with an alert (a blocking
    # socket writes it before raising), or hangs up (asyncio's may drop the alert unsent).
    def distrusting_client() -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1")

    await asyncio.to_thread(distrusting_client)
    # Half a ClientHello, then the end of the stream: a client gone mid-handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(partial)
    writer.write_eof()
    try:
        assert await read_until_eof(reader) == b""
    finally:
        writer.close()
    _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.close()
    # The server still serves.
    async with connect(wss_url(srv), ssl=certs.client_context(), open_timeout=5) as client:
        await client.send("after")
        assert await asyncio.wait_for(client.recv(), 5) == "after"
    # Counted as each ends; the lines reach `logging` through the loop.
    assert await poll_until(lambda: len(log_lines(caplog, "brioche.http")) >= 6, 5)
    assert srv.stats()["tls_handshakes_failed"] == 6
    lines = log_lines(caplog, "brioche.http")
    # In any order: each connection's end is logged from its own task, after the client may
    # already have seen it closed and the next connection begun.
    assert sorted(line.split(" failed: ")[1] for _, line in lines) == sorted([
        "not TLS",
        "not done within handshake_timeout",
        "refused by the TLS layer (received corrupt message of type HandshakePayloadTooLarge)",
        "refused by the TLS layer (received fatal alert: HandshakeFailure)",
        "refused by the TLS layer (received fatal alert: UnknownCA)",
        "the client closed the connection mid-handshake",
    ]), lines


async def test_unusable_certificates_are_a_brioche_error_at_serve(tmp_dir: Path, certs: Certs) -> None:
    other = Certs(tmp_dir, "other")
    encrypted = tmp_dir / "encrypted-key.pem"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.leaf.private_key_pem.bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    not_pem = tmp_dir / "not.pem"
    not_pem.write_text("hello\n")
    cases = [
        ((str(certs.cert_file), str(encrypted)), "is encrypted"),
        ((str(certs.cert_file), str(other.key_file)), "does not match the certificate"),
        ((str(tmp_dir / "missing.pem"), str(certs.key_file)), "cannot read the certificate file"),
        ((str(not_pem), str(certs.key_file)), "holds no certificate"),
        ((str(certs.cert_file), str(not_pem)), "holds no private key"),
    ]
    for files, message in cases:
        config = server.handler(upgrade_ws_path).hostname("127.0.0.1").port(0).tls(*files)
        with pytest.raises(brioche.BriocheError, match=message) as raised:
            await config.serve()
        assert not isinstance(raised.value, OSError)


async def test_tls_and_a_unix_socket_are_refused_together(tmp_dir: Path, certs: Certs) -> None:
    config = server.handler(upgrade_ws_path).unix(str(tmp_dir / "s.sock")).tls(*certs.files)
    with pytest.raises(ValueError, match="unix"):
        await config.serve()


async def test_reload_tls_swaps_the_certificate_for_new_connections_only(
    serve: ServeFn, tmp_dir: Path, certs: Certs
) -> None:
    srv = await serve(echo_config(), tls=certs.files)
    old_context = certs.client_context()
    async with connect(wss_url(srv), ssl=old_context, open_timeout=5) as before:
        renewed = Certs(tmp_dir, "renewed")
        os.replace(renewed.cert_file, certs.cert_file)
        os.replace(renewed.key_file, certs.key_file)
        srv.reload_tls()
        async with connect(wss_url(srv), ssl=renewed.client_context(), open_timeout=5) as after:
            await after.send("new")
            assert await asyncio.wait_for(after.recv(), 5) == "new"
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(wss_url(srv), ssl=old_context, open_timeout=5)
        # The connection made before keeps its session.
        await before.send("old")
        assert await asyncio.wait_for(before.recv(), 5) == "old"
        # A reload that fails keeps the certificate in use.
        certs.key_file.write_text("not a key\n")
        with pytest.raises(brioche.BriocheError, match="no private key"):
            srv.reload_tls()
        async with connect(wss_url(srv), ssl=renewed.client_context(), open_timeout=5) as again:
            await again.send("still")
            assert await asyncio.wait_for(again.recv(), 5) == "still"


async def test_reload_tls_without_tls_is_a_value_error(serve: ServeFn) -> None:
    srv = await serve(echo_config())
    with pytest.raises(ValueError, match="does not serve TLS"):
        srv.reload_tls()


RUN_SCRIPT = """
import logging
import sys
from brioche import server, websocket

def on_text(ws, text):
    ws.send(text)

def handler(request, srv):
    if request.path == "/ws":
        return server.upgrade(srv, request, [], None, server.bad_request)
    return server.text("ok")

logging.basicConfig(level=logging.INFO)
config = (server.handler(handler).websocket(websocket.init().on_text(on_text))
          .hostname("127.0.0.1").port(int(sys.argv[1])).tls(sys.argv[2], sys.argv[3]))
if __name__ == "__main__":
    config.run(workers=int(sys.argv[4]))
"""


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_under_run_reloads_the_certificate(tmp_dir: Path, certs: Certs, workers: int) -> None:
    port = free_port()
    script = tmp_dir / "app.py"
    script.write_text(RUN_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(port), *certs.files, str(workers),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    url = f"wss://127.0.0.1:{port}/ws"
    try:
        async def first_connection() -> None:
            for _ in range(200):
                try:
                    async with connect(url, ssl=certs.client_context(), open_timeout=5) as client:
                        await client.send("up")
                        assert await asyncio.wait_for(client.recv(), 5) == "up"
                        return
                except OSError:
                    await asyncio.sleep(0.05)  # polling for the port to open, bounded
            raise AssertionError("the server never listened")

        await asyncio.wait_for(first_connection(), 30)
        assert proc.stderr is not None
        if workers > 1:
            # Every worker has its certificate and its SIGHUP handler once the supervisor says
            # they all listen; a worker still starting would read the renewed files itself.
            for _ in range(1000):
                line = await asyncio.wait_for(proc.stderr.readline(), 30)
                assert line, "the server's stderr ended"
                if b"workers listening on port" in line:
                    break
            else:
                raise AssertionError("no 'workers listening' in the server's first 1,000 lines")
        renewed = Certs(tmp_dir, "renewed")
        os.replace(renewed.cert_file, certs.cert_file)
        os.replace(renewed.key_file, certs.key_file)
        proc.send_signal(signal.SIGHUP)
        reloaded = 0
        for _ in range(1000):  # each worker says so
            if reloaded == workers:
                break
            line = await asyncio.wait_for(proc.stderr.readline(), 10)
            assert line, "the server's stderr ended"
            reloaded += b"SIGHUP: TLS certificate reloaded" in line
        assert reloaded == workers
        # Under workers, several connections: the kernel spreads them over the workers.
        for i in range(4 * workers):
            async with connect(url, ssl=renewed.client_context(), open_timeout=5) as client:
                await client.send(f"renewed {i}")
                assert await asyncio.wait_for(client.recv(), 5) == f"renewed {i}"
    finally:
        proc.send_signal(signal.SIGINT)
        # communicate(), not wait(): it also reads both pipes to their end, so their transports
        # close before the test's loop does (on 3.10 one left open warned from its __del__).
        await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0


async def test_node_ws_client_over_wss(serve: ServeFn, certs: Certs, recorder: Recorder) -> None:
    srv = await serve(echo_config(recorder), tls=certs.files)
    ca_file = Path(certs.cert_file).parent / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca_file))
    # node trusts the test CA, and only for this process.
    result = await run_node_echo_client(wss_url(srv), {"NODE_EXTRA_CA_CERTS": str(ca_file)})
    assert result["close"]["code"] == 4002
    await recorder.wait_for(lambda: bool(recorder.of("close")), 5)
    assert recorder.of("close") == [(4002, "node bye")]


async def test_demo_page_over_https_and_wss_in_headless_chromium(serve: ServeFn, certs: Certs) -> None:
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    # Chromium trusts the test certificate's key, and only in this run: the hash of its SPKI.
    leaf = x509.load_pem_x509_certificate(certs.leaf.cert_chain_pems[0].bytes())
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    result = await demo_selftest_in_chromium(
        serve, "https", [f"--ignore-certificate-errors-spki-list={pin}"], tls=certs.files
    )
    assert_demo_worked(result)
