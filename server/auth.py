"""Who is calling, and may they: principals, the tokens file, TLS, listen checks, rate limits.

Principals
    Every call runs as a :class:`Principal`: a tenant (sees and changes only its own
    workloads), a node (a worker agent: may register, stream and move checkpoints
    for its own node id and the workloads placed on it, and nothing else; it sees no
    workload, plan or node through ``Allocator``), or the admin (sees everything; the
    only one who may change nodes, quotas and drains). The servicers ask
    :meth:`Principal.can_see`, :meth:`Principal.require_tenant`,
    :meth:`Principal.require_node` and :meth:`Principal.require_admin`.

    Workers should run with a node token: a worker's credential is within reach of
    whoever controls the machine it runs on, and a node token lets that reach no
    further than the node itself (an admin token still works for a worker, for
    single-operator set-ups and for ``--insecure`` on loopback).

The tokens file (``--tokens FILE``)
    A YAML mapping from bearer token to exactly one of ``{tenant: NAME}``,
    ``{node: NODE_ID}`` or ``{role: admin}``::

        "3c1f0e9a7b2d44c5a8e6f1b0d9c2a7e4": {tenant: research}
        "5d2e8f1a0b3c4d5e6f708192a3b4c5d6": {node: gpu-node-7}
        "9b8a7c6d5e4f30211f2e3d4c5b6a7988": {role: admin}

    Rules, each refused by :func:`load_tokens` with a :class:`TokenFileError` that
    names the file and the entry (a token is shown only as its first characters,
    ``3c1f…``, never in full):

    - the file is a non-empty mapping; a token is a string (quote numeric ones) of at
      least :data:`MIN_TOKEN_LENGTH` (16) printable ASCII characters without spaces
      (it travels in an ``authorization: Bearer TOKEN`` header);
    - no token appears twice (YAML would silently keep the last one);
    - each entry is a mapping with exactly one key, ``tenant`` (a non-empty name),
      ``node`` (a non-empty node id) or ``role`` (only ``admin`` exists); any other
      key is an error;
    - a file that others than its owner may read is accepted with a warning
      (:func:`loose_permissions`): a token in it is a password.

    Tokens are kept only as their SHA-256 digests: :class:`Authenticator` hashes the
    presented token and looks the digest up, so the lookup's timing does not depend on
    how much of a secret token a caller guessed. A principal's ``name`` (for logs and
    rate limits) is ``tenant:NAME#FPRINT``, ``node:ID#FPRINT`` or ``admin#FPRINT``, FPRINT being the first 8
    hex digits of the digest: two tokens of one tenant are told apart, and the
    token itself never reaches a log.

TLS
    :func:`server_credentials` (with ``client_ca_path``: mutual TLS, a client must
    present a certificate signed by that CA) and :func:`channel_credentials` for
    clients. An unreadable or non-PEM file is a :class:`ConfigError` naming it.

Listening: :func:`check_listen`, the decision table
    ==========  =====  ======  ================  =============================================
    --insecure  TLS    tokens  address           result
    ==========  =====  ======  ================  =============================================
    no          yes    yes     any               serve TLS; every call needs a token
    no          no     any     any               refused: "refuses to start unauthenticated"
    no          any    no      any               refused: "refuses to start unauthenticated"
    yes         any    any     loopback          serve (plain text unless TLS is given);
                                                 tokens enforced when a tokens file is given,
                                                 else every caller is the anonymous admin
    yes         any    any     not loopback      refused: "--insecure binds only to loopback"
    ==========  =====  ======  ================  =============================================

    Loopback means ``127.0.0.0/8``, ``::1`` (also IPv4-mapped), the name
    ``localhost``, or a ``unix:`` / ``unix-abstract:`` socket (not reachable from the
    network). Any other name is not resolved and counts as not loopback.

Rate limits
    :class:`RateLimiter`: a token bucket per principal name; an empty bucket raises
    :class:`RateLimited` (a :class:`server.errors.ResourceExhausted`, so
    RESOURCE_EXHAUSTED) saying when to retry.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from server.errors import PermissionDenied, ResourceExhausted, Unauthenticated

MIN_TOKEN_LENGTH = 16
"""The shortest token a tokens file may hold (e.g. ``openssl rand -hex 16`` gives 32)."""

FINGERPRINT_LENGTH = 8
"""Hex digits of a token's SHA-256 digest shown in a principal's name."""

AUTH_HINT = "send metadata 'authorization: Bearer TOKEN' with a token from the server's tokens file"


class ConfigError(ValueError):
    """The server's security configuration is unusable (listen address, TLS files)."""


