"""KeyPolicy and ClusterKeyPolicy, parsed and judged (webhook/policy.py, pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.policy import (
    DURATION_PATTERN,
    MAX_DURATION,
    MIN_STAGING_PERIOD,
    Bounds,
    ClusterDefaults,
    ClusterKeyPolicy,
    KeyPolicy,
    KeyPolicySpec,
    PolicyError,
    bound_violations,
    cluster_policy_problems,
    effective_policy,
    format_duration,
    parse_cluster_key_policy,
    parse_duration,
    parse_key_policy,
    parse_namespace_selector,
)

from strategies import json_values

DAY, HOUR, MINUTE = timedelta(days=1), timedelta(hours=1), timedelta(minutes=1)
SECOND = timedelta(seconds=1)


# --- durations ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "period"), [
    ("90d", 90 * DAY), ("12h", 12 * HOUR), ("45s", timedelta(seconds=45)),
    ("2m", 2 * MINUTE), ("1h30m", 90 * MINUTE), ("1d12h", 36 * HOUR),
    ("0h30m", 30 * MINUTE), ("3650d", MAX_DURATION),
], ids=["days", "hours", "seconds", "minutes", "hours-and-minutes", "days-and-hours",
        "a-zero-part", "the-maximum"])
def test_a_duration_is_read_as_whole_units(text, period):
    assert parse_duration(text, field="spec.rotationPeriod") == period


@pytest.mark.parametrize(("text", "says"), [
    ("0s", "is zero"), ("0d0h", "is zero"), ("-5m", "must be positive"),
    ("", "is not a duration"), ("90", "is not a duration"), ("1.5h", "is not a duration"),
    ("30m1h", "is not a duration"), ("1h1h", "is not a duration"), ("90D", "is not a duration"),
    (" 90d", "is not a duration"), ("90d\n", "is not a duration"), ("1w", "is not a duration"),
    ("3651d", "longer than 3650d"), ("999999999s", "longer than 3650d"),
    ("1" * 33 + "s", "at most 32"), (90, "not int"), (None, "not NoneType"),
], ids=["zero", "zero-in-parts", "negative", "empty", "no-unit", "fraction",
        "units-out-of-order", "unit-twice", "upper-case", "leading-space", "trailing-newline",
        "weeks", "over-ten-years", "over-ten-years-in-seconds", "too-long-to-read", "a-number",
        "null"])
def test_a_bad_duration_is_refused_naming_the_field(text, says):
    with pytest.raises(PolicyError) as info:
        parse_duration(text, field="spec.rotationPeriod")
    assert str(info.value).startswith("spec.rotationPeriod") and says in str(info.value)


@given(st.timedeltas(min_value=timedelta(seconds=1), max_value=MAX_DURATION))
def test_format_duration_reads_back(period):
    period = timedelta(seconds=int(period.total_seconds()))
    assert parse_duration(format_duration(period), field="f") == period


@given(st.text(max_size=40))
def test_the_crd_pattern_and_the_parser_agree(text):
    """What the API server's schema lets through (its anchored pattern, length 2..32),
    keymount reads as a duration, unless it is zero or over ten years."""
    import re
    schema_ok = 2 <= len(text) <= 32 and re.search(DURATION_PATTERN, text) is not None \
        and "\n" not in text
    try:
        parse_duration(text, field="f")
        parsed = True
    except PolicyError as exc:
        parsed = False
        assert schema_ok is False or "zero" in str(exc) or "ten years" in str(exc)
    assert not parsed or schema_ok


# --- namespace selectors -------------------------------------------------------------------

TEAM = {"team": "payments", "tier": "prod"}

SELECTORS = {
    "empty-selects-all": ({}, True),
    "absent-selects-none": (None, False),
    "match-labels": ({"matchLabels": {"team": "payments"}}, True),
    "match-labels-other": ({"matchLabels": {"team": "search"}}, False),
    "in": ({"matchExpressions": [{"key": "tier", "operator": "In",
                                  "values": ["prod", "staging"]}]}, True),
    "not-in": ({"matchExpressions": [{"key": "tier", "operator": "NotIn",
                                      "values": ["prod"]}]}, False),
    "exists": ({"matchExpressions": [{"key": "team", "operator": "Exists"}]}, True),
    "does-not-exist": ({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]},
                       False),
    "all-must-hold": ({"matchLabels": {"team": "payments"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["dev"]}]}, False),
}


@pytest.mark.parametrize(("selector", "selected"), SELECTORS.values(), ids=SELECTORS.keys())
def test_a_namespace_selector_matches_as_kubernetes_label_selectors_do(selector, selected):
    assert parse_namespace_selector(selector).matches(TEAM) is selected


BAD_SELECTORS = {
    "not-an-object": ("team=payments", "must be a label selector"),
    "unknown-operator": ({"matchExpressions": [{"key": "a", "operator": "Gt",
                                                "values": ["1"]}]}, "operator must be"),
    "in-without-values": ({"matchExpressions": [{"key": "a", "operator": "In"}]},
                          "needs at least one value"),
    "exists-with-values": ({"matchExpressions": [{"key": "a", "operator": "Exists",
                                                  "values": ["x"]}]}, "takes no values"),
    "too-many-terms": ({"matchLabels": {f"k{i}": "v" for i in range(65)}}, "at most 64"),
    "too-many-values": ({"matchExpressions": [{"key": "a", "operator": "In",
                                               "values": ["v"] * 257}]}, "at most 256"),
    "long-value": ({"matchLabels": {"a": "v" * 64}}, "at most 63"),
    "empty-key": ({"matchExpressions": [{"key": "", "operator": "Exists"}]}, "label key"),
}


@pytest.mark.parametrize(("selector", "says"), BAD_SELECTORS.values(), ids=BAD_SELECTORS.keys())
def test_a_bad_namespace_selector_is_refused(selector, says):
    with pytest.raises(PolicyError, match=says):
        parse_namespace_selector(selector)


# --- parsing the kinds ---------------------------------------------------------------------

def keypolicy_object(name="rotation", namespace="shop", created=None, **spec):
    meta = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "keymount.io/v1alpha1", "kind": "KeyPolicy", "metadata": meta,
            "spec": spec}


def cluster_object(name="baseline", selector=None, created=None, **spec):
    meta = {"name": name, **({"creationTimestamp": created} if created else {})}
    return {"apiVersion": "keymount.io/v1alpha1", "kind": "ClusterKeyPolicy",
            "metadata": meta, "spec": {"namespaceSelector": selector or {}, **spec}}


def test_a_keypolicy_without_fields_rotates_by_hand_with_a_two_minute_staging():
    policy = parse_key_policy(keypolicy_object(created="2026-01-02T03:04:05Z"))
    assert policy == KeyPolicy("rotation", "shop", KeyPolicySpec(None, 2 * MINUTE, "none"),
                               created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def test_a_keypolicy_reads_every_field():
    policy = parse_key_policy(keypolicy_object(rotationPeriod="90d", stagingPeriod="5m",
                                               restart="rolling"))
    assert policy.spec == KeyPolicySpec(90 * DAY, 5 * MINUTE, "rolling")


BAD_KEYPOLICIES = {
    "staging-under-10s": ({"stagingPeriod": "9s"}, "spec.stagingPeriod 9s is shorter than 10s"),
    "rotation-not-longer-than-staging": ({"rotationPeriod": "2m", "stagingPeriod": "2m"},
                                         "is not longer than spec.stagingPeriod"),
    "unknown-restart": ({"restart": "always"}, "spec.restart 'always' is not one of"),
    "bad-period": ({"rotationPeriod": "soon"}, "spec.rotationPeriod 'soon' is not a duration"),
}


@pytest.mark.parametrize(("spec", "says"), BAD_KEYPOLICIES.values(), ids=BAD_KEYPOLICIES.keys())
def test_a_bad_keypolicy_is_refused_naming_the_field(spec, says):
    with pytest.raises(PolicyError) as info:
        parse_key_policy(keypolicy_object(**spec))
    assert says in str(info.value)


def test_a_clusterkeypolicy_reads_defaults_and_bounds():
    policy = parse_cluster_key_policy(cluster_object(
        selector={"matchLabels": {"team": "payments"}}, rotationPeriod="30d",
        stagingPeriod="3m", restart="rolling", maxRotationPeriod="90d",
        minStagingPeriod="1m", minRotationPeriod="1h"))
    assert policy.defaults == ClusterDefaults(30 * DAY, 3 * MINUTE, "rolling")
    assert policy.bounds == Bounds(90 * DAY, MINUTE, HOUR)
    assert policy.selects(TEAM) and not policy.selects({"team": "search"})


@given(json_values)
def test_any_json_is_parsed_or_refused_with_policy_error(value):
    for parse in (parse_key_policy, parse_cluster_key_policy):
        for obj in ({"spec": value}, {"metadata": value, "spec": {"rotationPeriod": value}},
                    {"spec": {"namespaceSelector": value, "restart": value}}):
            try:
                parse(obj)
            except PolicyError:
                pass


# --- bounds ------------------------------------------------------------------------------

def cluster(name="baseline", selector=None, created=None, *, rotation=None, staging=None,
            restart=None, max_rotation=None, min_staging=None,
            min_rotation=None) -> ClusterKeyPolicy:
    return ClusterKeyPolicy(name, parse_namespace_selector(selector or {}),
                            ClusterDefaults(rotation, staging, restart),
                            Bounds(max_rotation, min_staging, min_rotation), created=created)


def keypolicy(rotation=None, staging=2 * MINUTE, restart="none", *, name="rotation",
              created=None) -> KeyPolicy:
    return KeyPolicy(name, "shop", KeyPolicySpec(rotation, staging, restart), created=created)


VIOLATIONS = {
    "rotation-over-the-maximum": (keypolicy(180 * DAY), cluster(max_rotation=90 * DAY),
                                  ["spec.rotationPeriod 180d is longer than maxRotationPeriod "
                                   "90d of ClusterKeyPolicy 'baseline'; set "
                                   "spec.rotationPeriod to at most 90d"]),
    "no-rotation-under-a-maximum": (keypolicy(None), cluster(max_rotation=90 * DAY),
                                    ["spec.rotationPeriod is not set (rotation by hand "
                                     "only), but ClusterKeyPolicy 'baseline' bounds it by "
                                     "maxRotationPeriod 90d; set spec.rotationPeriod to at "
                                     "most 90d"]),
    "staging-under-the-minimum": (keypolicy(30 * DAY, MINUTE), cluster(min_staging=5 * MINUTE),
                                  ["spec.stagingPeriod 1m is shorter than minStagingPeriod "
                                   "5m of ClusterKeyPolicy 'baseline'; set "
                                   "spec.stagingPeriod to at least 5m"]),
    # A namespace admin asking for a rotation every few seconds: each rotation keeps
    # one more key Secret and spends the controller's write budget, shared by all.
    "rotation-under-the-minimum": (keypolicy(11 * SECOND, 10 * SECOND),
                                   cluster(min_rotation=HOUR),
                                   ["spec.rotationPeriod 11s is shorter than "
                                    "minRotationPeriod 1h of ClusterKeyPolicy 'baseline' "
                                    "(each rotation keeps one more key Secret and spends "
                                    "the controller's shared write budget); set "
                                    "spec.rotationPeriod to at least 1h"]),
    "by-hand-is-not-under-the-minimum": (keypolicy(None), cluster(min_rotation=HOUR), []),
    "within": (keypolicy(90 * DAY, 5 * MINUTE),
               cluster(max_rotation=90 * DAY, min_staging=5 * MINUTE), []),
    "not-selected": (keypolicy(180 * DAY),
                     cluster(selector={"matchLabels": {"team": "search"}},
                             max_rotation=90 * DAY), []),
    "defaults-are-no-bounds": (keypolicy(180 * DAY, MINUTE),
                               cluster(rotation=30 * DAY, staging=5 * MINUTE), []),
}


@pytest.mark.parametrize(("policy", "bounds", "messages"), VIOLATIONS.values(),
                         ids=VIOLATIONS.keys())
def test_a_keypolicy_outside_a_selecting_clusterkeypolicy_names_the_bound(policy, bounds,
                                                                         messages):
    assert list(bound_violations(policy, TEAM, [bounds])) == messages


@pytest.mark.parametrize("floor", [dict(min_staging=2 * HOUR), dict(min_rotation=2 * HOUR)],
                         ids=["staging-floor", "rotation-floor"])
def test_bounds_that_conflict_across_clusterkeypolicies_are_refused_as_a_conflict(floor):
    # Each bound's own message used to point at the other one: a KeyPolicy author sent
    # round in circles by something only a cluster admin can change.
    fast = cluster("fast", max_rotation=HOUR)
    slow = cluster("slow", **floor)
    bound = "minStagingPeriod" if "min_staging" in floor else "minRotationPeriod"
    for policy in (keypolicy(HOUR, 30 * MINUTE), keypolicy(3 * HOUR, 2 * HOUR)):
        assert bound_violations(policy, TEAM, [slow, fast]) == (
            f"ClusterKeyPolicies 'fast' (maxRotationPeriod 1h) and 'slow' ({bound} 2h) "
            f"both select this namespace and no KeyPolicy can keep both; a cluster admin "
            f"must change one of them: kubectl edit clusterkeypolicies fast",)


def test_every_selecting_clusterkeypolicy_bounds_a_keypolicy():
    loose, strict = cluster("loose", max_rotation=180 * DAY), cluster("strict",
                                                                     max_rotation=30 * DAY)
    found = bound_violations(keypolicy(90 * DAY), TEAM, [strict, loose])
    assert len(found) == 1 and "ClusterKeyPolicy 'strict'" in found[0]
    found = bound_violations(keypolicy(365 * DAY), TEAM, [strict, loose])
    assert ["'loose'" in m for m in found] == [True, False]  # sorted by name


CLUSTER_PROBLEMS = {
    "default-over-own-maximum": (dict(rotation=180 * DAY, max_rotation=90 * DAY),
                                 "spec.rotationPeriod 180d is longer than its own "
                                 "spec.maxRotationPeriod 90d"),
    "default-under-own-minimum": (dict(staging=MINUTE, min_staging=5 * MINUTE),
                                  "spec.stagingPeriod 1m is shorter than its own "
                                  "spec.minStagingPeriod 5m"),
    "bounds-nobody-can-keep": (dict(max_rotation=HOUR, min_staging=HOUR),
                               "spec.minStagingPeriod 1h is not shorter than "
                               "spec.maxRotationPeriod 1h"),
    "rotation-within-its-staging": (dict(rotation=3 * MINUTE, min_staging=5 * MINUTE),
                                    "is not longer than the staging period 5m"),
    # A typo for 5d: no KeyPolicy could keep it (its staging is at least 10s), and it
    # would hold every selected namespace's staging under what the kubelet needs.
    "maximum-no-staging-fits-under": (dict(max_rotation=5 * SECOND),
                                      "spec.maxRotationPeriod 5s is not longer than 10s"),
    "minimum-over-maximum": (dict(max_rotation=DAY, min_rotation=2 * DAY),
                             "spec.minRotationPeriod 2d is longer than "
                             "spec.maxRotationPeriod 1d"),
    "default-under-own-rotation-minimum": (dict(rotation=HOUR, min_rotation=DAY),
                                           "spec.rotationPeriod 1h is shorter than its own "
                                           "spec.minRotationPeriod 1d"),
}


@pytest.mark.parametrize(("fields", "says"), CLUSTER_PROBLEMS.values(),
                         ids=CLUSTER_PROBLEMS.keys())
def test_a_clusterkeypolicy_whose_defaults_break_its_bounds_is_a_problem(fields, says):
    problems = cluster_policy_problems(cluster(**fields))
    assert len(problems) == 1 and says in problems[0], problems


def test_a_consistent_clusterkeypolicy_has_no_problem():
    assert cluster_policy_problems(cluster(rotation=30 * DAY, staging=5 * MINUTE,
                                           max_rotation=90 * DAY, min_staging=MINUTE)) == ()


# --- the effective policy ------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_namespace_without_any_policy_has_none():
    assert effective_policy(TEAM, [], [cluster(selector={"matchLabels": {"team": "x"}})]) \
        is None


def test_a_keypolicy_wins_over_clusterkeypolicy_defaults_as_a_whole():
    effective = effective_policy(TEAM, [keypolicy(None, 3 * MINUTE)],
                                 [cluster(rotation=30 * DAY, restart="rolling")])
    assert effective is not None
    assert effective.spec == KeyPolicySpec(None, 3 * MINUTE, "none")
    assert (effective.keypolicy, effective.cluster_policies) == ("rotation", ("baseline",))


def test_of_several_keypolicies_the_oldest_is_in_effect_then_the_first_name():
    older = keypolicy(30 * DAY, name="zeta", created=T0)
    younger = keypolicy(60 * DAY, name="alpha", created=T0 + timedelta(seconds=1))
    same_age = keypolicy(90 * DAY, name="beta", created=T0)
    effective = effective_policy(TEAM, [younger, same_age, older], [])
    assert effective is not None
    assert (effective.keypolicy, effective.rotation_period) == ("beta", 90 * DAY)
    assert effective.ignored == ("zeta", "alpha")


def test_without_a_keypolicy_each_default_comes_from_the_oldest_clusterkeypolicy_setting_it():
    old = cluster("old", created=T0, staging=5 * MINUTE)
    new = cluster("new", created=T0 + DAY, rotation=30 * DAY, staging=MINUTE,
                  restart="rolling")
    effective = effective_policy(TEAM, [], [new, old])
    assert effective is not None and effective.keypolicy is None
    assert effective.spec == KeyPolicySpec(30 * DAY, 5 * MINUTE, "rolling")
    assert effective.cluster_policies == ("old", "new")


def test_a_selecting_clusterkeypolicy_without_defaults_gives_the_keypolicy_defaults():
    effective = effective_policy(TEAM, [], [cluster()])
    assert effective is not None
    assert effective.spec == KeyPolicySpec(None, 2 * MINUTE, "none")


def test_the_strictest_bounds_of_all_selecting_clusterkeypolicies_hold():
    policies = [cluster("a", max_rotation=90 * DAY, min_staging=3 * MINUTE),
                cluster("b", max_rotation=30 * DAY, min_staging=MINUTE),
                cluster("elsewhere", selector={"matchLabels": {"team": "x"}},
                        max_rotation=DAY, min_staging=HOUR)]
    effective = effective_policy(TEAM, [keypolicy(60 * DAY, 2 * MINUTE)], policies)
    assert effective is not None
    assert (effective.rotation_period, effective.staging_period) == (30 * DAY, 3 * MINUTE)
    assert len(effective.adjusted) == 2
    assert "maxRotationPeriod 30d of ClusterKeyPolicy 'b'" in effective.adjusted[0]
    assert "minStagingPeriod 3m of ClusterKeyPolicy 'a'" in effective.adjusted[1]


def test_a_rotation_under_the_minimum_is_raised_to_it_and_the_maximum_wins_a_conflict():
    # Admitted before the bound, or given by another ClusterKeyPolicy's default.
    effective = effective_policy(TEAM, [keypolicy(11 * SECOND, 10 * SECOND)],
                                 [cluster("cost", min_rotation=HOUR)])
    assert effective is not None and effective.rotation_period == HOUR
    assert effective.adjusted == ("KeyPolicy 'rotation' gives rotationPeriod 11s; "
                                  "minRotationPeriod 1h of ClusterKeyPolicy 'cost' applies",)
    # A key's age is the bound that protects data; the minimum is a cost. Of the two in
    # conflict, the maximum holds, and the conflict is said.
    effective = effective_policy(TEAM, [keypolicy(11 * SECOND, 10 * SECOND)],
                                 [cluster("cost", min_rotation=2 * DAY),
                                  cluster("age", max_rotation=DAY)])
    assert effective is not None and effective.rotation_period == DAY
    assert effective.adjusted == (
        "KeyPolicy 'rotation' gives rotationPeriod 11s; minRotationPeriod 2d of "
        "ClusterKeyPolicy 'cost' applies, up to maxRotationPeriod 1d",
        "minRotationPeriod 2d of ClusterKeyPolicy 'cost' cannot be kept: maxRotationPeriod "
        "1d of ClusterKeyPolicy 'age' is shorter and holds; lower the one or raise the "
        "other")


def test_the_staging_is_never_held_below_the_shortest_staging_there_is():
    # A stored ClusterKeyPolicy from before the 5s maximum was refused: staging held to
    # 5s would activate keys before the kubelet can deliver them.
    effective = effective_policy(TEAM, [], [cluster(max_rotation=5 * SECOND)])
    assert effective is not None
    assert effective.staging_period == MIN_STAGING_PERIOD == 10 * SECOND


def test_a_deeply_nested_restart_is_a_policy_error_not_a_recursion_error():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(PolicyError, match=r"spec\.restart list is not one of none, rolling"):
        parse_key_policy(keypolicy_object(restart=nested))


def test_a_maximum_without_a_default_period_is_the_period():
    effective = effective_policy(TEAM, [], [cluster(max_rotation=90 * DAY)])
    assert effective is not None and effective.rotation_period == 90 * DAY


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3)),
                max_size=4, unique_by=lambda pair: pair[0]))
def test_the_effective_policy_does_not_depend_on_the_order_given(entries):
    policies = [cluster(name, created=T0 + i * DAY, rotation=(i + 2) * DAY,
                        max_rotation=(5 - i) * DAY) for name, i in entries]
    keypolicies = [keypolicy((i + 1) * DAY, name=name, created=T0 + (i % 2) * DAY)
                   for name, i in entries]
    forward = effective_policy(TEAM, keypolicies, policies)
    assert forward == effective_policy(TEAM, keypolicies[::-1], policies[::-1])


# --- how long a key is active under the bounds ----------------------------------------------
# A key's successor is staged one staging period before the key is one rotation period
# old (webhook/rotation.py), so on schedule a key is active for the longer of the two.

def test_a_staging_period_longer_than_the_bounded_rotation_is_held_to_it():
    # Admitted before the bound existed: a ten-year period with a staging nearly as long.
    old = keypolicy(3650 * DAY, 3649 * DAY)
    effective = effective_policy(TEAM, [old], [cluster(max_rotation=90 * DAY)])
    assert effective is not None
    assert (effective.rotation_period, effective.staging_period) == (90 * DAY, 90 * DAY)
    assert len(effective.adjusted) == 2
    assert "stagingPeriod 3649d, which is longer than the rotation period 90d" in \
        effective.adjusted[1]


def test_clusterkeypolicies_whose_bounds_conflict_are_reported_and_the_staging_floor_holds():
    fast = cluster("fast", created=T0, max_rotation=HOUR)
    slow = cluster("slow", created=T0 + DAY, min_staging=2 * HOUR)
    effective = effective_policy(TEAM, [], [fast, slow])
    assert effective is not None
    # The floor protects every Pod's reading of the staged key: it holds, and each key
    # is active for two hours, which the status says.
    assert (effective.rotation_period, effective.staging_period) == (HOUR, 2 * HOUR)
    conflict = effective.adjusted[-1]
    assert "each key stays active for 2h" in conflict
    assert "maxRotationPeriod 1h of ClusterKeyPolicy 'fast' cannot be kept" in conflict
    assert "lower minStagingPeriod of ClusterKeyPolicy 'slow'" in conflict


@given(rotation=st.integers(11, 400), staging=st.integers(10, 400),
       bounds=st.lists(st.tuples(st.none() | st.integers(1, 400),
                                 st.none() | st.integers(1, 400)), max_size=3),
       declared=st.booleans())
def test_on_schedule_no_key_is_active_longer_than_the_shortest_max_rotation_period(
        rotation, staging, bounds, declared):
    """Whatever a KeyPolicy declares (admitted before the bounds, so unchecked against
    them), a key is active no longer than the shortest maxRotationPeriod, unless a
    minStagingPeriod is longer still, which is then reported."""
    clusters = [cluster(f"c{i}", created=T0 + i * DAY,
                        max_rotation=limit and limit * HOUR,
                        min_staging=floor and floor * HOUR)
                for i, (limit, floor) in enumerate(bounds)]
    policies = [keypolicy(max(rotation, staging + 1) * HOUR, staging * HOUR)] if declared \
        else []
    effective = effective_policy(TEAM, policies, clusters)
    if not policies and not clusters:
        assert effective is None
        return
    assert effective is not None
    limits = [limit * HOUR for limit, _ in bounds if limit]
    floors = [floor * HOUR for _, floor in bounds if floor]
    assert effective.staging_period >= max(floors, default=timedelta(0))
    if effective.rotation_period is None:
        assert not limits
        return
    lifetime = max(effective.rotation_period, effective.staging_period)
    if limits and lifetime > min(limits):
        assert floors and max(floors) > min(limits)
        assert lifetime == max(floors)
        assert any("cannot be kept" in line for line in effective.adjusted)
    if policies and (effective.rotation_period, effective.staging_period) != \
            (policies[0].spec.rotation_period, policies[0].spec.staging_period):
        assert effective.adjusted
