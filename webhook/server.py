"""The HTTP edge: aiohttp apps for the webhooks (HTTPS) and the probes (plain HTTP).

Handlers parse (`admission`), route to one pure decision (`decisions`), take the edge
steps its verdict asks for (a live read, a generated key), and serialize. Everything that
can go wrong on the way is answered without crashing and without letting a backend
Pod through: bad requests get a 4xx with a JSON error; anything unexpected gets an
AdmissionReview that says allowed: false, code 500 (docs/contract.md, "HTTP").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import orjson
from aiohttp import HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .admission import (
    AdmissionRequest,
    MalformedReview,
    Verdict,
    Webhook,
    complete,
    errored,
    parse_review,
)
from .config import Settings
from .connections import ConnectionGuard, ConnectionLimits, request_received
from .decisions import Handler, PolicyView, View, needs_policy_view, route
from .events import EventRecorder, event_for
from .keyguard import KeyWriters
from .keys import Keyring
from .leader import Controller
from .lifecycle import GENERATED_KEY_NAME
from .livereads import LiveReads, PodListings
from .logs import DecisionLog
from .metrics import Metrics
from .offload import INLINE_BODY, Offload, WorkerFailed
from .podverdicts import PodVerdicts
from .policyreads import PolicyReads
from .sources import ClusterKeySource, KeySource
from .store import KeyStore
from .tls import CertReloader

log = logging.getLogger("keymount.admission")
server_log = logging.getLogger("keymount.server")

# Kubernetes caps a request body at 3 MiB; an AdmissionReview may carry the object
# twice (object and oldObject), so 7 MiB is the most a genuine review needs.
MAX_BODY = 7 * 1024 * 1024
LARGE_BODY = 1024 * 1024


@dataclass
class Runtime:
    settings: Settings
    store: KeyStore
    source: KeySource
    metrics: Metrics
    draining: bool = False
    auto_generate: bool = False  # only with a source that has create_generated_key
    writers: KeyWriters = field(default_factory=KeyWriters)
    events: EventRecorder | None = None
    live_reads: LiveReads = field(init=False)
    pod_listings: PodListings = field(init=False)
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # first full list is in
    large_bodies: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    decisions: DecisionLog = field(default_factory=DecisionLog)
    live_read_rate: float = 10.0
    live_read_burst: int = 20
    # The reads behind a KeyPolicy decision; None without the Kubernetes API
    # (--keys-from), where KeyPolicies are refused.
    policies: PolicyReads | None = None
    # serve --controller: the election, and the work its leader runs (webhook/leader.py).
    controller: Controller | None = None
    # Bodies over INLINE_BODY are decoded and judged in a worker process
    # (webhook/offload.py); None decodes every body on the loop, large ones one at a time.
    offload: Offload | None = None
    # Verdicts on backend Pods, by what they depend on (webhook/podverdicts.py).
    pod_verdicts: PodVerdicts = field(default_factory=PodVerdicts)

    def __post_init__(self) -> None:
        self.live_reads = LiveReads(
            lambda namespace: self.source.confirm(namespace), rate=self.live_read_rate,
            burst=self.live_read_burst, version=self.store.version,
            known=self.store.knows,
            on_call=lambda result: self.metrics.live_reads.labels(result).inc())
        self.pod_listings = PodListings(
            lambda namespace, secret: self.source.pods_listing(namespace, secret))


RUNTIME = web.AppKey("runtime", Runtime)


# --- the webhooks -------------------------------------------------------------------

def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def refuse_headers(request: web.BaseRequest) -> web.Response | None:
    """The 4xx response that refuses the request on its headers alone, or None."""
    if request.content_type != "application/json":
        return json_error(415, f"content type {request.content_type!r} is not supported; "
                               "send application/json")
    # A compressed body's Content-Length is its compressed size: a few KiB would be
    # decoded inline as the MiBs it inflates to, past every byte count. The API server
    # never compresses a review.
    # Every Content-Encoding header, every coding in each ("identity, gzip"); the API
    # server sends none (no comprehension made for none: this runs on every admission).
    headers = request.headers.getall("Content-Encoding", ())
    if headers:
        encodings = [coding.strip().lower() for value in headers
                     for coding in value.split(",")]
        if any(coding not in ("", "identity") for coding in encodings):
            shown = ", ".join(encodings)[:64]
            return json_error(415, f"content encoding {shown!r} is not supported; "
                                   "send the body uncompressed")
    length = request.content_length
    if length is not None and length > MAX_BODY:
        return json_error(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit")
    return None


async def read_body(request: web.BaseRequest) -> bytes | web.Response:
    """The request's body, or the 4xx response that refuses it."""
    refusal = refuse_headers(request)
    if refusal is not None:
        return refusal
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, f"body is over the {MAX_BODY}-byte limit")


