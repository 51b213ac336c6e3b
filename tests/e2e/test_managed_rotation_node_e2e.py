"""Managed rotation on a real node: a KeyPolicy and a `keymount serve --controller`
replica rotate a namespace twice on schedule while two Deployments of backend Pods run.

One run, three views of it (the `managed_rotation` fixture, once for the module):

- writers (Deployment `writer`) append, every 0.5 s, a record naming the highest key
  number at the top level of their /encryption-keys (what an application encrypts
  with) to a file on a hostPath directory; readers (Deployment `reader`, and a second
  container in each writer Pod) check every record against their own Pod's
  /encryption-keys: `encryption-key-<n>` or `staged/encryption-key-<n>` must be there.
  Staging is what makes that hold: a writer can only use key n after its activation,
  and every Pod got `staged/` before; without it, the Pods the kubelet syncs last miss
  the records of those it syncs first;
- every Pod also runs the test app of tests/e2e/node.py (container `app`), which
  prints what it reads every second: the CRI log's stamps on those lines say when
  each Pod first showed the staged and the active file;
- keymount.reader's KeyDirectory, pointed at one running reader Pod's projected volume
  through the kubelet's own directory, is asked what it sees all along.

The test bed's kubelet syncs every 10 s; the staged file took up to 17 s to reach a
running container (README, "Performance and timings"), so the staging period is 25 s.
The windows measured are printed and appended to /tmp/keymount-node-timings.txt. Only
digests of key bytes are compared and printed, never the bytes.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from kubernetes import client, config

from keymount.reader import InvalidKeyFile, KeyDirectory, MissingKey

from apihelpers import (
    KEY_LABEL,
    digest,
    first_seen,
    key_policy,
    key_volume,
    keymount_cli,
    stored_keys,
    timed_reports,
)
from conftest import controller_home, launch_keymount
from polling import poll
from test_node_e2e import TIMINGS_FILE, expected_files, reporting
from test_rotation_node_e2e import deployment, keys_cached, restarts

# A successor is staged one staging period before the period ends: 55 s leaves 30 s
# between one key's activation and the next staging, more than the kubelet takes to
# deliver either, so every Pod's volume passes through each state on its own.
ROTATION_PERIOD = "55s"
STAGING_PERIOD = timedelta(seconds=25)  # > the 17 s the staged file took to arrive
RECORDS = "/records/records"  # on the hostPath directory both Deployments mount
ROTATED = (2, 3)  # the keys the two scheduled rotations make

# Every 0.5 s: "<pod> <sequence> <highest top-level key number>", appended in one
# write. `$$` is the kubelet's escape for `$` (it expands $(NAME) in commands).
WRITER_SCRIPT = r"""trap 'exit 0' TERM INT
seq=0
while :; do
  n=`ls /encryption-keys | sed -n 's/^encryption-key-\([0-9]*\)$/\1/p' | sort -n | tail -n 1`
  seq=$$((seq + 1))
  echo "$POD_NAME $seq $n" >> /records/records
  sleep 0.5
done
"""

# Every 0.5 s, each record not checked yet: "found <writer> <seq> <n> top|staged", or
# "missing <writer> <seq> <n>: <what the directory holds>". A miss counts only if the
# kubelet did not swap the volume (`..data`) while the record was checked: in the
# swap's old version the file could be deleted between two lookups.
READER_SCRIPT = r"""trap 'exit 0' TERM INT
seen=0
while :; do
  if [ -f /records/records ]; then
    set -- `wc -l < /records/records`
    total=$1
    if [ "$total" -gt "$seen" ]; then
      awk -v s="$seen" -v t="$total" 'NR > s && NR <= t' /records/records > /tmp/batch
      version=`readlink /encryption-keys/..data`
      while read writer seq n; do
        while :; do
          where=
          if [ -f "/encryption-keys/encryption-key-$n" ]; then
            where=top
          elif [ -f "/encryption-keys/staged/encryption-key-$n" ]; then
            where=staged
          fi
          [ -n "$where" ] && break
          now=`readlink /encryption-keys/..data`
          [ "$now" = "$version" ] && break
          version=$now
        done
        if [ -n "$where" ]; then
          echo "found $writer $seq $n $where"
        else
          held=`ls /encryption-keys /encryption-keys/staged | tr '\n' ' '`
          echo "missing $writer $seq $n: $held"
        fi
      done < /tmp/batch
      seen=$total
    fi
  fi
  sleep 0.5
