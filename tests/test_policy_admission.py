"""KeyPolicy and ClusterKeyPolicy at the validating webhook: the pure decisions, the reads
behind them (webhook/policyreads.py, against a fake of our own PolicyApi), and the
server asking for those reads only when a decision needs them."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from webhook.admission import AdmissionRequest, parse_review
from webhook.config import Settings
from webhook.decisions import (
    PolicyView,
    View,
    check_clusterkeypolicy,
    check_keypolicy,
    needs_policy_view,
    route,
)
from webhook.keys import Keyring
from webhook.metrics import Metrics
from webhook.policyreads import MAX_CLUSTER_POLICIES, PolicyReadError, PolicyReads
from webhook.server import Runtime, decide
from webhook.store import KeyStore

from builders import review

NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "shop", "tier": "prod"}


def keypolicy(name="rotation", **spec):
    return {"apiVersion": "keymount.io/v1alpha1", "kind": "KeyPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def clusterkeypolicy(name="baseline", selector=None, **spec):
    return {"apiVersion": "keymount.io/v1alpha1", "kind": "ClusterKeyPolicy",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {} if selector is None else selector, **spec}}


def request_of(obj, *, kind="KeyPolicy", operation="CREATE", old=None) -> AdmissionRequest:
    body = review(obj, kind=kind, operation=operation, old=old,
                  namespace="shop" if kind == "KeyPolicy" else "")
    body["request"]["kind"] = {"group": "keymount.io", "version": "v1alpha1", "kind": kind}
    return parse_review(json.dumps(body).encode())


def view(*clusters, labels=NAMESPACE_LABELS, failure="", keypolicies=()) -> View:
    return View(Keyring("shop"), Settings(),
                policies=PolicyView(labels, tuple(clusters), failure=failure,
                                    keypolicies=tuple(keypolicies)))


PROD_BOUNDS = clusterkeypolicy(selector={"matchLabels": {"tier": "prod"}},
                               maxRotationPeriod="90d", minStagingPeriod="5m")

KEYPOLICIES = {
    "within-the-bounds": (keypolicy(rotationPeriod="30d", stagingPeriod="5m"), True, []),
    "rotation-over-the-maximum": (keypolicy(rotationPeriod="180d", stagingPeriod="5m"), False,
                                  ["spec.rotationPeriod 180d is longer than maxRotationPeriod "
                                   "90d of ClusterKeyPolicy 'baseline'"]),
    "no-rotation-under-a-maximum": (keypolicy(stagingPeriod="5m"), False,
                                    ["spec.rotationPeriod is not set",
                                     "set spec.rotationPeriod to at most 90d"]),
    "staging-under-the-minimum": (keypolicy(rotationPeriod="30d"), False,
                                  ["spec.stagingPeriod 2m is shorter than minStagingPeriod "
                                   "5m of ClusterKeyPolicy 'baseline'"]),
    "invalid-duration": (keypolicy(rotationPeriod="1y"), False,
                         ["spec.rotationPeriod '1y' is not a duration"]),
    "staging-under-10s": (keypolicy(rotationPeriod="30d", stagingPeriod="5s"), False,
                          ["spec.stagingPeriod 5s is shorter than 10s"]),
}


@pytest.mark.parametrize(("obj", "admitted", "says"), KEYPOLICIES.values(),
                         ids=KEYPOLICIES.keys())
def test_a_keypolicy_is_judged_against_the_bounds_of_its_namespace(obj, admitted, says):
    request = request_of(obj)
    assert route("validate", request) is check_keypolicy and needs_policy_view(request)
    verdict = check_keypolicy(request, view(PROD_BOUNDS))
    assert verdict.response["allowed"] is admitted, verdict.message
    assert verdict.result == ("allowed" if admitted else "denied")
    for part in says:
        assert part in verdict.message
    if not admitted:
        assert "KeyPolicy 'rotation' in namespace 'shop'" in verdict.message


def test_bounds_of_a_clusterkeypolicy_that_does_not_select_the_namespace_do_not_apply():
    verdict = check_keypolicy(request_of(keypolicy(rotationPeriod="180d")),
                              view(PROD_BOUNDS, labels={"tier": "dev"}))
    assert verdict.response == {"allowed": True}


def test_an_update_that_changes_the_spec_is_judged_like_a_create():
    old = keypolicy(rotationPeriod="30d", stagingPeriod="5m")
    request = request_of(keypolicy(rotationPeriod="180d", stagingPeriod="5m"),
                         operation="UPDATE", old=old)
    assert needs_policy_view(request)
    assert check_keypolicy(request, view(PROD_BOUNDS)).response["allowed"] is False


def test_an_update_that_keeps_the_spec_is_allowed_without_reads():
    # A KeyPolicy admitted before its bounds were tightened can still be labelled or
    # have its finalizers removed (deleted); the bound holds it anyway.
    old = keypolicy(rotationPeriod="180d")
    new = copy.deepcopy(old)
    new["metadata"]["labels"] = {"owner": "payments"}
    request = request_of(new, operation="UPDATE", old=old)
    assert not needs_policy_view(request)
    assert check_keypolicy(request, View(Keyring("shop"), Settings())).response == {
        "allowed": True}


SECOND_KEYPOLICY = {
    # (operation, the namespace's KeyPolicies as read, admitted)
    "first-create": ("CREATE", (), True),
    "create-over-another": ("CREATE", ("older",), False),
    "create-over-two": ("CREATE", ("older", "oldest"), False),
    "create-under-its-own-name": ("CREATE", ("rotation",), True),
    "update-beside-another": ("UPDATE", ("older", "rotation"), True),
}


@pytest.mark.parametrize(("operation", "stored", "admitted"), SECOND_KEYPOLICY.values(),
                         ids=SECOND_KEYPOLICY.keys())
def test_a_namespace_has_one_keypolicy(operation, stored, admitted):
    # The controller reads every KeyPolicy of a namespace on each change: their number
    # is bounded at admission, not by whoever may create them.
    new = keypolicy(rotationPeriod="30d", stagingPeriod="5m")
    old = keypolicy(rotationPeriod="60d", stagingPeriod="5m") if operation == "UPDATE" \
        else None
    verdict = check_keypolicy(request_of(new, operation=operation, old=old),
                              view(PROD_BOUNDS, keypolicies=stored))
    assert verdict.response["allowed"] is admitted, verdict.message
    if not admitted:
        assert verdict.message == (
            "namespace 'shop' already has KeyPolicy 'older', and a namespace has one "
            "KeyPolicy; change that one instead: kubectl edit keypolicies.keymount.io "
            "older -n shop")


def test_a_failed_read_refuses_the_keypolicy_with_the_reason():
    verdict = check_keypolicy(request_of(keypolicy(rotationPeriod="30d")),
                              view(failure="API server said 403: forbidden"))
    assert verdict.result == "error" and verdict.response["allowed"] is False
    assert "API server said 403: forbidden" in verdict.message
    assert "kubectl auth can-i list clusterkeypolicies.keymount.io" in verdict.message


def test_an_invalid_stored_clusterkeypolicy_refuses_keypolicies_naming_it():
    broken = clusterkeypolicy("broken", maxRotationPeriod="forever")
    verdict = check_keypolicy(request_of(keypolicy(rotationPeriod="30d")), view(broken))
    assert verdict.response["allowed"] is False
    assert "ClusterKeyPolicy 'broken' is invalid" in verdict.message
    assert "kubectl edit clusterkeypolicies broken" in verdict.message


CLUSTERKEYPOLICIES = {
    "consistent": (clusterkeypolicy(rotationPeriod="30d", maxRotationPeriod="90d"), True,
                   ""),
    "default-over-own-bound": (clusterkeypolicy(rotationPeriod="180d", maxRotationPeriod="90d"),
                               False, "spec.rotationPeriod 180d is longer than its own "
                                      "spec.maxRotationPeriod 90d"),
    "bad-selector": (clusterkeypolicy(selector={"matchExpressions": [
        {"key": "tier", "operator": "In"}]}), False, "needs at least one value"),
    "bad-duration": (clusterkeypolicy(minStagingPeriod="0s"), False,
                     "spec.minStagingPeriod '0s' is zero"),
}


@pytest.mark.parametrize(("obj", "admitted", "says"), CLUSTERKEYPOLICIES.values(),
                         ids=CLUSTERKEYPOLICIES.keys())
def test_a_clusterkeypolicy_keeps_its_own_bounds(obj, admitted, says):
    request = request_of(obj, kind="ClusterKeyPolicy")
    assert route("validate", request) is check_clusterkeypolicy
    assert not needs_policy_view(request)
    verdict = check_clusterkeypolicy(request, View(Keyring(""), Settings()))
    assert verdict.response["allowed"] is admitted
    assert says in verdict.message and ("ClusterKeyPolicy 'baseline'" in verdict.message
                                        or admitted)


def test_deleting_a_policy_is_not_judged():
    request = request_of(None, operation="DELETE", old=keypolicy(rotationPeriod="180d"))
    assert not needs_policy_view(request)
    assert route("validate", request)(request, view()).response == {"allowed": True}


# --- the reads -----------------------------------------------------------------------------

class FakePolicyApi:
    """Our PolicyApi, answering from memory, counting calls, optionally held open."""

    def __init__(self, labels=None, clusters=(), *, fail=None, keypolicies=()):
        self.labels, self.clusters, self.fail = labels or {}, list(clusters), fail
        self.keypolicies = list(keypolicies)
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def namespace_labels(self, namespace):
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise self.fail
        return self.labels

    async def cluster_policies(self, limit):
        self.calls += 1
        await self.release.wait()
        if len(self.clusters) > limit:
            raise PolicyReadError(f"there are more than {limit} ClusterKeyPolicies")
        return self.clusters

    async def keypolicy_names(self, namespace, limit):
        self.calls += 1
        await self.release.wait()
        return self.keypolicies[:limit]


async def test_a_read_gives_the_labels_every_clusterkeypolicy_and_the_keypolicies():
    reads = PolicyReads(FakePolicyApi(NAMESPACE_LABELS, [PROD_BOUNDS],
                                      keypolicies=["a", "b", "c"]))
    assert await reads.view("shop") == PolicyView(NAMESPACE_LABELS, (PROD_BOUNDS,),
                                                  keypolicies=("a", "b"))


@pytest.mark.parametrize(("fail", "says"), [
    (PolicyReadError("namespace 'shop' not found"), "namespace 'shop' not found"),
    (TimeoutError("read timed out"), "cannot reach the API server: TimeoutError"),
], ids=["missing-namespace", "timeout"])
async def test_a_failed_read_is_a_failure_in_words(fail, says):
    found = await PolicyReads(FakePolicyApi(fail=fail)).view("shop")
    assert says in found.failure


async def test_too_many_clusterkeypolicies_fail_closed():
    api = FakePolicyApi(NAMESPACE_LABELS, [PROD_BOUNDS] * (MAX_CLUSTER_POLICIES + 1))
    assert "more than 500" in (await PolicyReads(api).view("shop")).failure


async def test_concurrent_reviews_share_the_reads_in_flight():
    api = FakePolicyApi(NAMESPACE_LABELS, [PROD_BOUNDS])
    api.release.clear()
    reads = PolicyReads(api)
    waiting = [asyncio.ensure_future(reads.view("shop")) for _ in range(10)]
    await asyncio.sleep(0)
    api.release.set()
    views = await asyncio.gather(*waiting)
    assert api.calls == 3 and all(v.cluster_policies == (PROD_BOUNDS,) for v in views)
    await reads.view("shop")  # answered: the next review reads again
    assert api.calls == 6


async def test_reads_past_the_rate_limit_fail_closed():
    now = [0.0]
    api = FakePolicyApi(NAMESPACE_LABELS)
    reads = PolicyReads(api, rate=1.0, burst=2, clock=lambda: now[0])
    found = [await reads.view("shop") for _ in range(3)]
    assert [v.failure for v in found[:2]] == ["", ""]
    assert "limiting its reads" in found[2].failure and found[2].throttled
    assert api.calls == 6
    now[0] += 1.0
    assert (await reads.view("shop")).failure == ""
    # What the review is told: a refusal to retry (429), not a read access to check.
    verdict = check_keypolicy(request_of(keypolicy(rotationPeriod="30d")), View(
        Keyring("shop"), Settings(), policies=found[2]))
    assert verdict.response["status"]["code"] == 429
    assert "retry in a few seconds" in verdict.message and "auth can-i" not in verdict.message


# --- the server edge -----------------------------------------------------------------------

class NoKeys:
    async def load(self):
        pass

    async def run(self):
        pass

    async def confirm(self, namespace):
        return Keyring(namespace)


def runtime_with(api) -> Runtime:
    store = KeyStore()
    return Runtime(settings=Settings(), store=store, source=NoKeys(), metrics=Metrics(store),
                   policies=None if api is None else PolicyReads(api))


async def test_the_server_reads_for_a_keypolicy_and_refuses_outside_the_bounds():
    api = FakePolicyApi(NAMESPACE_LABELS, [PROD_BOUNDS])
    verdict = await decide(runtime_with(api), request_of(keypolicy(rotationPeriod="180d")),
                           "validate")
    assert api.calls == 3 and verdict.response["allowed"] is False
    assert "maxRotationPeriod 90d of ClusterKeyPolicy 'baseline'" in verdict.message


async def test_the_server_reads_nothing_for_a_clusterkeypolicy():
    api = FakePolicyApi()
    verdict = await decide(runtime_with(api), request_of(
        clusterkeypolicy(maxRotationPeriod="90d"), kind="ClusterKeyPolicy"), "validate")
    assert api.calls == 0 and verdict.response == {"allowed": True}


async def test_without_the_kubernetes_api_a_keypolicy_is_refused():
    verdict = await decide(runtime_with(None), request_of(keypolicy(rotationPeriod="30d")),
                           "validate")
    assert verdict.response["allowed"] is False and "--keys-from" in verdict.message


class RawResponse:
    """What the Kubernetes client returns with _preload_content=False: the body is read
    from the socket when asked for; where it is read is recorded."""

    def __init__(self, body: bytes) -> None:
        self.body, self.read_on_loop, self.closed = body, [], False

    def read(self, amount):
        import threading
        self.read_on_loop.append(threading.current_thread() is threading.main_thread())
        return self.body[:amount]

    def close(self):
        self.closed = True

    def release_conn(self):
        pass


def raw_policy_api(body: bytes):
    from webhook.cluster import KubernetesPolicyApi
    response = RawResponse(body)

    class Calls:
        def __getattr__(self, name):
            return lambda *args, **kwargs: response

    api = KubernetesPolicyApi.__new__(KubernetesPolicyApi)
    api.custom = api.core = Calls()
    return api, response


READS = {
    "namespace-labels": (lambda api: api.namespace_labels("shop"),
                         {"metadata": {"labels": {"tier": "prod"}}}, {"tier": "prod"}),
    "clusterkeypolicies": (lambda api: api.cluster_policies(500),
                           {"items": [PROD_BOUNDS]}, [PROD_BOUNDS]),
    "keypolicy-names": (lambda api: api.keypolicy_names("shop", 2),
                        {"items": [{"metadata": {"name": "a"}}]}, ["a"]),
}


@pytest.mark.parametrize(("call", "body", "expected"), READS.values(), ids=READS.keys())
async def test_each_policy_read_reads_and_decodes_its_body_off_the_event_loop(call, body,
                                                                             expected):
    # With _preload_content=False the body is read from the socket when asked for: in
    # the read's thread, not on the loop every admission waits on (up to 8 MiB of JSON).
    api, response = raw_policy_api(json.dumps(body).encode())
    assert await call(api) == expected
    assert response.read_on_loop and not any(response.read_on_loop)


@pytest.mark.parametrize("call", [c for c, _, _ in READS.values()], ids=READS.keys())
async def test_a_policy_read_over_8_mib_is_refused_unread(call):
    from webhook.cluster import MAX_POLICY_LIST_BYTES
    api, response = raw_policy_api(b" " * (MAX_POLICY_LIST_BYTES + 10))
    with pytest.raises(PolicyReadError, match="take more than"):
        await call(api)
    assert response.closed