async def read_chunks(request: web.BaseRequest) -> list[bytes] | web.Response:
    """The request's body as the chunks it arrived in (none copied or joined, which
    for a body of MiBs would take the loop a millisecond), or the 413 response that
    refuses it (its headers: `refuse_headers`)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > MAX_BODY:
                return json_error(413, f"body is over the {MAX_BODY}-byte limit")
            chunks.append(chunk)
    except ConnectionError:  # dropped (drop_slow_sender) or gone: nobody reads an answer
        return json_error(400, "the connection closed before the body arrived")
    return chunks


def drop_slow_sender(runtime: Runtime, request: web.BaseRequest) -> None:
    """Close the connection of a large review whose body is still arriving after
    offload.SLOW_READER, to give its room to another (offload.ReadAhead)."""
    server_log.warning("a large review's body arrived too slowly; connection closed to "
                       "make room for another", extra={"bytes": request.content_length})
    runtime.metrics.connections_dropped.labels("slow-body").inc()
    transport = request.transport
    if transport is not None:
        transport.abort()


def read_review(body: bytes) -> AdmissionRequest | web.Response:
    """The body's AdmissionReview, or the 400 response that refuses it."""
    try:
        return parse_review(body)
    except MalformedReview as exc:
        return json_error(400, str(exc))


class Judge(msgspec.Struct, frozen=True):
    """Who gives the verdict on a view: the routed handler here, or, for a review
    decoded in the worker process (`request` is then its head), the same handler there."""

    request: AdmissionRequest
    handler: Handler | None = None
    offload: Offload | None = None
    policy_view: bool = False  # for the worker's reviews: needs_policy_view of the whole

    @classmethod
    def here(cls, webhook: Webhook, request: AdmissionRequest) -> Judge:
        return cls(request, handler=route(webhook, request),
                   policy_view=needs_policy_view(request))

    async def verdict(self, view: View) -> Verdict:
        if self.handler is not None:
            return self.handler(self.request, view)
        assert self.offload is not None
        # The view crosses to the worker pickled: the remembered verdicts stay here
        # (the worker's copies of the keyring would never be the ones they name).
        return await self.offload.judge(msgspec.structs.replace(view, pod_verdicts=None))


def decide_at_once(runtime: Runtime, request: AdmissionRequest,
                   by: Judge) -> tuple[Verdict, bool]:
    """The routed handler's verdict on the key cache, and whether it is the answer:
    `decide` has no edge step to take for it (no live read, no Pod listing, no
    KeyPolicy reads). Most admissions end here, on the loop with nothing awaited."""
    assert by.handler is not None and not by.policy_view
    verdict = by.handler(request, view_of(runtime, request,
                                          runtime.store.keyring(request.namespace), "cache"))
    final = not verdict.key_state and (verdict.key is None or not verdict.key.needs_pods)
    return verdict, final


