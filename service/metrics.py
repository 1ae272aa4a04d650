"""Prometheus metrics, named after Triton's so existing dashboards and habits carry over.

One ``Metrics`` object per process with its own registry (passed down, never a global), shared by
the gateway and the worker when they run in one process. ``inference_count`` counts slices and
``execution_count`` engine runs: their ratio is the mean batch size the dynamic batcher achieves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_success = Counter(
            "c2p_request_success", "Requests answered without error, by API", ["api"], registry=r
        )
        self.request_failure = Counter(
            "c2p_request_failure",
            "Requests answered with an error, by API and error code",
            ["api", "reason"],
            registry=r,
        )
        self.jobs = Counter("c2p_jobs", "Jobs finished by workers, by outcome", ["outcome"], registry=r)
        self.inference_count = Counter("c2p_inference_count", "Slices run through the engine", registry=r)
        self.execution_count = Counter("c2p_execution_count", "Engine executions (batches)", registry=r)
        self.batch_size = Histogram(
            "c2p_batch_size", "Slices per engine execution", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.pending_requests = Gauge("c2p_pending_requests", "Jobs in flight in this worker", registry=r)
        self.queue_duration = Histogram(
            "c2p_queue_duration_seconds", "Submit to start of processing", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_duration = Histogram(
            "c2p_decode_duration_seconds", "Decoding and preprocessing per job", buckets=LATENCY_BUCKETS, registry=r
        )
        self.infer_duration = Histogram(
            "c2p_infer_duration_seconds", "Inference per job, batching included", buckets=LATENCY_BUCKETS, registry=r
        )
        self.encode_duration = Histogram(
            "c2p_encode_duration_seconds", "Masks, RLE and report per job", buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute_duration = Histogram(
            "c2p_compute_duration_seconds", "One engine execution", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stream_length = Gauge("c2p_stream_length", "Jobs queued or running (stream entries)", registry=r)
        self.stream_lag = Gauge("c2p_stream_lag", "Entries not yet delivered to any worker", registry=r)
        self.stream_pending = Gauge("c2p_stream_pending", "Entries delivered and not yet acknowledged", registry=r)
        self.dead_letters = Gauge("c2p_dead_letters", "Entries in the dead-letter stream", registry=r)
        self.redeliveries = Counter("c2p_redeliveries", "Jobs reclaimed from a silent worker", registry=r)
        self.forwarded = Counter(
            "c2p_forwarded",
            "DICOM SEG objects sent on to the DICOMweb destination, by outcome",
            ["outcome"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
