"""Prometheus metrics (docs/operations.md, "Metrics"). Labels carry names and states,
never key material."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .store import KeyStore, PodStore


class Metrics:
    """One registry per server, so tests and replicas in one process stay apart."""

    def __init__(self, store: KeyStore | None = None, pods: PodStore | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.admissions = AdmissionStats()
        r.register(self.admissions)
        self.watch_restarts = Counter(
            "keymount_watch_restarts", "Times a watch was re-established", registry=r)
        self.last_watch_event = Gauge(
            "keymount_key_watch_last_event_timestamp_seconds",
            "When the key Secret watch last delivered an event or bookmark (Unix time)",
            registry=r)
        self.tls_reloads = Counter(
            "keymount_tls_reloads", "Serving certificate reloads", ["result"], registry=r)
        self.live_reads = Counter(
            "keymount_live_reads", "Live reads of a namespace's keys (before a refusal or "
            "a new key's number), by result: read, coalesced, reused, limited",
            ["result"], registry=r)
        self.connections_dropped = Counter(
            "keymount_connections_dropped", "Connections keymount closed: evicted (their "
            "slot went to a new connection at --max-connections), expired (no answer "
            "begun within --request-timeout) or slow-body (a large review's body still "
            "arriving after a second, while another needed its room)",
            ["reason"], registry=r)
        self.events_dropped = Counter(
            "keymount_events_dropped", "Kubernetes Events not sent because the queue was full",
            registry=r)
        self.log_lines_dropped = Counter(
            "keymount_log_lines_dropped", "Log lines dropped because stderr did not take "
            "them fast enough (the queue was full)", registry=r)
        self.large_reviews = Counter(
            "keymount_large_reviews", "Admission requests whose body was over 16 KiB, or "
            "announced no size: decoded and judged in the review worker", registry=r)
        self.review_worker_restarts = Counter(
            "keymount_review_worker_restarts", "Times the process that decodes and judges "
            "large reviews died (on a review it could not finish) and was started again",
            registry=r)
        self.leader = Gauge(
            "keymount_leader", "1 while this process holds the controller Lease and runs "
            "the controller (serve --controller), else 0", registry=r)
        self.rotations = Counter(
            "keymount_rotations", "The controller's key writes by step: reserved (a slot), "
            "first (a namespace's first key, active at once), staged, activated, restarted "
            "(a workload rolled after an activation); and failed (a step that did not go "
            "through)", ["step"], registry=r)
        # The active key's activation (else creation) per namespace the leader manages;
        # ages are computed at scrape time, so they never go stale between two looks.
        self.key_activations: dict[str, datetime] = {}
        r.register(KeyAgeCollector(self.key_activations))
        if store is not None:
            r.register(StoreCollector(store, pods))

    def watch_event(self) -> None:
        self.last_watch_event.set_to_current_time()


DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# The event loop's CPU per admission: a request over 1 ms stalls every other one
# (README, "Benchmark"), so the buckets are fine around it.
LOOP_CPU_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05, 0.25)


class AdmissionStats(Collector):
    """`keymount_admission_requests_total` and `keymount_admission_duration_seconds`,
    the two metrics every admission updates, as plain numbers turned into metric
    families at scrape time. prometheus_client's Counter and Histogram take a lock per
    update, for threads; only the event loop's thread records and scrapes these."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS,
                 cpu_buckets: tuple[float, ...] = LOOP_CPU_BUCKETS) -> None:
        self.buckets, self.cpu_buckets = buckets, cpu_buckets
        self.counts: dict[tuple[str, str], int] = {}
        # Per webhook: one count per bucket, one for +Inf, then the sum of seconds.
        self.durations: dict[str, list[float]] = {}
        self.loop_cpu: dict[str, list[float]] = {}

    def record(self, webhook: str, result: str, seconds: float | None = None, *,
               loop_cpu: float | None = None) -> None:
        key = (webhook, result)
        self.counts[key] = self.counts.get(key, 0) + 1
        if seconds is not None:
            _observe(self.durations, self.buckets, webhook, seconds)
        if loop_cpu is not None:
            _observe(self.loop_cpu, self.cpu_buckets, webhook, loop_cpu)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("keymount_admission_requests",
                                       "Admission requests by webhook and result",
                                       labels=["webhook", "result"])
        for (webhook, result), count in sorted(self.counts.items()):
            requests.add_metric([webhook, result], count)
        yield requests
        yield _histogram("keymount_admission_duration_seconds",
                         "Time to answer an admission request", self.buckets,
                         self.durations)
        yield _histogram("keymount_admission_loop_cpu_seconds",
                         "CPU time the event loop spent on an admission once its body "
                         "was in: decoding, deciding, logging, encoding the answer (a "
                         "decision that waited for a live read also counts what the loop "
                         "did meanwhile)", self.cpu_buckets, self.loop_cpu)


