"""keymount's own admission metrics against prometheus_client's Counter and Histogram:
the same observations must expose the same samples."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from webhook.metrics import DURATION_BUCKETS, LOOP_CPU_BUCKETS, AdmissionStats

observations = st.lists(st.tuples(
    st.sampled_from(["mutate", "validate"]),
    st.sampled_from(["injected", "denied", "skipped", "error"]),
    # Exactly on a bound, between bounds, past the last one, and no duration at all
    # (a malformed request is counted but not timed).
    st.one_of(st.none(), st.sampled_from(DURATION_BUCKETS),
              st.floats(min_value=0, max_value=5, allow_nan=False)),
    # The loop's CPU time: the same, against its own finer buckets.
    st.one_of(st.none(), st.sampled_from(LOOP_CPU_BUCKETS),
              st.floats(min_value=0, max_value=1, allow_nan=False))), max_size=60)


def samples(registry: CollectorRegistry) -> set[str]:
    """Exposition lines, without the `_created` timestamps only prometheus_client adds."""
    return {line for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line}


@given(observations)
def test_admission_stats_expose_what_prometheus_client_would(seen):
    ours = CollectorRegistry()
    stats = AdmissionStats()
    ours.register(stats)
    theirs = CollectorRegistry()
    requests = Counter("keymount_admission_requests", "x", ["webhook", "result"],
                       registry=theirs)
    durations = Histogram("keymount_admission_duration_seconds", "x", ["webhook"],
                          registry=theirs, buckets=DURATION_BUCKETS)
    loop_cpu = Histogram("keymount_admission_loop_cpu_seconds", "x", ["webhook"],
                         registry=theirs, buckets=LOOP_CPU_BUCKETS)
    for webhook, result, seconds, cpu in seen:
        stats.record(webhook, result, seconds, loop_cpu=cpu)
        requests.labels(webhook, result).inc()
        if seconds is not None:
            durations.labels(webhook).observe(seconds)
        if cpu is not None:
            loop_cpu.labels(webhook).observe(cpu)
    assert samples(ours) == samples(theirs)
