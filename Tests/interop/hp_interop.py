"""Shared helpers for the aioquic interop peers used by HolePunch's Swift tests.

HolePunch identifies a peer by its NodeID: SHA-256 over the DER SubjectPublicKeyInfo of the peer's certificate,
printed as lowercase base32 without padding (64 hex digits are accepted too). This module computes it
independently of the Swift code, so the tests also check that both sides agree on the definition.

aioquic has no public switch for mutual TLS on the server side, nor a hook to pin a peer's key, so
`install_pinning` subclasses `aioquic.tls.Context` (the only seam there is) and relies on three of its private
members: `_request_client_certificate`, `_peer_certificate` and the `_server_handle_finished` /
`_client_handle_certificate_verify` steps. They are stable across aioquic 1.x; the pinned version is 1.7.2.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import signal
import socket
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aioquic import tls

ALPN = "holepunch/1"

# A child inherits the signal mask of the thread that spawned it. Swift's Foundation `Process` spawns from threads
# that block SIGTERM, so without this the test's `terminate()` would go unnoticed until `--lifetime` ran out.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def say(line: str) -> None:
    """One protocol line on stdout, flushed at once: the Swift side waits for these."""
    print(line, flush=True)


def generate_identity(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a self-signed certificate, built with `cryptography` rather than GnuTLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def node_id_bytes(certificate: x509.Certificate) -> bytes:
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def node_id_text(digest: bytes) -> str:
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def parse_node_id(text: str) -> bytes:
    """Parses a NodeID given as 52 base32 characters or 64 hex digits."""
    text = text.strip()
    if len(text) == 64:
        return bytes.fromhex(text)
    if len(text) != 52:
        raise ValueError(f"a NodeID is 52 base32 characters or 64 hex digits, got {len(text)} characters")
    padded = text.upper() + "=" * 4  # 52 characters encode 32 bytes; base32 pads to a multiple of 8
    digest = base64.b32decode(padded)
    if len(digest) != 32:
        raise ValueError("not a 32-byte NodeID")
    return digest


class _Pins:
    """What the pinned TLS context checks; set once per process by `install_pinning`."""

    expected_peer: bytes | None = None


def install_pinning(expected_peer: bytes | None) -> None:
    """Makes every aioquic TLS context (client and server) pin the peer's NodeID.

    The server side also requests a client certificate and refuses a handshake without one.
    `expected_peer` None means "log the peer's NodeID but accept anyone".
    """
    _Pins.expected_peer = expected_peer
    if getattr(tls.Context, "_holepunch_pinned", False):
        return
    base = tls.Context

    class PinnedContext(base):  # type: ignore[misc, valid-type]
        _holepunch_pinned = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not kwargs.get("is_client", True):
                self._request_client_certificate = True

        def _check_pin(self, role: str) -> None:
            certificate = self._peer_certificate
            if certificate is None:
                say(f"REJECTED {role} reason=no-certificate")
                raise tls.AlertBadCertificate("the peer presented no certificate")
            received = node_id_bytes(certificate)
            expected = _Pins.expected_peer
            if expected is not None and received != expected:
                say(f"REJECTED {role} received={node_id_text(received)} expected={node_id_text(expected)}")
                raise tls.AlertBadCertificate("the peer's NodeID is not the pinned one")
            say(f"VERIFIED {role} nodeid={node_id_text(received)}")

        def _client_handle_certificate_verify(self, input_buf):
            # Signature over the transcript first (proves key possession), then the pin.
            super()._client_handle_certificate_verify(input_buf)
            self._check_pin("server")

        def _server_handle_finished(self, input_buf, output_buf):
            # A client may answer a CertificateRequest with an empty Certificate; aioquic would then carry on
            # unauthenticated, so the pin (and the presence of a certificate) is checked before Finished is accepted.
            self._check_pin("client")
            super()._server_handle_finished(input_buf, output_buf)

    tls.Context = PinnedContext


def loopback_udp_socket() -> socket.socket:
    """A UDP socket on 127.0.0.1 with an ephemeral port: the tests never use any other address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def fail(message: str) -> "NoReturn":  # noqa: F821
    say(f"ERROR {message}")
    sys.exit(1)
