"""Prometheus metrics, named after Triton's so existing dashboards and habits carry over.

One ``Metrics`` object per process with its own registry (passed down, never a global), shared by
the gateway and the worker when they run in one process. ``c2p_inference_count`` counts slices and
``c2p_inference_exec_count`` engine runs: their ratio is the mean batch size the dynamic batcher achieves.
GPU memory and utilisation come from NVML at scrape time (``watch_gpus``, a worker on CUDA with the ``gpu``
extra); a process without a GPU exports none rather than zeros that would look like an idle GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_success = Counter(
            "c2p_inference_request_success", "Requests answered without error, by API", ["api"], registry=r
        )
        self.request_failure = Counter(
            "c2p_inference_request_failure",
            "Requests answered with an error, by API and error code",
            ["api", "reason"],
            registry=r,
        )
        self.jobs = Counter("c2p_jobs", "Jobs finished by workers, by outcome", ["outcome"], registry=r)
        self.inference_count = Counter(
            "c2p_inference_count", "Slices run through the engine (Triton: inferences)", registry=r
        )
        self.execution_count = Counter(
            "c2p_inference_exec_count", "Engine executions (batches); count / exec_count = mean batch", registry=r
        )
        self.batch_size = Histogram(
            "c2p_inference_batch_size", "Slices per engine execution", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.pending_requests = Gauge(
            "c2p_inference_pending_request_count", "Jobs in flight in this worker", registry=r
        )
        self.request_duration = Histogram(
            "c2p_inference_request_duration_seconds",
            "Successful requests, handler start to answer, by API (a 202 submission is timed to its 202)",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
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

    def succeeded(self, api: str, started: float) -> None:
        """One successful request: counted, and timed from ``started`` (time.perf_counter())."""
        self.request_success.labels(api).inc()
        self.request_duration.labels(api).observe(time.perf_counter() - started)

    def watch_gpus(self) -> bool:
        """Export GPU memory and utilisation (NVML); False, and nothing exported, where NVML is not there."""
        collector = GpuCollector.start()
        if collector is None:
            return False
        self.registry.register(collector)
        return True

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class GpuCollector(Collector):
    """Reads NVML when Prometheus scrapes, like Triton's ``nv_gpu_*`` metrics, one series per device."""

    def __init__(self, nvml: object, count: int) -> None:
        self.nvml = nvml
        self.count = count

    @classmethod
    def start(cls) -> GpuCollector | None:
        try:
            import pynvml  # nvidia-ml-py, the gpu extra
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            log.info("no GPU metrics: NVML is not usable here (%s)", exc)
            return None
        return cls(pynvml, count) if count else None

    def collect(self) -> Iterator[Metric]:
        nvml = self.nvml
        used = GaugeMetricFamily("c2p_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("c2p_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu"])
        busy = GaugeMetricFamily("c2p_gpu_utilization", "GPU busy fraction over the last sample (0..1)", labels=["gpu"])
        for index in range(self.count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)  # type: ignore[attr-defined]
            except Exception as exc:  # a device that went away must not break the whole scrape
                log.warning("GPU %d: NVML read failed (%s)", index, type(exc).__name__)
                continue
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
            busy.add_metric([str(index)], rates.gpu / 100.0)
        yield from (used, total, busy)
