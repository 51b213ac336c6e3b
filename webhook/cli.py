"""`keymount` (also `python -m webhook`): parse flags, call the library, print.

Every flag of `serve` can also come from the environment as KEYMOUNT_<FLAG>
(`--probe-port` → KEYMOUNT_PROBE_PORT), which is how the Deployment configures it.
Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import __version__
from .cli_common import (
    MAX_KEY_INPUT,
    CommandError,
    SubParsers,
    add_flag,
    add_key_writer_flags,
    add_settings_flags,
    add_switch,
    build_key_writers,
    build_settings,
    per_second,
    port,
    read_input,
    seconds,
    too_long_for_a_key,
    whole,
)
from .cli_keys import add_key_lifecycle_commands, add_status_command
from .config import (
    Settings,
)
from .errors import UserFacingError
from .events import EventRecorder
from .keys import Keyring, check_key
from .sources import ClusterKeySource

if TYPE_CHECKING:
    from .cluster import KubernetesKeySource
    from .controller import KeyController
    from .leader import Controller
    from .logs import LineSink
    from .metrics import Metrics
    from .policyreads import PolicyReads
    from .sources import KeySource
    from .store import KeyStore, PodStore

# --- serve ---------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import LineSink

    settings = build_settings(args)
    sink = LineSink(sys.stderr.fileno(), chunk=log_chunk(args))
    try:
        if int(args.workers) > 1:
            return _supervise(args, sink)
        return _serve(args, settings, sink)
    finally:
        sink.close()


def log_chunk(args: argparse.Namespace) -> int:
    """The largest write of serve's log lines to stderr: with --workers the supervisor
    and every worker share it (logs.SHARED_CHUNK)."""
    from .logs import SHARED_CHUNK, SOLE_WRITER_CHUNK

    shared = int(args.workers) > 1 or args.worker_supervisor is not None
    return SHARED_CHUNK if shared else SOLE_WRITER_CHUNK


def _supervise(args: argparse.Namespace, sink: LineSink) -> int:
    from .logs import configure_logging
    from .workers import Supervisor

    configure_logging(fmt=args.log_format, level=args.log_level, sink=sink)
    supervisor = Supervisor(
        args.argv, workers=int(args.workers), host=args.host, probe_port=int(args.probe_port),
        stop_timeout=float(args.shutdown_grace) + float(args.shutdown_timeout) + 5.0)
    try:
        return asyncio.run(supervisor.run())
    except OSError as exc:
        raise CommandError(f"cannot serve probes on {args.host}:{args.probe_port}: "
                           f"{exc.strerror or exc}") from None


def _serve(args: argparse.Namespace, settings: Settings, sink: LineSink) -> int:
    from .connections import ConnectionLimits
    from .logs import DecisionLog, configure_logging
    from .metrics import Metrics
    from .offload import Offload
    from .server import MAX_BODY, Runtime, ServeOptions, new_event_loop, serve
    from .store import KeyStore, PodStore

    if args.worker_supervisor is not None:
        from .parentdeath import end_with_parent
        end_with_parent(int(args.worker_supervisor))
    configure_logging(fmt=args.log_format, level=args.log_level, sink=sink)
    store, pods = KeyStore(), PodStore()
    metrics = Metrics(store, pods)
    sink.on_drop = metrics.log_lines_dropped.inc
    source = build_key_source(args, settings=settings, store=store, metrics=metrics, pods=pods)
    if args.auto_generate and not isinstance(source, ClusterKeySource):
        raise CommandError("--auto-generate needs the Kubernetes key source, not --keys-from",
                           2)
    if args.auto_generate and not args.client_ca:
        raise CommandError(
            "--auto-generate needs --client-ca: keymount then writes key Secrets because of "
            "an admission request, so only the API server may send one. Configure it to "
            "present a client certificate to keymount (docs/operations.md, \"Client "
            "certificates\") and pass the CA that signed it", 2)
    writers = build_key_writers(args)
    if not writers.configured:
        logging.getLogger("keymount.server").warning(
            "--key-writers is not set: anyone RBAC lets write Secrets can choose the key "
            "that encrypts new data; set it, e.g. --key-writers group:system:masters,"
            "group:keymount:key-writers")
    events = build_event_recorder(source, client_ca=args.client_ca, metrics=metrics)
    controller = build_controller(args, source=source, metrics=metrics)
    try:
        runtime = Runtime(settings=settings, store=store, source=source, metrics=metrics,
                          auto_generate=bool(args.auto_generate), writers=writers,
                          events=events, live_read_rate=float(args.live_reads_per_second),
                          controller=controller,
                          decisions=DecisionLog(sink, fmt=args.log_format,
                                                level=args.log_level),
                          live_read_burst=max(1, int(2 * float(args.live_reads_per_second))),
                          policies=build_policy_reads(source, args),
                          offload=Offload(max_body=MAX_BODY,
                                          on_restart=metrics.review_worker_restarts.inc))
        limits = ConnectionLimits(request_timeout=float(args.request_timeout),
                                  max_connections=int(args.max_connections),
                                  max_buffered=int(args.max_buffered_mib) * 1024 * 1024,
                                  handshake_timeout=float(args.request_timeout))
        options = ServeOptions(host=args.host, port=int(args.port),
                               probe_port=int(args.probe_port), tls_cert=args.tls_cert,
                               tls_key=args.tls_key, client_ca=args.client_ca or None,
                               shutdown_grace=float(args.shutdown_grace),
                               shutdown_timeout=float(args.shutdown_timeout), limits=limits)
        if args.worker_report_fd is not None:
            # A worker's probes are the supervisor's business: any free loopback port
            # (0, which --probe-port itself refuses), reported back over the pipe.
            options.reuse_port, options.probe_host, options.probe_port = True, "127.0.0.1", 0
            options.report = report_to(int(args.worker_report_fd))
    except ValueError as exc:
        raise CommandError(f"invalid limit: {exc}", 2) from None
    for path in (options.tls_cert, options.tls_key, *([options.client_ca]
                                                       if options.client_ca else [])):
        if not Path(path).is_file():
            raise CommandError(f"TLS file {path} not found; create a pair with "
                               f"`keymount certs --service keymount --namespace keymount "
                               f"--out certs --ip 127.0.0.1` or pass --tls-cert/--tls-key")
    try:
        loop = new_event_loop(args.event_loop)
    except ImportError:
        raise CommandError("--event-loop uvloop: uvloop is not installed here; install it "
                           "(pip install uvloop) or pass --event-loop asyncio", 2) from None
    try:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(serve(runtime, options))
    except OSError as exc:  # typically the port is taken
        raise CommandError(f"cannot serve on {options.host}:{options.port}/"
                           f"{options.probe_port}: {exc.strerror or exc}") from None
    return 0


def build_event_recorder(source: KeySource, *, client_ca: str | None,
                         metrics: Metrics) -> EventRecorder | None:
    """Events about admissions, only when every review comes from the API server.

    An Event outlives the request that caused it. Without --client-ca anyone who reaches
    the port can send a review, so a forged one could write an Event in any namespace
    claiming any user made any key: keymount then records none and says so once.
    Decisions are logged either way."""
    if not isinstance(source, ClusterKeySource):
        return None
    if not client_ca:
        logging.getLogger("keymount.server").warning(
            "no Kubernetes Events without --client-ca: anyone who reaches the webhook port "
            "could forge the reviews they would be about; decisions are still logged. "
            "Have the API server present a client certificate (docs/operations.md, "
            "\"Client certificates\") and pass its CA with --client-ca")
        return None
    from .cluster import describe_api_error
    return EventRecorder(source.event_sink(), host=os.environ.get("HOSTNAME", ""),
                         on_drop=metrics.events_dropped.inc, describe=describe_api_error)


def build_controller(args: argparse.Namespace, *, source: KeySource,
                     metrics: Metrics) -> Controller | None:
    """--controller: the election for the controller Lease (webhook/leader.py).

    With --workers N only worker 0 campaigns: the supervisor holds no API client and no
    key cache (the controller needs both), and a worker that exits takes the whole Pod
    down, so worker 0 lives exactly as long as the Pod. One identity (the Pod's name)
    then means one candidate, and the leader's work runs once per Pod, not N times."""
    if not args.controller:
        return None
    from .cluster import KubernetesKeySource, service_account_namespace
    if not isinstance(source, KubernetesKeySource):
        raise CommandError("--controller needs the Kubernetes key source, not --keys-from: "
                           "the controller's Lease and work live in the API server", 2)
    if args.worker_index not in (None, 0):
        return None
    import socket

    from .leader import (
        Controller,
        KubernetesLeases,
        LeaderElector,
        controller_identity,
        controller_namespace,
    )
    namespace = controller_namespace(args.controller_namespace, os.environ,
                                     service_account_namespace=service_account_namespace())
    identity = controller_identity(os.environ, hostname=socket.gethostname(), pid=os.getpid())
    elector = LeaderElector(KubernetesLeases(source.api.api_client, namespace=namespace),
                            identity=identity,
                            on_change=lambda leading: metrics.leader.set(int(leading)))
    work = build_key_controller(args, source=source, metrics=metrics,
                                may_write=elector.may_write, namespace=namespace)
    return Controller(elector, work=[work.run])


def build_key_controller(args: argparse.Namespace, *, source: KubernetesKeySource,
                         metrics: Metrics,
                         namespace: str,
                         may_write: Callable[[], bool] = lambda: True) -> KeyController:
    """The leader's work: managed rotation (webhook/controller.py). `namespace`:
    keymount's own, where its Lease is."""
    from .cluster import KeyClient, describe_api_error, policy_watches
    from .controller import KeyController, WriteBudget
    from .policystore import PolicyStore
    client = source.api.api_client
    policies = PolicyStore()
    rate = float(args.controller_writes_per_second)
    # Its own Events: they are about the controller's writes, never about a review, so
    # no forged request can cause one (unlike admission Events, which need --client-ca).
    events = EventRecorder(source.event_sink(), host=os.environ.get("HOSTNAME", ""),
                           on_drop=metrics.events_dropped.inc, describe=describe_api_error)
    return KeyController(KeyClient(client, settings=source.settings), keys=source.store,
                         policies=policies, watches=lambda: policy_watches(client, policies),
                         slots=source.settings.rotation_slots,
                         budget=WriteBudget(rate, max(1, int(2 * rate))), metrics=metrics,
                         events=events, may_write=may_write,
                         # the namespaces the webhooks skip (manifests/)
                         unmanaged=("kube-system", namespace))


def report_to(fd: int) -> Callable[[str], None]:
    """A worker's line to its supervisor (webhook/workers.py)."""
    def report(line: str) -> None:
        os.write(fd, line.encode() + b"\n")
    return report


def build_policy_reads(source: KeySource, args: argparse.Namespace) -> PolicyReads | None:
    """The reads behind KeyPolicy decisions, through the key source's API client (None
    with --keys-from: KeyPolicies are then refused)."""
    from .cluster import KubernetesKeySource, KubernetesPolicyApi
    from .policyreads import PolicyReads
    if not isinstance(source, KubernetesKeySource):
        return None
    rate = float(args.live_reads_per_second)
    return PolicyReads(KubernetesPolicyApi(source.api.api_client), rate=rate,
                       burst=max(1, int(2 * rate)))


def build_key_source(args: argparse.Namespace, *, settings: Settings, store: KeyStore,
                     metrics: Metrics, pods: PodStore | None = None) -> KeySource:
    if args.keys_from:
        from .localdir import DirectoryKeySource
        if not Path(args.keys_from).is_dir():
            raise CommandError(f"--keys-from {args.keys_from}: no such directory")
        return DirectoryKeySource(args.keys_from, settings=settings, store=store)
    from .cluster import KubernetesKeySource, has_cluster_config, load_api_client
    if not has_cluster_config(args.kubeconfig):
        raise CommandError("no key source: pass --keys-from DIR (Secret manifests), or run "
                           "with a kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) or "
                           "in a cluster", 2)
    namespaces = [n.strip() for n in (args.namespaces or "").split(",") if n.strip()]
    return KubernetesKeySource(load_api_client(kubeconfig=args.kubeconfig), settings=settings,
                               store=store, metrics=metrics, namespaces=namespaces or None,
                               pods=pods)


def add_serve(commands: SubParsers) -> None:
    p = commands.add_parser("serve", help="run the admission webhook")
    add_flag(p, "--host", default="0.0.0.0", help="address to listen on")
    add_flag(p, "--port", default=8443, type=port, help="HTTPS webhook port")
    add_flag(p, "--probe-port", default=8080, type=port,
             help="plain-HTTP port for /healthz, /readyz, /metrics")
    add_flag(p, "--tls-cert", default="certs/tls.crt", help="serving certificate (PEM)")
    add_flag(p, "--tls-key", default="certs/tls.key", help="serving private key (PEM)")
    add_flag(p, "--kubeconfig", default=None, help="kubeconfig (default: in-cluster or ~/.kube)")
    add_flag(p, "--keys-from", default=None, help="directory of key Secret manifests")
    add_flag(p, "--namespaces", default=None, help="watch only these namespaces, a,b")
    add_switch(p, "--auto-generate",
               help="create a key for a backend Pod's namespace that has none")
    add_key_writer_flags(p)
    add_flag(p, "--log-format", default="json", choices=("json", "text"), help="log format")
    add_flag(p, "--log-level", default="info", choices=("debug", "info", "warning", "error"),
             help="log level")
    add_flag(p, "--shutdown-grace", default=5.0, type=seconds(zero=True),
             help="seconds to keep serving after SIGTERM while /readyz fails")
    add_flag(p, "--shutdown-timeout", default=10.0, type=seconds(zero=True),
             help="then, seconds in-flight requests may take to finish")
    add_flag(p, "--client-ca", default=None,
             help="require a client certificate signed by this CA (PEM), as an API server "
                  "configured for it presents")
    add_flag(p, "--request-timeout", default=10.0, type=seconds(zero=False),
             help="seconds from a request's first byte (or a connection's TLS handshake) "
                  "to keymount's answer; slower clients are cut off")
    add_flag(p, "--max-connections", default=256, type=whole(1),
             help="open HTTPS connections; a new one past it closes the slowest (or idlest)")
    add_flag(p, "--max-buffered-mib", default=64, type=whole(1),
             help="request bytes buffered over all connections before reading pauses")
    add_flag(p, "--live-reads-per-second", default=10.0,
             type=per_second,
             help="live reads of the API server (before a refusal, for a new key's "
                  "number); coalesced per namespace, past this rate refusals stand")
    add_flag(p, "--event-loop", default="uvloop", choices=("uvloop", "asyncio"),
             help="uvloop (libuv: about a tenth more admissions per core) or asyncio, "
                  "the standard library's loop")
    add_flag(p, "--workers", default=1, type=whole(1),
             help="worker processes sharing the webhook port (SO_REUSEPORT), each with its "
                  "own key cache: one per core the Pod is given")
    p.add_argument("--worker-report-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-supervisor", type=int, default=None, help=argparse.SUPPRESS)
    add_switch(p, "--controller",
               help="campaign for the controller Lease (keymount-controller); its holder "
                    "runs the controller, every replica serves admission either way")
    add_flag(p, "--controller-namespace", default=None,
             help="namespace of the controller Lease (default: $POD_NAMESPACE, else the "
                  "ServiceAccount's namespace, else keymount)")
    # 4: at 10 a second a wave of 10,000 namespaces cost admission on the leader's core
    # 23-27% of CPU a request; at 4, measured, 7.5% (README, "The controller at
    # scale"). Rotations are due every few weeks: spreading a wave over hours is fine.
    add_flag(p, "--controller-writes-per-second", default=4.0,
             type=per_second,
             help="the controller's writes to the API server (slots, keys, status); a "
                  "wave of namespaces due at once is spread at this rate")
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)