async def decide(runtime: Runtime, request: AdmissionRequest, webhook: Webhook, *,
                 judge_by: Judge | None = None, cached: Verdict | None = None) -> Verdict:
    """Route to one pure decision, then take the edge steps its verdict asks for.
    `cached`: the verdict on the key cache, if `decide_at_once` has it already.

    Nothing here lets a backend Pod through on its own: every answer is a verdict of
    the routed handler (whose table refuses an unrouted backend Pod), a failed step
    raises (answered allowed: false, code 500, by the handler), and a live read past
    its limit leaves the refusal standing.
    """
    by = judge_by or Judge.here(webhook, request)
    verdict, keyring = await judge(runtime, request, by, cached=cached)
    if request.dry_run:
        # The one place dryRun is honoured: a dry run writes nothing (no generated
        # key), it only answers.
        return verdict
    if webhook == "validate":
        return verdict
    if keyring is not None and should_generate(runtime, verdict, keyring):
        return await generate_key(runtime, request, by)
    return verdict


def view_of(runtime: Runtime, request: AdmissionRequest, keyring: Keyring,
            source: Literal["cache", "live"], policies: PolicyView | None = None,
            listed_by: tuple[str, ...] | None = None) -> View:
    return View(keyring, runtime.settings, writers=runtime.writers,
                # the time matters to --max-key-age and to the times stamped on key
                # Secrets; a Pod's injection is remembered without it
                now=runtime.clock() if runtime.settings.max_key_age or not request.is_pod
                else None,
                source=source, policies=policies, pod_verdicts=runtime.pod_verdicts,
                listed_by=listed_by)


async def policy_view(runtime: Runtime, request: AdmissionRequest,
                      needed: bool) -> PolicyView | None:
    """For a KeyPolicy decision (`needed`): its namespace's labels and every
    ClusterKeyPolicy, read for this request (webhook/policyreads.py), or why not."""
    if not needed:
        return None
    if runtime.policies is None:
        return PolicyView(failure="keymount runs without the Kubernetes API (--keys-from)")
    return await runtime.policies.view(request.namespace)


async def judge(runtime: Runtime, request: AdmissionRequest, by: Judge, *,
                cached: Verdict | None = None) -> tuple[Verdict, Keyring | None]:
    """The routed handler's verdict on the cache (`cached`, if given); for a key-state
    refusal, its verdict on one live read of the namespace instead (with that keyring),
    since a key Secret created a moment ago may not have reached the cache yet
    (docs/contract.md, "Refusals").
    Rate limited: past the limit the cached refusal stands (fail closed)."""
    namespace = request.namespace
    verdict = cached if cached is not None else await by.verdict(view_of(
        runtime, request, runtime.store.keyring(namespace), "cache",
        await policy_view(runtime, request, by.policy_view)))
    listed = None
    if verdict.key is not None and verdict.key.needs_pods:
        # Deleting a Secret whose name running Pods may list (a tombstone): which Pods
        # do is read live, from every Pod's volumes (labels and annotations can change
        # on a running Pod; its volumes cannot). Past the limit the refusal stands.
        listed = await runtime.pod_listings.listing(namespace, request.object_name)
        if listed is None:
            return verdict, None
        verdict = await by.verdict(view_of(runtime, request, runtime.store.keyring(namespace),
                                           "cache", listed_by=listed))
    if not verdict.key_state:
        return verdict, None
    # A key Secret's number is judged on a read of its own; a Pod may share a read
    # taken a moment ago (webhook/livereads.py).
    keyring = await runtime.live_reads.confirm(namespace, fresh=request.is_secret)
    if keyring is None:
        return verdict, None
    return await by.verdict(view_of(runtime, request, keyring, "live",
                                    listed_by=listed)), keyring


def should_generate(runtime: Runtime, verdict: Verdict, keyring: Keyring) -> bool:
    """--auto-generate: a key-state refusal, confirmed live, in a namespace with no key
    Secret at all (not even an invalid or retired one, an empty slot or a staged key:
    its key is a key writer's to make, and slot 1 holds the name the generated key would
    take)."""
    return (runtime.auto_generate and verdict.key_state and not keyring.keys
            and not keyring.invalid and not keyring.retired and not keyring.slots
            and not keyring.staged_keys)


