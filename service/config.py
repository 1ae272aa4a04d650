"""One Settings object, built once at start-up from ``C2P_*`` variables and passed down; no globals.

Nested groups read ``C2P_<GROUP>__<FIELD>`` (e.g. ``C2P_ENGINE__KIND=torchscript``). A misspelt
variable would silently fall back to a default, so unknown ``C2P_*`` names are refused at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import DEFAULT_VARIANT

ENV_PREFIX = "C2P_"
NESTED_DELIMITER = "__"


class EngineSettings(BaseModel):
    kind: Literal["onnx", "torchscript"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 0 lets the runtime use every physical core; set it to the CPU limit of the container.
    intra_op_threads: int = Field(0, ge=0, le=256)
    inter_op_threads: int = Field(1, ge=1, le=64)
    max_batch_size: int = Field(16, ge=1, le=1024)
    # ONNX Runtime's idle threads spin for a while after each run. That buys a little latency on a
    # dedicated core and steals CPU from everything else in the process (decoding, the batcher).
    spin_wait: bool = False
    warmup: bool = True


MIB = 1024 * 1024


class LimitSettings(BaseModel):
    """Checked against headers before a single pixel is decoded, so no upload can exhaust memory."""

    max_upload_bytes: int = Field(1024 * MIB, ge=1)  # one request, all files together
    # Uploads a gateway reads at once (REST, STOW-RS, Open Inference REST); more get 503 with Retry-After. Each
    # costs a few MiB of memory and up to its size of spool disk (TMPDIR) while it is read and queued.
    max_concurrent_uploads: int = Field(64, ge=1)
    max_files: int = Field(2000, ge=1)  # files in one series (multipart parts or zip members)
    max_pixels_per_slice: int = Field(8192 * 8192, ge=1)  # rows x columns
    max_slices: int = Field(4096, ge=1)  # frames x files, or NIfTI z
    max_voxels: int = Field(600_000_000, ge=1)  # the decoded volume, all slices
    max_expansion_ratio: int = Field(200, ge=1)  # gzip / deflate / zip: decoded bytes per stored byte
    # ... checked only beyond this decoded size: a blank image compresses far better than 200:1 and is a valid
    # input (an all-zero 197 x 233 NIfTI is 3 MB from 8 KB), while a bomb still has to be large to hurt.
    expansion_floor_bytes: int = Field(64 * MIB, ge=0)
    # A DICOM series is one regular volume: a slice step more than this far (relative) from the median is a missing
    # slice or irregular spacing, and the series is refused (service/inputs/dicom/spacing.py).
    slice_spacing_tolerance: float = Field(0.1, gt=0, lt=1)

    def expansion_bound(self, stored: int) -> int:
        """The most a compressed member of ``stored`` bytes may decode to (before the upload limit)."""
        return max(self.max_expansion_ratio * stored, self.expansion_floor_bytes)


class QueueSettings(BaseModel):
    """Redis Streams names and the job lifecycle's clocks."""

    prefix: str = Field("c2p", pattern=r"^[A-Za-z0-9_.:-]+$")
    max_pending: int = Field(1000, ge=1)  # queued + running jobs; above it new jobs get 429
    retry_after_s: int = Field(5, ge=1)
    payload_ttl_s: int = Field(3600, ge=10)
    result_ttl_s: int = Field(3600, ge=10)
    # A worker renews the leases of its jobs every worker.heartbeat_s (their stream entries' idle time); an entry
    # not renewed for this long has lost its worker (killed, partitioned, frozen) and any live worker's janitor
    # takes it over. Short, so a killed worker's jobs resume within seconds; several heartbeats long, so a busy
    # worker never loses a job it is still working on.
    lease_s: float = Field(10.0, gt=0)
    # The longest a live worker keeps one job: past it the heartbeat stops renewing its lease and another worker
    # takes it. The job's own timeout (worker.job_timeout_s) normally ends it well before.
    job_deadline_s: float = Field(900.0, gt=0)
    max_deliveries: int = Field(3, ge=1)  # then the job fails and goes to the dead-letter stream
    max_wait_s: float = Field(300.0, ge=0)  # the longest ?wait= a synchronous request may ask for
    # Per tenant: jobs queued or running at once (None: only max_pending bounds a tenant); tenant_quotas overrides
    # it per tenant name, e.g. C2P_QUEUE__TENANT_QUOTAS='{"radiology": 500}'.
    tenant_max_pending: int | None = Field(None, ge=1)
    tenant_quotas: dict[str, int] = Field(default_factory=dict)
    # A submit without an Idempotency-Key that repeats one of the same tenant (same files, same options) within this
    # many seconds answers with the first job: a PACS bridge that retries after a dropped connection must not queue
    # the study twice. 0: off. With a key, the key decides, for as long as the job's record lives.
    dedupe_window_s: float = Field(10.0, ge=0)
    # The bytes jobs may hold in Redis (uploads, kept outputs, results); past it a submit gets 503 storage_full with
    # Retry-After before anything is stored. 0: 80 % of Redis's maxmemory, or no byte limit when Redis has none.
    max_bytes: int = Field(0, ge=0)
    # Submits are refused while Redis's maxmemory-policy could evict job data (anything but noeviction); true
    # accepts that loss (a warning is logged once).
    allow_eviction: bool = False


