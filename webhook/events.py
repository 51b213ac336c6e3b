"""Kubernetes Events for key decisions and refused backend Pods (docs/contract.md, "Trust").

`event_for` decides (pure) which Event a decision deserves: key created, retired or
refused, on the key Secret; a refused backend Pod, on the controller that tried to
create it (a bare Pod: its namespace), where `kubectl describe` shows it to the
person who can act. Never on a dryRun request: the webhooks declare
`sideEffects: NoneOnDryRun`. An Event names numbers, fingerprints and users, never
key material.

`EventRecorder` sends them from a bounded queue in the background, so an admission
never waits for the API server and a flood of refusals cannot grow memory: when the
queue is full, Events are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .admission import AdmissionRequest, Verdict
from .names import as_dict

log = logging.getLogger("keymount.events")
COMPONENT = "keymount"
MAX_MESSAGE = 1024  # the API server refuses Event messages over 1 KiB


@dataclass(frozen=True, slots=True)
class EventNote:
    namespace: str
    kind: str
    name: str
    api_version: str
    uid: str
    type: str  # Normal or Warning
    reason: str
    message: str


_KEY_REASONS = {"created": ("Normal", "KeyCreated"), "retired": ("Normal", "KeyRetired"),
                "pinned": ("Normal", "KeyPinned"), "refused": ("Warning", "KeyChangeRefused")}


def event_for(request: AdmissionRequest, verdict: Verdict, *, webhook: str) -> EventNote | None:
    if request.dry_run:
        return None
    if verdict.key is not None:
        # Created and retired are recorded once, by the validating webhook: it runs
        # last, so its answer is the one the API server acts on.
        if verdict.key.action == "refused" or (
                webhook == "validate" and verdict.key.action in _KEY_REASONS):
            return _key_event(request, verdict)
        return None
    if request.is_pod and verdict.result == "denied":
        return _pod_event(request, verdict)
    return None


def _key_event(request: AdmissionRequest, verdict: Verdict) -> EventNote:
    decision = verdict.key
    assert decision is not None
    type_, reason = _KEY_REASONS[decision.action]
    obj = request.object or request.old_object or {}
    uid = str((obj.get("metadata") or {}).get("uid") or "")
    facts = [f"by {request.username or 'unknown user'}", f"operation {request.operation}"]
    if decision.number is not None:
        facts.append(f"number {decision.number}")
    if decision.fingerprint:
        facts.append(f"fingerprint {decision.fingerprint}")
    summary = {"created": "key created", "retired": "key retired", "pinned": "key number pinned",
               "refused": f"refused: {decision.message}"}[decision.action]
    return EventNote(request.namespace, "Secret", request.object_name, "v1", uid, type_,
                     reason, _clip(f"{summary} ({', '.join(facts)})"))


def _pod_event(request: AdmissionRequest, verdict: Verdict) -> EventNote:
    pod = request.object or {}
    meta = as_dict(pod.get("metadata"))
    owner = next((r for r in meta.get("ownerReferences") or []
                  if isinstance(r, Mapping) and r.get("controller")), None)
    message = _clip(f"backend Pod {request.object_name or '(unnamed)'} refused by keymount: "
                    f"{verdict.message}")
    if owner is not None:
        return EventNote(request.namespace, str(owner.get("kind")), str(owner.get("name")),
                         str(owner.get("apiVersion")), str(owner.get("uid") or ""), "Warning",
                         "BackendPodRefused", message)
    return EventNote(request.namespace, "Namespace", request.namespace, "v1", "", "Warning",
                     "BackendPodRefused", message)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def build_event(note: EventNote, *, now: datetime, host: str = "") -> dict[str, Any]:
    """A core/v1 Event, as client-go's recorder writes one."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The API server wants involvedObject.namespace to equal the Event's namespace;
    # for a bare Pod's refusal the Namespace is named from inside itself, so
    # `kubectl get events -n NS` shows it to the namespace's users.
    involved: dict[str, Any] = {"kind": note.kind, "name": note.name,
                                "apiVersion": note.api_version, "namespace": note.namespace}
    if note.uid:
        involved["uid"] = note.uid
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{note.name or 'keymount'}.", "namespace": note.namespace},
        "involvedObject": involved, "type": note.type, "reason": note.reason,
        "message": note.message, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        "source": {"component": COMPONENT, **({"host": host} if host else {})},
        "reportingComponent": COMPONENT, "reportingInstance": host or COMPONENT,
    }


class EventRecorder:
    """Sends Events in the background through `send` (a call into the API)."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]], *,
                 capacity: int = 256, host: str = "",
                 on_drop: Callable[[], None] = lambda: None,
                 describe: Callable[[Exception], str] = lambda e: type(e).__name__) -> None:
        self.send, self.host, self.on_drop, self.describe = send, host, on_drop, describe
        self.queue: asyncio.Queue[EventNote] = asyncio.Queue(capacity)

    def emit(self, note: EventNote) -> None:
        try:
            self.queue.put_nowait(note)
        except asyncio.QueueFull:
            self.on_drop()

    async def run(self) -> None:
        while True:
            note = await self.queue.get()
            try:
                await self.send(build_event(note, now=datetime.now(UTC),
                                            host=self.host))
            except Exception as exc:  # an Event is best effort; the decision stands
                log.warning("could not record an Event",
                            extra={"reason": note.reason, "namespace": note.namespace,
                                   "error": self.describe(exc)})