class TokenFileError(ValueError):
    """The tokens file is unreadable or breaks one of its rules; names the file and entry."""


# --- principals -------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """The caller of one request: a tenant, a node (``node`` its id; neither tenant nor
    admin), or the admin (``tenant`` None, ``admin`` True)."""

    name: str
    tenant: str | None
    admin: bool
    node: str | None = None

    def can_see(self, tenant: str) -> bool:
        """Whether this principal may see and change ``tenant``'s data."""
        return self.admin or (self.tenant is not None and self.tenant == tenant)

    def require_admin(self, action: str = "this call") -> None:
        """Raise :class:`PermissionDenied` unless this principal is the admin."""
        if not self.admin:
            raise PermissionDenied(f"{action} needs the admin role; the caller is {self.name}")

    def require_node(self, node_id: str, action: str = "this call") -> None:
        """Raise :class:`PermissionDenied` unless this principal is the admin or the node
        ``node_id`` itself."""
        if not (self.admin or (self.node is not None and self.node == node_id)):
            raise PermissionDenied(
                f"{action} concerns node {node_id!r}; the caller is {self.name} and may act only "
                f"for {'node ' + repr(self.node) if self.node is not None else 'its own workloads'}"
            )

    def require_tenant(self, tenant: str, action: str = "this call") -> None:
        """Raise :class:`PermissionDenied` unless this principal may act for ``tenant``."""
        if not self.can_see(tenant):
            raise PermissionDenied(
                f"{action} concerns tenant {tenant!r}; the caller is {self.name} and may act only "
                f"for tenant {self.tenant!r}"
            )


ANONYMOUS = Principal(name="anonymous", tenant=None, admin=True)
"""Every caller of a server started ``--insecure`` without a tokens file."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def fingerprint(token: str) -> str:
    """A short, log-safe identifier of ``token``: the first hex digits of its SHA-256."""
    return _digest(token).hex()[:FINGERPRINT_LENGTH]


def _shown(token: object) -> str:
    """A token as error messages show it: its first characters only."""
    text = str(token)
    keep = min(4, len(text) // 4)
    return f"{text[:keep]}…" if keep else "…"


# --- the tokens file ---------------------------------------------------------------------


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, top: bool) -> None:
        super().__init__(key, line)
        self.key = key
        self.line = line
        self.top = top  # a key of the top-level mapping: a token


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys instead of keeping the last."""

    root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self.root = node
        return super().construct_document(node)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, Hashable):
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, top=node is loader.root)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_token(token: object, where: str) -> str:
    if not isinstance(token, str):
        raise TokenFileError(f"{where}: a token must be a string; quote it ({_shown(token)})")
    if not token:
        raise TokenFileError(f"{where}: empty token")
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenFileError(
            f"{where}: token {_shown(token)} is {len(token)} characters; tokens need at least "
            f"{MIN_TOKEN_LENGTH} (e.g. from `openssl rand -hex 16`)"
        )
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise TokenFileError(
            f"{where}: token {_shown(token)} has spaces or non-ASCII characters; a token is "
            f"printable ASCII (it is sent as 'authorization: Bearer TOKEN')"
        )
    return token


