"""Authentication, tenants, quotas and the audit log, on every API: REST, the Open Inference Protocol (REST and gRPC),
c2p.v1 gRPC and STOW-RS. Keys are real digests, tokens are real RS256/ES256 JWTs checked against a JWKS from a file
or from a discovery document served on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.routing import APIRoute
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from service.auth import Authenticator, KeyStore, check_exposure, entry_for, new_key, parse_entries
from service.config import AuthSettings, QueueSettings, Settings
from service.errors import Unauthenticated
from service.gateway.app import create_app
from service.gateway.identity import caller
from service.grpc import inference_pb2, inference_pb2_grpc, segmentation_pb2, segmentation_pb2_grpc
from service.grpc.inference import inference_registration
from service.grpc.server import build_server, stop_server
from service.ops.metrics import Metrics
from tests.service.harness import disc_image, engine_for, free_port, make_settings, png_bytes, running
from tests.service.test_grpc import trailers

ALPHA, BETA = new_key(), new_key()
KEYS = f"{entry_for('alpha', ALPHA)},{entry_for('beta', BETA)}"
ISSUER, AUDIENCE = "https://idp.example.test/realms/hospital", "c2p-serve"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", ("disc.png", data, "image/png"))]


# -- keys -------------------------------------------------------------------------------------------------


def test_entries_hold_digests_never_keys() -> None:
    key = new_key()
    assert key.startswith("c2p_") and len(key) > 40
    entries = parse_entries(f"# radiology\n{entry_for('radiology', key)}, \n\n", "file")
    assert list(entries.values()) == ["radiology"] and key not in json.dumps(entries)
    with pytest.raises(ValueError, match="never the key itself"):
        parse_entries(f"radiology:{key}", "C2P_API_KEYS")
    with pytest.raises(ValueError, match="two tenants"):
        parse_entries(f"{entry_for('a', key)},{entry_for('b', key)}", "C2P_API_KEYS")
    with pytest.raises(ValueError, match="tenant names"):
        entry_for("has space", key)


def test_key_file_rotates_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    old, new = new_key(), new_key()
    path.write_text(entry_for("alpha", old) + "\n")
    store = KeyStore(None, path)
    assert store.tenant_of(old) == "alpha" and store.tenant_of(new) is None
    path.write_text(f"{entry_for('alpha', new)}  # rotated\n")
    assert store.tenant_of(new) == "alpha" and store.tenant_of(old) is None
    path.write_text("half-written")  # a broken rewrite keeps the last good set
    assert store.tenant_of(new) == "alpha"


def test_headers_and_refusals() -> None:
    auth = Authenticator(Settings(api_keys=KEYS))

    async def check() -> None:
        assert (await auth.authenticate({"authorization": f"Bearer {ALPHA}"})).tenant == "alpha"
        assert (await auth.authenticate({"x-api-key": BETA})).tenant == "beta"
        principal = await auth.authenticate({"authorization": f"bearer  {ALPHA} "})
        assert principal.method == "api-key" and ALPHA not in principal.subject
        for headers in (
            {},
            {"authorization": f"Basic {ALPHA}"},
            {"x-api-key": ALPHA + "x"},
            {"x-api-key": "x" * 20_000},
        ):
            with pytest.raises(Unauthenticated) as refused:
                await auth.authenticate(headers)
            assert refused.value.http_status == 401 and refused.value.grpc_status == "UNAUTHENTICATED"
        assert (await Authenticator(Settings()).authenticate({})).tenant == "default"  # open

    asyncio.run(check())


def test_serve_refuses_an_open_port_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="without authentication"):
        check_exposure(Settings(host="0.0.0.0"), Authenticator(Settings()))
    with caplog.at_level(logging.WARNING):
        check_exposure(Settings(host="127.0.0.1"), Authenticator(Settings()))
        check_exposure(Settings(host="::1"), Authenticator(Settings()))
    assert sum("OPEN" in r.getMessage() for r in caplog.records) == 2
    check_exposure(Settings(host="0.0.0.0", api_keys=KEYS), Authenticator(Settings(api_keys=KEYS)))


def test_c2p_serve_on_all_interfaces_without_credentials_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main

    for name in ("C2P_API_KEYS", "C2P_AUTH__KEYS_FILE", "C2P_AUTH__OIDC_ISSUER"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    assert main(["serve", "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert time.monotonic() - started < 10  # refused before a model or Redis was started


def test_unsafe_oidc_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="audience"):
        AuthSettings(oidc_issuer=ISSUER)
    with pytest.raises(ValidationError, match="not allowed"):
        AuthSettings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE, algorithms=["RS256", "HS256"])
    with pytest.raises(ValidationError, match="not allowed"):
        AuthSettings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE, algorithms=["none"])


# -- tokens -----------------------------------------------------------------------------------------------


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(*keys: tuple[str, object]) -> dict:
    out = []
    for kid, private in keys:
        jwk = json.loads(
            jwt.algorithms.get_default_algorithms()[
                "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
            ].to_jwk(private.public_key())
        )  # type: ignore[attr-defined]
        out.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": out}


def token(private: object, kid: str, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "pacs-bridge", "tenant": "alpha", "iat": now, "exp": now + 300}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    algorithm = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid})  # type: ignore[arg-type]


def hmac_token(private: rsa.RSAPrivateKey, kid: str) -> str:
    """The classic algorithm confusion: HS256 "signed" with the public key's PEM as the shared secret."""
    secret = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "tenant": "alpha"}

    def part(value: object) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    signing_input = part({"alg": "HS256", "typ": "JWT", "kid": kid}) + b"." + part(claims)
    signature = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
    return (signing_input + b"." + signature).decode()