async def generate_key(runtime: Runtime, request: AdmissionRequest,
                       by: Judge) -> Verdict:
    """Create the namespace's generated key, then decide again on it."""
    assert isinstance(runtime.source, ClusterKeySource)  # cmd_serve checked it
    keyring = await runtime.source.create_generated_key(request.namespace)
    runtime.live_reads.forget(request.namespace)
    verdict = await by.verdict(view_of(runtime, request, keyring, "live"))
    if verdict.result != "injected":
        return verdict
    return verdict.with_warning(
        f"keymount generated key Secret {GENERATED_KEY_NAME!r} in namespace "
        f"{request.namespace!r}: back it up now (data encrypted with it is lost "
        f"with it): kubectl get secret {GENERATED_KEY_NAME} -n {request.namespace} "
        f"-o yaml")


# One webhook's answer to a request: a function returning the coroutine that answers.
WebHandler = Callable[[web.BaseRequest], Awaitable[web.Response]]


def build_handler(webhook: Webhook, runtime: Runtime) -> WebHandler:
    def handle(request: web.BaseRequest) -> Awaitable[web.Response]:
        # Not a coroutine itself: it returns the one that answers, so an ordinary
        # admission runs one coroutine frame fewer (each resumption of a suspended
        # request passes through every frame of its chain).
        length = request.content_length
        offload = runtime.offload
        if length is not None and length <= (LARGE_BODY if offload is None else INLINE_BODY):
            return answer(request, runtime)
        # Decoded, a hostile body of a few MiB can become hundreds of MiB of objects
        # and take tens of milliseconds: large (or unannounced) ones are handled one at
        # a time, in the worker process if there is one (the API server always sends a
        # Content-Length).
        if offload is None:
            return answer_alone(request, runtime)
        return answer_offloaded(request, runtime, offload)

    async def answer_alone(request: web.BaseRequest, runtime: Runtime) -> web.Response:
        async with runtime.large_bodies:
            return await answer(request, runtime)

    async def answer(request: web.BaseRequest, runtime: Runtime) -> web.Response:
        started = time.perf_counter()
        body = await read_body(request)
        if isinstance(body, web.Response):
            runtime.metrics.admissions.record(webhook, "error")
            return body
        request_received(request.transport)
        # From here the request's work runs on the loop, uninterrupted unless a live
        # read is awaited: its CPU time is what every other request waits behind.
        cpu = time.thread_time()
        review = read_review(body)
        if isinstance(review, web.Response):
            runtime.metrics.admissions.record(webhook, "error",
                                              loop_cpu=time.thread_time() - cpu)
            return review
        try:
            by = Judge.here(webhook, review)
            cached, final = (None, False) if by.policy_view else \
                decide_at_once(runtime, review, by)
        except Exception as exc:  # fail closed, whatever broke
            return finish(runtime, review, failed(review, exc), started=started, cpu=cpu)
        if final and cached is not None:
            return finish(runtime, review, cached, started=started, cpu=cpu)
        verdict = await decide_safely(runtime, review, by, cached=cached)
        return finish(runtime, review, verdict, started=started, cpu=cpu)

    async def answer_offloaded(request: web.BaseRequest, runtime: Runtime,
                               offload: Offload) -> web.Response:
        """`answer` for a body decoded and judged in the worker process: the loop only
        copies chunks, and logs and encodes the answer (webhook/offload.py). The body is
        read before the worker's lock is taken, within a bounded room: a client that
        sends its body slowly holds no lock, and yields its room a second after another
        review needs it (offload.ReadAhead)."""
        started = time.perf_counter()
        runtime.metrics.large_reviews.inc()
        refusal = refuse_headers(request)
        if refusal is not None:
            runtime.metrics.admissions.record(webhook, "error")
            return refusal
        room = request.content_length or MAX_BODY
        read_ahead = offload.read_ahead
        token = await read_ahead.reserve(room, drop=lambda: drop_slow_sender(runtime, request))
        try:
            chunks = await read_chunks(request)
            read_ahead.done_reading(token)
            if isinstance(chunks, web.Response):
                runtime.metrics.admissions.record(webhook, "error")
                return chunks
            request_received(request.transport)
            async with offload.lock:
                length = await offload.write(chunks)
                del chunks  # in the shared buffer now: a 7 MiB body is not kept twice
                read_ahead.release(token)
                return await decide_offloaded(runtime, offload, length, started=started)
        finally:
            read_ahead.release(token)

    async def decide_offloaded(runtime: Runtime, offload: Offload, length: int, *,
                               started: float) -> web.Response:
        """The worker's decision on the body in its buffer, answered (the caller holds
        the worker's lock)."""
        cpu = time.thread_time()
        try:
            head = await offload.parse(webhook, length)
        except WorkerFailed as exc:
            server_log.error("a review could not be decoded", extra={"error": str(exc)})
            runtime.metrics.admissions.record(webhook, "error")
            return json_error(500, f"{exc}; the review is refused, retry it")
        if isinstance(head, str):
            runtime.metrics.admissions.record(
                webhook, "error", loop_cpu=time.thread_time() - cpu - offload.waited_cpu)
            return json_error(400, head)
        review = head.request
        verdict = await decide_safely(runtime, review, Judge(
            review, offload=offload, policy_view=head.policy_view))
        offload.release()
        return finish(runtime, review, verdict, started=started,
                      cpu=cpu + offload.waited_cpu)

    async def decide_safely(runtime: Runtime, review: AdmissionRequest,
                            judge_by: Judge | None = None, *,
                            cached: Verdict | None = None) -> Verdict:
        try:
            return await decide(runtime, review, webhook, judge_by=judge_by, cached=cached)
        except Exception as exc:  # fail closed, whatever broke
            return failed(review, exc)

    def failed(review: AdmissionRequest, exc: Exception) -> Verdict:
        server_log.error("admission failed", exc_info=exc, extra={"uid": review.uid})
        return Verdict("error", errored(
            f"keymount could not decide ({type(exc).__name__}); see the keymount logs "
            f"for uid {review.uid}"))

    def finish(runtime: Runtime, review: AdmissionRequest, verdict: Verdict, *,
               started: float, cpu: float) -> web.Response:
        """Log and record the verdict and encode its answer; `cpu`: the loop's CPU clock
        when the review's work began (moved on by what it did for others meanwhile)."""
        elapsed = time.perf_counter() - started
        try:
            log_decision(runtime.decisions, review, verdict, webhook=webhook,
                         elapsed=elapsed)
            if runtime.events is not None:
                note = event_for(review, verdict, webhook=webhook)
                if note is not None:
                    runtime.events.emit(note)
        except Exception:  # bookkeeping must not turn a decision into an HTTP 500
            server_log.exception("recording the decision failed", extra={"uid": review.uid})
        response = web.Response(body=orjson.dumps(complete(review, verdict.response)),
                                content_type="application/json")
        try:  # recorded last: the answer's encoding is part of the loop's work
            runtime.metrics.admissions.record(webhook, verdict.result, elapsed,
                                              loop_cpu=time.thread_time() - cpu)
        except Exception:  # bookkeeping must not turn a decision into an HTTP 500
            server_log.exception("recording the decision failed", extra={"uid": review.uid})
        if runtime.draining:
            # Shutting down: answer, then close, so the API server's next request opens
            # a connection that the Service sends to another replica.
            response.force_close()
        return response

    return handle