done
"""

_CHECK = re.compile(r"^(found|missing) (\S+) (\d+) (\d*)(?: (top|staged)|: .*)$")


@dataclass(frozen=True)
class View:
    """What one KeyDirectory call sequence returned: the active key, and `get(n)` of
    the rotated numbers (None: MissingKey)."""

    numbers: tuple[int, ...]
    active: tuple[int, str] | None
    got: dict[int, str | None]
    error: str | None = None


@dataclass
class Run:
    namespace: str
    policy_created: datetime
    keys: dict[int, dict]  # stored_keys at the end
    digests: dict[int, str]  # sha256 of each active key's bytes
    staged_digests: dict[int, str]  # sha256 of each key's staged field
    pods_before: dict[str, str]  # pod name -> uid, once running with key 1
    pods_after: dict[str, str]
    restarts: list[int]  # every container of both Deployments
    records: list[tuple[str, int, int | None]]  # (writer, seq, key number)
    # pod -> what its reader program logged: (outcome, writer, seq, n, top|staged|None)
    checks: dict[str, list[tuple[str, str, int, int | None, str | None]]]
    reports: dict[str, list]  # pod -> timed_reports
    views: list[tuple[float, View]] = field(default_factory=list)  # (monotonic, view)
    view_pod: str = ""
    view_restarts: list[int] = field(default_factory=list)


def with_programs(body: dict, programs: dict[str, str], *, records: Path) -> dict:
    """A Deployment of `deployment()` (the key-reporting test app as container `app`)
    with a container per program (name: script), the records directory mounted at
    /records, writable for the writer only."""
    spec = body["spec"]["template"]["spec"]
    for name, script in programs.items():
        spec["containers"].append({
            "name": name, "image": spec["containers"][0]["image"],
            "imagePullPolicy": "Never", "command": ["/bin/sh", "-c", script],
            "env": [{"name": "POD_NAME",
                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
            "volumeMounts": [{"name": "records", "mountPath": "/records",
                              "readOnly": name != "writer"}]})
    spec["volumes"] = [{"name": "records", "hostPath": {"path": str(records),
                                                         "type": "Directory"}}]
    return body


def pods_of(api, namespace: str) -> dict[str, str]:
    return {p.metadata.name: p.metadata.uid
            for p in api.list_namespaced_pod(namespace).items
            if p.metadata.deletion_timestamp is None}


def look(keys: KeyDirectory) -> View:
    try:
        numbers = tuple(keys.numbers())
        number, key = keys.active()
        got: dict[int, str | None] = {}
        for n in ROTATED:
            try:
                got[n] = digest(keys.get(n))
            except MissingKey:
                got[n] = None
        return View(numbers, (number, digest(key)), got)
    except (MissingKey, InvalidKeyFile, OSError) as exc:
        return View((), None, {}, error=f"{type(exc).__name__}: {exc}")


def parse_checks(text: str) -> list[tuple[str, str, int, int | None, str | None]]:
    checks = []
    for line in text.splitlines():
        if m := _CHECK.match(line):
            outcome, writer, seq, n, where = m.groups()
            checks.append((outcome, writer, int(seq), int(n) if n else None, where))
    return checks


def parse_records(text: str) -> list[tuple[str, int, int | None]]:
    records = []
    for line in text.splitlines():
        writer, seq, *n = line.split(" ")
        records.append((writer, int(seq), int(n[0]) if n and n[0] else None))
    return records


@pytest.fixture(scope="module")
def managed_rotation(control_plane, admin_kubeconfig, api, keymount, node, policy_crds,
                     tmp_path_factory):
    apps = client.AppsV1Api(config.new_client_from_config(config_file=str(admin_kubeconfig)))
    custom = client.CustomObjectsApi(api.api_client)
    namespace = f"managed-rotation-node-{secrets.token_hex(3)}"
    api.create_namespace({"metadata": {"name": namespace}})
    rights = contextlib.ExitStack()
    # The controller's Lease in a namespace of its own: it never rotates that one.
    home = rights.enter_context(controller_home(api, admin_kubeconfig,
                                                control_plane.keymount_user))
    records = tmp_path_factory.mktemp("records")
    controller = None
    try:
        # Key 1 and slots 2 and 3 first: the Pods list the slots both rotations fill.
        arrived, slots = keys_cached(keymount, 1), keys_cached(keymount, 2, state="slot")
        keymount_cli(admin_kubeconfig, "keys", "create", "-n", namespace, "--generate")
        poll(lambda: arrived() and slots(), what="key 1 and its slots cached")
        # The writers check each other's records too: whichever Pod the kubelet gives
        # a new key first, some other Pod is still without it, and must find it staged.
        for name, programs in (("writer", {"writer": WRITER_SCRIPT, "reader": READER_SCRIPT}),
                               ("reader", {"reader": READER_SCRIPT})):
            apps.create_namespaced_deployment(namespace, with_programs(
                deployment(name), programs, records=records))
        first = expected_files(api, namespace)
        for name in ("writer", "reader"):
            poll(lambda name=name: (r := reporting(node, api, namespace, f"app={name}", 2))
                 and all(report == first for _, report in r.values()),
                 timeout=90, what=f"{name}: two replicas reading key 1")
        before = pods_of(api, namespace)
        view_pod = sorted(p for p in before if p.startswith("reader-"))[0]
        keys = KeyDirectory(key_volume(node, before[view_pod]))
        views: list[tuple[float, View]] = [(time.monotonic(), look(keys))]

        # Every Pod runs: now the policy, and the controller that carries it out.
        policy_created = datetime.now().astimezone()
        key_policy(custom, namespace, rotationPeriod=ROTATION_PERIOD,
                   stagingPeriod=f"{int(STAGING_PERIOD.total_seconds())}s")
        controller = launch_keymount(control_plane, tmp_path_factory.mktemp("controller"),
                                     "--controller", "--controller-namespace", home)
        checked = {"at": 0.0}

        def rotated_twice_and_everywhere() -> bool:
            view = look(keys)
            if view != views[-1][1]:
                views.append((time.monotonic(), view))
            if time.monotonic() - checked["at"] < 1:
                return False
            checked["at"] = time.monotonic()
            if [n for n, k in stored_keys(api, namespace).items()
                    if k["state"] == "active"] != [1, 2, 3]:
                return False
            return view.active is not None and view.active[0] == 3 and all(
                (r := reporting(node, api, namespace, f"app={name}", 2)) and
                all("encryption-key-3" in report for _, report in r.values())
                for name in ("writer", "reader"))
        poll(rotated_twice_and_everywhere, timeout=240,
             what="keys 2 and 3 active and shown by every Pod")
        controller.stop()  # no third rotation while the records are counted

        # Every record written so far, checked in every Pod.
        written = parse_records((records / "records").read_text())
        readers = sorted(before)  # every Pod runs the reader program

        def checks() -> dict | None:
            found = {pod: parse_checks(node.file_logs(namespace, pod, "reader", before[pod]))
                     for pod in readers}
            return found if all(len(c) >= len(written) for c in found.values()) else None
        all_checks = poll(checks, timeout=30, what="every Pod checking every record")

        stored = {s.metadata.name: s.data or {} for s in
                  api.list_namespaced_secret(namespace, label_selector=KEY_LABEL).items}
        keys_end = stored_keys(api, namespace)

        def sha(data_field: str) -> dict[int, str]:
            return {n: digest(base64.b64decode(stored[k["name"]][data_field]))
                for n, k in keys_end.items() if stored[k["name"]].get(data_field)}
        yield Run(
            namespace=namespace, policy_created=policy_created, keys=keys_end,
            digests=sha("encryption-key"),
            staged_digests=sha("staged-encryption-key"),
            pods_before=before, pods_after=pods_of(api, namespace),
            restarts=restarts(api, namespace, "writer") + restarts(api, namespace, "reader"),
            records=written, checks=all_checks,
            reports={pod: timed_reports(namespace, pod, uid) for pod, uid in before.items()},
            views=views, view_pod=view_pod,
            view_restarts=[s.restart_count for s in api.read_namespaced_pod(
                view_pod, namespace).status.container_statuses])
    finally:
        if controller is not None and controller.proc.poll() is None:
            controller.stop()
        rights.close()
        api.delete_namespace(namespace)  # its Pods stop: the machine is shared


def test_readers_find_a_key_for_every_record_through_two_scheduled_rotations(
        managed_rotation):
    run = managed_rotation
    assert {n: k["state"] for n, k in run.keys.items() if n <= 3} == \
        {1: "active", 2: "active", 3: "active"}
    for n in ROTATED:  # staged by the controller, activated after the staging period
        key = run.keys[n]
        assert key["staged_at"] is not None and key["activated_at"] is not None
        assert key["activated_at"] - key["staged_at"] >= STAGING_PERIOD
    assert run.restarts == [0] * 10  # 2 writer Pods x 3 containers, 2 readers x 2
    assert run.pods_after == run.pods_before  # the same Pods all along

    writers = sorted({w for w, _, _ in run.records})
    assert writers == sorted(p for p in run.pods_before if p.startswith("writer-"))
    for writer in writers:  # one process each, never restarted, no record lost
        seqs = [s for w, s, _ in run.records if w == writer]
        assert seqs == list(range(1, len(seqs) + 1))
    used = {n for _, _, n in run.records}
    assert used == {1, 2, 3}  # the writers encrypted with each key, and always had one

    written = run.records
    for reader, checks in run.checks.items():
        misses = [c for c in checks if c[0] == "missing"]
        assert misses == [], f"{reader} found no key for {len(misses)} record(s)"
        # Each record, once, in the order written (a reader checks the file in order).
        assert [(w, s, n) for _, w, s, n, _ in checks[:len(written)]] == written
    staged_only = sum(c[4] == "staged" for checks in run.checks.values()
                      for c in checks[:len(written)])
    since = {n: {what: (run.keys[n][what] - run.policy_created).total_seconds()
                 for what in ("staged_at", "activated_at")} for n in ROTATED}
    line = (f"managed rotation, 2 writers, 4 Pods checking: {len(written)} records "
            f"written, {len(run.checks) * len(written)} checks, 0 misses, {staged_only} "
            f"found only under "
            f"staged/; from the KeyPolicy's creation: " +
            ", ".join(f"key {n} staged at {t['staged_at']:.0f}s, active at "
                      f"{t['activated_at']:.0f}s" for n, t in since.items()))
    print("\n" + line)
    with TIMINGS_FILE.open("a") as out:
        out.write(line + "\n")


def test_every_running_pod_shows_the_staged_file_before_any_pod_shows_the_active_file(
        managed_rotation):
    run = managed_rotation
    lines = []
    for n in ROTATED:
        staged_at, activated_at = run.keys[n]["staged_at"], run.keys[n]["activated_at"]
        staged = {pod: first_seen(r, f"staged/encryption-key-{n}", staged_at)
                  for pod, r in run.reports.items()}
        active = {pod: first_seen(r, f"encryption-key-{n}", staged_at)
                  for pod, r in run.reports.items()}
        assert len(staged) == 4 and None not in staged.values(), staged
        assert None not in active.values(), active
        last_staged, first_active = max(staged.values()), min(active.values())
        assert last_staged < first_active, (n, staged, active)
        assert first_active >= staged_at + STAGING_PERIOD, (n, staged_at, active)
        assert first_active >= activated_at, (n, activated_at, active)
        def each(seen: dict, since: datetime) -> str:
            return ", ".join(f"{pod.split('-')[0]} {(at - since).total_seconds():.1f}s"
                             for pod, at in sorted(seen.items(), key=lambda i: i[1]))
        lines.append(
            f"managed rotation, key {n}: staged -> staged file in all 4 running Pods "
            f"{(last_staged - staged_at).total_seconds():.1f}s ({each(staged, staged_at)}), "
            f"activated -> active file in all 4 "
            f"{(max(active.values()) - activated_at).total_seconds():.1f}s "
            f"({each(active, activated_at)}); the last staged file "
            f"{(first_active - last_staged).total_seconds():.1f}s before the first active")
    print("\n" + "\n".join(lines))
    with TIMINGS_FILE.open("a") as out:
        out.write("\n".join(lines) + "\n")


def test_the_reader_follows_a_running_pods_volume_through_staging_and_activation(
        managed_rotation):
    run = managed_rotation
    views = [view for _, view in run.views]
    assert [v.error for v in views if v.error] == []
    old, new = run.digests, run.staged_digests
    first = views[0]
    assert first.active == (1, old[1]) and first.got == {2: None, 3: None}

    def first_index(condition) -> int:
        return next(i for i, v in enumerate(views) if condition(v))
    for n in ROTATED:
        assert new[n] == old[n]  # the staged bytes are the bytes activated
        before = first_index(lambda v, n=n: v.active == (n - 1, old[n - 1]) and
                             v.got[n] is None)
        during = first_index(lambda v, n=n: v.active == (n - 1, old[n - 1]) and
                             v.got[n] == new[n] and n not in v.numbers)
        after = first_index(lambda v, n=n: v.active == (n, old[n]) and v.got[n] == old[n])
        assert before < during < after, (n, before, during, after)
    actives = [v.active[0] for v in views if v.active]
    assert actives == sorted(actives) and actives[-1] == 3  # never back to an older key
    assert views[-1].got == {2: old[2], 3: old[3]}
    assert run.view_restarts == [0, 0]