# --- inject ----------------------------------------------------------------------------

def cmd_inject(args: argparse.Namespace) -> int:
    from .localdir import DirectoryKeySource, ManifestError, load_documents
    from .store import KeyStore
    from .workloads import InjectionRefused, inject_document

    settings = build_settings(args)
    try:
        text = read_input(args.filename).decode("utf-8", "replace")
        documents = expand_aliases(load_documents(text, source=args.filename),
                                   source=args.filename, budget=max(len(text), 1_000_000))
        if args.keys_from:
            store = KeyStore()
            source = DirectoryKeySource(args.keys_from, settings=settings, store=store)
            store.replace_all(source.scan())
            for message in source.skipped.values():
                print(f"warning: {message}", file=sys.stderr)
            if source.errors:
                # Injecting without a file's keys would write manifests with the wrong
                # key, or none, and say nothing: the file must be fixed or moved away.
                raise CommandError("cannot read key manifests in --keys-from "
                                   f"{args.keys_from}: " + "; ".join(source.errors.values())
                                   + "; fix these files or move them out of the directory")
            keyring_for: Callable[[str], Keyring] = store.keyring
        else:
            keyring_for = build_cluster_keyrings(args, settings)
    except ManifestError as exc:
        raise CommandError(str(exc)) from None
    except RecursionError:
        raise CommandError(f"{args.filename}: nested too deeply for a Kubernetes "
                           f"manifest") from None
    output = []
    try:
        for document in documents:
            result = inject_document(document, keyring_for=keyring_for, settings=settings,
                                     default_namespace=args.namespace)
            for warning in result.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            output.append(result.document)
        text = yaml.safe_dump_all(output, sort_keys=False, explicit_start=True)
    except InjectionRefused as exc:
        raise CommandError(f"denied: {exc}") from None
    except RecursionError:
        raise CommandError(f"{args.filename}: nested too deeply for a Kubernetes "
                           f"manifest") from None
    sys.stdout.write(text)
    return 0


