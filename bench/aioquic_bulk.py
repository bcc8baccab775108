"""aioquic bulk sender/receiver and handshake loop for `holepunch bench quic --compare`.

server:  binds 127.0.0.1 on an ephemeral port, prints `READY port=<p>`, then for every connection counts the bytes
         of each bidirectional stream and, at the stream's end, answers with the count (ASCII) and finishes.
client:  `--bytes N` sends N bytes on one stream, finishes it, and waits for the server's count; or
         `--handshakes N` dials N times in a row (handshake, then close). Either way it prints one line
         `RESULT {json}` with the bytes, the count and the seconds measured, then exits.

Both sides use a self-signed P-256 certificate and no chain validation: this measures transport, not PKI.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import signal
import socket
import ssl
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

ALPN = "holepunch-bench"

# Children inherit the spawning thread's signal mask; Swift may spawn us with SIGTERM blocked.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def identity():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aioquic-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class CountingProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._counts: dict[int, int] = {}

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            total = self._counts.get(event.stream_id, 0) + len(event.data)
            self._counts[event.stream_id] = total
            if event.end_stream:
                self._quic.send_stream_data(event.stream_id, str(total).encode(), end_stream=True)
                self.transmit()


async def serve(lifetime: float) -> None:
    key, cert = identity()
    configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    configuration.certificate = cert
    configuration.private_key = key
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=CountingProtocol), sock=loopback_socket()
    )
    print(f"READY port={transport.get_extra_info('sockname')[1]}", flush=True)
    try:
        await asyncio.sleep(lifetime)
    finally:
        server.close()


async def dial(port: int):
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    connection = QuicConnection(configuration=configuration)
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: QuicConnectionProtocol(connection), sock=loopback_socket()
    )
    protocol.connect(("127.0.0.1", port))
    await protocol.wait_connected()
    return transport, protocol


async def hang_up(transport, protocol) -> None:
    protocol.close()
    await protocol.wait_closed()
    transport.close()


async def bulk(port: int, size: int) -> dict:
    transport, protocol = await dial(port)
    try:
        reader, writer = await protocol.create_stream()
        chunk = bytes(256 * 1024)
        start = time.perf_counter()
        sent = 0
        while sent < size:
            piece = chunk if size - sent >= len(chunk) else chunk[: size - sent]
            writer.write(piece)
            sent += len(piece)
            # aioquic buffers without limit; draining per chunk keeps memory flat and lets packets go out.
            await writer.drain()
        writer.write_eof()
        reply = await reader.read()
        seconds = time.perf_counter() - start
        if int(reply or b"-1") != size:
            raise RuntimeError(f"server counted {reply!r}, sent {size}")
        return {"bytes": size, "seconds": seconds}
    finally:
        await hang_up(transport, protocol)


async def handshakes(port: int, count: int) -> dict:
    start = time.perf_counter()
    for _ in range(count):
        transport, protocol = await dial(port)
        # Send CONNECTION_CLOSE but do not sit out the draining period (3 PTO), as HolePunch's close() does not.
        protocol.close()
        transport.close()
    return {"handshakes": count, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--bytes", type=int)
    parser.add_argument("--handshakes", type=int)
    parser.add_argument("--lifetime", type=float, default=600.0)
    args = parser.parse_args()
    if args.mode == "server":
        asyncio.run(serve(args.lifetime))
        return
    if args.port is None or (args.bytes is None) == (args.handshakes is None):
        sys.exit("client needs --port and exactly one of --bytes, --handshakes")
    work = bulk(args.port, args.bytes) if args.bytes is not None else handshakes(args.port, args.handshakes)
    print("RESULT " + json.dumps(asyncio.run(work)), flush=True)


if __name__ == "__main__":
    main()