def _principal(token: str, entry: object, where: str) -> Principal:
    fp = fingerprint(token)
    if not isinstance(entry, dict) or len(entry) != 1:
        raise TokenFileError(
            f"{where}: expected exactly one of {{tenant: NAME}}, {{node: NODE_ID}} or {{role: admin}}"
        )
    ((key, value),) = entry.items()
    if key == "tenant":
        if not isinstance(value, str) or not value.strip():
            raise TokenFileError(f"{where}: tenant must be a non-empty name")
        return Principal(name=f"tenant:{value}#{fp}", tenant=value, admin=False)
    if key == "node":
        if not isinstance(value, str) or not value.strip():
            raise TokenFileError(f"{where}: node must be a non-empty node id")
        return Principal(name=f"node:{value}#{fp}", tenant=None, admin=False, node=value)
    if key == "role":
        if value != "admin":
            raise TokenFileError(f"{where}: unknown role {value!r}; the only role is 'admin'")
        return Principal(name=f"admin#{fp}", tenant=None, admin=True)
    raise TokenFileError(f"{where}: unknown key {key!r}; expected 'tenant', 'node' or 'role'")


def load_tokens(path: str | Path) -> dict[str, Principal]:
    """Read a tokens file (see the module docstring for its rules) into token → principal."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: cannot read the tokens file: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        what = f"token {_shown(exc.key)}" if exc.top else f"key {exc.key!r}"
        raise TokenFileError(f"{path}: line {exc.line}: {what} appears twice") from None
    except yaml.YAMLError as exc:
        # The parser's message may quote the offending line, so keep only where it is.
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise TokenFileError(f"{path}: not valid YAML ({at})") from None
    if data is None:
        raise TokenFileError(f"{path}: the tokens file defines no tokens")
    if not isinstance(data, dict):
        raise TokenFileError(
            f"{path}: expected a mapping of TOKEN: {{tenant: NAME}}, TOKEN: {{node: NODE_ID}} "
            f"or TOKEN: {{role: admin}}"
        )
    if not data:
        raise TokenFileError(f"{path}: the tokens file defines no tokens")
    tokens: dict[str, Principal] = {}
    for token, entry in data.items():
        where = f"{path}: token {_shown(token)}"
        checked = _check_token(token, where)
        tokens[checked] = _principal(checked, entry, where)
    return tokens


def loose_permissions(path: str | Path) -> str | None:
    """Why a credential file is readable by others than its owner (``mode 0644``), or None."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"{path} is readable by others than its owner (mode {mode & 0o777:04o}); chmod 600 it"
    return None


# --- authentication ----------------------------------------------------------------------


class Authenticator:
    """Maps a request's ``authorization: Bearer TOKEN`` metadata to its :class:`Principal`.

    ``tokens`` None is the insecure mode without a tokens file: every caller is
    :data:`ANONYMOUS`, an admin. Otherwise only the tokens' SHA-256 digests are kept.
    """

    def __init__(self, tokens: dict[str, Principal] | None) -> None:
        self._by_digest: dict[bytes, Principal] | None = (
            None if tokens is None else {_digest(t): p for t, p in tokens.items()}
        )

    @classmethod
    def from_file(cls, path: str | Path | None) -> Authenticator:
        """An authenticator for the tokens file at ``path``; None: the anonymous insecure mode."""
        return cls(None if path is None else load_tokens(path))

    @property
    def enabled(self) -> bool:
        """Whether calls need a token (False: everyone is the anonymous admin)."""
        return self._by_digest is not None

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller's principal, or :class:`Unauthenticated` saying what to send."""
        if self._by_digest is None:
            return ANONYMOUS
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated(f"no credentials: {AUTH_HINT}")
        if len(values) > 1:
            raise Unauthenticated(f"more than one authorization header: {AUTH_HINT}")
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"the authorization header is not 'Bearer TOKEN': {AUTH_HINT}")
        principal = self._by_digest.get(_digest(token))
        if principal is None:
            raise Unauthenticated(f"unknown token: {AUTH_HINT}")
        return principal


# --- TLS ---------------------------------------------------------------------------------


