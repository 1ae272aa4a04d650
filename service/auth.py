"""Who is calling: API keys and OIDC bearer tokens, one check for REST, gRPC and STOW-RS.

Every credential resolves to a :class:`Principal` whose tenant owns the jobs it submits. Keys are stored only as
SHA-256 digests: they are 256-bit random strings, so a fast hash is enough (there is nothing to brute-force, unlike
a password) and a leaked environment or Secret file gives nobody a working key. Tokens are verified with PyJWT:
signature by a key from the issuer's JWKS, issuer, audience, expiry; the tenant is one of their claims.

With no keys and no issuer configured the service is *open*: every caller is the ``default`` tenant. Only
``c2p serve`` on a loopback address may run that way (:func:`check_exposure`), so a workstation needs no set-up and
a pod never listens unauthenticated by accident.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import secrets
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jwt

from service.config import AuthSettings, Settings
from service.errors import Unauthenticated, Unavailable

log = logging.getLogger(__name__)

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ENTRY_RE = re.compile(r"^(?P<tenant>[^:\s]+):sha256:(?P<digest>[0-9a-f]{64})$")
KEY_PREFIX = "c2p_"
OPEN_TENANT = "default"
# A key or token longer than this is refused before it is hashed or parsed.
MAX_CREDENTIAL_CHARS = 16 * 1024
JWKS_LIFESPAN_S = 300
FETCH_TIMEOUT_S = 5.0
REFUSED = "missing or invalid credentials: send Authorization: Bearer <API key or token> or X-API-Key: <API key>"


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str  # who within the tenant: the key's digest prefix or the token's sub
    method: Literal["api-key", "oidc", "open", "dimse-ae"]  # dimse-ae: a calling AE title on the allowlist


OPEN = Principal(tenant=OPEN_TENANT, subject="anonymous", method="open")


# -- keys ------------------------------------------------------------------------------------------------


def new_key() -> str:
    """A fresh API key: 256 random bits, prefixed so secret scanners and people can tell what it is."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def entry_for(tenant: str, key: str) -> str:
    """The line to store for ``key``: ``TENANT:sha256:HEX``."""
    check_tenant(tenant)
    return f"{tenant}:sha256:{digest(key)}"


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant names are 1-64 letters, digits, '_', '.', '@' or '-' (got {tenant!r})")
    return tenant


def parse_entries(text: str, source: str) -> dict[str, str]:
    """Digest -> tenant from comma- or newline-separated ``TENANT:sha256:HEX`` entries; '#' starts a comment.

    A plain key where a digest belongs is refused with a hint: keys are never stored.
    """
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for item in line.split("#", 1)[0].split(","):
            item = item.strip()
            if not item:
                continue
            match = ENTRY_RE.fullmatch(item)
            if match is None:
                raise ValueError(
                    f"{source} entry {number} is not TENANT:sha256:<64 hex digits>; store the key's digest, never the "
                    "key itself (`c2p keys new --tenant NAME` prints both)"
                )
            tenant = check_tenant(match["tenant"])
            previous = entries.setdefault(match["digest"], tenant)
            if previous != tenant:
                raise ValueError(f"{source} entry {number}: one key is given to two tenants")
    return entries


class KeyStore:
    """The configured key digests: ``C2P_API_KEYS`` plus a file, re-read whenever the file changes (a mounted
    Kubernetes Secret is updated in place, so keys rotate without a restart)."""

    def __init__(self, inline: str | None, path: Path | None) -> None:
        self._inline = parse_entries(inline or "", "C2P_API_KEYS")
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._from_file: dict[str, str] = {}
        self._lock = threading.Lock()
        if path is not None:
            self._reload()  # a broken file stops the start-up, not the first request

    def __bool__(self) -> bool:
        return bool(self._inline) or self._path is not None

    def _reload(self) -> None:
        assert self._path is not None
        stat = self._path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            self._from_file = parse_entries(self._path.read_text(encoding="utf-8"), str(self._path))
            self._stamp = stamp

    def tenant_of(self, key: str) -> str | None:
        if self._path is not None:
            try:
                self._reload()
            except (OSError, ValueError) as exc:  # mid-rotation: keep the last good set and say why
                log.warning("API key file not reloaded, keeping the previous keys: %s", exc)
        found = digest(key)
        return self._inline.get(found) or self._from_file.get(found)


# -- tokens ----------------------------------------------------------------------------------------------


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and credential.startswith("eyJ")


def _fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
        return json.loads(response.read(1024 * 1024))


