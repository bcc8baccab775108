"""An aioquic QUIC echo client for HolePunch's interop tests.

It generates its own P-256 certificate and announces its NodeID first, so the Swift side can bind a server whose
accept policy allows exactly this client. Then it waits for the server's port and NodeID on stdin, dials
127.0.0.1:<port> presenting the certificate, pins the server's certificate to the given NodeID, sends `--bytes`
random bytes on one bidirectional stream, finishes it, and checks that the echo matches (SHA-256).

Protocol:
  stdout  IDENTITY nodeid=<base32 NodeID of this client>
  stdin   CONNECT <port> <server NodeID>
  stdout  VERIFIED server nodeid=<...>   (or REJECTED server ... and a non-zero exit)
  stdout  ECHO ok bytes=<n> sha256=<hex>  then exit 0; any failure prints ERROR <why> and exits 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import ssl
import sys

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

import hp_interop


async def echo(port: int, server_node_id: str, alpn: str, size: int, key, certificate) -> None:
    hp_interop.install_pinning(hp_interop.parse_node_id(server_node_id))
    # Chain validation is off because HolePunch certificates are self-signed; the NodeID pin replaces it.
    # An empty --alpn sends no ALPN extension at all: a peer QUIC must refuse (RFC 9001 section 8.1).
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[alpn] if alpn else None, verify_mode=ssl.CERT_NONE)
    configuration.certificate = certificate
    configuration.private_key = key
    connection = QuicConnection(configuration=configuration)

    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(connection), sock=hp_interop.loopback_udp_socket()
    )
    try:
        protocol.connect(("127.0.0.1", port))
        await protocol.wait_connected()
        reader, writer = await protocol.create_stream()
        payload = os.urandom(size)
        writer.write(payload)
        writer.write_eof()
        reply = await reader.read()
        if reply != payload:
            hp_interop.fail(f"echo mismatch: sent {len(payload)} bytes, got {len(reply)} back")
        hp_interop.say(f"ECHO ok bytes={len(reply)} sha256={hashlib.sha256(reply).hexdigest()}")
    finally:
        protocol.close()
        await protocol.wait_closed()
        transport.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpn", default=hp_interop.ALPN, help="the protocol to offer; empty offers none")
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    key, certificate = hp_interop.generate_identity("aioquic-echo-client")
    hp_interop.say(f"IDENTITY nodeid={hp_interop.node_id_text(hp_interop.node_id_bytes(certificate))}")
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    parts = line.split()
    if len(parts) != 3 or parts[0] != "CONNECT":
        hp_interop.fail(f"expected 'CONNECT <port> <nodeid>' on stdin, got {line!r}")
    try:
        await asyncio.wait_for(
            echo(int(parts[1]), parts[2], args.alpn, args.bytes, key, certificate), timeout=args.timeout
        )
    except asyncio.TimeoutError:
        hp_interop.fail(f"no complete echo within {args.timeout} s")
    except ConnectionError as error:
        hp_interop.fail(f"connection failed: {error!r}")


if __name__ == "__main__":
    asyncio.run(main())