class WorkerSettings(BaseModel):
    concurrency: int = Field(8, ge=1, le=1024)  # jobs in flight per worker (their slices share batches)
    # The worker takes one job at a time, and a new one only while the jobs it holds have fewer slices than this
    # (their decoded pixels and tensors are what a worker's memory holds); a job larger than it runs alone.
    max_slices_in_flight: int = Field(512, ge=1)
    decode_threads: int = Field(2, ge=1, le=64)
    max_queue_delay_ms: float = Field(5.0, ge=0, le=10_000)
    janitor_interval_s: float = Field(2.0, gt=0)
    heartbeat_s: float = Field(2.0, gt=0)  # well inside queue.lease_s (Settings checks: at most half of it)
    # A job's timeout: this, plus job_timeout_per_slice_s for each of its slices once they are known, at most
    # queue.job_deadline_s. Past it the job fails with job_timeout (a server-side failure) and is dead-lettered.
    job_timeout_s: float = Field(60.0, gt=0)
    job_timeout_per_slice_s: float = Field(1.0, ge=0)
    # One engine call (a batch) longer than this is hung: its items fail with engine_hung, its thread is abandoned
    # and the next batch runs on a fresh one. With max_hung_engine_calls still stuck the worker stops taking jobs,
    # hands back what it holds and exits non-zero, so its supervisor (Kubernetes) starts a clean process.
    batch_timeout_s: float = Field(60.0, gt=0)
    max_hung_engine_calls: int = Field(2, ge=1)
    # SIGTERM: stop taking jobs, finish those in flight for this long, then hand the rest back.
    drain_timeout_s: float = Field(30.0, ge=0)
    # Threshold on the fused probability; the mask is what a caller gets, the probability is not sent.
    threshold: float = Field(0.5, gt=0, lt=1)
    # The plane NIfTI volumes are sliced in, whatever voxel order the file has (service/inputs/orientation.py);
    # DICOM series are sliced as acquired.
    slice_plane: Literal["axial", "coronal", "sagittal"] = "axial"
    # Volume consistency: a slice whose area jumps this many MADs from its neighbours' is an outlier. Outliers
    # are flagged (reliability.outlier_slices) and kept: a real small finding on one to three slices looks
    # exactly like one. Erasing them is an opt-in.
    outlier_mads: float = Field(6.0, gt=0)
    suppress_outliers: bool = False
    # Keep a windowed uint8 preview and the DICOM headers with each result (about one byte per voxel before
    # compression, for result_ttl_s), so the PNG and DICOM SEG formats can be made on request. Off: JSON and
    # NIfTI only.
    keep_outputs: bool = True
    # De-identify the DICOM headers kept for the DICOM SEG a caller downloads (PS3.15 basic profile), so what the
    # service returns carries no patient identifiers. A SEG forwarded back to the source PACS keeps them: it must
    # match the patient and study there.
    deidentify: bool = False
    # A worker running alone (`c2p worker`) serves /metrics and /v2/health/* here; 0 turns it off.
    ops_port: int = Field(8002, ge=0, le=65535)
    # Which models this worker loads: comma-separated NAME or NAME:VERSION from the model repository (the C2P_MODEL
    # model answers to its variant name); unset: all of them.
    models: str | None = None
    # The most memory the loaded models may take together (about 3x their files: service/worker/served.py); a set
    # of models over it stops the start with their sizes. None: no limit.
    memory_budget_mb: int | None = Field(None, ge=1)


