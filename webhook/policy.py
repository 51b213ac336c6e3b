"""Key policies: a namespace's rotation declared as Kubernetes objects, decided purely.

Two kinds (docs/contract.md, "Policies"), group `keymount.io`, version `v1alpha1`:

- `KeyPolicy` (namespaced): `spec.rotationPeriod` (unset: rotation by hand only),
  `spec.stagingPeriod` (default 2m, at least 10s), `spec.restart` (`none`|`rolling`).
- `ClusterKeyPolicy` (cluster-scoped): `spec.namespaceSelector` (a metav1
  LabelSelector), defaults for the namespaces it selects that have no KeyPolicy
  (`rotationPeriod`, `stagingPeriod`, `restart`) and bounds (`maxRotationPeriod`,
  `minStagingPeriod`).

Everything here is a function of the objects it is given: the admission webhook judges
a KeyPolicy against the ClusterKeyPolicies it read (`bound_violations`), the controller
asks what a namespace runs by (`effective_policy`). Parsing bounds every size it reads
(an admission request's object is written by whoever sends it) and raises
`PolicyError` naming the field and what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from .names import CLUSTERKEYPOLICY_KIND, CLUSTERKEYPOLICY_PLURAL, KEYPOLICY_KIND, as_dict
from .selectors import Operator, Requirement

__all__ = [
    "DEFAULT_STAGING_PERIOD", "DURATION_PATTERN", "MAX_DURATION", "MIN_STAGING_PERIOD",
    "Bounds", "ClusterDefaults", "ClusterKeyPolicy", "EffectivePolicy", "KeyPolicy",
    "KeyPolicySpec", "NamespaceSelector", "PolicyError", "Restart", "bound_violations",
    "cluster_policy_problems", "effective_policy", "format_duration",
    "parse_cluster_key_policy", "parse_duration", "parse_key_policy",
    "parse_namespace_selector",
]

Restart = Literal["none", "rolling"]
RESTARTS: tuple[Restart, ...] = ("none", "rolling")

DEFAULT_STAGING_PERIOD = timedelta(minutes=2)
# Below this a staged key cannot reach running Pods before it is activated (the kubelet
# syncs a Secret volume every 10 s at best); docs/operations.md says what to choose.
MIN_STAGING_PERIOD = timedelta(seconds=10)
# Ten years: a longer period is a typo, and keeps every `time + period` representable.
MAX_DURATION = timedelta(days=3650)
MAX_DURATION_TEXT = 32
# Whole numbers with units d, h, m, s, largest first, each at most once: 90d, 12h,
# 1h30m. The CRDs' schemas carry the same pattern (anchored), so the API server refuses
# what this refuses before keymount is asked (tests/test_policy.py checks they agree).
DURATION_BODY = r"([0-9]{1,9}d)?([0-9]{1,9}h)?([0-9]{1,9}m)?([0-9]{1,9}s)?"
DURATION_PATTERN = f"^{DURATION_BODY}$"
_DURATION = re.compile(DURATION_BODY)
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))

# A LabelSelector's sizes, as the CRD schema caps them: far above any real selector.
MAX_SELECTOR_TERMS = 64
MAX_SELECTOR_VALUES = 256
MAX_LABEL_KEY = 317  # a 253-character DNS prefix, "/", a 63-character name
MAX_LABEL_VALUE = 63
MAX_NAME = 253
_OPERATORS: dict[str, Operator] = {"In": "in", "NotIn": "notin", "Exists": "exists",
                                   "DoesNotExist": "!exists"}


class PolicyError(ValueError):
    """A KeyPolicy or ClusterKeyPolicy that cannot be read as one: the message names
    the field and what to write instead."""


# --- durations ---------------------------------------------------------------------------

def parse_duration(text: object, *, field: str) -> timedelta:
    """`90d`, `12h`, `45s`, `1h30m`: longer than zero, at most MAX_DURATION."""
    example = "write whole numbers with the units d, h, m, s, largest first, e.g. 90d, " \
              "12h, 45s or 1h30m"
    if not isinstance(text, str):
        raise PolicyError(f"{field} must be a duration string ({example}), "
                          f"not {type(text).__name__}")
    if len(text) > MAX_DURATION_TEXT:
        raise PolicyError(f"{field} is {len(text)} characters long; a duration has at most "
                          f"{MAX_DURATION_TEXT} ({example})")
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        hint = "; it must be positive" if text.lstrip().startswith("-") else ""
        raise PolicyError(f"{field} {text!r} is not a duration{hint}: {example}")
    seconds = sum(int(part[:-1]) * size
                  for part, (_, size) in zip(match.groups(), _UNITS, strict=True) if part)
    if seconds == 0:
        raise PolicyError(f"{field} {text!r} is zero; it must be longer than that ({example})")
    if seconds > MAX_DURATION.total_seconds():
        raise PolicyError(f"{field} {text!r} is longer than "
                          f"{format_duration(MAX_DURATION)} (ten years)")
    return timedelta(seconds=seconds)


def format_duration(period: timedelta) -> str:
    """The shortest spelling `parse_duration` reads back: 90d, 1h30m, 45s."""
    seconds = int(period.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in _UNITS:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _optional_duration(spec: Mapping[str, Any], key: str) -> timedelta | None:
    value = spec.get(key)
    return None if value is None else parse_duration(value, field=f"spec.{key}")


def _staging(spec: Mapping[str, Any], key: str = "stagingPeriod") -> timedelta | None:
    period = _optional_duration(spec, key)
    if period is not None and period < MIN_STAGING_PERIOD:
        raise PolicyError(
            f"spec.{key} {format_duration(period)} is shorter than "
            f"{format_duration(MIN_STAGING_PERIOD)}: a staged key needs at least the "
            f"kubelet's sync period to reach running Pods; set spec.{key} to at least "
            f"{format_duration(MIN_STAGING_PERIOD)} (2m covers kubelet defaults)")
    return period


def _restart(spec: Mapping[str, Any]) -> Restart | None:
    value = spec.get("restart")
    if value is None:
        return None
    for restart in RESTARTS:
        if value == restart:
            return restart
    # Only a string is shown (clipped before repr: a nested value's repr could recurse
    # without bound); anything else by its type.
    shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
    raise PolicyError(f"spec.restart {shown} is not one of {', '.join(RESTARTS)}")


# --- namespace selectors -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NamespaceSelector:
    """A metav1 LabelSelector: every requirement must hold. An empty selector selects
    every namespace; an absent one (`None` in the object) selects none, as
    apimachinery's LabelSelectorAsSelector has it."""

    requirements: tuple[Requirement, ...] = ()
    selects_nothing: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        return not self.selects_nothing and all(r.matches(labels)
                                                for r in self.requirements)