def _observe(rows: dict[str, list[float]], bounds: tuple[float, ...], webhook: str,
             value: float) -> None:
    row = rows.get(webhook)
    if row is None:
        row = rows[webhook] = [0.0] * (len(bounds) + 2)
    # Bucket `le` counts observations <= le: the first bound not below `value`.
    row[bisect_left(bounds, value)] += 1
    row[-1] += value


def _histogram(name: str, documentation: str, bounds: tuple[float, ...],
               rows: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["webhook"])
    labels = [repr(float(b)) for b in bounds] + ["+Inf"]  # as prometheus_client prints them
    for webhook, row in sorted(rows.items()):
        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for label, observed in zip(labels, row[:-1], strict=True):
            cumulative += observed
            buckets.append((label, cumulative))
        family.add_metric([webhook], buckets, sum_value=row[-1])
    return family


class KeyAgeCollector(Collector):
    """`keymount_key_age_seconds`: how old each managed namespace's active key is."""

    def __init__(self, activations: dict[str, datetime]) -> None:
        self.activations = activations

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ages = GaugeMetricFamily("keymount_key_age_seconds",
                                 "Age of the active key of each namespace the controller "
                                 "manages (since its activation, else its creation)",
                                 labels=["namespace"])
        now = datetime.now(UTC)
        for namespace, since in sorted(self.activations.items()):
            ages.add_metric([namespace], max(0.0, (now - since).total_seconds()))
        yield ages


class StoreCollector(Collector):
    """Cache figures computed at scrape time, so ages are current when read."""

    def __init__(self, store: KeyStore, pods: PodStore | None = None) -> None:
        self.store, self.pods = store, pods

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.count_by_state()
        secrets = GaugeMetricFamily("keymount_key_secrets", "Key Secrets in the cache by state",
                                    labels=["state"])
        for state in ("valid", "invalid", "retired", "slot", "staged"):
            secrets.add_metric([state], counts.get(state, 0))
        yield secrets
        yield GaugeMetricFamily("keymount_cache_ready",
                                "1 once the first full list of key Secrets is in",
                                value=1 if self.store.ready else 0)
        ages = GaugeMetricFamily("keymount_newest_key_age_seconds",
                                 "Age of the newest valid key of each namespace, "
                                 "from its activation (else its creation)",
                                 labels=["namespace"])
        now = datetime.now(UTC)
        for namespace in self.store.namespaces():
            newest = self.store.keyring(namespace).newest
            since = newest.active_since if newest is not None else None
            if since is not None:
                ages.add_metric([namespace], (now - since).total_seconds())
        yield ages
        if self.pods is not None:
            behind = GaugeMetricFamily(
                "keymount_stale_pods", "Backend Pods not on their namespace's current key "
                "set: updating (the kubelet adds the missing keys) or stale (needs a "
                "restart)", labels=["namespace", "state"])
            for (namespace, state), count in sorted(self.pods.behind(self.store).items()):
                behind.add_metric([namespace, state], count)
            yield behind
