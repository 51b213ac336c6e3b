"""The HTTP edge: aiohttp apps for the webhooks (HTTPS) and the probes (plain HTTP).

Handlers parse, call the pure decisions in `admission`, and serialize. Everything that
can go wrong on the way is answered without crashing and without letting a backend
Pod through: bad requests get a 4xx with a JSON error; anything unexpected gets an
AdmissionReview that says allowed: false, code 500 (SPEC §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .admission import (AdmissionRequest, MalformedReview, Verdict, build_review, errored,
                        key_change, parse_review, review_mutation, review_validation)
from .config import Settings
from .events import EventRecorder, event_for
from .keyguard import KeyWriters, is_new_key
from .keys import Keyring
from .lifecycle import GENERATED_KEY_NAME
from .metrics import Metrics
from .store import KeyStore, Reservations

log = logging.getLogger("keymount.admission")
server_log = logging.getLogger("keymount.server")

# Kubernetes caps a request body at 3 MiB; an AdmissionReview may carry the object
# twice (object and oldObject), so 7 MiB is the most a genuine review needs.
MAX_BODY = 7 * 1024 * 1024
Webhook = Literal["mutate", "validate"]


class KeySource(Protocol):
    """What the server needs of a key source (local directory or Kubernetes)."""

    async def load(self) -> None: ...

    async def run(self) -> None: ...

    async def confirm(self, namespace: str) -> Keyring: ...


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
    reservations: Reservations = field(default_factory=Reservations)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(timezone.utc))


RUNTIME = web.AppKey("runtime", Runtime)


# --- the webhooks -------------------------------------------------------------------

def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


async def read_review(request: web.Request) -> AdmissionRequest | web.Response:
    """The request's AdmissionReview, or the 4xx response that refuses it."""
    if request.content_type != "application/json":
        return json_error(415, f"content type {request.content_type!r} is not supported; "
                               "send application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        return json_error(413, f"body of {request.content_length} bytes is over the "
                               f"{MAX_BODY}-byte limit")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, f"body is over the {MAX_BODY}-byte limit")
    try:
        return parse_review(body)
    except MalformedReview as exc:
        return json_error(400, str(exc))


async def decide(runtime: Runtime, review: AdmissionRequest, webhook: Webhook) -> Verdict:
    reservations = runtime.reservations

    def verdict_for(keyring: Keyring) -> Verdict:
        reserved = reservations.held(review.namespace) if review.is_secret else None
        if webhook == "mutate":
            return review_mutation(review, keyring=keyring, settings=runtime.settings,
                                   now=runtime.clock(), reserved=reserved)
        return review_validation(review, keyring=keyring, settings=runtime.settings,
                                 writers=runtime.writers, reserved=reserved)

    if review.is_secret and is_new_key(key_change(review), settings=runtime.settings):
        # A new key's number is judged against a fresh view: one live read, as rare as
        # key creation (docs/contract.md, "Key numbers").
        runtime.metrics.live_reads.inc()
        verdict = verdict_for(await runtime.source.confirm(review.namespace))
        key = verdict.key
        if (webhook == "validate" and key is not None and key.allowed
                and key.number is not None and not review.dry_run):
            # Held until the watch brings the Secret: a key racing this one for the same
            # number is refused, never stored beside it.
            reservations.reserve(review.namespace, key.number, review.object_name)
        return verdict
    verdict = verdict_for(runtime.store.keyring(review.namespace))
    if not verdict.key_state:
        return verdict
    # Confirm a key-state refusal with one live read: a key Secret created a moment
    # ago may not have reached the cache yet (SPEC §5). Only ever on this rare path.
    runtime.metrics.live_reads.inc()
    keyring = await runtime.source.confirm(review.namespace)
    verdict = verdict_for(keyring)
    if (verdict.key_state and runtime.auto_generate and webhook == "mutate"
            and not review.dry_run and not keyring.keys and not keyring.invalid):
        # No key Secret at all: make one. Never on dryRun, which must not write.
        keyring = await runtime.source.create_generated_key(review.namespace)
        verdict = verdict_for(keyring)
        if verdict.result == "injected":
            verdict = verdict.with_warning(
                f"keymount generated key Secret {GENERATED_KEY_NAME!r} in namespace "
                f"{review.namespace!r}: back it up now (data encrypted with it is lost "
                f"with it): kubectl get secret {GENERATED_KEY_NAME} -n {review.namespace} "
                f"-o yaml")
    return verdict


def build_handler(webhook: Webhook) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        runtime = request.app[RUNTIME]
        started = time.perf_counter()
        review = await read_review(request)
        if isinstance(review, web.Response):
            runtime.metrics.admissions.labels(webhook, "error").inc()
            return review
        try:
            verdict = await decide(runtime, review, webhook)
        except Exception as exc:  # fail closed, whatever broke
            server_log.exception("admission failed", extra={"uid": review.uid})
            verdict = Verdict("error", errored(
                review.uid, f"keymount could not decide ({type(exc).__name__}); "
                            f"see the keymount logs for uid {review.uid}"))
        elapsed = time.perf_counter() - started
        try:
            runtime.metrics.admissions.labels(webhook, verdict.result).inc()
            runtime.metrics.duration.labels(webhook).observe(elapsed)
            log_decision(review, verdict, webhook=webhook, elapsed=elapsed)
            if runtime.events is not None:
                note = event_for(review, verdict, webhook=webhook)
                if note is not None:
                    runtime.events.emit(note)
        except Exception:  # bookkeeping must not turn a decision into an HTTP 500
            server_log.exception("recording the decision failed", extra={"uid": review.uid})
        return web.json_response(build_review(review.api_version, verdict.response))

    return handle


