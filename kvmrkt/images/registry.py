"""A client for the OCI distribution API v2 (``docker://`` and ``oci://`` references).

Role: fetch manifests and blobs from a registry into the store, with token (Bearer) and basic auth, TLS with a
per-registry CA (``CONFIG_DIR/certs.d/HOST[:PORT]/ca.crt``), and plain HTTP or unverified TLS only when
``--insecure-options=http`` / ``tls`` say so. Credentials come from rkt-style ``CONFIG_DIR/auth.d/*.json``
files (``dockerAuth`` kind). Trust boundary: the registry and everything it returns are untrusted: manifests
are fetched by digest when pinned and always hashed (a manifest fetched by tag is named by the digest of the
bytes received), documents are size-bounded, blobs are verified by ``Store.put_blob``; credentials are never
sent over plain HTTP unless ``http`` is allowed, and never to another host than the one they are for (the
token realm excepted, as the protocol requires).
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import IO, Any

from kvmrkt import jsondoc
from kvmrkt.digest import Digest
from kvmrkt.errors import ConfigError, ImageError, ImageNotFoundError
from kvmrkt.images import oci
from kvmrkt.images.records import Gate, ImageRecord, Progress, no_progress
from kvmrkt.images.sources import import_oci
from kvmrkt.images.store import Store
from kvmrkt.trust import sigfiles

ACCEPT = ", ".join([*oci.MANIFEST_TYPES, *oci.INDEX_TYPES])
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password for one registry."""

    user: str
    password: str


