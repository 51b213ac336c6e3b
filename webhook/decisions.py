"""The admission decisions and the router that picks one per request.

`route` looks up (webhook, kind, operation) in `ROUTES` and returns one handler; each
handler is a pure function `(request, view) -> Verdict` of the request and a `View` of
its namespace (the keyring, settings, key writers, the time). No
handler does I/O: when a verdict says a fresher view could change it (`key_state`),
the server reads the namespace live and calls the same handler again
(server.decide).

Failing closed is a property of the table, not of branch order: every Pod operation at
either webhook has an entry, and a request with no entry gets `UNROUTED[webhook]`,
which allows anything but a backend Pod and refuses a backend Pod
(docs/contract.md, "The validating webhook").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from .admission import (
    OPERATIONS,
    AdmissionRequest,
    Result,
    Verdict,
    Webhook,
    allowed,
    denied,
    errored,
    patched,
)
from .config import STATUS_ANNOTATION, VOLUME_NAME, Settings
from .injection import (
    FILE_MODE,
    Injected,
    check_keyring,
    ephemeral_containers,
    find_mount_problem,
    inject_keys,
    needs_keys,
    select_containers,
    slot_items,
)
from .key_secrets import parse_key_secret
from .keyguard import (
    KeyChange,
    KeyDecision,
    KeyWriters,
    guard_key_secret,
    is_new_key,
    stamp_key_secret,
)
from .keys import Keyring, parse_time
from .lifecycle import newest_key_too_old, read_status_annotation
from .names import (
    CLUSTERKEYPOLICY_KIND,
    CLUSTERKEYPOLICY_PLURAL,
    KEYPOLICY_KIND,
    KEYPOLICY_PLURAL,
    POLICY_GROUP,
    as_dict,
    as_list,
    is_list_of_objects,
    key_file_name,
    slot_number,
)
from .podverdicts import PodVerdicts, pod_content
from .policy import (
    ClusterKeyPolicy,
    PolicyError,
    bound_violations,
    cluster_policy_problems,
    parse_cluster_key_policy,
    parse_key_policy,
)


@dataclass(frozen=True, slots=True)
class PolicyView:
    """What a KeyPolicy decision reads besides the request, read from the API server
    for this request: the labels of the request's namespace and every
    ClusterKeyPolicy as stored; or, in `failure`, why they could not be read (the
    decision then refuses: failing closed)."""

    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    cluster_policies: tuple[Mapping[str, Any], ...] = ()
    failure: str = ""
    keypolicies: tuple[str, ...] = ()  # names of (some of) the namespace's KeyPolicies
    throttled: bool = False  # the failure is keymount's own read limit: retry, 429


class View(msgspec.Struct, frozen=True):
    """What a decision sees besides the request."""

    keyring: Keyring  # the request namespace's keys
    settings: Settings
    writers: KeyWriters = msgspec.field(default_factory=KeyWriters)
    # --max-key-age, and the times keymount stamps on key Secrets (staged-at,
    # activated-at); None stamps none.
    now: datetime | None = None
    # "cache": the key cache, possibly a moment behind the API server; "live": read
    # from the API server for this request (or, in tests and the CLI, the truth).
    source: Literal["cache", "live"] = "live"
    # Only for the requests `needs_policy_view` names; None otherwise.
    policies: PolicyView | None = None
    # The webhook's remembered verdicts on backend Pods (webhook/podverdicts.py): only
    # where the Pod was decoded from JSON; None decides every Pod afresh.
    pod_verdicts: PodVerdicts | None = None
    # Only for a Secret's DELETE, once a verdict asked for it (`needs_pods`): the Pods
    # not yet finished whose volumes name it, read live; None: not read.
    listed_by: tuple[str, ...] | None = None


Handler = Callable[[AdmissionRequest, View], Verdict]

THROTTLED = 429  # a refusal that stands only because live reads are limited right now


# --- key Secrets ----------------------------------------------------------------------

def key_change(request: AdmissionRequest) -> KeyChange:
    return KeyChange(request.operation, request.namespace, request.object_name,
                     request.object, request.old_object, request.requester)


def key_verdict(request: AdmissionRequest, decision: KeyDecision, *,
                unchanged: Result = "allowed") -> Verdict:
    if not decision.allowed:
        return Verdict("denied", denied(decision.message, warnings=decision.warnings,
                                        code=THROTTLED if decision.retry else 403),
                       key_state=decision.key_state, key=decision)
    response = patched(decision.patch, warnings=decision.warnings)
    return Verdict(unchanged if decision.action == "none" else "allowed", response,
                   key=decision)


def needs_live_view(request: AdmissionRequest, view: View, *,
                    stamping: bool = False) -> Verdict | None:
    """A new key's number is judged only against a live read, never the cache
    (docs/contract.md, "Key numbers"). On the cache this is a key-state refusal: the
    server reads live and asks again, and the refusal is what stands when the live-read
    limit says no, with code 429 (Too Many Requests), so a client can tell it from a
    refusal on the merits and retry (`keys restore` does).

    `stamping` (`/mutate`): a new key that names its own number (a restore, an import)
    is stamped on the cache: the stamp only adds the numbers used to its record, and the
    guard at `/validate` judges the number, and that the record covers every number
    used, on a live read of its own, refusing the key if the cache was behind. One read
    per such key instead of two."""
    if view.source != "cache":
        return None
    record = parse_key_secret(request.object or {}, settings=view.settings,
                              namespace=request.namespace)
    if record.staged and not parse_key_secret(request.old_object or {}, settings=view.settings,
                                              namespace=request.namespace).staged:
        # At most one staged key per namespace: a staging is judged against a fresh
        # read, so one made a moment ago through another replica is seen.
        return Verdict("denied", denied(
            f"keymount is limiting live reads of the API server right now and judges "
            f"a staging only against a fresh read of namespace {request.namespace!r}; "
            f"retry in a few seconds", code=THROTTLED), key_state=True)
    if not is_new_key(key_change(request), settings=view.settings):
        return None
    if record.slot:
        # A slot's number is its name's, and the API server holds one Secret per name;
        # filling it is judged again (keyguard._guard_fill). So reserving one needs no
        # live read, and no review about other keys can hold a rotation up.
        return None
    if stamping and record.index_explicit:
        return None
    return Verdict("denied", denied(
        f"keymount is limiting live reads of the API server right now and judges "
        f"a new key's number only against a fresh read of namespace "
        f"{request.namespace!r}; retry in a few seconds", code=THROTTLED), key_state=True)


def stamp_secret(request: AdmissionRequest, view: View) -> Verdict:
    """`/mutate`, Secret CREATE or UPDATE: a new key Secret's number and used numbers."""
    return needs_live_view(request, view, stamping=True) or key_verdict(request, stamp_key_secret(
        key_change(request), keyring=view.keyring,
        settings=view.settings, now=view.now), unchanged="skipped")


