"""AdmissionReview in, AdmissionReview out: the wire, parsing, responses, `Verdict`.

Pure functions only. The server reads the body, parses it here, has `decisions` judge
it, and writes what `complete` makes of the verdict. Two error families, as the API
server sees them: `MalformedReview` (the request itself is bad: HTTP 4xx) and a
`Verdict` whose response says `allowed: false` (the object is refused, with a message a
user can act on).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict

import msgspec
import orjson

from .decoding import decode_review
from .keyguard import KeyDecision, Requester
from .keys import KeyFile
from .names import as_dict

REVIEW_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")

Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
OPERATIONS: tuple[Operation, ...] = ("CREATE", "UPDATE", "DELETE", "CONNECT")
Webhook = Literal["mutate", "validate"]  # the path the request came in on
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


class AdmissionRequest(msgspec.Struct, frozen=True):
    """One review's request, as keymount reads it. Frozen msgspec Structs, here and for
    the other values made per admission (Verdict, decisions.View, injection.Injected):
    as immutable as a frozen dataclass, built in C at a tenth of its cost (README,
    "Benchmark")."""

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
        # Quoted in part: a body of MiBs may be one apiVersion, and the whole of it
        # would be encoded into the answer on the event loop.
        shown = repr(review.get("apiVersion"))
        shown = shown if len(shown) <= 100 else shown[:100] + "..."
        raise MalformedReview(f"unsupported AdmissionReview apiVersion {shown}; "
                              f"use admission.k8s.io/v1")
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("AdmissionReview has no request object")
    uid, kind = request.get("uid"), request.get("kind")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("AdmissionReview request has no uid")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise MalformedReview("AdmissionReview request has no kind")
    if request.get("operation") not in OPERATIONS:
        raise MalformedReview("AdmissionReview request has no valid operation")
    for field in ("object", "oldObject"):
        obj = request.get(field)
        if obj is not None:
            check_object(obj, f"request.{field}")
    user = as_dict(request.get("userInfo"))
    groups = user["groups"] if isinstance(user.get("groups"), list) else []
    return AdmissionRequest(
        api_version=review["apiVersion"], uid=uid, group=str(kind.get("group") or ""),
        kind=kind["kind"], operation=request["operation"],
        namespace=str(request.get("namespace") or ""), name=str(request.get("name") or ""),
        object=request.get("object"), old_object=request.get("oldObject"),
        dry_run=bool(request.get("dryRun")), username=str(user.get("username") or ""),
        groups=tuple(map(str, groups)),
    )


def check_object(obj: Any, where: str) -> None:
    """What the API server guarantees of any object it sends (ObjectMeta's types), and
    every rule reads as such: an object, whose metadata is an object, whose labels and
    annotations map names to strings. Only a direct client can send anything else."""
    if not isinstance(obj, dict):
        raise MalformedReview(f"AdmissionReview {where} is not an object")
    meta = obj.get("metadata")
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise MalformedReview(f"AdmissionReview {where}.metadata is not an object")
    for field in ("labels", "annotations"):
        values = meta.get(field)
        if values is None:
            continue
        # A loop, not all() over a generator: Python 3.11 makes that a frame of its own,
        # on every admission.
        strings = isinstance(values, dict)
        for value in values.values() if strings else ():
            if type(value) is not str:
                strings = False
                break
        if not strings:
            raise MalformedReview(f"AdmissionReview {where}.metadata.{field} is not a map "
                                  f"of strings")


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
    """`encoded`: the patch already encoded (injection.build_patch), if it is."""
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


# --- what a decision returns ---------------------------------------------------------

class Verdict(msgspec.Struct, frozen=True):
    """Every decision in `decisions` returns one; the server completes its response."""

    result: Result
    response: AdmissionResponseWire
    files: tuple[KeyFile, ...] = ()
    # A refusal that a fresher view of the namespace's key Secrets could turn around:
    # the server reads the namespace live and asks the same decision again, so a cache
    # a moment behind never denies; past the live-read limit the refusal stands (fail
    # closed; docs/contract.md, "Refusals").
    key_state: bool = False
    key: KeyDecision | None = None  # a decision on a key Secret: logged, and an Event
    status: str = ""  # with `files`: their keymount.io/status JSON

    @property
    def message(self) -> str:
        return self.response.get("status", {}).get("message", "")

    def with_warning(self, warning: str) -> Verdict:
        response: AdmissionResponseWire = {**self.response}
        response["warnings"] = [*self.response.get("warnings", []), warning]
        return msgspec.structs.replace(self, response=response)