def log_decision(decisions: DecisionLog, review: AdmissionRequest, verdict: Verdict, *,
                 webhook: Webhook, elapsed: float) -> None:
    # Every decision on a key Secret is kept at info: who touched which key is the
    # audit trail (docs/contract.md, "Trust").
    level = logging.DEBUG if verdict.result == "skipped" and verdict.key is None \
        else logging.INFO
    if not decisions.enabled(level):
        return
    # Not "name" or "message": LogRecord reserves them, and `extra` may not overwrite them.
    fields: dict[str, Any] = {
        "webhook": webhook, "uid": review.uid, "namespace": review.namespace,
        "kind": review.kind, "pod" if review.is_pod else "object": review.object_name,
        "operation": review.operation, "user": review.username, "result": verdict.result,
        # milliseconds to 3 places; round(x, 3) formats a decimal string
        "duration_ms": round(elapsed * 1_000_000) / 1000,
    }
    if review.dry_run:
        fields["dry_run"] = True
    if verdict.key is not None:
        fields["key_action"] = verdict.key.action
        if verdict.key.number is not None:
            fields["number"] = verdict.key.number
        if verdict.key.fingerprint:
            fields["fingerprint"] = verdict.key.fingerprint
    if verdict.files:
        # The same list as the keymount.io/status annotation: its JSON, made once per
        # keyring, goes into JSON lines as it is.
        fields["files"] = orjson.Fragment(verdict.status) if decisions.writes_json and \
            verdict.status else [f.as_status() for f in verdict.files]
    if verdict.message:
        fields["reason"] = verdict.message
    decisions.write(level, fields, created=time.time())


