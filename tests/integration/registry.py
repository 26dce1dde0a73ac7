"""A real registry for tests: Debian's docker-registry on loopback, optionally behind htpasswd (basic) auth or
token auth served by a small token service in this process (ES256 JWTs, as the distribution spec describes).

Started and stopped by pid; storage lives in the test's temporary directory.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

USER, PASSWORD = "tester", "s3cret-pass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _tls_files(workdir: Path) -> bytes:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it; returns the CA certificate (PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmrkt test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (workdir / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM)


class TokenService:
    """Issues registry tokens to USER/PASSWORD (basic auth on the token request)."""

    def __init__(self, workdir: Path, service: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmrkt-test-token-issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256())
        )
        self.bundle = workdir / "token-root.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.service = service
        self.issuer = "kvmrkt-test-issuer"
        self.port = free_port()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests += 1
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                query = parse_qs(urlparse(self.path).query)
                body = json.dumps({"token": outer.token(query.get("scope", [""])[0])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, scope: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": self.issuer, "sub": USER, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": str(now) + scope, "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Registry:
    """docker-registry serving plain HTTP on 127.0.0.1, with auth = None | "basic" | "token"."""

    def __init__(self, workdir: Path, auth: str | None = None, tls: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = auth
        self.tokens: TokenService | None = None
        self.ca_pem = b""
        config = [
            "version: 0.1", "log:", "  level: error", "storage:", "  filesystem:",
            f"    rootdirectory: {workdir / 'data'}", "  delete:", "    enabled: true", "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]  # fmt: skip
        if tls:
            self.ca_pem = _tls_files(workdir)
            config += ["  tls:", f"    certificate: {workdir / 'server.pem'}", f"    key: {workdir / 'server.key'}"]
        if auth == "basic":
            htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True).stdout
            (workdir / "htpasswd").write_bytes(htpasswd)
            config += ["auth:", "  htpasswd:", "    realm: kvmrkt-test", f"    path: {workdir / 'htpasswd'}"]
        elif auth == "token":
            self.tokens = TokenService(workdir, "kvmrkt-test-registry")
            config += ["auth:", "  token:", f"    realm: {self.tokens.realm}", f"    service: {self.tokens.service}",
                       f"    issuer: {self.tokens.issuer}", f"    rootcertbundle: {self.tokens.bundle}"]
        (workdir / "config.yml").write_text("\n".join(config) + "\n")
        self.log = (workdir / "registry.log").open("wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(workdir / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        scheme = "https" if tls else "http"
        ctx = ssl._create_unverified_context() if tls else None  # only to see that it is up
        while True:
            try:
                urllib.request.urlopen(f"{scheme}://{self.host}/v2/", timeout=1, context=ctx)
                break
            except urllib.error.HTTPError:
                break  # 401: up, and asking for credentials
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    log = (workdir / "registry.log").read_text()
                    raise RuntimeError(f"docker-registry did not start: {log}") from None
                time.sleep(0.05)

    def push(self, layout: Path, repo: str, tag: str = "latest") -> None:
        """Push an OCI layout's image with skopeo (a real client)."""
        creds = ["--dest-creds", f"{USER}:{PASSWORD}"] if self.auth else []
        # --dest-tls-verify=false also allows plain HTTP for this push: the CLI under test is kvmrkt, not skopeo.
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", *creds, f"oci:{layout}:latest",
                        f"docker://{self.host}/{repo}:{tag}"], check=True, capture_output=True, timeout=120)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self.tokens:
            self.tokens.close()
