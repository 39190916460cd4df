"""A small LLM-like API over real HTTPS on 127.0.0.1, for the SDK egress tests.

``POST /v1/generate`` answers with a reply and the token usage a provider
would bill; ``POST /v1/moved?to=URL`` redirects (307) to URL. Every
request's method, path and headers are kept, so a test can see what really
went over the wire. The certificate is self-signed for the
IP address 127.0.0.1 and written next to its key, so a client trusts it by
passing the certificate's path as its CA bundle.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LlmApi", "ReceivedRequest", "https_llm_api", "self_signed_for_ip"]

HOST = "127.0.0.1"

#: What every generate call reports, as a provider's usage block does.
USAGE = {"input_tokens": 5_200, "output_tokens": 730, "cached_input_tokens": 1_200}


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class LlmApi:
    """The running server: where it is, how to trust it, what it received."""

    base_url: str
    ca_path: Path
    key_path: Path
    received: list[ReceivedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return HOST

    def requests(self) -> list[ReceivedRequest]:
        with self.lock:
            return list(self.received)

    def forget(self) -> None:
        with self.lock:
            self.received.clear()


def self_signed_for_ip(folder: Path, ip: str = HOST) -> tuple[Path, Path]:
    """Write a self-signed certificate for ``ip`` and its key; (cert, key) paths.

    The certificate is its own CA (so it can be the client's trust anchor)
    and names the IP in subjectAltName, which is what hostname checks read.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    cert_path = folder / "api-cert.pem"
    key_path = folder / "api-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    return cert_path, key_path


def _handler_for(api: LlmApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            with api.lock:
                api.received.append(
                    ReceivedRequest(
                        method="POST",
                        path=self.path,
                        headers=dict(self.headers.items()),
                        body=body,
                    )
                )

            if self.path.startswith("/v1/moved?to="):
                self.send_response(307)
                self.send_header("Location", unquote(self.path.split("=", 1)[1]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return

            if self.path != "/v1/generate":
                self._answer(404, {"error": f"no route {self.path}"})
                return

            prompt = json.loads(body or b"{}").get("prompt", "")
            self._answer(200, {"reply": f"summary of {prompt}", "usage": USAGE})

        def _answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet: the test reads ``api.received``, not stderr.
            return

    return Handler


@contextmanager
def https_llm_api(
    folder: Path, certificate: tuple[Path, Path] | None = None
) -> Iterator[LlmApi]:
    """Serve the API over TLS on a free port of 127.0.0.1 until the block ends.

    ``certificate`` (cert, key) reuses another server's certificate, so a
    client that trusts one trusts both: a second origin on the same IP.
    """
    cert_path, key_path = certificate or self_signed_for_ip(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)

    api = LlmApi(base_url="", ca_path=cert_path, key_path=key_path)
    server = ThreadingHTTPServer((HOST, 0), _handler_for(api))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    api.base_url = f"https://{HOST}:{port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