def webhook_server(runtime: Runtime) -> web.Server:
    """The webhook port's HTTP server: POST /mutate and POST /validate, nothing else
    (docs/contract.md, "HTTP"). Call it with the event loop running.

    aiohttp's low-level server, not an Application: for every request an Application
    resolves the path through its router, builds and freezes a match_info and looks for
    middlewares, about 5% of keymount's CPU per admission (README, "Benchmark"); two
    fixed paths are one dict lookup. What the router did besides is done here: 404 and
    405 (with Allow), `Expect: 100-continue`, and the body limit, which aiohttp applies
    to chunked bodies too (`client_max_size`)."""
    handlers = {"/mutate": build_handler("mutate", runtime),
                "/validate": build_handler("validate", runtime)}
    loop = asyncio.get_running_loop()

    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine: the handler's own is what aiohttp awaits (`handle`).
        handler = handlers.get(request.path)  # decoded, without the query (?timeout=10s)
        if handler is None or request.method != "POST" or "Expect" in request.headers:
            return unusual(request, handler)
        return handler(request)

    async def unusual(request: web.BaseRequest, handler: WebHandler | None,
                      ) -> web.StreamResponse:
        if handler is None:
            return json_error(404, "not found: keymount answers POST /mutate and "
                                   "POST /validate")
        if request.method != "POST":
            refusal = json_error(405, f"method {request.method[:16]!r} is not allowed; "
                                      "send POST")
            refusal.headers["Allow"] = "POST"
            return refusal
        unmet = await expect(request)
        if unmet is not None:
            return unmet
        return await handler(request)

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any,
                     task: asyncio.Task[None]) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop,
                               client_max_size=MAX_BODY)

    # auto_decompress=False: aiohttp would inflate a compressed body as it arrives,
    # before the handler refuses it (refuse_headers).
    return web.Server(dispatch, request_factory=make_request, access_log=None,
                      auto_decompress=False)


async def expect(request: web.BaseRequest) -> web.Response | None:
    """An `Expect` header as aiohttp's router answers it (RFC 9110, 10.1.1): on HTTP/1.1,
    `100-continue` is answered `100 Continue` at once, and the body follows; anything
    else is refused (417). The API server sends none; curl does, for large bodies."""
    value = request.headers.get("Expect", "")
    if request.version != HttpVersion11 or value.lower() != "100-continue":
        return json_error(417, f"Expect {value[:32]!r} is not supported")
    writer = request.writer
    await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.output_size = 0  # the answer's own bytes are still to come
    await writer.drain()
    return None