GRPC_MAX_MESSAGE = 2**31 - 1


class GrpcSettings(BaseModel):
    """The gRPC server's transport.

    Message limits are sized for volumes: a unary Segment carries the whole upload in one message, so
    the receive limit is the REST upload limit plus framing; larger series use SegmentStream. gRPC cannot
    go above 2 GiB - 1 per message. Keepalive pings let a server notice a vanished client during a long
    wait instead of holding its job forever.
    """

    max_receive_message_bytes: int = Field(1024 * MIB + 4 * MIB, ge=1024, le=GRPC_MAX_MESSAGE)
    # A c2p.v1 Job (RLE masks, per-slice reliability) of a 4096-slice volume is some tens of MB, but an Open
    # Inference Protocol answer carries the mask raw, one byte per voxel: as large as limits.max_voxels allows.
    max_send_message_bytes: int = Field(1024 * MIB + 4 * MIB, ge=1024, le=GRPC_MAX_MESSAGE)
    # Ping an idle connection this often, and drop it if the ping is not answered within the timeout.
    keepalive_time_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(20.0, gt=0)
    # Clients may ping this often (grpc's default of 5 minutes makes servers hang up on clients that
    # keep connections alive every 30 s, a common setting); more often is answered with GOAWAY.
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    # Concurrent calls per connection (HTTP/2 streams).
    max_concurrent_streams: int = Field(100, ge=1, le=2**31 - 1)
    # WatchSegmentation re-reads the job this often.
    watch_interval_s: float = Field(0.1, gt=0, le=10)
    # Health status refresh (Redis answers and a warm worker announced itself).
    health_interval_s: float = Field(1.0, gt=0, le=60)
    # TLS: PEM files. Certificate + key turn TLS on; a client CA on top requires client certificates
    # signed by it (mutual TLS). Without them the port is plaintext, for a mesh or loopback.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _tls_pairs(self) -> GrpcSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("grpc TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("grpc mutual TLS (tls_client_ca_file) needs the server's own certificate and key")
        return self


class DicomWebSettings(BaseModel):
    """Sending each finished DICOM SEG of a job that came in by STOW-RS back to a DICOMweb server (the PACS).

    Delivery is retried with doubling back-off, and its outcome is kept with the job (``delivery`` in the job's
    JSON), so a PACS that was down is visible instead of silently missing results.
    """

    # The destination's DICOMweb root, e.g. http://orthanc:8042/dicom-web/ ; unset: nothing is sent anywhere.
    destination_url: str | None = Field(None, pattern=r"^https?://")
    # Extra request headers, e.g. {"Authorization": "Bearer ..."}; never logged.
    destination_headers: dict[str, str] = Field(default_factory=dict, repr=False)
    attempts: int = Field(5, ge=1, le=100)
    backoff_s: float = Field(2.0, ge=0, le=600)  # before the second attempt; doubles each time
    timeout_s: float = Field(60.0, gt=0)
    # STOW-RS series assembly: instances of one series posted in several requests are collected and segmented as one
    # volume once none has arrived for this long (service/queue/assembly.py). 0: each request's series is a job of
    # its own at once (a PACS that sends a study in one request, as Orthanc does, needs no more).
    assembly_quiet_s: float = Field(0.0, ge=0, le=3600)