def expand_aliases(documents: list[Any], *, source: str, budget: int) -> list[Any]:
    """The documents as trees, as the webhook gets them (JSON, YAML aliases expanded by
    kubectl): a node a YAML alias shares between two places would otherwise take the
    injection's change twice. At most `budget` nodes in all, so an alias bomb (a few
    lines that expand to billions of nodes) is refused rather than expanded."""
    left = budget

    def copy(node: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise CommandError(f"{source}: its YAML aliases expand to more than {budget} "
                               f"nodes; write the manifests out without aliases")
        if isinstance(node, dict):
            return {key: copy(value) for key, value in node.items()}
        if isinstance(node, list):
            return [copy(value) for value in node]
        return node
    return [copy(document) for document in documents]


def build_cluster_keyrings(args: argparse.Namespace,
                           settings: Settings) -> Callable[[str], Keyring]:
    """Without --keys-from: each namespace's keys read once from the cluster."""
    from functools import cache

    from .cluster import KeyClient
    client = KeyClient.from_kubeconfig(kubeconfig=args.kubeconfig, context=args.context,
                                       settings=settings)
    return cache(client.keyring)


def add_inject(commands: SubParsers) -> None:
    p = commands.add_parser("inject", help="inject keys into manifests offline")
    p.add_argument("-f", "--filename", required=True, help="YAML stream, or - for stdin")
    p.add_argument("-n", "--namespace", default="default",
                   help="namespace of documents that name none")
    add_flag(p, "--keys-from", default=None,
             help="directory of key Secret manifests (default: the cluster's key Secrets)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig, without --keys-from")
    p.add_argument("--context", default=None, help="kubeconfig context")
    add_settings_flags(p)
    p.set_defaults(func=cmd_inject)


# --- keys check ----------------------------------------------------------------------

def cmd_keys_check(args: argparse.Namespace) -> int:
    value = read_input(args.file, limit=MAX_KEY_INPUT)
    subject = "stdin" if args.file == "-" else f"file {args.file}"
    if reason := too_long_for_a_key(value, subject):
        print(f"invalid: {reason}")
        return 1
    result = check_key(value, subject=subject, encoding=args.key_encoding)
    if not result.valid:
        print(f"invalid: {result.reason}")
        return 1
    print(f"valid: {result.encoding} AES-256 key, fingerprint {result.fingerprint}")
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return 0


def add_keys(commands: SubParsers) -> SubParsers:
    keys = commands.add_parser("keys", help="create, rotate, list, check and retire keys")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="validate key material offline (exit 1 if invalid)")
    check.add_argument("file", nargs="?", default="-", help="key file, or - for stdin")
    add_flag(check, "--key-encoding", default="auto", choices=("auto", "raw", "base64"),
             help="which key encodings are accepted")
    check.set_defaults(func=cmd_keys_check)

    add_key_lifecycle_commands(sub)
    return sub