def parse_namespace_selector(value: object, *,
                             field: str = "spec.namespaceSelector") -> NamespaceSelector:
    if value is None:
        return NamespaceSelector(selects_nothing=True)
    if not isinstance(value, dict):
        raise PolicyError(f"{field} must be a label selector (matchLabels, "
                          f"matchExpressions), not {type(value).__name__}")
    labels = value.get("matchLabels") or {}
    expressions = value.get("matchExpressions") or []
    if not isinstance(labels, dict) or not isinstance(expressions, list):
        raise PolicyError(f"{field}: matchLabels must be a map and matchExpressions a list")
    if len(labels) + len(expressions) > MAX_SELECTOR_TERMS:
        raise PolicyError(f"{field} has {len(labels) + len(expressions)} terms; at most "
                          f"{MAX_SELECTOR_TERMS}")
    requirements = [Requirement(_label_key(key, field=f"{field}.matchLabels"), "=",
                                frozenset({_label_value(v, field=f"{field}.matchLabels")}))
                    for key, v in labels.items()]
    for i, expression in enumerate(expressions):
        requirements.append(_expression(expression, field=f"{field}.matchExpressions[{i}]"))
    return NamespaceSelector(tuple(requirements))


def _expression(expression: object, *, field: str) -> Requirement:
    if not isinstance(expression, dict):
        raise PolicyError(f"{field} must be an object with key, operator and values")
    key = _label_key(expression.get("key"), field=f"{field}.key")
    operator = expression.get("operator")
    if not isinstance(operator, str) or operator not in _OPERATORS:
        raise PolicyError(f"{field}.operator must be one of {', '.join(_OPERATORS)}")
    values = expression.get("values") or []
    if not isinstance(values, list) or len(values) > MAX_SELECTOR_VALUES:
        raise PolicyError(f"{field}.values must be a list of at most "
                          f"{MAX_SELECTOR_VALUES} values")
    if operator in ("In", "NotIn") and not values:
        raise PolicyError(f"{field}: operator {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        raise PolicyError(f"{field}: operator {operator} takes no values")
    parsed = frozenset(_label_value(v, field=f"{field}.values") for v in values)
    return Requirement(key, _OPERATORS[operator], parsed)


def _label_key(key: object, *, field: str) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_LABEL_KEY:
        raise PolicyError(f"{field}: a label key is a string of 1 to {MAX_LABEL_KEY} "
                          f"characters")
    return key


def _label_value(value: object, *, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE:
        raise PolicyError(f"{field}: a label value is a string of at most "
                          f"{MAX_LABEL_VALUE} characters")
    return value


# --- the two kinds ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyPolicySpec:
    """How a namespace rotates: a KeyPolicy's spec, or what ClusterKeyPolicies give a
    namespace without one."""

    rotation_period: timedelta | None = None  # None: by hand only
    staging_period: timedelta = DEFAULT_STAGING_PERIOD
    restart: Restart = "none"


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    name: str
    namespace: str
    spec: KeyPolicySpec = KeyPolicySpec()
    created: datetime | None = None  # metadata.creationTimestamp; None before it is stored
    generation: int = 0


@dataclass(frozen=True, slots=True)
class ClusterDefaults:
    """What a ClusterKeyPolicy sets for the namespaces it selects that have no
    KeyPolicy; None where it sets nothing."""

    rotation_period: timedelta | None = None
    staging_period: timedelta | None = None
    restart: Restart | None = None


@dataclass(frozen=True, slots=True)
class Bounds:
    max_rotation_period: timedelta | None = None
    min_staging_period: timedelta | None = None
    # Each rotation writes a new key Secret that is kept (old data needs it) and three
    # writes from the controller's shared budget: the cluster admin's floor on how often.
    min_rotation_period: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ClusterKeyPolicy:
    name: str
    namespace_selector: NamespaceSelector
    defaults: ClusterDefaults = ClusterDefaults()
    bounds: Bounds = Bounds()
    created: datetime | None = None
    generation: int = 0

    def selects(self, namespace_labels: Mapping[str, str]) -> bool:
        return self.namespace_selector.matches(namespace_labels)


def _metadata(obj: Mapping[str, Any]) -> tuple[str, str, datetime | None, int]:
    meta = as_dict(obj.get("metadata"))
    name = meta.get("name") or meta.get("generateName")
    namespace = meta.get("namespace")
    generation = meta.get("generation")
    # Strings only, clipped: these names go into messages, and a review's object is
    # written by whoever sends it.
    return (name[:MAX_NAME] if isinstance(name, str) else "",
            namespace[:MAX_NAME] if isinstance(namespace, str) else "",
            _timestamp(meta.get("creationTimestamp")),
            generation if isinstance(generation, int) and generation >= 0 else 0)


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _spec(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    spec = obj.get("spec")
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise PolicyError(f"{kind} spec must be an object")
    return spec


def parse_key_policy(obj: Mapping[str, Any]) -> KeyPolicy:
    """A KeyPolicy object as stored or reviewed. Raises PolicyError."""
    name, namespace, created, generation = _metadata(obj)
    spec = _spec(obj, KEYPOLICY_KIND)
    rotation = _optional_duration(spec, "rotationPeriod")
    staging = _staging(spec) or DEFAULT_STAGING_PERIOD
    if rotation is not None and rotation <= staging:
        raise PolicyError(
            f"spec.rotationPeriod {format_duration(rotation)} is not longer than "
            f"spec.stagingPeriod {format_duration(staging)}: a key would be due before the "
            f"last one is active; set spec.rotationPeriod longer or spec.stagingPeriod "
            f"shorter")
    return KeyPolicy(name, namespace, KeyPolicySpec(rotation, staging, _restart(spec) or "none"),
                     created=created, generation=generation)


def parse_cluster_key_policy(obj: Mapping[str, Any]) -> ClusterKeyPolicy:
    """A ClusterKeyPolicy object as stored or reviewed. Raises PolicyError. Whether its
    defaults keep to its own bounds is `cluster_policy_problems`' question."""
    name, _, created, generation = _metadata(obj)
    spec = _spec(obj, CLUSTERKEYPOLICY_KIND)
    selector = parse_namespace_selector(spec.get("namespaceSelector"))
    defaults = ClusterDefaults(_optional_duration(spec, "rotationPeriod"), _staging(spec),
                               _restart(spec))
    bounds = Bounds(_optional_duration(spec, "maxRotationPeriod"),
                    _optional_duration(spec, "minStagingPeriod"),
                    _optional_duration(spec, "minRotationPeriod"))
    return ClusterKeyPolicy(name, selector, defaults, bounds, created=created,
                            generation=generation)


# --- judging -------------------------------------------------------------------------------

def _age_order(policy: KeyPolicy | ClusterKeyPolicy) -> tuple[bool, datetime, str]:
    """Oldest first (creationTimestamp, then name); objects never stored last."""
    return (policy.created is None, policy.created or datetime.min.replace(tzinfo=UTC),
            policy.name)


def bound_violations(keypolicy: KeyPolicy | KeyPolicySpec,
                     namespace_labels: Mapping[str, str],
                     clusterkeypolicies: Iterable[ClusterKeyPolicy]) -> tuple[str, ...]:
    """How a KeyPolicy breaks the bounds of the ClusterKeyPolicies that select its
    namespace (by ClusterKeyPolicy name): one message per bound, naming the
    ClusterKeyPolicy, the bound and the value to write; empty when it keeps them all."""
    spec = keypolicy.spec if isinstance(keypolicy, KeyPolicy) else keypolicy
    selecting = sorted((c for c in clusterkeypolicies if c.selects(namespace_labels)),
                       key=lambda c: c.name)
    conflict = _bounds_conflict(selecting)
    if conflict:
        # Each bound's own message would point at the other one, round and round.
        return (conflict,)
    found = []
    for cluster in selecting:
        limit, floor = cluster.bounds.max_rotation_period, cluster.bounds.min_staging_period
        source = f"ClusterKeyPolicy {cluster.name!r}"
        if limit is not None and spec.rotation_period is None:
            found.append(
                f"spec.rotationPeriod is not set (rotation by hand only), but {source} "
                f"bounds it by maxRotationPeriod {format_duration(limit)}; set "
                f"spec.rotationPeriod to at most {format_duration(limit)}")
        elif limit is not None and spec.rotation_period is not None \
                and spec.rotation_period > limit:
            found.append(
                f"spec.rotationPeriod {format_duration(spec.rotation_period)} is longer "
                f"than maxRotationPeriod {format_duration(limit)} of {source}; set "
                f"spec.rotationPeriod to at most {format_duration(limit)}")
        if floor is not None and spec.staging_period < floor:
            found.append(
                f"spec.stagingPeriod {format_duration(spec.staging_period)} is shorter "
                f"than minStagingPeriod {format_duration(floor)} of {source}; set "
                f"spec.stagingPeriod to at least {format_duration(floor)}")
        least = cluster.bounds.min_rotation_period
        if least is not None and spec.rotation_period is not None \
                and spec.rotation_period < least:
            found.append(
                f"spec.rotationPeriod {format_duration(spec.rotation_period)} is shorter "
                f"than minRotationPeriod {format_duration(least)} of {source} (each "
                f"rotation keeps one more key Secret and spends the controller's shared "
                f"write budget); set spec.rotationPeriod to at least "
                f"{format_duration(least)}")
    return tuple(found)


def _strictest(selecting: list[ClusterKeyPolicy], bound: str,
               pick: Callable[..., Any]) -> tuple[timedelta | None, str]:
    """The strictest value of one bound (`pick`: min for a maximum, max for a minimum)
    over the ClusterKeyPolicies that set it, and the first one that sets it so."""
    found = [(getattr(c.bounds, bound), c.name) for c in selecting
             if getattr(c.bounds, bound) is not None]
    return pick(found, key=lambda pair: pair[0]) if found else (None, "")


def _bounds_conflict(selecting: list[ClusterKeyPolicy]) -> str | None:
    """Why no KeyPolicy can keep the bounds of these ClusterKeyPolicies together (each
    one alone is consistent: cluster_policy_problems), or None."""
    limit, limit_by = _strictest(selecting, "max_rotation_period", min)
    if limit is None:
        return None
    floor, floor_by = _strictest(selecting, "min_staging_period", max)
    least, least_by = _strictest(selecting, "min_rotation_period", max)
    broken: list[tuple[timedelta, str, str]] = []
    if floor is not None and floor >= limit:
        broken.append((floor, floor_by, "minStagingPeriod"))
    if least is not None and least > limit:
        broken.append((least, least_by, "minRotationPeriod"))
    if not broken:
        return None
    worst, worst_by, name = max(broken, key=lambda entry: entry[0])
    return (f"ClusterKeyPolicies {limit_by!r} (maxRotationPeriod {format_duration(limit)}) "
            f"and {worst_by!r} ({name} {format_duration(worst)}) both select this "
            f"namespace and no KeyPolicy can keep both; a cluster admin must change one "
            f"of them: kubectl edit {CLUSTERKEYPOLICY_PLURAL} {limit_by}")


def cluster_policy_problems(policy: ClusterKeyPolicy) -> tuple[str, ...]:
    """Where a ClusterKeyPolicy's own defaults break its own bounds, or its bounds leave
    no KeyPolicy that could keep them; empty when it is consistent."""
    defaults, bounds = policy.defaults, policy.bounds
    limit, floor = bounds.max_rotation_period, bounds.min_staging_period
    found = []
    if limit is not None and defaults.rotation_period is not None \
            and defaults.rotation_period > limit:
        found.append(f"spec.rotationPeriod {format_duration(defaults.rotation_period)} is "
                     f"longer than its own spec.maxRotationPeriod {format_duration(limit)}; "
                     f"set spec.rotationPeriod to at most {format_duration(limit)}")
    if floor is not None and defaults.staging_period is not None \
            and defaults.staging_period < floor:
        found.append(f"spec.stagingPeriod {format_duration(defaults.staging_period)} is "
                     f"shorter than its own spec.minStagingPeriod {format_duration(floor)}; "
                     f"set spec.stagingPeriod to at least {format_duration(floor)}")
    if limit is not None and floor is not None and floor >= limit:
        found.append(f"spec.minStagingPeriod {format_duration(floor)} is not shorter than "
                     f"spec.maxRotationPeriod {format_duration(limit)}: no KeyPolicy could "
                     f"keep both (its rotationPeriod must be longer than its "
                     f"stagingPeriod); lower spec.minStagingPeriod or raise "
                     f"spec.maxRotationPeriod")
    if limit is not None and limit <= MIN_STAGING_PERIOD:
        found.append(f"spec.maxRotationPeriod {format_duration(limit)} is not longer than "
                     f"{format_duration(MIN_STAGING_PERIOD)}, the shortest staging period: "
                     f"no KeyPolicy could keep it; set spec.maxRotationPeriod longer (90d "
                     f"is common)")
    least = bounds.min_rotation_period
    if least is not None and limit is not None and least > limit:
        found.append(f"spec.minRotationPeriod {format_duration(least)} is longer than "
                     f"spec.maxRotationPeriod {format_duration(limit)}: no KeyPolicy could "
                     f"keep both; lower spec.minRotationPeriod or raise "
                     f"spec.maxRotationPeriod")
    if least is not None and defaults.rotation_period is not None \
            and defaults.rotation_period < least:
        found.append(f"spec.rotationPeriod {format_duration(defaults.rotation_period)} is "
                     f"shorter than its own spec.minRotationPeriod {format_duration(least)}; "
                     f"set spec.rotationPeriod to at least {format_duration(least)}")
    staging = defaults.staging_period or DEFAULT_STAGING_PERIOD
    if floor is not None:
        staging = max(staging, floor)
    if defaults.rotation_period is not None and defaults.rotation_period <= staging:
        found.append(f"spec.rotationPeriod {format_duration(defaults.rotation_period)} is "
                     f"not longer than the staging period {format_duration(staging)} it "
                     f"gives: a key would be due before the last one is active; set "
                     f"spec.rotationPeriod longer")
    return tuple(found)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """What a namespace rotates by, and where each part came from."""

    rotation_period: timedelta | None  # None: by hand only
    staging_period: timedelta
    restart: Restart
    keypolicy: str | None  # the KeyPolicy in effect; None: ClusterKeyPolicy defaults
    # Every ClusterKeyPolicy that selects the namespace, oldest first.
    cluster_policies: tuple[str, ...] = ()
    # The namespace's other KeyPolicies, which are not in effect (one per namespace).
    ignored: tuple[str, ...] = ()
    # Where a bound replaced a declared value, in words (for status and Events).
    adjusted: tuple[str, ...] = field(default=())

    @property
    def spec(self) -> KeyPolicySpec:
        return KeyPolicySpec(self.rotation_period, self.staging_period, self.restart)


def effective_policy(namespace_labels: Mapping[str, str],
                     keypolicies: Iterable[KeyPolicy],
                     clusterkeypolicies: Iterable[ClusterKeyPolicy]) -> EffectivePolicy | None:
    """The policy a namespace runs by, or None when it has none (no KeyPolicy, no
    ClusterKeyPolicy selecting it): rotation stays by hand.

    - `keypolicies`: the namespace's KeyPolicies. One is meant to exist; of several,
      the oldest (creationTimestamp, then name) is in effect and the rest are
      `ignored`. A KeyPolicy replaces the ClusterKeyPolicies' defaults as a whole.
    - Without a KeyPolicy, each default comes from the oldest selecting
      ClusterKeyPolicy that sets it; what none sets is a KeyPolicy's default
      (stagingPeriod 2m, restart none, rotationPeriod unset).
    - The strictest bounds of every selecting ClusterKeyPolicy always hold: the shortest
      maxRotationPeriod (it is also the period when nothing sets one), the longest
      minRotationPeriod (below the shortest maxRotationPeriod: the age of a key is the
      bound that protects data, the other one a cost) and the longest
      minStagingPeriod. A KeyPolicy admitted before a bound was tightened is held to
      the bound, and `adjusted` says so.
    - A staging period longer than the rotation period is held to it, so that a key is
      active no longer than the rotation period (webhook/rotation.py); only a
      minStagingPeriod longer than the period makes keys live longer, and `adjusted`
      names the ClusterKeyPolicies whose bounds conflict.
    """
    labels = dict(namespace_labels)
    selecting = sorted((c for c in clusterkeypolicies if c.selects(labels)), key=_age_order)
    ordered = sorted(keypolicies, key=_age_order)
    if not ordered and not selecting:
        return None
    if ordered:
        spec, source = ordered[0].spec, f"KeyPolicy {ordered[0].name!r} gives"
    else:
        def first(attribute: str) -> Any:
            return next((getattr(c.defaults, attribute) for c in selecting
                         if getattr(c.defaults, attribute) is not None), None)
        spec = KeyPolicySpec(first("rotation_period"),
                             first("staging_period") or DEFAULT_STAGING_PERIOD,
                             first("restart") or "none")
        source = "the ClusterKeyPolicies' defaults give"
    rotation, staging, adjusted = spec.rotation_period, spec.staging_period, []
    limit, limit_by = _strictest(selecting, "max_rotation_period", min)
    floor, floor_by = _strictest(selecting, "min_staging_period", max)
    least, least_by = _strictest(selecting, "min_rotation_period", max)
    if least is not None and rotation is not None and rotation < least:
        # In conflict with a shorter maximum, the maximum holds (said below).
        raised = least if limit is None else min(least, limit)
        adjusted.append(f"{source} rotationPeriod {format_duration(rotation)}; "
                        f"minRotationPeriod {format_duration(least)} of ClusterKeyPolicy "
                        f"{least_by!r} applies" + ("" if raised == least else
                                                   f", up to maxRotationPeriod "
                                                   f"{format_duration(raised)}"))
        rotation = raised
    if limit is not None and (rotation is None or rotation > limit):
        declared = "no rotationPeriod" if rotation is None else \
            f"rotationPeriod {format_duration(rotation)}"
        adjusted.append(f"{source} {declared}; maxRotationPeriod "
                        f"{format_duration(limit)} of ClusterKeyPolicy {limit_by!r} applies")
        rotation = limit
    if least is not None and limit is not None and least > limit:
        adjusted.append(f"minRotationPeriod {format_duration(least)} of ClusterKeyPolicy "
                        f"{least_by!r} cannot be kept: maxRotationPeriod "
                        f"{format_duration(limit)} of ClusterKeyPolicy {limit_by!r} is "
                        f"shorter and holds; lower the one or raise the other")
    if rotation is not None and staging > rotation:
        # A key is active for the longer of the two periods (webhook/rotation.py stages
        # its successor one staging period before the rotation period ends): a longer
        # staging would outlast the period, and a bound on it. Possible for a KeyPolicy
        # admitted before a bound, or defaults taken from two ClusterKeyPolicies.
        # Never below the shortest staging there is, though: a key active before the
        # kubelet can deliver it leaves Pods unable to decrypt (only a stored
        # ClusterKeyPolicy from before maxRotationPeriod was held above it gets here).
        held = max(rotation, MIN_STAGING_PERIOD)
        adjusted.append(f"{source} stagingPeriod {format_duration(staging)}, which "
                        f"is longer than the rotation period {format_duration(rotation)}; "
                        f"it is held to {format_duration(held)}")
        staging = held
    if floor is not None and staging < floor:
        adjusted.append(f"{source} stagingPeriod {format_duration(staging)}; "
                        f"minStagingPeriod {format_duration(floor)} of ClusterKeyPolicy "
                        f"{floor_by!r} applies")
        staging = floor
    if rotation is not None and staging > rotation:
        # The staging floor holds: it is what keeps every Pod able to decrypt during a
        # rotation. The bound it breaks is said, with the two objects that set them.
        broken = (f"; maxRotationPeriod {format_duration(limit)} of ClusterKeyPolicy "
                  f"{limit_by!r} cannot be kept: lower minStagingPeriod of ClusterKeyPolicy "
                  f"{floor_by!r} or raise maxRotationPeriod of ClusterKeyPolicy "
                  f"{limit_by!r}") if limit is not None and staging > limit else ""
        adjusted.append(f"each key stays active for {format_duration(staging)}, its "
                        f"staging period (minStagingPeriod of ClusterKeyPolicy "
                        f"{floor_by!r}), longer than the rotation period "
                        f"{format_duration(rotation)}{broken}")
    return EffectivePolicy(rotation, staging, spec.restart,
                           ordered[0].name if ordered else None,
                           tuple(c.name for c in selecting),
                           tuple(p.name for p in ordered[1:]), tuple(adjusted))
