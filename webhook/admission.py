"""AdmissionReview in, AdmissionReview out: parsing, the decisions, the responses.

Pure functions only. The server reads the body and the key cache, calls `review_*`,
and writes what comes back. Two error families, as the API server sees them:
`MalformedReview` (the request itself is bad: HTTP 4xx) and a `Verdict` whose response
says `allowed: false` (the object is refused, with a message a user can act on).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from .config import VOLUME_NAME, Settings
from .decoding import decode_review
from .injection import (
    FILE_MODE,
    Injected,
    find_mount_problem,
    inject_keys,
    needs_keys,
    select_containers,
)
from .keyguard import (
    KeyChange,
    KeyDecision,
    KeyWriters,
    Requester,
    guard_key_secret,
    stamp_key_secret,
)
from .keys import KeyFile, Keyring
from .names import as_dict, key_file_name, slot_number

REVIEW_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
Result = Literal["injected", "skipped", "allowed", "denied", "error"]


# --- the wire (admission.k8s.io/v1) -------------------------------------------------

class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class UserInfoWire(TypedDict, total=False):
    username: str
    groups: list[str]


class AdmissionRequestWire(TypedDict):
    uid: str
    kind: GroupVersionKind
    operation: Operation
    namespace: NotRequired[str]
    name: NotRequired[str]
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    dryRun: NotRequired[bool]
    userInfo: NotRequired[UserInfoWire]


class StatusWire(TypedDict, total=False):
    code: int
    message: str
    reason: str


class AdmissionResponseWire(TypedDict, total=False):
    uid: str
    allowed: bool
    status: StatusWire
    patchType: Literal["JSONPatch"]
    patch: str
    warnings: list[str]
    auditAnnotations: dict[str, str]


class AdmissionReviewWire(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    response: AdmissionResponseWire


# --- parsing ---------------------------------------------------------------------

class MalformedReview(ValueError):
    """The body is not an AdmissionReview keymount can answer (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    api_version: str
    uid: str
    group: str
    kind: str
    operation: str
    namespace: str
    name: str
    object: Mapping[str, Any] | None
    old_object: Mapping[str, Any] | None
    dry_run: bool
    username: str
    groups: tuple[str, ...] = ()

    @property
    def is_pod(self) -> bool:
        return self.group == "" and self.kind == "Pod"

    @property
    def is_secret(self) -> bool:
        return self.group == "" and self.kind == "Secret"

    @property
    def requester(self) -> Requester:
        return Requester(self.username, self.groups)

    @property
    def object_name(self) -> str:
        meta = (self.object or self.old_object or {}).get("metadata") or {}
        return self.name or meta.get("name") or meta.get("generateName") or ""


# A Pod or Secret has hundreds of JSON objects and arrays, not hundreds of thousands;
# decoded, a few MiB of `{},` would be hundreds of MiB of dicts (docs/contract.md, "HTTP").
MAX_CONTAINERS = 100_000


def parse_review(body: bytes) -> AdmissionRequest:
    # Each object or array takes at least two bytes ("{}"), so a body shorter than
    # twice the limit cannot hold too many: genuine reviews skip the count.
    if len(body) > 2 * MAX_CONTAINERS and body.count(b"{") + body.count(b"[") > MAX_CONTAINERS:
        raise MalformedReview(f"body holds more than {MAX_CONTAINERS} JSON objects and "
                              f"arrays; not an AdmissionReview keymount answers")
    try:
        # The decode is most of an admission's cost: msgspec against the review's shape,
        # skipping managedFields, else orjson (webhook/decoding.py). Both refuse deep
        # nesting instead of recursing without bound.
        review = decode_review(body)
    except orjson.JSONDecodeError as exc:
        # The position only: the decoder's message may quote the body (a key Secret).
        raise MalformedReview(f"body is not valid JSON (at byte {exc.pos})") from None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise MalformedReview("body is not an AdmissionReview (kind must be AdmissionReview)")
    if review.get("apiVersion") not in REVIEW_VERSIONS:
        raise MalformedReview(f"unsupported AdmissionReview apiVersion "
                              f"{review.get('apiVersion')!r}; use admission.k8s.io/v1")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("AdmissionReview has no request object")
    uid, kind = request.get("uid"), request.get("kind")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("AdmissionReview request has no uid")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise MalformedReview("AdmissionReview request has no kind")
    if request.get("operation") not in ("CREATE", "UPDATE", "DELETE", "CONNECT"):
        raise MalformedReview("AdmissionReview request has no valid operation")
    for field in ("object", "oldObject"):
        if request.get(field) is not None and not isinstance(request[field], dict):
            raise MalformedReview(f"AdmissionReview request.{field} is not an object")
    user = as_dict(request.get("userInfo"))
    groups = user["groups"] if isinstance(user.get("groups"), list) else []
    return AdmissionRequest(
        api_version=review["apiVersion"], uid=uid, group=str(kind.get("group") or ""),
        kind=kind["kind"], operation=request["operation"],
        namespace=str(request.get("namespace") or ""), name=str(request.get("name") or ""),
        object=request.get("object"), old_object=request.get("oldObject"),
        dry_run=bool(request.get("dryRun")), username=str(user.get("username") or ""),
        groups=tuple(str(g) for g in groups),
    )


# --- responses (cf. controller-runtime's Allowed/Denied/Patched/Errored) --------------

def complete(request: AdmissionRequest, response: AdmissionResponseWire) -> AdmissionReviewWire:
    """The answer to `request`: its apiVersion, and its uid set here, once, for every
    response (decisions never carry it; cf. controller-runtime's Response.Complete)."""
    return {"apiVersion": request.api_version, "kind": "AdmissionReview",
            "response": {**response, "uid": request.uid}}


def allowed(*, warnings: tuple[str, ...] = ()) -> AdmissionResponseWire:
    response: AdmissionResponseWire = {"allowed": True}
    if warnings:
        response["warnings"] = list(warnings)
    return response


def patched(patch: tuple[dict[str, Any], ...], *, warnings: tuple[str, ...] = (),
            audit: Mapping[str, str] | None = None, encoded: str = "") -> AdmissionResponseWire:
    """`encoded`: the patch already encoded (injection.encode_patch), if it is."""
    response = allowed(warnings=warnings)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = encoded or base64.b64encode(orjson.dumps(list(patch))).decode()
    if audit:
        response["auditAnnotations"] = dict(audit)
    return response


def denied(message: str, *, code: int = 403,
           warnings: tuple[str, ...] = ()) -> AdmissionResponseWire:
    response: AdmissionResponseWire = {
        "allowed": False,
        "status": {"code": code, "message": message, "reason": "Forbidden"},
    }
    if warnings:
        response["warnings"] = list(warnings)
    return response


def errored(message: str, *, code: int = 500) -> AdmissionResponseWire:
    return {"allowed": False,
            "status": {"code": code, "message": message, "reason": "InternalError"}}


# --- decisions --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    response: AdmissionResponseWire
    files: tuple[KeyFile, ...] = ()
    # A refusal caused by the namespace's key Secrets: the server confirms it with a
    # live read before sending it, so a cache a moment behind never denies
    # (docs/contract.md, "Refusals").
    key_state: bool = False
    key: KeyDecision | None = None  # a decision on a key Secret: logged, and an Event
    status: str = ""  # with `files`: their keymount.io/status JSON

    @property
    def message(self) -> str:
        return self.response.get("status", {}).get("message", "")

    def with_warning(self, warning: str) -> Verdict:
        response: AdmissionResponseWire = {**self.response}
        response["warnings"] = [*self.response.get("warnings", []), warning]
        return dataclasses.replace(self, response=response)


def key_change(request: AdmissionRequest, *,
               reserved: Mapping[int, str] | None = None) -> KeyChange:
    return KeyChange(request.operation, request.namespace, request.object_name,
                     request.object, request.old_object, request.requester,
                     reserved or {})


def key_verdict(request: AdmissionRequest, decision: KeyDecision, *,
                unchanged: Result = "allowed") -> Verdict:
    if not decision.allowed:
        return Verdict("denied", denied(decision.message,
                                        warnings=decision.warnings),
                       key_state=decision.key_state, key=decision)
    response = patched(decision.patch, warnings=decision.warnings)
    return Verdict(unchanged if decision.action == "none" else "allowed", response,
                   key=decision)


def review_mutation(request: AdmissionRequest, *, keyring: Keyring, settings: Settings,
                    now: datetime | None = None,
                    reserved: Mapping[int, str] | None = None) -> Verdict:
    """`/mutate`: inject the keys into a backend Pod being created; stamp a new key
    Secret's number (docs/contract.md, "Injection" and "Key numbers")."""
    if request.is_secret and request.operation in ("CREATE", "UPDATE"):
        return key_verdict(request, stamp_key_secret(
            key_change(request, reserved=reserved), keyring=keyring, settings=settings),
            unchanged="skipped")
    if not (request.is_pod and request.operation == "CREATE"):
        return Verdict("skipped", allowed())
    pod = request.object
    if pod is None:
        return Verdict("denied", denied("Pod CREATE request carries no object",
                                        code=400))
    if not needs_keys(pod, settings=settings):
        return Verdict("skipped", allowed())
    outcome = inject_keys(pod, keyring=keyring, settings=settings, now=now)
    if not isinstance(outcome, Injected):
        return Verdict("denied", denied(outcome.message),
                       key_state=outcome.from_key_state)
    return Verdict("injected", patched(outcome.patch, warnings=outcome.warnings,
                                       audit={"encryption-keys": outcome.status},
                                       encoded=outcome.encoded),
                   files=outcome.files, status=outcome.status)


def review_validation(request: AdmissionRequest, *, keyring: Keyring, settings: Settings,
                      writers: KeyWriters = KeyWriters(),
                      reserved: Mapping[int, str] | None = None) -> Verdict:
    """`/validate`: backend Pods as finally stored, Pods gaining the backend label, and
    key Secrets (docs/contract.md, "The validating webhook")."""
    if request.is_pod and request.operation == "CREATE" and request.object is not None:
        return review_final_pod(request, keyring=keyring, settings=settings)
    if request.is_pod and request.operation == "UPDATE" and request.object is not None:
        return review_pod_relabel(request, keyring=keyring, settings=settings)
    if request.is_secret:
        return key_verdict(request, guard_key_secret(
            key_change(request, reserved=reserved), keyring=keyring, settings=settings,
            writers=writers))
    return Verdict("allowed", allowed())


def review_pod_relabel(request: AdmissionRequest, *, keyring: Keyring,
                       settings: Settings) -> Verdict:
    """A Pod cannot become a backend Pod without its keys: Pod volumes are immutable, so
    one created without keymount's volume can never get it."""
    pod, old = request.object or {}, request.old_object or {}
    if not needs_keys(pod, settings=settings) or needs_keys(old, settings=settings):
        return Verdict("allowed", allowed())
    problem = find_injection_problem(pod, keyring=keyring, settings=settings)
    if problem is None:
        return Verdict("allowed", allowed())
    return Verdict("denied", denied(
        f"Pod {request.object_name!r} cannot become a backend Pod ({settings.pod_selector}) "
        f"by a label change: {problem[0]}, and a running Pod's volumes cannot be added. "
        f"Create a new Pod with the label instead (keymount mounts the keys at creation)"),
        key_state=problem[1])


def review_final_pod(request: AdmissionRequest, *, keyring: Keyring,
                     settings: Settings) -> Verdict:
    pod = request.object or {}
    if not needs_keys(pod, settings=settings):
        return Verdict("allowed", allowed())
    problem = find_injection_problem(pod, keyring=keyring, settings=settings)
    if problem is None:
        return Verdict("allowed", allowed())
    message, key_state = problem
    return Verdict("denied", denied(
        f"backend Pod does not carry keymount's encryption keys as injected: {message}. "
        f"Another mutating webhook may have changed it after keymount; list them with "
        f"`kubectl get mutatingwebhookconfigurations`"), key_state=key_state)


def find_injection_problem(pod: Mapping[str, Any], *, keyring: Keyring,
                           settings: Settings) -> tuple[str, bool] | None:
    """What is wrong with a stored backend Pod's key volume, and whether fresher key
    state could make it right; None when it is as docs/contract.md,
    "Injection", says."""
    spec = as_dict(pod.get("spec"))
    volumes = [v for v in spec.get("volumes") or [] if isinstance(v, dict)
               and v.get("name") == VOLUME_NAME]
    if len(volumes) != 1:
        return f"expected one volume {VOLUME_NAME!r}, found {len(volumes)}", False
    projected = volumes[0].get("projected")
    if set(volumes[0]) != {"name", "projected"} or not isinstance(projected, dict):
        return f"volume {VOLUME_NAME!r} is not a projected volume", False
    if projected.get("defaultMode") != FILE_MODE:
        return f"volume {VOLUME_NAME!r} has defaultMode {projected.get('defaultMode')}", False
    sources = projected.get("sources") or []
    if not sources:
        return f"volume {VOLUME_NAME!r} has no key sources", False
    for source in sources:
        secret = source.get("secret") if isinstance(source, dict) else None
        if set(source) != {"secret"} or not isinstance(secret, dict):
            return f"volume {VOLUME_NAME!r} projects something other than key Secrets", False
        name = str(secret.get("name"))
        if secret.get("optional") is True:
            problem = _slot_problem(secret, settings=settings)
            if problem:
                return problem, False
            continue
        record = keyring.find(name)
        number = keyring.number_of(name)
        if record is None or not record.valid or number is None:
            return (f"volume {VOLUME_NAME!r} references {name!r}, not a valid key Secret "
                    f"of namespace {keyring.namespace!r}"), True
        item = {"key": settings.key_field, "path": key_file_name(number)}
        if secret.get("items") != [item]:
            return f"key source {name!r} does not project {item}", False
    targets = select_containers(pod)
    if not isinstance(targets, list):
        return targets.message, False
    problem = find_mount_problem(spec, targets, settings=settings, injected=True)
    return (problem, False) if problem else None


def _slot_problem(secret: Mapping[str, Any], *, settings: Settings) -> str | None:
    """An optional source must be a rotation slot: the reserved name of a number, at
    that number's file. The guard keeps that name for that number, so a slot whose
    number another key took meanwhile simply stays empty."""
    name = str(secret.get("name"))
    number = slot_number(name)
    if number is None:
        return f"optional source {name!r} is not one of keymount's rotation slots"
    item = {"key": settings.key_field, "path": key_file_name(number)}
    if secret.get("items") != [item]:
        return f"rotation slot {name!r} does not project {item}"
    return None