def guard_secret(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`, any Secret operation: the key-Secret guard."""
    verdict = needs_live_view(request, view) or key_verdict(request, guard_key_secret(
        key_change(request), keyring=view.keyring,
        settings=view.settings, writers=view.writers, listed_by=view.listed_by))
    if view.source == "cache" and verdict.key is not None and verdict.key.on_keyring:
        # Retiring the active key, or deleting a key whose twin is already gone, looks
        # allowed on a cache that has not seen the change yet: a live read decides.
        return Verdict("denied", denied(
            f"keymount is limiting live reads of the API server right now and allows "
            f"retiring or deleting a key only on a fresh read of namespace "
            f"{request.namespace!r}; retry in a few seconds", code=THROTTLED), key_state=True)
    return verdict


# --- Pods --------------------------------------------------------------------------------

def inject_pod(request: AdmissionRequest, view: View) -> Verdict:
    """`/mutate`, Pod CREATE: inject the keys into a backend Pod (docs/contract.md,
    "Injection")."""
    pod, settings = request.object, view.settings
    if pod is None:
        return Verdict("denied", denied("Pod CREATE request carries no object",
                                        code=400))
    if not needs_keys(pod, settings=settings):
        return Verdict("skipped", allowed())
    memo, keyring = view.pod_verdicts, view.keyring
    if memo is None:
        return _injection_verdict(pod, view)
    content = pod_content(pod, keyring=keyring, settings=settings, aged=bool(
        view.now and newest_key_too_old(keyring, max_age=settings.max_key_age,
                                        now=view.now)))
    if content is None:
        return _injection_verdict(pod, view)
    verdict = memo.get(content, keyring=keyring, settings=settings)
    if verdict is None:
        verdict = _injection_verdict(pod, view)
        memo.keep(content, verdict, keyring=keyring, settings=settings)
    return verdict


def _injection_verdict(pod: Mapping[str, Any], view: View) -> Verdict:
    outcome = inject_keys(pod, keyring=view.keyring, settings=view.settings, now=view.now)
    if not isinstance(outcome, Injected):
        return Verdict("denied", denied(outcome.message),
                       key_state=outcome.from_key_state)
    return Verdict("injected", patched(outcome.patch, warnings=outcome.warnings,
                                       audit={"encryption-keys": outcome.status},
                                       encoded=outcome.encoded),
                   files=outcome.files, status=outcome.status)


def check_final_pod(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`, Pod CREATE: a backend Pod as finally stored carries the keys as
    injected (another mutating webhook may have run after keymount)."""
    pod, settings = request.object or {}, view.settings
    if not needs_keys(pod, settings=settings):
        return Verdict("allowed", allowed())
    problem = find_injection_problem(pod, keyring=view.keyring, settings=settings,
                                     since_mutation=True)
    if problem is None:
        return Verdict("allowed", allowed())
    message, key_state = problem
    return Verdict("denied", denied(
        f"backend Pod does not carry keymount's encryption keys as injected: {message}. "
        f"Another mutating webhook may have changed it after keymount; list them with "
        f"`kubectl get mutatingwebhookconfigurations`"), key_state=key_state)


def check_pod_relabel(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`, Pod UPDATE: a Pod cannot become a backend Pod without its keys: Pod
    volumes are immutable, so one created without keymount's volume can never get it,
    and one whose author wrote a volume of that name must deliver every key, as keymount
    would have. A backend Pod keeps its status annotation, and no ephemeral container
    of it mounts the keys; and one that holds keymount's volume stays a backend Pod."""
    pod, old, settings = request.object or {}, request.old_object or {}, view.settings
    if not needs_keys(pod, settings=settings):
        if needs_keys(old, settings=settings) and _has_keymount_volume(old):
            # The webhooks see only backend Pods (their objectSelector): relabelled out,
            # the Pod could take an ephemeral container that mounts the keys unchecked.
            return Verdict("denied", denied(
                f"backend Pod {request.object_name!r} holds keymount's volume "
                f"{VOLUME_NAME!r}, so it stays a backend Pod ({settings.pod_selector}) "
                f"for its life: keymount checks only backend Pods, and a Pod's volumes "
                f"cannot be removed. Keep the label; to take the Pod out of service, "
                f"delete it: kubectl delete pod {request.object_name} -n "
                f"{request.namespace}"))
        return Verdict("allowed", allowed())
    if needs_keys(old, settings=settings):
        problem_text = _backend_pod_change(pod, old, settings=settings)
        if problem_text is None:
            return Verdict("allowed", allowed())
        return Verdict("denied", denied(f"backend Pod {request.object_name!r}: {problem_text}"))
    # Judged as a new backend Pod is: the namespace's refusals first (an invalid key
    # under --invalid-keys deny, two keys with one number), or a label would let in the
    # Pod that creating it with the label would not.
    refusal = check_keyring(view.keyring, settings=settings)
    if refusal is not None:
        return Verdict("denied", denied(
            f"Pod {request.object_name!r} cannot become a backend Pod "
            f"({settings.pod_selector}) by a label change, as no new one can be created "
            f"now: {refusal.message}"), key_state=refusal.from_key_state)
    problem = find_injection_problem(pod, keyring=view.keyring, settings=settings)
    if problem is None:
        return Verdict("allowed", allowed())
    return Verdict("denied", denied(
        f"Pod {request.object_name!r} cannot become a backend Pod ({settings.pod_selector}) "
        f"by a label change: {problem[0]}, and a running Pod's volumes cannot be added. "
        f"Create a new Pod with the label instead (keymount mounts the keys at creation)"),
        key_state=problem[1])


# --- keymount's policies ---------------------------------------------------------------

def _policy_name(request: AdmissionRequest) -> str:
    return request.object_name[:253]


def needs_policy_view(request: AdmissionRequest) -> bool:
    """Whether the server must read the namespace's labels and the ClusterKeyPolicies
    before `check_keypolicy` judges this request: a KeyPolicy created, or updated with
    a new spec."""
    if request.group != POLICY_GROUP or request.kind != KEYPOLICY_KIND:
        return False
    return request.operation == "CREATE" or (
        request.operation == "UPDATE" and not _same_spec(request))


def _same_spec(request: AdmissionRequest) -> bool:
    return request.old_object is not None and request.object is not None and \
        request.object.get("spec") == request.old_object.get("spec")


def check_keypolicy(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`, KeyPolicy CREATE or UPDATE: the bounds of every ClusterKeyPolicy
    that selects its namespace (docs/contract.md, "Policies")."""
    name, namespace = _policy_name(request), request.namespace
    if request.object is None:
        return Verdict("denied", denied("KeyPolicy request carries no object", code=400))
    if request.operation == "UPDATE" and _same_spec(request):
        # Labels, annotations, finalizers: a KeyPolicy admitted before its bounds were
        # tightened can still be changed (and deleted). Its spec is held to the bounds
        # anyway (policy.effective_policy).
        return Verdict("allowed", allowed())
    try:
        policy = parse_key_policy(request.object)
    except PolicyError as exc:
        return Verdict("denied", denied(f"KeyPolicy {name!r} in namespace {namespace!r}: "
                                        f"{exc}"))
    context = view.policies
    if context is not None and context.throttled:
        # The reads are shared by every namespace: a refusal that a retry turns around,
        # with the code that says so (as for key state, THROTTLED).
        return Verdict("denied", denied(
            f"keymount is limiting its reads of the API server right now and could not "
            f"read the ClusterKeyPolicies that bound KeyPolicy {name!r} in namespace "
            f"{namespace!r}; retry in a few seconds", code=THROTTLED))
    if context is None or context.failure:
        reason = context.failure if context else "no read of them was made"
        return Verdict("error", errored(
            f"keymount could not read the ClusterKeyPolicies that bound KeyPolicy {name!r} "
            f"in namespace {namespace!r} ({reason}), so it refuses it; retry in a few "
            f"seconds. If it persists, check keymount's read access: kubectl auth can-i "
            f"list {CLUSTERKEYPOLICY_PLURAL}.{POLICY_GROUP} --as "
            f"system:serviceaccount:keymount:keymount (and get namespaces)"))
    others = [other for other in context.keypolicies if other != name]
    if request.operation == "CREATE" and others:
        # One KeyPolicy a namespace (only the oldest would be in effect): and the
        # controller reads every one of them on each change, so their number is bounded
        # here, not by whoever may create them.
        return Verdict("denied", denied(
            f"namespace {namespace!r} already has KeyPolicy {others[0]!r}, and a namespace "
            f"has one KeyPolicy; change that one instead: kubectl edit "
            f"{KEYPOLICY_PLURAL}.{POLICY_GROUP} {others[0]} -n {namespace}"))
    clusters: list[ClusterKeyPolicy] = []
    for obj in context.cluster_policies:
        try:
            clusters.append(parse_cluster_key_policy(obj))
        except PolicyError as exc:
            broken = str(as_dict(obj.get("metadata")).get("name") or "")[:253]
            return Verdict("denied", denied(
                f"ClusterKeyPolicy {broken!r} is invalid ({exc}), so keymount cannot tell "
                f"whether KeyPolicy {name!r} keeps its bounds; fix it first: kubectl edit "
                f"{CLUSTERKEYPOLICY_PLURAL} {broken}"))
    violations = bound_violations(policy, context.namespace_labels, clusters)
    if violations:
        return Verdict("denied", denied(
            f"KeyPolicy {name!r} in namespace {namespace!r} is outside the bounds set for "
            f"its namespace: {'; '.join(violations)} (see the bounds with `kubectl get "
            f"{CLUSTERKEYPOLICY_PLURAL} -o yaml`)"))
    return Verdict("allowed", allowed())