# An AE title: 1 to 16 characters of the default repertoire, no backslash (PS3.5 table 6.2-1), not starting with a
# space (leading spaces are not significant).
AE_TITLE = r"^[!-\[\]-~][ -\[\]-~]{0,15}$"


class DimseSettings(BaseModel):
    """The DICOM DIMSE door (service/dimse/): a C-STORE receiver a PACS sends series to, and the C-STORE sender that
    returns each finished DICOM SEG. Off unless a port is set."""

    port: int | None = Field(None, ge=1, le=65535)  # C2P_DIMSE__PORT: listen on settings.host at this port
    ae_title: str = Field("C2P", pattern=AE_TITLE)  # the title callers address, and the one results are sent from
    # Calling AE titles allowed to associate, comma-separated. Empty: any caller, which is allowed only on a loopback
    # address (as an open HTTP port is); elsewhere the service refuses to start.
    allowed_calling_aes: str = ""
    max_associations: int = Field(8, ge=1, le=256)
    max_pdu: int = Field(16382, ge=0, le=2**32 - 1)  # the largest PDU we accept; 0: no limit
    # A series' instances are collected until none has arrived for this long, then segmented as one volume.
    quiet_s: float = Field(2.0, gt=0, le=3600)
    # Where finished SEGs go back to, AE@host:port; unset: results are fetched over HTTP only.
    destination: str | None = Field(None, pattern=r"^[!-\[\]-~][ -\[\]-~]{0,15}@[A-Za-z0-9._-]+:[0-9]{1,5}$")
    attempts: int = Field(5, ge=1, le=100)
    backoff_s: float = Field(2.0, ge=0, le=600)  # before the second attempt; doubles each time
    timeout_s: float = Field(60.0, gt=0)

    def allowed(self) -> list[str]:
        return [ae.strip() for ae in self.allowed_calling_aes.split(",") if ae.strip()]


class SegSettings(BaseModel):
    """What the DICOM SEG a reader sees in the PACS is called (the series list shows these two)."""

    series_number: int = Field(9901, ge=1, le=2**31 - 1)
    # After "RESEARCH USE ONLY", which always leads it; empty: the result's summary (concept, level, slices).
    series_description: str = Field("", max_length=44, pattern=r"^[^\\\x00-\x1f]*$")


class TracingSettings(BaseModel):
    """OpenTelemetry (service/ops/tracing.py): off unless an OTLP/HTTP collector is named."""

    endpoint: str | None = Field(None, pattern=r"^https?://")  # e.g. http://otel-collector:4318
    service_name: str = "c2p-serve"
    sample_ratio: float = Field(1.0, ge=0, le=1)  # of traces started here; a caller's sampled flag is followed


