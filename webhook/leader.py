"""Leader election for `keymount serve --controller`, on a coordination.k8s.io/v1 Lease.

Every replica serves admission; one of them, the holder of the Lease `keymount-controller`
in keymount's namespace, also runs the controller's work (docs/operations.md, "The
controller"). The algorithm is client-go's `leaderelection` package (kubernetes/kubernetes,
staging/src/k8s.io/client-go/tools/leaderelection/leaderelection.go), the one Kubernetes'
own controllers use, with its timings (lease 15 s, renew deadline 10 s, retry 2 s):

- A candidate never compares the timestamps written in the Lease with its own clock:
  another node's clock may be minutes off. It notes, on its own monotonic clock, when
  it first saw the record as it is now; the holder's term has run out when the record
  has not changed for `leaseDurationSeconds` since then. Clock skew between nodes does
  not matter, only a difference in clock *rates* (bounded by lease/renew, 15/10).
- Every write carries the resourceVersion it was decided on (a create has none), so of
  two candidates taking an expired Lease the API server takes one and answers the other
  409: the loser simply stays a follower.
- The leader renews every retry period and stops leading as soon as it has not renewed
  for the renew deadline (10 s), before anyone else can take the Lease: a follower
  waits the lease duration (15 s) from when it saw the last renewal.
- On a graceful stop the leader cancels its work, waits for it to end, and releases the
  Lease (empty holder, 1 s duration, as client-go's ReleaseOnCancel), so a follower
  takes over at its next attempt instead of 15 s later.

Like client-go this is no fencing: a leader cut off from the API server for longer than
the renew deadline may still be finishing a write when its successor starts. The
controller's work must therefore be idempotent, with its state in the API server.

The layers: `decide` and its helpers are pure (the observed record, our identity, the
local clock); `KubernetesLeases` is the I/O (the sync client in a daemon thread, never
on the event loop); `LeaderElector` is the loop that runs the leader's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypedDict

from .names import CONTROLLER_LEASE

log = logging.getLogger("keymount.leader")

DEFAULT_NAMESPACE = "keymount"
# Holder identities are written by whoever may update the Lease; logs show at most this.
MAX_SHOWN_IDENTITY = 253


@dataclass(frozen=True, slots=True)
class Timings:
    """Kubernetes' own controllers' defaults (kube-controller-manager, kube-scheduler)."""
    lease_duration: float = 15.0  # a follower waits this long without seeing a renewal
    renew_deadline: float = 10.0  # the leader stops leading this long after its last renewal
    retry_period: float = 2.0  # between attempts, to acquire or to renew
    jitter: float = 0.2  # followers' attempts spread over retry_period × (1 + jitter)

    def __post_init__(self) -> None:
        # client-go's own checks: a leader must give up before anyone may take over,
        # and have room for more than one attempt before it does.
        if not self.lease_duration > self.renew_deadline > self.retry_period * 1.2 > 0:
            raise ValueError("leader election timings need lease duration > renew deadline "
                             "> 1.2 × retry period > 0")
        if self.lease_duration != int(self.lease_duration):
            # Followers go by the Lease's leaseDurationSeconds, a whole number.
            raise ValueError("the lease duration must be whole seconds")


# --- the record and the decisions (pure) ---------------------------------------------

@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The election's state as the Lease's spec holds it."""
    holder: str = ""  # empty: released, anyone may take it at once
    lease_duration_seconds: int = 0
    acquire_time: datetime | None = None  # informational only: never compared with our clock
    renew_time: datetime | None = None  # likewise; its change is what tells of a renewal
    transitions: int = 0  # how many times the Lease changed holder


@dataclass(frozen=True, slots=True)
class StoredLease:
    """The Lease as read or written: its record and the version a write must name."""
    record: LeaseRecord
    resource_version: str


@dataclass(frozen=True, slots=True)
class Observation:
    """A record and when *we* first saw it as it is, on our monotonic clock."""
    record: LeaseRecord
    seen_at: float