def _config_files(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The JSON objects of a drop-in directory (``auth.d``, ``registries.d``), in name order.

    Raises:
        ConfigError: a file that cannot be read or is not a JSON object, named.
    """
    for path in sorted(directory.glob("*.json")):
        try:
            doc = jsondoc.load(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        yield path, doc


def load_credentials(config_dir: Path, host: str) -> Credentials | None:
    """Credentials for ``host`` from ``auth.d/*.json`` (rkt's ``dockerAuth`` kind).

    Raises:
        ConfigError: a malformed auth file (named), so a typo never silently means anonymous.
    """
    found: Credentials | None = None
    for path, doc in _config_files(config_dir / "auth.d"):
        if doc.get("rktKind") not in ("dockerAuth", "auth"):
            raise ConfigError(f"{path}: rktKind must be dockerAuth (or auth)")
        if doc["rktKind"] != "dockerAuth":
            continue
        creds = doc.get("credentials")
        hosts = doc.get("registries")
        if doc.get("rktVersion") != "v1" or not isinstance(hosts, list) or not isinstance(creds, dict) or not (
            isinstance(creds.get("user"), str) and isinstance(creds.get("password"), str)
        ):
            raise ConfigError(f"{path}: expected rktVersion v1, registries [..] and credentials {{user, password}}")
        if host in hosts:
            found = Credentials(creds["user"], creds["password"])
    return found


class RegistryClient:
    """One repository on one registry."""

    def __init__(
        self, ref: oci.RegistryRef, *, config_dir: Path, insecure: frozenset[str], timeout: float = 60
    ) -> None:
        self.ref = ref
        self.timeout = timeout
        self.allow_http = "http" in insecure
        self.credentials = load_credentials(config_dir, ref.host)
        ca = config_dir / "certs.d" / ref.host / "ca.crt"
        if "tls" in insecure:
            self.ssl = ssl._create_unverified_context()  # noqa: S323 - the operator asked for --insecure-options=tls
        else:
            self.ssl = ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)
        self.scheme = "https"
        self.token: str | None = None
        self.basic = False  # the registry asked for basic auth

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.ref.host}/v2/{self.ref.repo}/{path}"

    def _auth_header(self) -> dict[str, str]:
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.credentials and self.basic:
            raw = f"{self.credentials.user}:{self.credentials.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _open(self, url: str, headers: dict[str, str]) -> HTTPResponse:
        req = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) URLs built here
        return urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl)  # type: ignore[no-any-return]  # noqa: S310

    def _login(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        fields = dict(_CHALLENGE.findall(params))
        if scheme.lower() == "basic":
            if not self.credentials:
                raise ImageError(f"{self.ref.host} requires a login", hint=self._auth_hint())
            self.basic = True
            return
        if scheme.lower() != "bearer" or "realm" not in fields:
            raise ImageError(f"{self.ref.host}: unsupported authentication challenge {challenge[:80]!r}")
        query = {"service": fields.get("service", ""), "scope": fields.get("scope", f"repository:{self.ref.repo}:pull")}
        url = fields["realm"] + "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        headers = {}
        if self.credentials:
            raw = f"{self.credentials.user}:{self.credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        try:
            with self._open(url, headers) as resp:
                doc = jsondoc.loads(resp.read(1 << 20))
        except (urllib.error.URLError, ValueError, OSError) as exc:
            raise ImageError(f"{self.ref.host}: token request to {fields['realm']} failed: {exc}",
                             hint=self._auth_hint()) from exc
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise ImageError(f"{self.ref.host}: the token service returned no token")
        self.token = token

    def _auth_hint(self) -> str:
        return f"put credentials for {self.ref.host} in CONFIG_DIR/auth.d/*.json (rktKind dockerAuth)"

    def request(self, path: str, accept: str | None = None) -> HTTPResponse:
        """GET a registry path, handling the auth challenge once and the https->http fallback for ``http``.

        Raises:
            ImageNotFoundError: 404; ImageError: other failures, with the registry's message.
        """
        challenged = False
        for _attempt in range(4):
            headers = {**self._auth_header(), **({"Accept": accept} if accept else {})}
            try:
                return self._open(self._url(path), headers)
            except urllib.error.HTTPError as exc:
                body = exc.read(2000).decode("utf-8", "replace")
                if exc.code == 401 and not challenged and exc.headers.get("WWW-Authenticate"):
                    challenged = True
                    self._login(exc.headers["WWW-Authenticate"])
                    continue
                if exc.code == 404:
                    raise ImageNotFoundError(f"{self.ref}: not found on the registry ({path})") from exc
                if exc.code in (401, 403):
                    raise ImageError(f"{self.ref.host} refused access ({exc.code}): {body.strip()[:300]}",
                                     hint=self._auth_hint()) from exc
                raise ImageError(f"{self.ref.host} answered {exc.code} for {path}: {body.strip()[:300]}") from exc
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, ssl.SSLError) and self.scheme == "https" and self.allow_http:
                    self.scheme = "http"
                    continue
                hint = None
                if isinstance(reason, ssl.SSLError):
                    hint = (f"for a registry with its own CA put it in CONFIG_DIR/certs.d/{self.ref.host}/ca.crt; "
                            "for a local plain-HTTP registry use --insecure-options=http")
                raise ImageError(f"cannot reach {self.ref.host}: {reason}", hint=hint) from exc
            except OSError as exc:
                raise ImageError(f"cannot reach {self.ref.host}: {exc}") from exc
        raise ImageError(f"{self.ref.host}: authentication failed", hint=self._auth_hint())

    def manifest(self, reference: str) -> tuple[bytes, Digest]:
        """Fetch a manifest or index by tag or digest; returns its bytes and their digest.

        Raises:
            DigestMismatchError-like ImageError: a pinned digest that the bytes do not match.
        """
        with self.request(f"manifests/{reference}", ACCEPT) as resp:
            data = resp.read(oci.MAX_DOCUMENT + 1)
        if len(data) > oci.MAX_DOCUMENT:
            raise ImageError(f"{self.ref}: manifest larger than {oci.MAX_DOCUMENT} bytes")
        digest = Digest.of_bytes(data)
        if reference.startswith("sha256:") and not Digest.parse(reference).matches(digest):
            raise ImageError(f"{self.ref}: the registry served a manifest that does not match {reference}")
        return data, digest

    @contextlib.contextmanager
    def blob(self, desc: oci.Descriptor) -> Iterator[IO[bytes]]:
        """Stream a blob (redirects to storage backends are followed)."""
        with self.request(f"blobs/{desc.digest}") as resp:
            yield resp


def lookaside_url(config_dir: Path, ref: oci.RegistryRef) -> str | None:
    """The signature lookaside for a repository, from ``CONFIG_DIR/registries.d/*.json`` (the containers
    registries.d keys, as JSON): ``{"docker": {"HOST[/PATH]": {"lookaside": URL}}, "default-docker":
    {"lookaside": URL}}``; the most specific scope wins; a scope defined in two files is an error."""
    scopes: dict[str, tuple[str, Path]] = {}
    default: str | None = None
    for path, doc in _config_files(config_dir / "registries.d"):
        if set(doc) - {"docker", "default-docker"}:
            raise ConfigError(f"{path}: only docker and default-docker are supported")
        for scope, conf in (doc.get("docker") or {}).items():
            if scope in scopes:
                raise ConfigError(f"{path}: scope {scope!r} is also defined in {scopes[scope][1]}")
            if not isinstance(conf, dict) or not isinstance(conf.get("lookaside"), str):
                raise ConfigError(f"{path}: docker[{scope!r}] needs a lookaside URL")
            scopes[scope] = (conf["lookaside"], path)
        if "default-docker" in doc:
            default = (doc["default-docker"] or {}).get("lookaside")
    parts = f"{ref.host}/{ref.repo}".split("/")
    for i in range(len(parts), 0, -1):
        if "/".join(parts[:i]) in scopes:
            return scopes["/".join(parts[:i])][0]
    return default


def _read_url(url: str, limit: int = 1 << 20) -> bytes | None:
    """A lookaside file (file://, http://, https://), or None when it does not exist."""
    parsed = urllib.parse.urlparse(url)
    try:
        if parsed.scheme == "file":
            with open(urllib.parse.unquote(parsed.path), "rb") as fh:
                return fh.read(limit)
        if parsed.scheme in ("http", "https"):
            with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - configured lookaside
                return bytes(resp.read(limit))
    except FileNotFoundError:
        return None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise ImageError(f"signature lookaside {url}: HTTP {exc.code}") from exc
    except OSError as exc:
        raise ImageError(f"signature lookaside {url}: {exc}") from exc
    raise ConfigError(f"unsupported lookaside URL {url!r}")


def registry_signatures(client: RegistryClient, config_dir: Path) -> Callable[[Digest], dict[str, bytes]]:
    """Collects an image's signatures: simple-signing ones from the lookaside (``REPO@sha256=HEX/signature-N``)
    and cosign ones from the ``sha256-HEX.sig`` tag (payload layers with a base64 signature annotation)."""

    def collect(digest: Digest) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        base = lookaside_url(config_dir, client.ref)
        for n in range(1, 65) if base else ():
            url = f"{str(base).rstrip('/')}/{client.ref.repo}@{digest.algorithm}={digest.hex}/{sigfiles.source_name(n)}"
            data = _read_url(url)
            if data is None:
                break
            files[sigfiles.simple_name(n)] = data
        try:
            data, _ = client.manifest(f"{digest.algorithm}-{digest.hex}.sig")
        except ImageNotFoundError:
            return files
        doc = oci.load_json(data, "cosign signature manifest")
        for n, layer in enumerate(doc.get("layers") or [], 1):
            desc = oci.parse_descriptor(layer, "cosign signature layer")
            sig = dict(desc.annotations).get("dev.cosignproject.cosign/signature")
            if sig is None or desc.size > 1 << 20:
                continue
            with client.blob(desc) as fh:
                payload = fh.read(desc.size + 1)
            if not Digest.of_bytes(payload).matches(desc.digest):
                raise ImageError(f"{client.ref}: cosign payload does not match its digest {desc.digest}")
            payload_name, sig_name = sigfiles.cosign_names(n)
            files[payload_name] = payload
            try:
                files[sig_name] = base64.b64decode(sig, validate=True)
            except ValueError as exc:
                raise ImageError(f"{client.ref}: cosign signature annotation is not base64") from exc
        return files

    return collect


def fetch(
    store: Store, ref: oci.RegistryRef, *, config_dir: Path, insecure: frozenset[str], name: str | None = None,
    progress: Progress = no_progress, gate: Gate,
) -> ImageRecord:
    """Fetch an image from a registry into the store (blobs already present are not fetched again).

    The manifest is fetched and hashed, its signatures collected and the gate consulted before the manifest is
    parsed or any other blob requested.
    """
    client = RegistryClient(ref, config_dir=config_dir, insecure=insecure)
    data, digest = client.manifest(ref.reference)
    desc = oci.Descriptor(oci.MT_OCI_MANIFEST, digest, len(data))

    def opener(d: oci.Descriptor) -> contextlib.AbstractContextManager[IO[bytes]]:
        if d.digest.matches(digest):
            return contextlib.nullcontext(io.BytesIO(data))
        if d.media_type in (*oci.MANIFEST_TYPES, *oci.INDEX_TYPES):
            return contextlib.nullcontext(io.BytesIO(client.manifest(str(d.digest))[0]))
        return client.blob(d)

    record = import_oci(store, opener, desc, name=name or ref.name, source=f"docker://{ref}", progress=progress,
                        transport="docker", gate=gate, collect=registry_signatures(client, config_dir))
    store.record_remote(f"docker://{ref}", record.id)
    return record