def test_tokens_from_a_jwks_file(tmp_path: Path) -> None:
    signer, stranger, curve = _rsa(), _rsa(), ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(("k1", signer), ("k2", curve))))
    settings = Settings(auth=AuthSettings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE, jwks_file=path))
    auth = Authenticator(settings)

    async def tenant(value: str) -> str:
        return (await auth.authenticate({"authorization": f"Bearer {value}"})).tenant

    async def check() -> None:
        assert await tenant(token(signer, "k1")) == "alpha"
        assert await tenant(token(curve, "k2", tenant="beta")) == "beta"
        assert (await auth.authenticate({"authorization": f"Bearer {token(signer, 'k1')}"})).subject == "pacs-bridge"
        now = int(time.time())
        refused = {
            "expired": token(signer, "k1", exp=now - 120),
            "no expiry": token(signer, "k1", exp=None),
            "other audience": token(signer, "k1", aud="another-service"),
            "other issuer": token(signer, "k1", iss="https://evil.example.test"),
            "unknown signer": token(stranger, "k1"),
            "unknown key id": token(signer, "k9"),
            "no tenant": token(signer, "k1", tenant=None),
            "bad tenant": token(signer, "k1", tenant="a b"),
            "not yet valid": token(signer, "k1", nbf=now + 600),
            "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "tenant": "alpha"}, None, "none"),
            # the classic confusion: HMAC "signed" with the public key's bytes
            "hs256 with the public key": hmac_token(signer, "k1"),
        }
        for name, value in refused.items():
            with pytest.raises(Unauthenticated):
                await tenant(value)
                pytest.fail(f"{name} was accepted")

    asyncio.run(check())


@contextlib.contextmanager
def identity_provider(documents: dict[str, dict]) -> Iterator[tuple[str, list[str]]]:
    """An OIDC discovery document and a JWKS on loopback; yields the base URL and the paths asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = documents.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body or {}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


def test_tokens_from_the_issuers_discovery_with_key_rotation() -> None:
    first, second = _rsa(), _rsa()
    documents: dict[str, dict] = {}
    with identity_provider(documents) as (base, asked):
        issuer = base + "/realms/hospital"
        documents["/realms/hospital/.well-known/openid-configuration"] = {"issuer": issuer, "jwks_uri": base + "/jwks"}
        documents["/jwks"] = jwks(("one", first))
        oidc = AuthSettings(oidc_issuer=issuer, oidc_audience=AUDIENCE, jwks_refresh_cooldown_s=0)
        auth = Authenticator(Settings(auth=oidc))
        assert asked == []  # nothing fetched at start-up: a provider that is down must not stop the service

        async def check() -> None:
            principal = await auth.authenticate({"authorization": f"Bearer {token(first, 'one', iss=issuer)}"})
            assert principal.tenant == "alpha" and principal.method == "oidc"
            fetched = len(asked)
            await auth.authenticate({"authorization": f"Bearer {token(first, 'one', iss=issuer)}"})
            assert len(asked) == fetched  # cached
            documents["/jwks"] = jwks(("one", first), ("two", second))  # the provider rotates its keys
            principal = await auth.authenticate({"authorization": f"Bearer {token(second, 'two', iss=issuer)}"})
            assert principal.tenant == "alpha" and asked.count("/jwks") == 2
            # API keys still work beside tokens when both are configured
            both = Authenticator(Settings(api_keys=KEYS, auth=AuthSettings(oidc_issuer=issuer, oidc_audience=AUDIENCE)))
            assert (await both.authenticate({"x-api-key": BETA})).tenant == "beta"

        asyncio.run(check())


# -- REST: every route, tenants, quotas, audit --------------------------------------------------------------

OPEN_ROUTES = {
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{model}/ready",
    "/v2/models/{model}/versions/{version}/ready",
    "/ui",
    "/ui/",
    "/ui/{name}",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/metrics",  # checks inside the handler (public_metrics), tested below
}


def _flatten(routes: list) -> Iterator:
    """Routes of included routers too (newer FastAPI keeps an included router as one entry)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flatten(inner.routes)
        else:
            yield route