class AuthSettings(BaseModel):
    """Who may call (service/auth.py). API keys come from ``C2P_API_KEYS`` and/or ``keys_file``, each entry
    ``TENANT:sha256:HEX`` (``c2p keys new`` makes one); an OIDC issuer turns bearer JWTs on. With neither, the
    service runs open, which ``c2p serve`` allows only on a loopback address."""

    keys_file: Path | None = None  # one entry per line, '#' comments; re-read when it changes (a mounted Secret)
    oidc_issuer: str | None = Field(None, pattern=r"^https?://")  # the token's iss must equal it
    oidc_audience: str | None = None  # the token's aud must contain it (required with an issuer)
    jwks_url: str | None = Field(None, pattern=r"^https?://")  # default: the issuer's OIDC discovery
    jwks_file: Path | None = None  # a JWKS document on disk, for air-gapped sites
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"])
    # A token naming an unknown key id makes us re-fetch the JWKS (the provider rotated keys), at most this often: a
    # stream of made-up key ids must not turn into a stream of requests to the identity provider.
    jwks_refresh_cooldown_s: float = Field(30.0, ge=0, le=3600)
    # The claim naming the tenant ("tid" for Entra ID, "sub" for one tenant per client).
    tenant_claim: str = "tenant"
    leeway_s: float = Field(30.0, ge=0, le=600)  # clock skew allowed on exp / nbf / iat
    # /metrics without credentials (what Prometheus scrapes); it carries no patient data and no job ids.
    public_metrics: bool = False
    # Who did what to which job: one JSON line per action on the c2p.audit logger, and a capped Redis stream
    # {prefix}:audit of this many entries (0: the log only).
    audit_stream_max_len: int = Field(100_000, ge=0)

    @model_validator(mode="after")
    def _oidc_complete(self) -> AuthSettings:
        if self.oidc_issuer is not None and not self.oidc_audience:
            raise ValueError("auth.oidc_issuer needs auth.oidc_audience: a token for another service must not pass")
        if (self.jwks_url or self.jwks_file) and self.oidc_issuer is None:
            raise ValueError("auth.jwks_url / jwks_file need auth.oidc_issuer")
        unsafe = [a for a in self.algorithms if a.upper() == "NONE" or a.upper().startswith("HS")]
        if unsafe:
            raise ValueError(f"auth.algorithms: {', '.join(unsafe)} not allowed (only public-key signatures)")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # The service's address as its callers reach it (behind a proxy or an ingress), e.g. https://c2p.example.org:
    # the base of the URLs it hands out (STOW-RS RetrieveURL). Unset: the address each request came to.
    public_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    grpc_port: int = Field(8001, ge=1, le=65535)
    redis_url: str | None = None
    # API keys, comma-separated entries TENANT:sha256:HEX (hashes, never the keys themselves); see AuthSettings.
    api_keys: str | None = Field(None, repr=False)
    # A variant name (its shipped weights), a checkpoint (NAME.safetensors + NAME.json) or an export folder: the
    # default model, served when a request names none.
    model: str = DEFAULT_VARIANT
    # A folder of NAME/VERSION/ export folders served beside the default model (service/repository.py).
    model_repository: Path | None = None
    # The service's own folder for what it makes and may remake: model folders, generated code's staging,
    # a private Redis's socket and config (removed on exit). Default $XDG_CACHE_HOME/c2p-serve or
    # ~/.cache/c2p-serve.
    cache_dir: Path = Field(default_factory=lambda: default_cache_dir())
    # Where export folders of models given by name or checkpoint are kept, one per weights digest
    # (default: <cache_dir>/artifacts).
    artifacts_dir: Path | None = None
    engine: EngineSettings = EngineSettings()
    limits: LimitSettings = LimitSettings()
    queue: QueueSettings = QueueSettings()
    worker: WorkerSettings = WorkerSettings()
    grpc: GrpcSettings = GrpcSettings()
    dicomweb: DicomWebSettings = DicomWebSettings()
    dimse: DimseSettings = DimseSettings()
    seg: SegSettings = SegSettings()
    tracing: TracingSettings = TracingSettings()
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> Settings:
        if self.worker.heartbeat_s * 2 > self.queue.lease_s:
            raise ValueError(
                f"worker.heartbeat_s {self.worker.heartbeat_s} must be at most half of queue.lease_s "
                f"{self.queue.lease_s}: a busy worker would lose the jobs it is working on"
            )
        return self

    @model_validator(mode="after")
    def _artifacts_under_cache(self) -> Settings:
        if self.artifacts_dir is None:
            self.artifacts_dir = self.cache_dir / "artifacts"
        return self


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "c2p-serve"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``C2P_*`` names that no setting reads (typos that would otherwise be ignored)."""
    known = set()
    for name, field in Settings.model_fields.items():
        key = ENV_PREFIX + name.upper()
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            known.update(key + NESTED_DELIMITER + sub.upper() for sub in annotation.model_fields)
        else:
            known.add(key)
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from the environment, then explicit overrides (the CLI's flags)."""
    environ = os.environ if environ is None else environ
    unknown = unknown_variables(environ)
    if unknown:
        raise ValueError(f"unknown settings in the environment: {', '.join(unknown)}")
    settings = Settings()
    if overrides:
        settings = Settings.model_validate(
            {**settings.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    return settings