def check_clusterkeypolicy(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`, ClusterKeyPolicy CREATE or UPDATE: a valid selector and durations,
    and defaults within its own bounds."""
    name = _policy_name(request)
    if request.object is None:
        return Verdict("denied", denied("ClusterKeyPolicy request carries no object",
                                        code=400))
    try:
        problems = cluster_policy_problems(parse_cluster_key_policy(request.object))
    except PolicyError as exc:
        problems = (str(exc),)
    if problems:
        return Verdict("denied", denied(f"ClusterKeyPolicy {name!r}: {'; '.join(problems)}"))
    return Verdict("allowed", allowed())


# --- nothing to decide -------------------------------------------------------------------

def skip(request: AdmissionRequest, view: View) -> Verdict:
    """`/mutate`: nothing to change."""
    return Verdict("skipped", allowed())


def allow(request: AdmissionRequest, view: View) -> Verdict:
    """`/validate`: nothing to check."""
    return Verdict("allowed", allowed())


def _unrouted(webhook: Webhook, result: Result) -> Handler:
    def unrouted(request: AdmissionRequest, view: View) -> Verdict:
        obj = request.object or request.old_object or {}
        if request.is_pod and needs_keys(obj, settings=view.settings):
            # No entry in ROUTES decides on this backend Pod: refuse rather than let
            # it through without its keys.
            return Verdict("error", errored(
                f"keymount has no decision for {request.operation} of a backend Pod at "
                f"/{webhook}, so it refuses it; this is a keymount bug: report it with "
                f"the keymount logs for uid {request.uid}"))
        return Verdict(result, allowed())
    unrouted.__name__ = f"unrouted_{webhook}"
    return unrouted


# --- the router --------------------------------------------------------------------------

Route = tuple[Webhook, str, str]  # (webhook, kind, operation); a core-group kind bare

ROUTES: dict[Route, Handler] = {
    ("mutate", "Pod", "CREATE"): inject_pod,
    **{("mutate", "Pod", op): skip for op in ("UPDATE", "DELETE", "CONNECT")},
    ("mutate", "Secret", "CREATE"): stamp_secret,
    ("mutate", "Secret", "UPDATE"): stamp_secret,
    **{("mutate", "Secret", op): skip for op in ("DELETE", "CONNECT")},
    ("validate", "Pod", "CREATE"): check_final_pod,
    ("validate", "Pod", "UPDATE"): check_pod_relabel,
    **{("validate", "Pod", op): allow for op in ("DELETE", "CONNECT")},
    **{("validate", "Secret", op): guard_secret for op in OPERATIONS},
    # keymount's own kinds: writes are judged; a DELETE has nothing to judge (UNROUTED).
    **{("validate", f"{POLICY_GROUP}/{KEYPOLICY_KIND}", op): check_keypolicy
       for op in ("CREATE", "UPDATE")},
    **{("validate", f"{POLICY_GROUP}/{CLUSTERKEYPOLICY_KIND}", op): check_clusterkeypolicy
       for op in ("CREATE", "UPDATE")},
}
UNROUTED: dict[Webhook, Handler] = {"mutate": _unrouted("mutate", "skipped"),
                                    "validate": _unrouted("validate", "allowed")}


def route(webhook: Webhook, request: AdmissionRequest,
          routes: Mapping[Route, Handler] = ROUTES) -> Handler:
    """The one handler for this request."""
    kind = request.kind if request.group == "" else f"{request.group}/{request.kind}"
    return routes.get((webhook, kind, request.operation)) or UNROUTED[webhook]


def review_mutation(request: AdmissionRequest, *, keyring: Keyring, settings: Settings,
                    now: datetime | None = None) -> Verdict:
    """`/mutate` against a keyring taken as the truth (tests, `keymount` offline)."""
    return route("mutate", request)(request, View(keyring, settings, now=now))


def review_validation(request: AdmissionRequest, *, keyring: Keyring, settings: Settings,
                      writers: KeyWriters = KeyWriters(),
                      listed_by: tuple[str, ...] | None = None) -> Verdict:
    """`/validate` against a keyring (and for a DELETE, the Pods listing the Secret)
    taken as the truth."""
    return route("validate", request)(request, View(keyring, settings, writers=writers,
                                                    listed_by=listed_by))


# --- what a stored backend Pod must carry ------------------------------------------------

def _has_keymount_volume(pod: Mapping[str, Any]) -> bool:
    volumes = as_dict(pod.get("spec")).get("volumes")
    return isinstance(volumes, list) and any(
        isinstance(v, dict) and v.get("name") == VOLUME_NAME for v in volumes)


def _backend_pod_change(pod: Mapping[str, Any], old: Mapping[str, Any], *,
                        settings: Settings) -> str | None:
    """What an update of a backend Pod may not do (its spec is immutable but for images,
    ephemeral containers and a few fields): change keymount's status annotation, which
    `keymount status`, audit and `restart: rolling` read to tell a stale Pod, or give an
    ephemeral container the keys."""
    before = as_dict(as_dict(old.get("metadata")).get("annotations")).get(STATUS_ANNOTATION)
    after = as_dict(as_dict(pod.get("metadata")).get("annotations")).get(STATUS_ANNOTATION)
    if before != after:
        return (f"annotation {STATUS_ANNOTATION} records the keys keymount gave the Pod and "
                f"cannot change; leave it out of your patch or manifest (`keymount "
                f"status` shows which keys each backend Pod has)")
    # Ephemeral containers are never selected: the targets play no part. They are only
    # ever added, so one that mounted the keys before this check existed stays, and
    # must not keep every later update (a finalizer's removal) from the Pod. Only the
    # ones this update adds (or changes) are judged: compared with the old Pod's first
    # problem instead, that one would let every later debugger mount the keys too.
    before = {str(c.get("name")): c for _, c in ephemeral_containers(as_dict(old.get("spec")))}
    added = [c for _, c in ephemeral_containers(as_dict(pod.get("spec")))
             if before.get(str(c.get("name"))) != c]
    return find_mount_problem({"ephemeralContainers": added}, [], settings=settings,
                              injected=False, ephemeral_only=True)