def _calls(dependant: object) -> Iterator[object]:
    yield dependant.call  # type: ignore[attr-defined]
    for sub in dependant.dependencies:  # type: ignore[attr-defined]
        yield from _calls(sub)


def test_every_route_but_health_and_static_files_requires_a_caller() -> None:
    app = create_app(Settings(api_keys=KEYS))
    unguarded = []
    routes = list(_flatten(app.routes))
    assert {"/v1/segmentations", "/v2/models/{model}/infer", "/dicomweb/studies"} <= {r.path for r in routes}
    for route in routes:
        path = getattr(route, "path", "")
        if path in OPEN_ROUTES:
            continue
        assert isinstance(route, APIRoute), path
        if caller not in set(_calls(route.dependant)):
            unguarded.append(path)
    assert unguarded == []


def test_rest_tenants_quotas_and_audit(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    quota = queue_settings.model_copy(update={"tenant_max_pending": 1})
    settings = make_settings(redis_url, quota, exported).model_copy(update={"api_keys": KEYS})
    image = png_bytes(disc_image())

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            # no credential: 401 everywhere but health, with the challenge header
            for method, path in [
                ("POST", "/v1/segmentations"),
                ("GET", "/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA"),
                ("GET", "/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA/result"),
                ("DELETE", "/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA"),
                ("GET", "/v2"),
                ("GET", "/v2/models/c2p"),
                ("POST", "/v2/models/c2p/infer"),
                ("POST", "/dicomweb/studies"),
                ("GET", "/metrics"),
            ]:
                answer = await http.request(method, path, headers={"X-API-Key": "c2p_wrong"})
                assert answer.status_code == 401, (path, answer.text)
                assert answer.headers["www-authenticate"].startswith("Bearer")
                body = answer.json()
                assert body.get("code") == "unauthenticated", body
            assert (await http.get("/v2/health/live")).status_code == 200
            assert (await http.get("/v2/health/ready")).status_code == 503  # no worker: not ready, but not 401

            first = await http.post("/v1/segmentations", files=upload(image), headers=bearer(ALPHA))
            assert first.status_code == 202, first.text
            job = first.json()["id"]
            assert len(job) == 22  # 128 random bits
            mine = await http.get(f"/v1/segmentations/{job}", headers={"X-API-Key": ALPHA})
            assert mine.status_code == 200 and mine.json()["status"] == "queued"
            # another tenant: the same 404 as a job that never existed, for every action
            never = await http.get("/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA", headers=bearer(BETA))
            for method, suffix in [("GET", ""), ("GET", "/result"), ("GET", "/result?format=nifti"), ("DELETE", "")]:
                theirs = await http.request(method, f"/v1/segmentations/{job}{suffix}", headers=bearer(BETA))
                assert theirs.status_code == 404 and theirs.json() == never.json() | {}, suffix
            assert (await http.get(f"/v1/segmentations/{job}", headers=bearer(ALPHA))).status_code == 200

            # per-tenant quota: alpha is at 1, beta is not affected
            over = await http.post("/v1/segmentations", files=upload(image), headers=bearer(ALPHA))
            assert (
                over.status_code == 429 and over.json()["code"] == "queue_full" and "tenant" in over.json()["message"]
            )
            assert over.headers["retry-after"]
            assert (await http.post("/v1/segmentations", files=upload(image), headers=bearer(BETA))).status_code == 202
            assert (await http.delete(f"/v1/segmentations/{job}", headers=bearer(ALPHA))).status_code == 204
            again = await http.post("/v1/segmentations", files=upload(image), headers=bearer(ALPHA))
            assert again.status_code == 202  # the slot came back with the delete

        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            entries = [fields for _, fields in await client.xrange(f"{queue_settings.prefix}:audit")]
            held = await client.hgetall(f"{queue_settings.prefix}:tenants")
        finally:
            await client.aclose()
        actions = [(e["action"], e.get("tenant"), e.get("job_id")) for e in entries]
        assert ("submit", "alpha", job) in actions and ("read", "alpha", job) in actions
        assert ("delete", "alpha", job) in actions
        assert not any(a == ("read", "beta", job) for a in actions)  # beta never saw it
        denied = [e for e in entries if e["action"] == "denied"]
        assert len(denied) == 9 and all("tenant" not in e and e["reason"] == "credential" for e in denied)
        assert {e["api"] for e in denied} == {"rest", "kserve-rest", "stow-rs"}
        assert not any("disc.png" in json.dumps(e) or ALPHA in json.dumps(e) for e in entries)
        assert held == {"alpha": "1", "beta": "1"}

    asyncio.run(scenario())


def test_quota_slots_come_back_when_jobs_end(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    quota = queue_settings.model_copy(update={"tenant_quotas": {"alpha": 2}})
    settings = make_settings(redis_url, quota, exported).model_copy(update={"api_keys": KEYS})
    image = png_bytes(disc_image())

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            for _ in range(3):  # three in a row through a quota of two: each ends before the next
                done = await http.post("/v1/segmentations?wait=30", files=upload(image), headers=bearer(ALPHA))
                assert done.status_code == 200, done.text
            bad = await http.post(
                "/v1/segmentations?wait=30", files=upload(b"\x89PNG\r\n\x1a\n broken"), headers=bearer(ALPHA)
            )
            assert bad.status_code in (415, 422)
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert await client.hgetall(f"{queue_settings.prefix}:tenants") == {}
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_public_metrics_setting(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    base = make_settings(redis_url, queue_settings, exported)
    public = base.model_copy(update={"api_keys": KEYS, "auth": AuthSettings(public_metrics=True)})

    async def scenario() -> None:
        async with running(public, None, worker=False) as (http, _):
            assert (await http.get("/metrics")).status_code == 200
            assert (await http.get("/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA")).status_code == 401
        async with running(base.model_copy(update={"api_keys": KEYS}), None, worker=False) as (http, _):
            assert (await http.get("/metrics", headers=bearer(BETA))).status_code == 200

    asyncio.run(scenario())


# -- gRPC: both services --------------------------------------------------------------------------------------


def test_grpc_needs_credentials_and_keeps_tenants_apart(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported).model_copy(
        update={"api_keys": KEYS, "grpc_port": free_port()}
    )
    image = png_bytes(disc_image())

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        metrics = Metrics()
        server = build_server(settings, client, metrics, services=[inference_registration(settings, client, metrics)])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                c2p = segmentation_pb2_grpc.SegmentationStub(channel)
                oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = segmentation_pb2.SegmentRequest(files=[segmentation_pb2.File(name="d.png", data=image)])
                job_ref = segmentation_pb2.GetSegmentationRequest(id="AAAAAAAAAAAAAAAAAAAAAA")
                calls = {
                    "Segment": lambda md: c2p.Segment(request, metadata=md),
                    "SegmentStream": lambda md: c2p.SegmentStream(
                        iter([segmentation_pb2.SegmentChunk(name="d.png", data=image, last=True)]), metadata=md
                    ),
                    "GetSegmentation": lambda md: c2p.GetSegmentation(job_ref, metadata=md),
                    "WatchSegmentation": lambda md: _first(c2p.WatchSegmentation(job_ref, metadata=md)),
                    "DeleteSegmentation": lambda md: c2p.DeleteSegmentation(
                        segmentation_pb2.DeleteSegmentationRequest(id="AAAAAAAAAAAAAAAAAAAAAA"), metadata=md
                    ),
                    "ServerMetadata": lambda md: oip.ServerMetadata(inference_pb2.ServerMetadataRequest(), metadata=md),
                    "ModelMetadata": lambda md: oip.ModelMetadata(
                        inference_pb2.ModelMetadataRequest(name="c2p"), metadata=md
                    ),
                    "ModelInfer": lambda md: oip.ModelInfer(
                        inference_pb2.ModelInferRequest(model_name="c2p"), metadata=md
                    ),
                }
                for name, call in calls.items():
                    for metadata in [(), (("authorization", "Bearer c2p_nope"),), (("x-api-key", BETA + "x"),)]:
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await call(metadata)
                        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                        assert trailers(refused.value).get("c2p-error-code") == "unauthenticated"
                # health and readiness answer without credentials
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                await oip.ServerLive(inference_pb2.ServerLiveRequest())

                job = await c2p.Segment(request, metadata=(("authorization", f"Bearer {ALPHA}"),))
                mine = segmentation_pb2.GetSegmentationRequest(id=job.id)
                assert (await c2p.GetSegmentation(mine, metadata=(("x-api-key", ALPHA),))).id == job.id
                for name in ("GetSegmentation", "DeleteSegmentation"):
                    with pytest.raises(grpc.aio.AioRpcError) as theirs:
                        if name == "GetSegmentation":
                            await c2p.GetSegmentation(mine, metadata=(("x-api-key", BETA),))
                        else:
                            await c2p.DeleteSegmentation(
                                segmentation_pb2.DeleteSegmentationRequest(id=job.id), metadata=(("x-api-key", BETA),)
                            )
                    assert theirs.value.code() == grpc.StatusCode.NOT_FOUND
                assert (await c2p.GetSegmentation(mine, metadata=(("x-api-key", ALPHA),))).id == job.id
        finally:
            await stop_server(server, grace_s=1)
            await client.aclose()

    asyncio.run(scenario())


async def _first(stream: object) -> object:
    async for item in stream:  # type: ignore[attr-defined]
        return item
    return None