def observe(previous: Observation | None, record: LeaseRecord, *, now: float) -> Observation:
    """What we know after reading `record` at `now`: the same record keeps the time it
    was first seen (nobody renewed it since); any change, a renewal included, restarts
    the holder's term from now."""
    if previous is not None and previous.record == record:
        return previous
    return Observation(record, now)


def expires_at(observation: Observation) -> float:
    """When, on our clock, the holder's term runs out unless we see it renewed."""
    return observation.seen_at + max(observation.record.lease_duration_seconds, 0)


@dataclass(frozen=True, slots=True)
class Held:
    """Another candidate holds the Lease and its term has not run out."""
    holder: str
    until: float  # our clock


@dataclass(frozen=True, slots=True)
class Claim:
    """Write `record`: create the Lease (there is none) or update the version read."""
    record: LeaseRecord
    renewal: bool  # the Lease was ours already (False: an acquisition)


def decide(observation: Observation | None, *, identity: str, now: float, wall: datetime,
           timings: Timings) -> Held | Claim:
    """client-go's tryAcquireOrRenew, as a decision on what was read (None: no Lease).

    `wall` is only written into the record (acquireTime, renewTime), for people reading
    the Lease; no decision depends on it."""
    duration = int(timings.lease_duration)
    if observation is None:
        return Claim(LeaseRecord(identity, duration, wall, wall, 0), renewal=False)
    record = observation.record
    if record.holder == identity:
        # Ours, whether this process took it or an earlier one of the same identity
        # (a container restarted in the same Pod): renew it, keeping its acquireTime.
        return Claim(replace(record, lease_duration_seconds=duration, renew_time=wall,
                             acquire_time=record.acquire_time or wall), renewal=True)
    if record.holder and now < expires_at(observation):
        return Held(record.holder, expires_at(observation))
    return Claim(LeaseRecord(identity, duration, wall, wall, record.transitions + 1),
                 renewal=False)


def released(record: LeaseRecord, *, wall: datetime) -> LeaseRecord:
    """The record a leader leaves on a graceful stop: no holder, so the next candidate
    to look takes it; a 1 s duration for candidates that wait on the duration alone."""
    return LeaseRecord("", 1, wall, wall, record.transitions)


def renewal_overdue(last_renewal: float, *, now: float, timings: Timings) -> bool:
    """Whether a leader must stop leading: no renewal for the renew deadline. It does so
    `lease_duration - renew_deadline` (5 s) before any follower may take the Lease."""
    return now - last_renewal >= timings.renew_deadline


def next_attempt(held: Held | None, *, now: float, timings: Timings,
                 spread: float) -> float:
    """Seconds until a follower's next attempt: a retry period, spread (`spread` in
    [0, 1)) so followers do not all ask at once, and never later than the moment the
    holder's term runs out, so a dead leader is replaced as soon as the rules allow."""
    delay = timings.retry_period * (1 + timings.jitter * spread)
    if held is not None:
        delay = min(delay, max(held.until - now, 0.0) + 0.05)
    return delay


# --- where and who (pure) ------------------------------------------------------------

def controller_namespace(flag: str | None, environ: Mapping[str, str], *,
                         service_account_namespace: str | None) -> str:
    """keymount's namespace, where the Lease lives: --controller-namespace, else the Pod's
    own (POD_NAMESPACE from the downward API), else its ServiceAccount's, else
    `keymount`."""
    for candidate in (flag, environ.get("POD_NAMESPACE"), service_account_namespace):
        if candidate and candidate.strip():
            return candidate.strip()
    return DEFAULT_NAMESPACE


def controller_identity(environ: Mapping[str, str], *, hostname: str, pid: int) -> str:
    """Who we are in the Lease: the Pod's name (POD_NAME from the downward API), unique
    among replicas and shown by `kubectl get lease`; else host name and process id."""
    name = environ.get("POD_NAME", "").strip()
    return name or f"{hostname}_{pid}"


def shown(identity: str) -> str:
    return identity[:MAX_SHOWN_IDENTITY]


# --- the wire ------------------------------------------------------------------------

class LeaseSpec(TypedDict, total=False):
    holderIdentity: str | None
    leaseDurationSeconds: int | None
    acquireTime: str | None
    renewTime: str | None
    leaseTransitions: int | None