class TokenVerifier:
    """OIDC access tokens: signed by a key in the issuer's JWKS, for our audience, not expired.

    Keys come from a JWKS file (air-gapped sites) or a URL, by default the one the issuer's discovery document
    names; fetched lazily (an identity provider that is down at start-up must not stop the service) and cached by
    PyJWKClient, which re-fetches when a token names an unknown key id (the provider rotated its keys).
    """

    def __init__(self, settings: AuthSettings) -> None:
        assert settings.oidc_issuer is not None and settings.oidc_audience is not None
        self.settings = settings
        self._issuer = settings.oidc_issuer
        self._keys: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if settings.jwks_file is not None:
            self._keys = jwt.PyJWKSet.from_json(settings.jwks_file.read_text(encoding="utf-8"))
        elif settings.jwks_url is not None:
            self._client = self._new_client(settings.jwks_url)

    def _new_client(self, url: str) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(
            url,
            cache_keys=True,
            lifespan=JWKS_LIFESPAN_S,
            timeout=FETCH_TIMEOUT_S,
            cooldown_duration=self.settings.jwks_refresh_cooldown_s,
        )

    def _signing_key(self, token: str) -> object:
        if self._keys is not None:
            kid = jwt.get_unverified_header(token).get("kid")
            candidates = [k for k in self._keys.keys if kid is None or k.key_id == kid]
            if not candidates:
                raise jwt.InvalidTokenError("no key in the JWKS file has this token's key id")
            return candidates[0].key
        if self._client is None:
            try:
                discovery = _fetch_json(self._issuer.rstrip("/") + "/.well-known/openid-configuration")
            except (OSError, ValueError) as exc:
                raise Unavailable(f"the identity provider's discovery document cannot be read: {exc}") from exc
            if not isinstance(discovery.get("jwks_uri"), str):
                raise Unavailable("the identity provider's discovery document names no jwks_uri")
            self._client = self._new_client(discovery["jwks_uri"])
        try:
            return self._client.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError as exc:
            raise Unavailable(f"the identity provider's signing keys cannot be fetched: {exc}") from exc

    def verify(self, token: str) -> Principal:
        """Blocking (a JWKS fetch may happen): call it in a thread."""
        settings = self.settings
        try:
            claims = jwt.decode(
                token,
                self._signing_key(token),  # type: ignore[arg-type]
                algorithms=settings.algorithms,
                audience=settings.oidc_audience,
                issuer=self._issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except (jwt.InvalidTokenError, jwt.PyJWKClientError) as exc:
            raise Unauthenticated(REFUSED) from exc
        tenant = claims.get(settings.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise Unauthenticated(f"the token carries no usable '{settings.tenant_claim}' claim naming a tenant")
        subject = claims.get("sub")
        return Principal(tenant=tenant, subject=str(subject) if subject else "token", method="oidc")


# -- the check -------------------------------------------------------------------------------------------


def credential_from(headers: Mapping[str, str]) -> str | None:
    """The key or token in ``Authorization: Bearer ...`` or ``X-API-Key``; headers (or gRPC metadata) by lower-case
    name."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated(REFUSED)
        return value.strip()
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key else None


class Authenticator:
    """Built once from Settings; answers ``authenticate`` for every API."""

    def __init__(self, settings: Settings) -> None:
        auth = settings.auth
        self.keys = KeyStore(settings.api_keys, auth.keys_file)
        self.tokens = TokenVerifier(auth) if auth.oidc_issuer is not None else None
        self.public_metrics = auth.public_metrics

    @property
    def open(self) -> bool:
        return not self.keys and self.tokens is None

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if self.open:
            return OPEN
        credential = credential_from(headers)
        if not credential or len(credential) > MAX_CREDENTIAL_CHARS:
            raise Unauthenticated(REFUSED)
        if self.tokens is not None and looks_like_jwt(credential):
            return await asyncio.to_thread(self.tokens.verify, credential)
        tenant = self.keys.tenant_of(credential)
        if tenant is None:
            raise Unauthenticated(REFUSED)
        return Principal(tenant=tenant, subject="key:" + digest(credential)[:12], method="api-key")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, authenticator: Authenticator) -> None:
    """Refuse to listen beyond this machine without credentials; on loopback, say loudly that anyone local may call."""
    if not authenticator.open:
        return
    if not is_loopback(settings.host):
        raise ValueError(
            f"refusing to listen on {settings.host} without authentication: set C2P_API_KEYS (entries from "
            "`c2p keys new --tenant NAME`), C2P_AUTH__KEYS_FILE or C2P_AUTH__OIDC_ISSUER, or bind to 127.0.0.1"
        )
    log.warning(
        "no credentials configured: the service is OPEN to every process on this machine (bound to %s); "
        "set C2P_API_KEYS or C2P_AUTH__OIDC_ISSUER before exposing it",
        settings.host,
    )