def log_decision(review: AdmissionRequest, verdict: Verdict, *, webhook: Webhook,
                 elapsed: float) -> None:
    # Every decision on a key Secret is kept at info: who touched which key is the
    # audit trail (docs/contract.md, "Trust").
    level = logging.DEBUG if verdict.result == "skipped" and verdict.key is None \
        else logging.INFO
    if not log.isEnabledFor(level):
        return
    # Not "name" or "message": LogRecord reserves them, and `extra` may not overwrite them.
    fields: dict[str, Any] = {
        "webhook": webhook, "uid": review.uid, "namespace": review.namespace,
        "kind": review.kind, "pod" if review.is_pod else "object": review.object_name,
        "operation": review.operation, "user": review.username, "result": verdict.result,
        "duration_ms": round(elapsed * 1000, 3),
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
        fields["files"] = [f.as_status() for f in verdict.files]
    if verdict.message:
        fields["reason"] = verdict.message
    log.log(level, "admission decision", extra=fields)


def build_webhook_app(runtime: Runtime) -> web.Application:
    # aiohttp refuses bodies over client_max_size itself, which covers chunked
    # requests that declare no Content-Length.
    app = web.Application(client_max_size=MAX_BODY)
    app[RUNTIME] = runtime
    app.router.add_post("/mutate", build_handler("mutate"))
    app.router.add_post("/validate", build_handler("validate"))
    app.cleanup_ctx.append(key_source_ctx)
    return app


async def key_source_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the key source with the app and stop it with the app."""
    runtime = app[RUNTIME]
    tasks = [asyncio.create_task(_keep_keys(runtime), name="keymount-key-source")]
    if runtime.events is not None:
        tasks.append(asyncio.create_task(runtime.events.run(), name="keymount-events"))
    yield
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
            break
        except Exception as exc:
            server_log.warning("first load of key Secrets failed; retrying",
                               extra={"error": f"{type(exc).__name__}: {exc}",
                                      "retry_seconds": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
    await runtime.source.run()


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


# --- TLS ----------------------------------------------------------------------------

def build_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file)
    return context


class CertReloader:
    """Reloads the serving certificate into the live SSLContext when its files change.

    New TLS handshakes use the new pair; open connections keep theirs. cert-manager
    and kubelet Secret-volume updates replace both files, not always at the same
    instant: a pair that does not load yet is retried at the next tick and the old
    one stays in service meanwhile.
    """

    def __init__(self, context: ssl.SSLContext, cert_file: str, key_file: str, *,
                 metrics: Metrics, interval: float = 2.0) -> None:
        self.context, self.cert_file, self.key_file = context, cert_file, key_file
        self.metrics, self.interval = metrics, interval
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple:
        stamps = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            self.metrics.tls_reloads.labels("error").inc()
            server_log.warning("serving certificate changed but does not load yet; "
                               "keeping the previous one", extra={"error": str(exc)})
            return False
        self._stamp = stamp
        self.metrics.tls_reloads.labels("success").inc()
        server_log.info("serving certificate reloaded", extra={"cert": self.cert_file})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload_if_changed()


@dataclass
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 8443
    probe_port: int = 8080
    tls_cert: str = "certs/tls.crt"
    tls_key: str = "certs/tls.key"
    shutdown_grace: float = 5.0
    cert_reload_interval: float = 2.0


async def serve(runtime: Runtime, options: ServeOptions,
                stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop`), then drain as SPEC §8 says."""
    context = build_ssl_context(options.tls_cert, options.tls_key)
    reloader = CertReloader(context, options.tls_cert, options.tls_key,
                            metrics=runtime.metrics, interval=options.cert_reload_interval)
    webhook_runner = web.AppRunner(build_webhook_app(runtime), access_log=None,
                                   shutdown_timeout=30.0)
    probe_runner = web.AppRunner(build_probe_app(runtime), access_log=None)
    await webhook_runner.setup()
    await probe_runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    reload_task = asyncio.create_task(reloader.run(), name="keymount-cert-reloader")
    try:
        await web.TCPSite(probe_runner, options.host, options.probe_port).start()
        await web.TCPSite(webhook_runner, options.host, options.port,
                          ssl_context=context).start()
        server_log.info("serving", extra={"port": options.port,
                                          "probe_port": options.probe_port})
        await stop.wait()
        # Endpoints and kube-proxy take a moment to drop this Pod: keep answering new
        # connections for a grace period while /readyz says 503, then stop.
        runtime.draining = True
        server_log.info("draining", extra={"grace_seconds": options.shutdown_grace})
        await asyncio.sleep(options.shutdown_grace)
    finally:
        reload_task.cancel()
        await webhook_runner.cleanup()  # stops accepting, waits for in-flight requests
        await probe_runner.cleanup()
        server_log.info("stopped")
