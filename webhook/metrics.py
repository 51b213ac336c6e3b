"""Prometheus metrics (docs/operations.md, "Metrics"). Labels carry names and states,
never key material."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .store import KeyStore, PodStore


class Metrics:
    """One registry per server, so tests and replicas in one process stay apart."""

    def __init__(self, store: KeyStore | None = None, pods: PodStore | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.admissions = Counter(
            "keymount_admission_requests", "Admission requests by webhook and result",
            ["webhook", "result"], registry=r)
        self.duration = Histogram(
            "keymount_admission_duration_seconds", "Time to answer an admission request",
            ["webhook"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
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
            "slot went to a new connection at --max-connections) or expired (no answer "
            "begun within --request-timeout)",
            ["reason"], registry=r)
        self.events_dropped = Counter(
            "keymount_events_dropped", "Kubernetes Events not sent because the queue was full",
            registry=r)
        self.log_lines_dropped = Counter(
            "keymount_log_lines_dropped", "Log lines dropped because stderr did not take "
            "them fast enough (the queue was full)", registry=r)
        if store is not None:
            r.register(StoreCollector(store, pods))
        # Children resolved once: `labels()` costs a lock and a tuple per call, on
        # every admission.
        self._admission: dict[tuple[str, str], Any] = {}
        self._duration: dict[str, Any] = {}

    def admission(self, webhook: str, result: str) -> Any:
        child = self._admission.get((webhook, result))
        if child is None:
            child = self._admission[webhook, result] = self.admissions.labels(webhook, result)
        return child

    def admission_duration(self, webhook: str) -> Any:
        child = self._duration.get(webhook)
        if child is None:
            child = self._duration[webhook] = self.duration.labels(webhook)
        return child

    def watch_event(self) -> None:
        self.last_watch_event.set_to_current_time()


class StoreCollector(Collector):
    """Cache figures computed at scrape time, so ages are current when read."""

    def __init__(self, store: KeyStore, pods: PodStore | None = None) -> None:
        self.store, self.pods = store, pods

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.count_by_state()
        secrets = GaugeMetricFamily("keymount_key_secrets", "Key Secrets in the cache by state",
                                    labels=["state"])
        for state in ("valid", "invalid", "retired"):
            secrets.add_metric([state], counts.get(state, 0))
        yield secrets
        yield GaugeMetricFamily("keymount_cache_ready",
                                "1 once the first full list of key Secrets is in",
                                value=1 if self.store.ready else 0)
        ages = GaugeMetricFamily("keymount_newest_key_age_seconds",
                                 "Age of the newest valid key of each namespace",
                                 labels=["namespace"])
        now = datetime.now(UTC)
        for namespace in self.store.namespaces():
            newest = self.store.keyring(namespace).newest
            if newest is not None and newest.created is not None:
                ages.add_metric([namespace], (now - newest.created).total_seconds())
        yield ages
        if self.pods is not None:
            behind = GaugeMetricFamily(
                "keymount_stale_pods", "Backend Pods not on their namespace's current key "
                "set: updating (the kubelet adds the missing keys) or stale (needs a "
                "restart)", labels=["namespace", "state"])
            for (namespace, state), count in sorted(self.pods.behind(self.store).items()):
                behind.add_metric([namespace, state], count)
            yield behind