# How long before a Pod's creation a key may have been made and still be missing from
# its volume for having come after the mutation: the mutating webhook's answer, any
# webhooks after it, and the cache's delay (seconds, not minutes).
KEY_AFTER_MUTATION = timedelta(seconds=60)


def find_injection_problem(pod: Mapping[str, Any], *, keyring: Keyring,
                           settings: Settings,
                           since_mutation: bool = False) -> tuple[str, bool] | None:
    """What is wrong with a stored backend Pod's key volume, and whether fresher key
    state could make it right; None when it is as docs/contract.md,
    "Injection", says: every valid key of the namespace delivered (as a source of its
    own, or through a listed slot it filled since), the status annotation naming
    exactly the key sources, and the mounts as injected. `since_mutation` (a CREATE):
    a key that came after the mutating webhook's answer is no reason to refuse: one
    numbered above every number the volume lists, made around the Pod's creation (the
    API server sets a Pod's creationTimestamp before validating webhooks see it)."""
    spec = as_dict(pod.get("spec"))
    if not is_list_of_objects(spec.get("containers")):
        return "its spec.containers is not a list of objects", False
    volumes = [v for v in as_list(spec.get("volumes")) if isinstance(v, dict)
               and v.get("name") == VOLUME_NAME]
    if len(volumes) != 1:
        return f"expected one volume {VOLUME_NAME!r}, found {len(volumes)}", False
    projected = volumes[0].get("projected")
    if set(volumes[0]) != {"name", "projected"} or not isinstance(projected, dict):
        return f"volume {VOLUME_NAME!r} is not a projected volume", False
    if projected.get("defaultMode") != FILE_MODE:
        return f"volume {VOLUME_NAME!r} has defaultMode {projected.get('defaultMode')}", False
    sources = as_list(projected.get("sources"))
    if not sources:
        return f"volume {VOLUME_NAME!r} has no key sources", False
    listed: set[str] = set()
    highest = 0  # the highest number the volume lists, keys and slots
    stated: list[dict[str, str]] = []  # the status annotation the key sources imply
    for source in sources:
        secret = source.get("secret") if isinstance(source, dict) else None
        if not isinstance(secret, dict) or set(source) != {"secret"}:
            return f"volume {VOLUME_NAME!r} projects something other than key Secrets", False
        name = str(secret.get("name"))
        listed.add(name)
        if secret.get("optional") is True:
            slot_problem = _slot_problem(secret, keyring=keyring, settings=settings)
            if slot_problem:
                return slot_problem
            highest = max(highest, slot_number(name) or 0)
            continue
        record = keyring.find(name)
        number = keyring.number_of(name)
        if record is None or not record.valid or number is None:
            return (f"volume {VOLUME_NAME!r} references {name!r}, not a valid key Secret "
                    f"of namespace {keyring.namespace!r}"), True
        item = {"key": settings.key_field, "path": key_file_name(number)}
        if secret.get("items") != [item]:
            return f"key source {name!r} does not project {item}", False
        stated.append({"file": key_file_name(number), "secret": name,
                       "fingerprint": record.fingerprint})
        highest = max(highest, number)
    ns = keyring.namespace
    # A key the cache shows and the volume lacks may have come after the mutating
    # webhook's view: confirmed on a live read before the refusal stands.
    if not keyring.keys:
        return f"namespace {ns!r} has no valid encryption key", True
    made = parse_time(as_dict(pod.get("metadata")).get("creationTimestamp"))
    missing = [r.name for r in keyring.keys if r.name not in listed and not (
        since_mutation and (keyring.number_of(r.name) or 0) > highest
        and made is not None and r.created is not None
        and r.created >= made - KEY_AFTER_MUTATION)]
    if missing:
        return (f"volume {VOLUME_NAME!r} does not deliver key Secret(s) "
                f"{', '.join(repr(m) for m in missing)} of namespace {ns!r}: a backend Pod "
                f"carries every valid key, the newest to encrypt with"), True
    if read_status_annotation(pod) != stated:
        return (f"annotation {STATUS_ANNOTATION} does not name exactly the keys volume "
                f"{VOLUME_NAME!r} projects"), False
    targets = select_containers(pod)
    if not isinstance(targets, list):
        return targets.message, False
    problem = find_mount_problem(spec, targets, settings=settings, injected=True)
    return (problem, False) if problem else None


def _slot_problem(secret: Mapping[str, Any], *, keyring: Keyring,
                  settings: Settings) -> tuple[str, bool] | None:
    """An optional source must be a slot that exists, at its number's file: a key
    Secret (empty, filled since, or retired) holds the name, so only a key writer can
    give it material. A name no key Secret holds could be created by anyone, and the
    kubelet would mount it (docs/contract.md, "Rotation reaches running Pods: key
    slots"); one the cache does not show yet is confirmed by a live read."""
    name = str(secret.get("name"))
    number = slot_number(name)
    if number is None:
        return f"optional source {name!r} is not one of keymount's key slots", False
    items = slot_items(number, settings=settings)
    # keymount before staged keys listed the key field alone: such a Pod may still be
    # relabelled (check_pod_relabel).
    if secret.get("items") not in (items, items[:1]):
        return f"key slot {name!r} does not project {items}", False
    record = keyring.find(name)
    if record is None or not record.index_explicit or record.index != number:
        return (f"optional source {name!r} is not a key slot of namespace "
                f"{keyring.namespace!r}: no key Secret holds that name"), True
    return None