# --- certs ---------------------------------------------------------------------------

def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import build_ca_bundle_patch, build_certificates, write_certificates

    try:
        pems = build_certificates(service=args.service, namespace=args.namespace,
                                  ips=args.ip or [], dns_names=args.dns or [])
    except ValueError as exc:
        raise CommandError(f"invalid --ip: {exc}", 2) from None
    try:
        files = write_certificates(Path(args.out), pems)
        print(f"wrote {files.ca_cert}, {files.tls_cert}, {files.tls_key} and client.crt/.key "
              f"for an API server that presents one (private keys 0600)",
              file=sys.stderr)
        if args.kustomize_patch:
            path = Path(args.kustomize_patch)
            path.write_text(build_ca_bundle_patch(files.ca_bundle))
            print(f"wrote {path}: the caBundle for every keymount webhook", file=sys.stderr)
    except OSError as exc:
        raise CommandError(f"cannot write {exc.filename or args.out}: "
                           f"{exc.strerror or exc}") from None
    print(files.ca_bundle)
    return 0


def add_certs(commands: SubParsers) -> None:
    p = commands.add_parser("certs", help="make a CA and serving certificate; print caBundle")
    p.add_argument("--service", required=True, help="webhook Service name")
    p.add_argument("--namespace", required=True, help="webhook Service namespace")
    p.add_argument("--out", default="certs", help="output directory (default certs)")
    p.add_argument("--ip", action="append", help="IP SAN, repeatable (e.g. 127.0.0.1)")
    p.add_argument("--dns", action="append", help="extra DNS SAN, repeatable")
    p.add_argument("--kustomize-patch", metavar="FILE", default=None,
                   help="also write the caBundle as a kustomize patch, e.g. "
                        "manifests/ca-bundle.yaml")
    p.set_defaults(func=cmd_certs)


# --- main -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keymount", description="Mount a namespace's AES-256 keys into backend Pods.")
    parser.add_argument("--version", action="version", version=f"keymount {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(commands)
    add_inject(commands)
    add_keys(commands)
    add_status_command(commands)
    add_certs(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Inside the try: a flag's validator (cli_common.checked) refuses a bad value,
        # from the command line or KEYMOUNT_<FLAG>, as a CommandError.
        args = build_parser().parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]  # for serve --workers
        code = args.func(args)
    except UserFacingError as exc:
        print(f"keymount: {exc}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    return int(code)


def run() -> None:
    """The console entry point. A daemon thread still blocked in an API call (a list
    started before a start-up failure) can crash the interpreter's finalisation
    (SIGABRT while it tears down the thread's SSL socket), so leave without it once
    output is flushed."""
    import threading
    code = main()
    if any(t.daemon and t.name == "keymount-api" and t.is_alive()
           for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