class LeaseMetadata(TypedDict, total=False):
    name: str
    namespace: str
    resourceVersion: str


class LeaseObject(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: LeaseMetadata
    spec: LeaseSpec


def micro_time(moment: datetime | None) -> str | None:
    """A Kubernetes MicroTime: RFC 3339, UTC, microseconds."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _whole(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_lease(obj: Mapping[str, Any]) -> StoredLease:
    """A Lease as the API server returns it. Fields of the wrong type read as absent: a
    Lease edited by hand into nonsense is an expired one, which a candidate replaces."""
    spec = obj.get("spec")
    spec = spec if isinstance(spec, dict) else {}
    metadata = obj.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    holder = spec.get("holderIdentity")
    record = LeaseRecord(
        holder=holder if isinstance(holder, str) else "",
        lease_duration_seconds=_whole(spec.get("leaseDurationSeconds")),
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=_whole(spec.get("leaseTransitions")))
    version = metadata.get("resourceVersion")
    return StoredLease(record, version if isinstance(version, str) else "")


def lease_object(record: LeaseRecord, *, name: str, namespace: str,
                 resource_version: str | None) -> LeaseObject:
    """The Lease to create (no resourceVersion) or to replace (the version we read)."""
    metadata: LeaseMetadata = {"name": name, "namespace": namespace}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": record.holder,
                     "leaseDurationSeconds": record.lease_duration_seconds,
                     "acquireTime": micro_time(record.acquire_time),
                     "renewTime": micro_time(record.renew_time),
                     "leaseTransitions": record.transitions}}


# --- the I/O edge --------------------------------------------------------------------

class LeaseConflict(Exception):
    """Someone else wrote the Lease first (409): we lost this round."""


class LeaseApi(Protocol):
    """The three calls the election makes on its one Lease."""

    where: str  # namespace/name, for logs

    async def read(self) -> StoredLease | None:
        """The Lease, or None when there is none."""

    async def create(self, record: LeaseRecord) -> StoredLease:
        """Create it; LeaseConflict when it exists already."""

    async def replace(self, record: LeaseRecord, *, resource_version: str) -> StoredLease:
        """Replace the version we read; LeaseConflict when it changed (or is gone)."""


class KubernetesLeases:
    """LeaseApi on the API server: the official client's CoordinationV1Api, each call in
    a daemon thread (watch.in_daemon_thread), raw JSON in and out."""

    # Connect and read timeouts of one call; the elector also bounds each attempt by
    # what is left of its renew deadline.
    REQUEST_TIMEOUT = (3.0, 5.0)

    def __init__(self, api_client: Any, *, namespace: str,
                 name: str = CONTROLLER_LEASE) -> None:
        from kubernetes import client
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.where = f"{namespace}/{name}"

    async def read(self) -> StoredLease | None:
        from kubernetes.client.rest import ApiException

        from .watch import in_daemon_thread

        def call() -> StoredLease | None:
            try:
                response = self.api.read_namespaced_lease(
                    self.name, self.namespace, _preload_content=False,
                    _request_timeout=self.REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return parse_lease(json.loads(response.data))
        return await in_daemon_thread(call)

    async def create(self, record: LeaseRecord) -> StoredLease:
        body = lease_object(record, name=self.name, namespace=self.namespace,
                            resource_version=None)
        return await self._write(lambda: self.api.create_namespaced_lease(
            self.namespace, body, _preload_content=False,
            _request_timeout=self.REQUEST_TIMEOUT))

    async def replace(self, record: LeaseRecord, *, resource_version: str) -> StoredLease:
        body = lease_object(record, name=self.name, namespace=self.namespace,
                            resource_version=resource_version)
        return await self._write(lambda: self.api.replace_namespaced_lease(
            self.name, self.namespace, body, _preload_content=False,
            _request_timeout=self.REQUEST_TIMEOUT))

    async def _write(self, send: Callable[[], Any]) -> StoredLease:
        from kubernetes.client.rest import ApiException

        from .watch import in_daemon_thread

        def call() -> StoredLease:
            try:
                response = send()
            except ApiException as exc:
                # 409: created or changed by another candidate since we read it; 404 on
                # a replace: deleted since. Either way another write won the round.
                if exc.status in (404, 409):
                    raise LeaseConflict(str(exc.status)) from None
                raise
            return parse_lease(json.loads(response.data))
        return await in_daemon_thread(call)


# --- the loop ------------------------------------------------------------------------

# What the leader runs: a coroutine that works until it is cancelled (leadership lost,
# or the process stopping). Returning ends the work but not the leadership; raising
# makes the leader step down (release the Lease) and campaign again two retry periods
# later.
LeaderWork = Callable[[], Awaitable[None]]


async def hold() -> None:
    """The leader's work when none is registered: hold the Lease, do nothing else."""
    await asyncio.Future()


def together(works: Sequence[LeaderWork]) -> LeaderWork:
    """Several pieces of work as one: all run at once; the first to fail cancels the
    others (the leader then steps down). With none, the leader only holds the Lease."""
    if not works:
        return hold

    async def run_all() -> None:
        async with asyncio.TaskGroup() as group:
            for work in works:
                group.create_task(_as_coroutine(work))
    return run_all


async def _as_coroutine(work: LeaderWork) -> None:
    await work()


Outcome = Literal["stopped", "lost", "failed"]


@dataclass
class LeaderElector:
    """Campaign for the Lease until stopped; while leading, run the leader's work."""

    leases: LeaseApi
    identity: str
    timings: Timings = Timings()
    on_change: Callable[[bool], None] = lambda leading: None  # e.g. the keymount_leader gauge
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = lambda: datetime.now(UTC)
    spread: Callable[[], float] = random.random
    # Bookkeeping: the last Lease read or written, and what we know of its record.
    stored: StoredLease | None = field(default=None, init=False)
    observation: Observation | None = field(default=None, init=False)
    leading: bool = field(default=False, init=False)
    _last_renewal: float = field(default=0.0, init=False)  # when the last renewal was sent
    _shown_holder: str | None = field(default=None, init=False)
    _last_error: str | None = field(default=None, init=False)

    async def run(self, work: LeaderWork, *, stop: asyncio.Event) -> None:
        """Until `stop` is set: follow, and lead whenever the Lease is ours."""
        log.info("campaigning for the controller Lease",
                 extra={"lease": self.leases.where, "identity": shown(self.identity)})
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if not await self._acquire(stopping):
                    return
                outcome = await self._lead(work, stopping)
                if outcome == "stopped":
                    return
                if outcome == "failed":
                    # Stepped down: give every follower (each asks once per retry
                    # period) the chance to take over before campaigning again, and
                    # keep a failing work from looping on the API server.
                    await _wait(stopping, 2 * self.timings.retry_period)
        finally:
            stopping.cancel()

    # --- following ---------------------------------------------------------------

    async def _acquire(self, stopping: asyncio.Future[Any]) -> bool:
        """Attempt every retry period until the Lease is ours (True) or we stop."""
        while not stopping.done():
            started = self.clock()
            outcome = await self._attempt_until(stopping, self.timings.renew_deadline)
            if isinstance(outcome, float):
                self._last_renewal = outcome
                if stopping.done():  # acquired just as we were told to stop
                    await self._release()
                    return False
                return True
            if stopping.done():
                return False
            delay = next_attempt(outcome, now=self.clock(), timings=self.timings,
                                 spread=self.spread())
            # The attempt itself took time: wait only the rest of the period.
            await _wait(stopping, max(delay - (self.clock() - started), 0.0))
        return False

    async def _attempt_until(self, stopping: asyncio.Future[Any],
                             timeout: float) -> float | Held | None:
        """An attempt, abandoned at `timeout` (a call hung on a dead connection) or when
        we stop; abandoned, it counts as failed."""
        attempt = asyncio.ensure_future(self._attempt())
        await _wait_any({attempt, stopping}, timeout)
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attempt
            return None
        return attempt.result()

    async def _attempt(self) -> float | Held | None:
        """One tryAcquireOrRenew. The Lease is ours: the time the successful write was
        sent (our renewal is at least that recent). Held by another: who and until
        when. None: the write lost a race, or the API server could not be asked."""
        sent = self.clock()
        try:
            if self._fast_renewal_possible(sent):
                # The leader writes on the version it wrote last, without reading
                # first (client-go's fast path); a 409 means someone else wrote.
                with contextlib.suppress(LeaseConflict):
                    return self._wrote(await self._renew_last_written(), sent)
            stored = await self.leases.read()
            now = self.clock()
            self.stored = stored
            self.observation = None if stored is None else observe(
                self.observation, stored.record, now=now)
            self._show_holder()
            decision = decide(self.observation, identity=self.identity, now=now,
                              wall=self.wall(), timings=self.timings)
            if isinstance(decision, Held):
                return decision
            sent = self.clock()
            if stored is None:
                written = await self.leases.create(decision.record)
            else:
                written = await self.leases.replace(
                    decision.record, resource_version=stored.resource_version)
            if not decision.renewal:
                log.info("acquired the controller Lease",
                         extra={"lease": self.leases.where, "identity": shown(self.identity),
                                "transitions": decision.record.transitions})
            return self._wrote(written, sent)
        except LeaseConflict:
            log.debug("another candidate wrote the Lease first",
                      extra={"lease": self.leases.where})
            return None
        except Exception as exc:  # the API server unreachable, RBAC, timeouts
            self._note_error(exc)
            return None

    def may_write(self) -> bool:
        """Whether the leader's work may send a write now: leading, and within the renew
        deadline of the last renewal. Past it a follower may take the Lease once
        `lease_duration - renew_deadline` more has gone by, the margin for a write
        already on its way (client-go's leaders stop at the same deadline)."""
        return self.leading and not renewal_overdue(self._last_renewal, now=self.clock(),
                                                    timings=self.timings)

    def _fast_renewal_possible(self, now: float) -> bool:
        return (self.leading and self.stored is not None and self.observation is not None
                and self.stored.record.holder == self.identity
                and now < expires_at(self.observation))

    async def _renew_last_written(self) -> StoredLease:
        assert self.stored is not None
        renewed = replace(self.stored.record, renew_time=self.wall(),
                          lease_duration_seconds=int(self.timings.lease_duration))
        return await self.leases.replace(renewed,
                                         resource_version=self.stored.resource_version)

    def _wrote(self, written: StoredLease, sent: float) -> float:
        self.stored = written
        self.observation = Observation(written.record, self.clock())
        self._last_error = None
        self._show_holder()
        return sent

    def _show_holder(self) -> None:
        holder = "" if self.observation is None else self.observation.record.holder
        if holder != self._shown_holder:
            self._shown_holder = holder
            if holder and holder != self.identity:
                log.info("the controller Lease is held by another replica",
                         extra={"lease": self.leases.where, "holder": shown(holder)})

    def _note_error(self, exc: Exception) -> None:
        from .watch import describe_error
        message = describe_error(exc)
        # Once per distinct error, not every 2 s while the API server is away.
        if message != self._last_error:
            self._last_error = message
            log.warning("cannot read or write the controller Lease; retrying",
                        extra={"lease": self.leases.where, "error": message})

    # --- leading ------------------------------------------------------------------

    async def _lead(self, work: LeaderWork, stopping: asyncio.Future[Any]) -> Outcome:
        self._set_leading(True)
        task = asyncio.create_task(_as_coroutine(work), name="keymount-leader-work")
        outcome: Outcome = "lost"
        try:
            outcome = await self._renew(task, stopping)
        finally:
            self._set_leading(False)
            finished = await _cancel(task, timeout=self.timings.renew_deadline)
            if outcome != "lost":
                if finished:
                    await self._release()
                else:
                    # Releasing now could let a successor start while this work still
                    # runs: leave the Lease to expire instead.
                    log.error("the leader's work did not end when cancelled; the Lease "
                              "is left to expire", extra={"lease": self.leases.where})
        return outcome

    async def _renew(self, task: asyncio.Task[None],
                     stopping: asyncio.Future[Any]) -> Outcome:
        """Renew every retry period until stopped, the work fails, or the renew deadline
        passes without a renewal (or another holder appears)."""
        watching: set[asyncio.Future[Any]] = {stopping, task}
        while True:
            await _wait_any(watching, self.timings.retry_period)
            if stopping.done():
                return "stopped"
            if task in watching and task.done():
                if task.cancelled() or task.exception() is not None:
                    if not task.cancelled():
                        log.error("the leader's work failed; stepping down",
                                  exc_info=task.exception())
                    return "failed"
                watching.discard(task)  # the work is done; keep the Lease regardless
            while True:
                now = self.clock()
                if renewal_overdue(self._last_renewal, now=now, timings=self.timings):
                    log.warning("could not renew the controller Lease within the renew "
                                "deadline; stopped leading",
                                extra={"lease": self.leases.where,
                                       "renew_deadline_seconds": self.timings.renew_deadline})
                    return "lost"
                remaining = self._last_renewal + self.timings.renew_deadline - now
                outcome = await self._attempt_until(stopping, remaining)
                if stopping.done():
                    return "stopped"
                if isinstance(outcome, float):
                    self._last_renewal = outcome
                    break
                if isinstance(outcome, Held):
                    log.warning("another replica holds the controller Lease; stopped leading",
                                extra={"lease": self.leases.where,
                                       "holder": shown(outcome.holder)})
                    return "lost"
                # What is left of the deadline now, after the attempt: the time it took
                # is gone too (waiting on the earlier figure overran it by up to a retry
                # period).
                left = self._last_renewal + self.timings.renew_deadline - self.clock()
                await _wait_any({stopping}, min(self.timings.retry_period, left))
                if stopping.done():
                    return "stopped"

    async def _release(self) -> None:
        """Give the Lease up (client-go's ReleaseOnCancel), if it is still ours."""
        if self.stored is None or self.stored.record.holder != self.identity:
            return
        record = released(self.stored.record, wall=self.wall())
        try:
            written = await asyncio.wait_for(self.leases.replace(
                record, resource_version=self.stored.resource_version),
                timeout=self.timings.renew_deadline)
        except LeaseConflict:
            return  # someone wrote it since: it is not ours to release
        except Exception as exc:
            from .watch import describe_error
            log.warning("could not release the controller Lease; it expires in its own "
                        "time", extra={"lease": self.leases.where,
                                       "error": describe_error(exc)})
            return
        self.stored = written
        self.observation = Observation(written.record, self.clock())
        log.info("released the controller Lease", extra={"lease": self.leases.where})

    def _set_leading(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        self.on_change(leading)
        if leading:
            log.info("leading: running the controller",
                     extra={"lease": self.leases.where, "identity": shown(self.identity)})
        else:
            log.info("stopped leading", extra={"lease": self.leases.where})


async def _wait(stopping: asyncio.Future[Any], seconds: float) -> None:
    await _wait_any({stopping}, seconds)


async def _wait_any(futures: set[asyncio.Future[Any]], seconds: float) -> None:
    """Until one of `futures` is done or `seconds` pass; never cancels them."""
    await asyncio.wait(futures, timeout=max(seconds, 0.0),
                       return_when=asyncio.FIRST_COMPLETED)


async def _cancel(task: asyncio.Task[None], *, timeout: float) -> bool:
    """Cancel the leader's work and wait for it to end; False if it would not."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done and not task.cancelled():
        task.exception()  # retrieved: _renew reported a failure that mattered
    return task in done


@dataclass
class Controller:
    """What `serve --controller` runs beside admission: the election, and the registry
    of work the leader runs while it holds the Lease (the seam for the reconciler).

    Register work before `run` starts: `controller.work.append(work)`. Each `LeaderWork`
    is started when this process becomes the leader and cancelled when it stops being
    one; with nothing registered the leader only holds the Lease."""

    elector: LeaderElector
    work: list[LeaderWork] = field(default_factory=list)

    async def run(self, *, stop: asyncio.Event) -> None:
        await self.elector.run(together(list(self.work)), stop=stop)