def _read_pem(path: str | Path, what: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data or marker not in data:
        raise ConfigError(f"the {what} {path} is not a PEM file with a {marker.decode()}")
    return data


def server_credentials(
    cert_path: str | Path, key_path: str | Path, client_ca_path: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for the server; with ``client_ca_path``, clients must present a
    certificate signed by that CA (mutual TLS)."""
    cert = _read_pem(cert_path, "TLS certificate", b"CERTIFICATE")
    key = _read_pem(key_path, "TLS private key", b"PRIVATE KEY")
    ca = None if client_ca_path is None else _read_pem(client_ca_path, "client CA", b"CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_path: str | Path | None = None, cert_path: str | Path | None = None, key_path: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a client: ``ca_path`` to trust (default: the system's roots);
    ``cert_path`` and ``key_path`` together for mutual TLS."""
    if (cert_path is None) != (key_path is None):
        raise ConfigError(
            "a client certificate needs its key, and a key its certificate: give both or neither"
        )
    ca = None if ca_path is None else _read_pem(ca_path, "CA certificate", b"CERTIFICATE")
    cert = None if cert_path is None else _read_pem(cert_path, "client certificate", b"CERTIFICATE")
    key = None if key_path is None else _read_pem(key_path, "client private key", b"PRIVATE KEY")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# --- listening ---------------------------------------------------------------------------


def _host(address: str) -> str | None:
    """The host part of ``HOST:PORT`` / ``[V6]:PORT``; None when it has no port."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or not address[end + 1 :].startswith(":"):
            return None
        return address[1:end]
    host, sep, port = address.rpartition(":")
    if not sep or not port or ":" in host:
        return None
    return host


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address (``127.0.0.1:50051``, ``[::1]:0``, ``localhost:0``,
    ``unix:/path``) is reachable only from this machine. Unrecognised addresses: False."""
    address = address.strip()
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = _host(address)
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost: not resolved, not trusted
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_listen(address: str, *, insecure: bool, tls: bool, tokens: bool) -> None:
    """Refuse (:class:`ConfigError`) a configuration the module docstring's table forbids."""
    if insecure:
        if not is_loopback(address):
            raise ConfigError(
                f"--insecure binds only to loopback (127.0.0.1, [::1], localhost or a unix socket), "
                f"not {address!r}; to listen there, drop --insecure and give --tls-cert/--tls-key "
                f"and --tokens"
            )
        return
    missing = [what for what, have in (("--tls-cert/--tls-key", tls), ("--tokens", tokens)) if not have]
    if missing:
        raise ConfigError(
            f"the server refuses to start unauthenticated: give {' and '.join(missing)}, or --insecure "
            f"with a loopback --listen address (e.g. 127.0.0.1:50051) for local use"
        )


# --- rate limits -------------------------------------------------------------------------


DEFAULT_RATE_PER_S = 2000.0
"""The server's default limit per caller (``--rate-limit``), bursts of twice that: far
above what one client of the service needs, low enough that one caller cannot saturate
the server's interpreter for the others."""


class RateLimited(ResourceExhausted):
    """Too many requests from one principal; ``retry_after_s`` says when one will pass."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    """A token bucket per principal name: ``burst`` requests at once, refilled at
    ``rate_per_s``. ``rate_per_s`` 0 disables the limit. Thread-safe.

    One bucket is kept per name ever seen; names come from the tokens file (plus
    ``anonymous``), so their number is bounded.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate_per_s >= 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a finite number >= 0, not {rate_per_s}")
        if rate_per_s > 0 and burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def check(self, name: str) -> None:
        """Take one request from ``name``'s bucket, or raise :class:`RateLimited`."""
        if self.rate_per_s <= 0:
            return
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return
            self._buckets[name] = (tokens, now)
        retry = (1.0 - tokens) / self.rate_per_s
        raise RateLimited(
            f"too many requests from {name}: the limit is {self.rate_per_s:g}/s with bursts of "
            f"{self.burst}; retry after {retry:.3g} s",
            retry_after_s=retry,
        )
