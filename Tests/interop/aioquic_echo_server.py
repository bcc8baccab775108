"""An aioquic QUIC echo server for HolePunch's interop tests.

It generates its own P-256 certificate (with `cryptography`, not GnuTLS), binds 127.0.0.1 on an ephemeral port,
requires a client certificate pinned to `--expect-client`, and echoes every bidirectional stream back, finishing
it when the client finishes.

Protocol on stdout (one line each, flushed):
  READY port=<port> nodeid=<base32 NodeID of this server>
  VERIFIED client nodeid=<...>       after the client's certificate matched the pin
  REJECTED client ...                when it did not (the handshake then fails with bad_certificate)
  ECHOED stream=<id> bytes=<n>       when a stream's echo is complete
The process runs until it is terminated, or `--lifetime` seconds pass (a guard against leaked processes).
"""

from __future__ import annotations

import argparse
import asyncio

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

import hp_interop


class EchoProtocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._echoed: dict[int, int] = {}

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data, end_stream=event.end_stream)
            total = self._echoed.get(event.stream_id, 0) + len(event.data)
            self._echoed[event.stream_id] = total
            if event.end_stream:
                hp_interop.say(f"ECHOED stream={event.stream_id} bytes={total}")
            self.transmit()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-client", required=True, help="the client's NodeID (base32 or hex)")
    parser.add_argument("--alpn", default=hp_interop.ALPN, help="the protocol to accept; empty negotiates none")
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args()

    hp_interop.install_pinning(hp_interop.parse_node_id(args.expect_client))
    key, certificate = hp_interop.generate_identity("aioquic-echo-server")
    # An empty --alpn negotiates no protocol at all: a peer QUIC must refuse (RFC 9001 section 8.1).
    configuration = QuicConfiguration(is_client=False, alpn_protocols=[args.alpn] if args.alpn else None)
    configuration.certificate = certificate
    configuration.private_key = key

    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=configuration, create_protocol=EchoProtocol),
        sock=hp_interop.loopback_udp_socket(),
    )
    port = transport.get_extra_info("sockname")[1]
    node_id = hp_interop.node_id_text(hp_interop.node_id_bytes(certificate))
    hp_interop.say(f"READY port={port} nodeid={node_id}")
    try:
        await asyncio.sleep(args.lifetime)
    finally:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