@contextlib.asynccontextmanager
async def keeping_keys(runtime: Runtime) -> AsyncIterator[None]:
    """The key source (and the Event recorder) running, for as long as the webhook
    serves: started before it listens, stopped after it is closed."""
    tasks = [asyncio.create_task(_keep_keys(runtime), name="keymount-key-source")]
    if runtime.events is not None:
        tasks.append(asyncio.create_task(runtime.events.run(), name="keymount-events"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _keep_keys(runtime: Runtime) -> None:
    """First full load (retried: /readyz stays 503 until it succeeds), then follow."""
    backoff = 1.0
    while True:
        try:
            await runtime.source.load()
            runtime.loaded.set()
            break
        except Exception as exc:
            server_log.warning("first load of key Secrets failed; retrying",
                               extra={"error": f"{type(exc).__name__}: {exc}",
                                      "retry_seconds": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
    # The cache is long-lived: move it out of the cyclic garbage collector's sight, or
    # every full collection walks tens of thousands of records (a 30 ms stall at
    # 10,000 namespaces x 5 keys, seen as p99 latency).
    gc.collect()
    gc.freeze()
    await runtime.source.run()


async def _control(runtime: Runtime, stop: asyncio.Event) -> None:
    """serve --controller: campaign once the key cache is loaded (a replica that cannot
    read key Secrets should not lead), until `stop`, which releases the Lease. Whatever
    the election does, admission is served: a failure here is logged, never raised."""
    controller = runtime.controller
    assert controller is not None
    loaded = asyncio.ensure_future(runtime.loaded.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loaded, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loaded.cancel()
        stopping.cancel()
    if stop.is_set():
        return
    try:
        await controller.run(stop=stop)
    except Exception:
        server_log.exception("the controller's election failed; admission is still served")
        runtime.metrics.leader.set(0)


async def _report_ready(runtime: Runtime, report: Callable[[str], None]) -> None:
    await runtime.loaded.wait()
    report("ready")


# --- probes and metrics ---------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.draining:
        return web.Response(status=503, text="shutting down\n")
    if not runtime.store.ready:
        return web.Response(status=503, text="key Secrets not listed yet\n")
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[RUNTIME].metrics.registry
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_probe_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop runs sockets and TLS in libuv and Cython instead of Python: on the
    benchmark's review that is about a tenth more admissions per core
    (docs/operations.md, "Event loop"). asyncio, the standard library's loop, stays
    one flag away should uvloop ever misbehave."""
    if kind == "uvloop":
        import uvloop  # an optional import: no wheel for every platform

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 8443
    probe_port: int = 8080
    tls_cert: str = "certs/tls.crt"
    tls_key: str = "certs/tls.key"
    client_ca: str | None = None
    shutdown_grace: float = 5.0
    # After the grace period: how long in-flight requests may take to finish. With
    # the grace this stays well inside a Pod's 30 s termination grace period.
    shutdown_timeout: float = 10.0
    cert_reload_interval: float = 1.0
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    # One of several `--workers`: the webhook port is shared (SO_REUSEPORT), the
    # probe port is private to the supervisor (loopback, any free port), and `report`
    # tells the supervisor "probe <port>" and then "ready" (docs/operations.md, "Workers").
    reuse_port: bool = False
    probe_host: str | None = None
    report: Callable[[str], None] | None = None


async def serve(runtime: Runtime, options: ServeOptions,
                stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain (docs/operations.md, "Shutdown")."""
    async with keeping_keys(runtime):
        await _serve(runtime, options, stop)


async def _serve(runtime: Runtime, options: ServeOptions, stop: asyncio.Event | None) -> None:
    metrics = runtime.metrics
    reloader = CertReloader(options.tls_cert, options.tls_key, client_ca=options.client_ca,
                            interval=options.cert_reload_interval,
                            on_reload=lambda result: metrics.tls_reloads.labels(result).inc())
    http = webhook_server(runtime)
    webhook_runner = web.ServerRunner(http, shutdown_timeout=options.shutdown_timeout)
    probe_runner = web.AppRunner(build_probe_app(runtime), access_log=None)
    await webhook_runner.setup()
    await probe_runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    reload_task = asyncio.create_task(reloader.run(), name="keymount-cert-reloader")
    guard = ConnectionGuard(options.limits,
                            on_event=lambda what: metrics.connections_dropped.labels(what).inc())
    sweep_task = asyncio.create_task(guard.sweep(), name="keymount-request-deadlines")
    listener: asyncio.AbstractServer | None = None
    report_task: asyncio.Task[None] | None = None
    # Started with the server and stopped by the same `stop`: on SIGTERM the leader
    # releases the Lease at once, while this replica goes on draining admission.
    control_task = (asyncio.create_task(_control(runtime, stop), name="keymount-controller")
                    if runtime.controller is not None else None)
    offload_task = (asyncio.create_task(_start_offload(runtime.offload),
                                        name="keymount-review-worker")
                    if runtime.offload is not None else None)
    try:
        # The webhook port first: /readyz may say "ok" the moment the probe port is up
        # (the keys can be listed by then), and a client sent here on that word must
        # find the port listening (a CI run caught a refused connection in between).
        listener = await loop.create_server(
            guard.wrap(http), options.host, options.port,
            ssl=reloader.listening, ssl_handshake_timeout=options.limits.handshake_timeout,
            reuse_address=True, reuse_port=options.reuse_port or None, backlog=512)
        await web.TCPSite(probe_runner, options.probe_host or options.host,
                          options.probe_port).start()
        probe_port = probe_runner.addresses[0][1]  # the bound port, when asked for 0
        server_log.info("serving", extra={"port": options.port, "probe_port": probe_port,
                                          "event_loop": loop_name(loop)})
        if options.report is not None:
            options.report(f"probe {probe_port}")
            report_task = asyncio.create_task(_report_ready(runtime, options.report))
        await stop.wait()
        # Endpoints and kube-proxy take a moment to drop this Pod: keep answering new
        # connections for a grace period while /readyz says 503 and every answer says
        # Connection: close, then stop accepting.
        runtime.draining = True
        server_log.info("draining", extra={"grace_seconds": options.shutdown_grace})
        await asyncio.sleep(options.shutdown_grace)
    finally:
        reload_task.cancel()
        if report_task is not None:
            report_task.cancel()
        if listener is not None:
            listener.close()
            # Requests under way, and the ones connections accepted a moment ago are
            # still to send, are answered before aiohttp closes the idle connections
            # (ConnectionGuard.drain says why not the other way round); a body still
            # arriving meets the request deadline first.
            await guard.drain(timeout=options.shutdown_timeout, fresh_timeout=1.0,
                              then=http.pre_shutdown)
        # Idle connections are closed by now; answers still being written get
        # shutdown_timeout to finish.
        await webhook_runner.cleanup()
        sweep_task.cancel()
        if control_task is not None:
            stop.set()  # also when serving failed: the election ends with the server
            await _finish(control_task, timeout=options.shutdown_timeout)
        await probe_runner.cleanup()
        if runtime.offload is not None:
            assert offload_task is not None
            offload_task.cancel()
            await loop.run_in_executor(None, runtime.offload.close)
        server_log.info("stopped")


async def _start_offload(offload: Offload) -> None:
    """Spawn the review worker while the server starts, not at the first large review;
    a failure here is logged, and the first large review tries again."""
    try:
        await offload.start()
    except Exception:
        server_log.exception("the review worker did not start; large reviews will retry it")


async def _finish(task: asyncio.Task[None], *, timeout: float) -> None:
    """Let `task` end on its own (the Lease released) for `timeout`, then cancel it."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
