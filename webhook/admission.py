"""AdmissionReview in, AdmissionReview out: parsing, the decisions, the responses.

Pure functions only. The server reads the body and the key cache, calls `review_*`,
and writes what comes back. Two error families, as the API server sees them:
`MalformedReview` (the request itself is bad: HTTP 4xx) and a `Verdict` whose response
says `allowed: false` (the object is refused, with a message a user can act on).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from .config import VOLUME_NAME, Settings
from .injection import (FILE_MODE, Injected, build_mount, find_mount_conflict,
                        inject_keys, needs_keys, select_containers)
from .key_secrets import is_key_secret, parse_key_secret
from .keys import ALLOW_DELETE_ANNOTATION, KeyFile, Keyring

REVIEW_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
# The namespace controller deletes every object of a namespace being deleted; refusing
# it leaves the namespace stuck in Terminating (kube-controller-manager's
# namespace deleter retries forever), so key-Secret deletes by it are always allowed.
NAMESPACE_CONTROLLER = "system:serviceaccount:kube-system:namespace-controller"

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

    @property
    def is_pod(self) -> bool:
        return self.group == "" and self.kind == "Pod"

    @property
    def is_secret(self) -> bool:
        return self.group == "" and self.kind == "Secret"

    @property
    def object_name(self) -> str:
        meta = (self.object or self.old_object or {}).get("metadata") or {}
        return self.name or meta.get("name") or meta.get("generateName") or ""


def parse_review(body: bytes) -> AdmissionRequest:
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReview(f"body is not valid JSON: {exc}") from None
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
    user = request.get("userInfo") if isinstance(request.get("userInfo"), dict) else {}
    return AdmissionRequest(
        api_version=review["apiVersion"], uid=uid, group=str(kind.get("group") or ""),
        kind=kind["kind"], operation=request["operation"],
        namespace=str(request.get("namespace") or ""), name=str(request.get("name") or ""),
        object=request.get("object"), old_object=request.get("oldObject"),
        dry_run=bool(request.get("dryRun")), username=str(user.get("username") or ""),
    )


# --- responses (cf. controller-runtime's Allowed/Denied/Patched/Errored) --------------

def build_review(api_version: str, response: AdmissionResponseWire) -> AdmissionReviewWire:
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def allowed(uid: str, *, warnings: tuple[str, ...] = ()) -> AdmissionResponseWire:
    response: AdmissionResponseWire = {"uid": uid, "allowed": True}
    if warnings:
        response["warnings"] = list(warnings)
    return response


def patched(uid: str, patch: tuple[dict[str, Any], ...], *, warnings: tuple[str, ...] = (),
            audit: Mapping[str, str] | None = None) -> AdmissionResponseWire:
    response = allowed(uid, warnings=warnings)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()).decode()
    if audit:
        response["auditAnnotations"] = dict(audit)
    return response


def denied(uid: str, message: str, *, code: int = 403,
           warnings: tuple[str, ...] = ()) -> AdmissionResponseWire:
    response: AdmissionResponseWire = {
        "uid": uid, "allowed": False,
        "status": {"code": code, "message": message, "reason": "Forbidden"},
    }
    if warnings:
        response["warnings"] = list(warnings)
    return response


def errored(uid: str, message: str, *, code: int = 500) -> AdmissionResponseWire:
    return {"uid": uid, "allowed": False,
            "status": {"code": code, "message": message, "reason": "InternalError"}}


# --- decisions --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    response: AdmissionResponseWire
    files: tuple[KeyFile, ...] = ()
    # A refusal caused by the namespace's key Secrets: the server confirms it with a
    # live read before sending it, so a cache a moment behind never denies (SPEC §5).
    key_state: bool = False

    @property
    def message(self) -> str:
        return self.response.get("status", {}).get("message", "")

    def with_warning(self, warning: str) -> Verdict:
        response = dict(self.response)
        response["warnings"] = [*response.get("warnings", []), warning]
        return dataclasses.replace(self, response=response)


def review_mutation(request: AdmissionRequest, *, keyring: Keyring, settings: Settings,
                    now: datetime | None = None) -> Verdict:
    """`/mutate`: inject the keys into a backend Pod being created (SPEC §4, §5)."""
    if not (request.is_pod and request.operation == "CREATE"):
        return Verdict("skipped", allowed(request.uid))
    pod = request.object
    if pod is None:
        return Verdict("denied", denied(request.uid, "Pod CREATE request carries no object",
                                        code=400))
    if not needs_keys(pod, settings=settings):
        return Verdict("skipped", allowed(request.uid))
    outcome = inject_keys(pod, keyring=keyring, settings=settings, now=now)
    if not isinstance(outcome, Injected):
        return Verdict("denied", denied(request.uid, outcome.message),
                       key_state=outcome.from_key_state)
    return Verdict("injected", patched(request.uid, outcome.patch, warnings=outcome.warnings,
                                       audit={"encryption-keys": outcome.status}),
                   files=outcome.files)


def review_validation(request: AdmissionRequest, *, keyring: Keyring,
                      settings: Settings) -> Verdict:
    """`/validate`: backend Pods as finally stored, and key Secrets (SPEC §6)."""
    if request.is_pod and request.operation == "CREATE" and request.object is not None:
        return review_final_pod(request, keyring=keyring, settings=settings)
    if request.is_secret:
        return review_key_secret(request, settings=settings)
    return Verdict("allowed", allowed(request.uid))


def review_final_pod(request: AdmissionRequest, *, keyring: Keyring,
                     settings: Settings) -> Verdict:
    pod = request.object or {}
    if not needs_keys(pod, settings=settings):
        return Verdict("allowed", allowed(request.uid))
    problem = find_injection_problem(pod, keyring=keyring, settings=settings)
    if problem is None:
        return Verdict("allowed", allowed(request.uid))
    message, key_state = problem
    return Verdict("denied", denied(request.uid, (
        f"backend Pod does not carry keymount's encryption keys as injected: {message}. "
        f"Another mutating webhook may have changed it after keymount; list them with "
        f"`kubectl get mutatingwebhookconfigurations`")), key_state=key_state)


def find_injection_problem(pod: Mapping[str, Any], *, keyring: Keyring,
                           settings: Settings) -> tuple[str, bool] | None:
    """What is wrong with a stored backend Pod's key volume, and whether fresher key
    state could make it right; None when it is as SPEC §4 says."""
    spec = pod.get("spec") if isinstance(pod.get("spec"), Mapping) else {}
    volumes = [v for v in spec.get("volumes") or [] if isinstance(v, Mapping)
               and v.get("name") == VOLUME_NAME]
    if len(volumes) != 1:
        return f"expected one volume {VOLUME_NAME!r}, found {len(volumes)}", False
    projected = volumes[0].get("projected")
    if set(volumes[0]) != {"name", "projected"} or not isinstance(projected, Mapping):
        return f"volume {VOLUME_NAME!r} is not a projected volume", False
    if projected.get("defaultMode") != FILE_MODE:
        return f"volume {VOLUME_NAME!r} has defaultMode {projected.get('defaultMode')}", False
    sources = projected.get("sources") or []
    if not sources:
        return f"volume {VOLUME_NAME!r} has no key sources", False
    for position, source in enumerate(sources):
        secret = source.get("secret") if isinstance(source, Mapping) else None
        if set(source) != {"secret"} or not isinstance(secret, Mapping):
            return f"volume {VOLUME_NAME!r} projects something other than key Secrets", False
        item = {"key": settings.key_field, "path": f"encryption-key-{position + 1}"}
        if secret.get("items") != [item]:
            return f"key source {position + 1} does not project {item}", False
        record = keyring.find(str(secret.get("name")))
        if record is None or not record.valid:
            return (f"volume {VOLUME_NAME!r} references {secret.get('name')!r}, not a valid "
                    f"key Secret of namespace {keyring.namespace!r}"), True
    targets = select_containers(pod)
    if not isinstance(targets, list):
        return targets.message, False
    mount = build_mount(settings=settings)
    for _, container in targets:
        mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") == VOLUME_NAME]
        if not any(_same_mount(m, mount) for m in mounts):
            return (f"container {container.get('name')!r} does not mount {VOLUME_NAME!r} "
                    f"read-only at {settings.mount_path}"), False
    for path_prefix in ("containers", "initContainers"):
        for container in spec.get(path_prefix) or []:
            conflict = find_mount_conflict(container, mount_path=settings.mount_path)
            if conflict:
                return (f"container {container.get('name')!r} mounts volume {conflict!r} at "
                        f"or under {settings.mount_path}"), False
    return None


def _same_mount(actual: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return (actual.get("mountPath") == wanted["mountPath"] and actual.get("readOnly") is True
            and not actual.get("subPath") and not actual.get("subPathExpr"))


def review_key_secret(request: AdmissionRequest, *, settings: Settings) -> Verdict:
    """Refuse what would lose a key or put an unusable one in place (SPEC §6b)."""
    new, old = request.object, request.old_object
    is_key = {"new": new is not None and is_key_secret(new, settings=settings),
              "old": old is not None and is_key_secret(old, settings=settings)}
    name = request.object_name
    ns = request.namespace
    if request.operation == "DELETE":
        if old is None:
            # Before 1.15 DELETE carried no oldObject; without it nothing can be checked,
            # and the webhook fails closed.
            return Verdict("denied", denied(request.uid, (
                f"cannot tell whether Secret {name!r} holds a key: the DELETE request "
                f"carries no oldObject")))
        if not is_key["old"] or _may_delete(old, request):
            return Verdict("allowed", allowed(request.uid))
        return Verdict("denied", denied(request.uid, (
            f"Secret {name!r} in namespace {ns!r} holds an encryption key that old data may "
            f"still need; deleting it makes that data undecryptable. Retire it first: "
            f"keymount keys retire {name} -n {ns}")))
    if request.operation not in ("CREATE", "UPDATE") or new is None:
        return Verdict("allowed", allowed(request.uid))
    if is_key["new"]:
        record = parse_key_secret(new, settings=settings, namespace=ns)
        if not record.valid:
            return Verdict("denied", denied(request.uid, (
                f"key Secret {name!r} in namespace {ns!r} is invalid: {record.check.reason}. "
                f"Check key material with `keymount keys check FILE`, or generate one with "
                f"`keymount keys create {name} -n {ns} --generate`")))
        warnings = (f"key Secret {name!r}: {record.check.warning}",) if record.check.warning \
            else ()
    else:
        warnings = ()
    if request.operation == "UPDATE" and is_key["old"] and not _may_delete(old, request):
        before = parse_key_secret(old, settings=settings, namespace=ns)
        after = parse_key_secret(new, settings=settings, namespace=ns) if is_key["new"] \
            else None
        if before.valid and (after is None or after.fingerprint != before.fingerprint):
            change = ("removes the key label" if after is None
                      else "replaces the key material")
            return Verdict("denied", denied(request.uid, (
                f"this update of key Secret {name!r} in namespace {ns!r} {change} "
                f"(fingerprint {before.fingerprint}); data encrypted with that key would "
                f"become undecryptable. Add a new key instead: keymount keys rotate -n {ns} "
                f"--generate")))
    return Verdict("allowed", allowed(request.uid, warnings=warnings))


def _may_delete(secret: Mapping[str, Any] | None, request: AdmissionRequest) -> bool:
    annotations = ((secret or {}).get("metadata") or {}).get("annotations") or {}
    return (annotations.get(ALLOW_DELETE_ANNOTATION) == "true"
            or request.username == NAMESPACE_CONTROLLER)

