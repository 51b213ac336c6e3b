"""A real node for keymount's end-to-end test bed: containerd + kubelet + the
controllers that turn Deployments into Pods, joined to a started ``ControlPlane``.

Stdlib only, like ``controlplane.py``.  The kubelet and kube-controller-manager come
from ``bash scripts/prepare-control-plane.sh`` (next to kube-apiserver), containerd,
runc and a static busybox from Debian packages that the same script installs.

Usage::

    with ControlPlane() as cp, Node(cp) as node:   # start() + wait_ready()
        pod = {..., "spec": {"nodeName": NODE_NAME, "hostNetwork": True,
                             "containers": [key_reporter_container()]}}
        ...
        keys = latest_keys(node.logs("ns", "pod", "app"))   # {file: sha256} or None

What runs, all on loopback and in a private temporary directory:

- containerd with its own root, state and socket (no clash with a system
  containerd); CNI is pointed at empty private directories, so the node stays
  ``NotReady`` and runs only ``hostNetwork: true`` Pods;
- two local images imported from a ``docker-archive`` tar built here, no registry:
  ``docker.io/local/busybox:1`` (a static busybox and its applets) and
  ``docker.io/local/pause:1`` (the same layer, ``sleep`` forever: the Pod sandbox);
- kubelet 1.20 registered as node ``localhost`` with the control plane's admin token;
  the API server reaches it as ``localhost`` (``--kubelet-preferred-address-types=
  Hostname``), so ``kubectl logs``/``exec`` work; the node's InternalIP is this
  machine's own address and is never used;
- kube-controller-manager with the deployment, replicaset, garbagecollector and
  namespace controllers only (no scheduler: Pods and templates set ``nodeName``).

``stop()`` ends kubelet and the controllers, kills and deletes every container,
stops containerd, unmounts whatever was mounted under the temporary directory,
removes the Pods' log directories under /var/log/pods, restores the kernel settings
the kubelet changed, and deletes the directory.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from controlplane import _tail, _terminate, cache_dir

__all__ = [
    "BUSYBOX_IMAGE",
    "NODE_NAME",
    "PAUSE_IMAGE",
    "NoReport",
    "Node",
    "NodeError",
    "NodeUnavailable",
    "build_image_archive",
    "check_node_binaries",
    "key_reporter_container",
    "latest_keys",
    "parse_key_reports",
]

PREPARE_HINT = "run `bash scripts/prepare-control-plane.sh` (as root) to install it"
NODE_NAME = "localhost"
BUSYBOX_IMAGE = "docker.io/local/busybox:1"
PAUSE_IMAGE = "docker.io/local/pause:1"
BUSYBOX = Path("/bin/busybox")
POD_LOGS = Path("/var/log/pods")
CONTAINER_LOGS = Path("/var/log/containers")
CGROUP_FS = Path("/sys/fs/cgroup")
# With cgroupsPerQOS off the kubelet gives no cgroup parent, and containerd puts each
# container at /<namespace>/<id> in every hierarchy.
CGROUP_PARENT = "k8s.io"
# kubelet 1.20 keeps its device-plugin socket here whatever --root-dir says.
KUBELET_VAR = Path("/var/lib/kubelet")
# containerd's shims put their sockets here whatever containerd's state directory is.
SHIM_SOCKETS = Path("/run/containerd/s")
# No cloud: keep the kubelet's AWS credential provider off the EC2 metadata address.
NO_CLOUD_ENV = {"AWS_EC2_METADATA_DISABLED": "true"}
# What the test app and probes use; intersected with what the busybox provides.
APPLETS = (
    "sh", "ash", "ls", "cat", "sha256sum", "sleep", "date", "echo", "find", "sort",
    "test", "[", "head", "tail", "wc", "grep", "env", "ps", "true", "false", "stat",
    "readlink", "mkdir", "rm", "kill", "hostname", "id", "uname", "printf", "sed",
    "awk", "tr", "cut", "xargs", "od", "base64", "touch", "cp", "mv", "ln", "which",
)
IMAGE_FORMAT_VERSION = "1"  # bump when the archive's layout changes (cache key)
# Kernel settings that kubelet 1.20 sets on start (setupKernelTunables); restored on stop.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
)

# Every second: one line naming the files under /encryption-keys (sorted) with the
# sha256 of their bytes, "keys: none" without that directory, "keys: empty" for an
# empty one.  Backticks, not $(...): the kubelet expands $(NAME) in commands.
KEY_REPORTER_SCRIPT = r"""trap 'exit 0' TERM INT
while :; do
  if [ -d /encryption-keys ]; then
    line=keys:
    for f in `ls /encryption-keys | sort`; do
      if [ -f "/encryption-keys/$f" ]; then
        set -- `sha256sum "/encryption-keys/$f"`
        line="$line $f=$1"
      fi
    done
    if [ -d /encryption-keys/staged ]; then
      for f in `ls /encryption-keys/staged | sort`; do
        if [ -f "/encryption-keys/staged/$f" ]; then
          set -- `sha256sum "/encryption-keys/staged/$f"`
          line="$line staged/$f=$1"
        fi
      done
    fi
    [ "$line" = keys: ] && line="keys: empty"
    echo "$line"
  else
    echo "keys: none"
  fi
  sleep 1
done
"""


class NodeUnavailable(RuntimeError):
    """A binary the node needs is missing (kubelet, containerd, busybox, ...)."""


class NodeError(RuntimeError):
    """containerd, kubelet or kube-controller-manager failed to start, died, or
    the node did not become usable in time."""


class NoReport(LookupError):
    """The container has not printed a ``keys:`` line yet."""


# ---------------------------------------------------------------------- binaries
def _elf_is_static(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP (dynamic loader)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64, order = head[4] == 2, "little" if head[5] == 1 else "big"
        if is64:
            phoff = int.from_bytes(head[0x20:0x28], order)
            phentsize = int.from_bytes(head[0x36:0x38], order)
            phnum = int.from_bytes(head[0x38:0x3A], order)
        else:
            phoff = int.from_bytes(head[0x1C:0x20], order)
            phentsize = int.from_bytes(head[0x2A:0x2C], order)
            phnum = int.from_bytes(head[0x2C:0x2E], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize:i * phentsize + 4], order) == 3:  # PT_INTERP
            return False
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_node_binaries(directory: os.PathLike | None = None) -> dict:
    """Paths of everything the node runs, or raise NodeUnavailable with the hint."""
    d = Path(directory) if directory is not None else cache_dir()
    found: dict = {}
    for name in ("kubelet", "kube-controller-manager"):
        p = d / "bin" / name
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise NodeUnavailable(f"{p} is missing; {PREPARE_HINT}")
        found[name] = p
    stamp = d / "STAMP"
    fields = dict(
        line.split("=", 1)
        for line in (stamp.read_text().splitlines() if stamp.is_file() else ())
        if "=" in line
    )
    for name in ("kubelet", "kube-controller-manager"):
        want = fields.get(name.replace("-", "_") + "_sha256")
        if want is None or want != _sha256_cached(found[name]):
            raise NodeUnavailable(f"{found[name]} does not match {stamp}; {PREPARE_HINT}")
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "umount"):
        p = shutil.which(name)
        if p is None:
            raise NodeUnavailable(f"`{name}` is not on PATH; {PREPARE_HINT}")
        found[name] = Path(p)
    if not BUSYBOX.is_file() or not _elf_is_static(BUSYBOX):
        raise NodeUnavailable(
            f"{BUSYBOX} is missing or not statically linked (Debian's busybox-static "
            f"provides it); {PREPARE_HINT}")
    found["busybox"] = BUSYBOX
    return found


_hashes: dict = {}


def _sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = _sha256(path)
    return _hashes[key]


# ---------------------------------------------------------------------- images
def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}.get(machine, machine)


def _tar_add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None,
             mode: int = 0o755, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.type, info.mtime, info.uid, info.gid = mode, kind, 0, 0, 0
    info.uname = info.gname = "root"
    if kind == tarfile.SYMTYPE:
        info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _busybox_applets(busybox: Path) -> list:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                         check=True).stdout.split()
    return [a for a in APPLETS if a in out]


def _layer_tar(busybox: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555),
                        ("root", 0o700), ("sys", 0o555), ("tmp", 0o1777), ("var", 0o755)):
            _tar_add(tar, d, mode=mode, kind=tarfile.DIRTYPE)
        _tar_add(tar, "bin/busybox", data=busybox.read_bytes(), mode=0o755)
        for applet in _busybox_applets(busybox):
            _tar_add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _tar_add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644)
        _tar_add(tar, "etc/group", data=b"root:x:0:\n", mode=0o644)
    return buf.getvalue()


def _image_config(diff_id: str, *, entrypoint: list | None, cmd: list | None) -> bytes:
    config = {
        "architecture": _go_arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "keymount tests/e2e/node.py"}],
    }
    return json.dumps(config, sort_keys=True).encode()


def build_image_archive(path: os.PathLike, busybox: Path = BUSYBOX) -> Path:
    """Write a docker-archive tar holding BUSYBOX_IMAGE and PAUSE_IMAGE (one shared
    layer: a static busybox and its applet links).  Deterministic; written atomically."""
    layer = _layer_tar(busybox)
    layer_hex = hashlib.sha256(layer).hexdigest()
    diff_id = "sha256:" + layer_hex
    images = [
        ("local/busybox:1", _image_config(diff_id, entrypoint=None, cmd=["sh"])),
        # The Pod sandbox: PID 1 that only waits (containerd kills it with SIGKILL).
        ("local/pause:1", _image_config(diff_id, entrypoint=["/bin/sleep", "2147483647"],
                                        cmd=None)),
    ]
    manifest = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, layer_hex, mode=0o755, kind=tarfile.DIRTYPE)
        _tar_add(tar, f"{layer_hex}/layer.tar", data=layer, mode=0o644)
        for tag, config in images:
            name = hashlib.sha256(config).hexdigest() + ".json"
            _tar_add(tar, name, data=config, mode=0o644)
            manifest.append({"Config": name, "RepoTags": [tag],
                             "Layers": [f"{layer_hex}/layer.tar"]})
        _tar_add(tar, "manifest.json", data=json.dumps(manifest).encode(), mode=0o644)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return target


def _image_archive(cache: Path, fallback_dir: Path, busybox: Path = BUSYBOX) -> Path:
    """The image archive, built once per busybox binary in the cache directory
    (or, if that is not writable, in ``fallback_dir``)."""
    key = hashlib.sha256(
        f"{IMAGE_FORMAT_VERSION}:{_sha256_cached(busybox)}:{_go_arch()}".encode()
    ).hexdigest()[:16]
    for directory in (cache / "images", fallback_dir):
        target = directory / f"local-busybox-{key}.tar"
        if target.is_file():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return build_image_archive(target, busybox)
        except OSError:
            continue
    raise NodeError(f"cannot write the image archive to {fallback_dir}")


# ---------------------------------------------------------------------- test app
def key_reporter_container(name: str = "app", *, image: str = BUSYBOX_IMAGE) -> dict:
    """A container spec (a dict for the API) whose process prints, every second, one
    ``keys: ...`` line describing what it reads under /encryption-keys
    (``keys: encryption-key-1=<sha256> encryption-key-2=<sha256>``, names sorted, then
    the staged keys as ``staged/encryption-key-3=<sha256>``; ``keys: none`` without the
    directory; ``keys: empty`` for an empty one)."""
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", KEY_REPORTER_SCRIPT],
    }


_REPORT = re.compile(r"^keys:(?: (.*))?$")


def parse_key_reports(log_text: str) -> list:
    """Every ``keys:`` report in a container's log, oldest first: a dict
    {file name: sha256 hex} per report ({} for an empty directory), or None where the
    container had no /encryption-keys."""
    reports: list = []
    for line in log_text.splitlines():
        m = _REPORT.match(line.strip())
        if not m:
            continue
        body = (m.group(1) or "").strip()
        if body == "none":
            reports.append(None)
            continue
        files: dict = {}
        if body not in ("", "empty"):
            for token in body.split():
                name, sep, digest = token.partition("=")
                files[name] = digest if sep else ""
        reports.append(files)
    return reports


def latest_keys(log_text: str) -> dict | None:
    """The newest report of ``parse_key_reports``; NoReport if there is none yet."""
    reports = parse_key_reports(log_text)
    if not reports:
        raise NoReport("no `keys:` line in the log yet")
    return reports[-1]


# ---------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deadline_poll(predicate, *, timeout: float, what: str, interval: float = 0.1,
                   check=None):
    """Call ``predicate`` until it returns something true; ``check`` may raise early
    (a process died); NodeError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NodeError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def _mount_points() -> list:
    """Mount points of this mount namespace, in mount order (/proc/self/mountinfo)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # octal escapes (\040 for a space) in the mount point
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                 fields[4]))
    return points


def _processes() -> dict:
    """{pid: (ppid, argv)} of every process."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        procs[int(entry)] = (ppid, argv)
    return procs


_live: set[Node] = set()


@atexit.register
def _stop_leftovers() -> None:
    for node in list(_live):
        try:
            node.stop()
        except Exception:
            pass


# ---------------------------------------------------------------------- the node
class Node:
    """containerd + kubelet + kube-controller-manager for a started ``ControlPlane``.

    ``start()`` launches them and returns once the kubelet has registered;
    ``wait_ready()`` waits until a trivial hostNetwork Pod runs and its log is readable
    through ``kubectl logs``.  ``timings`` holds seconds per phase.  Attributes after
    ``start()``: ``workdir``, ``socket`` (containerd), ``kubeconfig`` (admin),
    ``kubelet_port``, ``containerd_log``, ``kubelet_log``, ``controller_manager_log``.
    """

    name = NODE_NAME

    def __init__(self, control_plane: Any, directory: os.PathLike | None = None, *,
                 startup_timeout: float = 90.0) -> None:
        self._bins = check_node_binaries(directory)
        self._cache = Path(directory) if directory is not None else cache_dir()
        self.control_plane = control_plane
        self.startup_timeout = startup_timeout
        self.workdir: Path | None = None
        self.socket: Path | None = None
        self.kubeconfig: Path | None = None
        self.kubelet_port: int | None = None
        self.containerd_log: Path | None = None
        self.kubelet_log: Path | None = None
        self.controller_manager_log: Path | None = None
        self.timings: dict = {}
        self.last_log_source: str | None = None
        self._containerd: subprocess.Popen | None = None
        self._kubelet: subprocess.Popen | None = None
        self._kcm: subprocess.Popen | None = None
        self._sysctls: dict = {}
        self._created_dirs: list = []
        self._container_ids: set = set()
        self._created_cgroups: list = []
        self._pod_uids: set = set()  # every Pod bound to this node (for /var/log/pods)
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watch_stream: Any = None
        self._stray_sockets: list = []
        self._t0 = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Node:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> Node:
        if self.workdir is not None:
            raise NodeError("already started")
        if not self.control_plane.is_alive():
            raise NodeError("the control plane is not running")
        self._t0 = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="keymount-node-"))
        _live.add(self)
        try:
            self._created_dirs = [d for d in (POD_LOGS, CONTAINER_LOGS, SHIM_SOCKETS.parent,
                                              SHIM_SOCKETS, KUBELET_VAR) if not d.exists()]
            self._created_cgroups = [
                h / CGROUP_PARENT for h in (CGROUP_FS.iterdir() if CGROUP_FS.is_dir() else ())
                if h.is_dir() and not (h / CGROUP_PARENT).exists()]
            self._sysctls = {name: self._read_sysctl(name) for name in KUBELET_SYSCTLS}
            self._stopping.clear()
            self._watcher = threading.Thread(target=self._watch_pods, daemon=True,
                                             name="keymount-node-pod-uids")
            self._watcher.start()
            self._start_containerd()
            self._mark("containerd")
            self._import_images()
            self._mark("images")
            self._start_kubelet()
            self._start_controller_manager()
            self._wait_registered()
            self._mark("kubelet_registered")
        except BaseException:
            self.stop()
            raise
        return self

    def _mark(self, phase: str) -> None:
        self.timings[phase] = round(time.monotonic() - self._t0, 2)

    def stop(self) -> None:
        """Stop everything this node started and leave no process, mount or file."""
        if self.workdir is None:
            return
        w = self.workdir
        _terminate(self._kubelet)
        _terminate(self._kcm)
        self._kubelet = self._kcm = None
        self._end_watch()  # an open watch would hold kube-apiserver's shutdown ~8 s
        try:
            self._remove_containers()
        finally:
            _terminate(self._containerd)
            self._containerd = None
            self._kill_stray_shims()
            self._unmount_under(w)
            self._remove_cgroups()
            self._remove_pod_logs(w)
            self._restore_sysctls()
            keep = os.environ.get("KEYMOUNT_E2E_NODE_LOGS")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                for log in w.glob("*.log"):
                    shutil.copy(log, Path(keep) / log.name)
            shutil.rmtree(w, ignore_errors=True)
            self.workdir = None
            _live.discard(self)

    # ------------------------------------------------------------------ containerd
    def _ctr(self, *args: str, check: bool = True, timeout: float = 60.0,
             namespace: str = "k8s.io") -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self._bins["ctr"]), "-a", str(self.socket), "-n", namespace, *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}\n"
                            f"containerd log:\n{_tail(self.containerd_log)}")
        return result

    def _containerd_config(self) -> str:
        w = self.workdir
        assert w is not None
        default = subprocess.run([str(self._bins["containerd"]), "config", "default"],
                                 capture_output=True, text=True, check=True).stdout
        (w / "cni-bin").mkdir()
        (w / "cni-conf").mkdir()
        (w / "opt").mkdir()
        replacements = [  # (section header, key, value): each must occur exactly once
            (None, "root", str(w / "containerd-root")),
            (None, "state", str(w / "containerd-state")),
            ("[grpc]", "address", str(self.socket)),
            ('[plugins."io.containerd.grpc.v1.cri"]', "restrict_oom_score_adj", True),
            ('[plugins."io.containerd.grpc.v1.cri"]', "sandbox_image", PAUSE_IMAGE),
            ('[plugins."io.containerd.grpc.v1.cri"]', "stream_server_address", "127.0.0.1"),
            ('[plugins."io.containerd.grpc.v1.cri".cni]', "bin_dir", str(w / "cni-bin")),
            ('[plugins."io.containerd.grpc.v1.cri".cni]', "conf_dir", str(w / "cni-conf")),
            ('[plugins."io.containerd.internal.v1.opt"]', "path", str(w / "opt")),
            ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
             "Root", str(w / "runc")),
        ]
        lines = default.splitlines()
        for section, key, value in replacements:
            current, hits = None, []
            for i, line in enumerate(lines):
                stripped = line.strip()
                if stripped.startswith("["):
                    current = stripped
                elif current == section and re.match(rf"{re.escape(key)}\s*=", stripped):
                    hits.append(i)
            if len(hits) != 1:
                raise NodeError(f"`containerd config default` has {len(hits)} `{key}` "
                                f"in {section or 'the top level'}; expected one")
            indent = lines[hits[0]][:len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
            rendered = "true" if value is True else json.dumps(value)
            lines[hits[0]] = f"{indent}{key} = {rendered}"
        return "\n".join(lines) + "\n"

    def _start_containerd(self) -> None:
        w = self.workdir
        assert w is not None
        self.socket = w / "containerd.sock"
        config = w / "containerd.toml"
        config.write_text(self._containerd_config())
        self.containerd_log = w / "containerd.log"
        with open(self.containerd_log, "ab") as log:
            self._containerd = subprocess.Popen(
                [str(self._bins["containerd"]), "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

        def cri_ok() -> bool:
            if not self.socket.exists():
                return False
            r = self._ctr("plugins", "ls", check=False, timeout=10)
            if r.returncode != 0:
                return False
            for line in r.stdout.splitlines():
                fields = line.split()
                if len(fields) >= 4 and fields[0] == "io.containerd.grpc.v1" \
                        and fields[1] == "cri":
                    if fields[-1] != "ok":
                        raise NodeError(f"containerd's CRI plugin: {line}\n"
                                        f"{_tail(self.containerd_log)}")
                    return True
            return False

        _deadline_poll(cri_ok, timeout=self.startup_timeout, what="containerd's CRI plugin",
                       check=lambda: self._check_alive(self._containerd, "containerd",
                                                       self.containerd_log))

    def _import_images(self) -> None:
        assert self.workdir is not None
        archive = _image_archive(self._cache, self.workdir)
        self._ctr("images", "import", str(archive))
        listed = self._ctr("images", "ls", "-q").stdout.split()
        missing = [i for i in (BUSYBOX_IMAGE, PAUSE_IMAGE) if i not in listed]
        if missing:
            raise NodeError(f"images {missing} not in containerd after importing {archive}: "
                            f"{listed}")

    def _remove_containers(self) -> None:
        """Kill and delete every task and container of our containerd (all namespaces)."""
        if self._containerd is None or self._containerd.poll() is not None:
            return
        spaces = self._ctr("namespaces", "ls", "-q", check=False).stdout.split()
        for ns in spaces:
            tasks = self._ctr("tasks", "ls", check=False, namespace=ns).stdout.splitlines()[1:]
            ids = [t.split()[0] for t in tasks if t.split()]
            for cid in ids:
                self._ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False,
                          namespace=ns)

            def stopped(ns: str = ns) -> bool:
                rows = self._ctr("tasks", "ls", check=False, namespace=ns).stdout
                return all(r.split()[-1] != "RUNNING" for r in rows.splitlines()[1:]
                           if r.split())
            try:
                _deadline_poll(stopped, timeout=20, what="containers killed")
            except NodeError:
                pass  # _kill_stray_shims() is the fallback
            if ids:
                self._ctr("tasks", "delete", "-f", *ids, check=False, namespace=ns)
            containers = self._ctr("containers", "ls", "-q", check=False,
                                   namespace=ns).stdout.split()
            self._container_ids.update(containers)
            if containers:
                self._ctr("containers", "delete", *containers, check=False, namespace=ns)

    def _kill_stray_shims(self) -> None:
        """SIGKILL shims still serving our containerd socket, with their children."""
        if self.socket is None:
            return
        procs = _processes()
        address = str(self.socket)
        shims = [pid for pid, (_, argv) in procs.items()
                 if argv and "containerd-shim" in os.path.basename(argv[0])
                 and address in argv]
        victims = set(shims)
        for pid in shims:  # a killed shim leaves its socket: /run/containerd/s/<sha256>
            argv = procs[pid][1]
            opts = dict(zip(argv[1::2], argv[2::2], strict=False))
            if "-namespace" in opts and "-id" in opts:
                name = hashlib.sha256(os.path.join(
                    address, opts["-namespace"], opts["-id"]).encode()).hexdigest()
                self._stray_sockets.append(SHIM_SOCKETS / name)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in procs.items():
                if ppid in victims and pid not in victims:
                    victims.add(pid)
                    changed = True
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def gone() -> bool:
            return not any(os.path.exists(f"/proc/{pid}") and
                           not self._is_zombie(pid) for pid in victims)
        if victims:
            try:
                _deadline_poll(gone, timeout=10, what="stray shims gone")
            except NodeError:
                pass
        for path in self._stray_sockets:
            path.unlink(missing_ok=True)
        self._stray_sockets = []

    @staticmethod
    def _is_zombie(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            return stat[stat.rfind(")") + 2] == "Z"
        except OSError:
            return True

    @staticmethod
    def _unmount_under(root: Path) -> None:
        prefix = str(root).rstrip("/") + "/"
        for _ in range(3):
            points = [p for p in _mount_points() if p.startswith(prefix)]
            if not points:
                return
            for point in reversed(points):
                r = subprocess.run(["umount", point], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True)

    # ------------------------------------------------------------------ kubelet
    def _start_kubelet(self) -> None:
        w = self.workdir
        assert w is not None
        self.kubeconfig = Path(self.control_plane.write_kubeconfig(w / "admin.kubeconfig"))
        for d in ("kubelet", "kubelet-certs", "volume-plugins"):
            (w / d).mkdir()
        self.kubelet_port = _free_port()
        healthz_port = _free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "authentication": {"anonymous": {"enabled": True},
                               "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},  # loopback only
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1Mi",
                             "nodefs.inodesFree": "1", "imagefs.available": "1Mi",
                             "imagefs.inodesFree": "1"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "syncFrequency": "10s",
            "makeIPTablesUtilChains": False,
            "volumePluginDir": str(w / "volume-plugins"),
            "serializeImagePulls": False,
            "kubeAPIQPS": 50,
            "kubeAPIBurst": 100,
        }
        cfg = w / "kubelet-config.json"
        cfg.write_text(json.dumps(config, indent=2) + "\n")
        self.kubelet_log = w / "kubelet.log"
        args = [
            str(self._bins["kubelet"]),
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{self.socket}",
            f"--kubeconfig={self.kubeconfig}",
            f"--config={cfg}",
            f"--root-dir={w / 'kubelet'}",
            f"--cert-dir={w / 'kubelet-certs'}",
            f"--hostname-override={NODE_NAME}",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            f"--v={os.environ.get('KEYMOUNT_E2E_KUBELET_V', '1')}",
        ]
        with open(self.kubelet_log, "ab") as log:
            self._kubelet = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **NO_CLOUD_ENV})

    def _start_controller_manager(self) -> None:
        w = self.workdir
        assert w is not None and self.kubeconfig is not None
        self.controller_manager_log = w / "kube-controller-manager.log"
        # As the namespace controller's own identity: keymount lets exactly that user
        # delete live key Secrets while it empties a namespace being deleted.
        user = "system:serviceaccount:kube-system:namespace-controller"
        kubeconfig = self.control_plane.write_kubeconfig(
            w / "controller-manager.kubeconfig", token=self.control_plane.user_tokens[user])
        args = [
            str(self._bins["kube-controller-manager"]),
            f"--kubeconfig={kubeconfig}",
            "--controllers=deployment,replicaset,garbagecollector,namespace",
            "--leader-elect=false",
            "--secure-port=0",
            "--port=0",
            "--use-service-account-credentials=false",
            "--v=1",
        ]
        with open(self.controller_manager_log, "ab") as log:
            self._kcm = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **NO_CLOUD_ENV})

    def _wait_registered(self) -> None:
        def registered() -> bool:
            status, _ = self.control_plane.request("GET", f"/api/v1/nodes/{NODE_NAME}",
                                                   timeout=5)
            return status == 200
        _deadline_poll(registered, timeout=self.startup_timeout, interval=0.2,
                       what=f"node {NODE_NAME} registered", check=self.check_alive)

    # ------------------------------------------------------------------ readiness
    @staticmethod
    def _check_alive(proc: subprocess.Popen | None, name: str, log: Path | None):
        if proc is not None and proc.poll() is not None:
            raise NodeError(f"{name} exited with {proc.returncode}:\n{_tail(log, 60)}")

    def check_alive(self) -> None:
        """Raise NodeError if containerd, kubelet or kube-controller-manager died."""
        self._check_alive(self._containerd, "containerd", self.containerd_log)
        self._check_alive(self._kubelet, "kubelet", self.kubelet_log)
        self._check_alive(self._kcm, "kube-controller-manager", self.controller_manager_log)

    def is_alive(self) -> bool:
        return all(p is not None and p.poll() is None
                   for p in (self._containerd, self._kubelet, self._kcm))

    def node_object(self) -> dict:
        status, body = self.control_plane.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200:
            raise NodeError(f"GET node {NODE_NAME}: HTTP {status}: {body[:500]}")
        return json.loads(body)

    def wait_ready(self, timeout: float | None = None) -> None:
        """The Node object exists (Ready=False is expected: no CNI) and a trivial
        hostNetwork Pod reaches Running and its log is readable via ``kubectl logs``."""
        timeout = timeout or self.startup_timeout
        if self.workdir is None:
            raise NodeError("node not started")
        self._wait_registered()
        name = f"keymount-node-probe-{secrets.token_hex(3)}"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "keymount-node-probe"}},
            "spec": self.pod_spec([{
                "name": "probe", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c",
                            "trap 'exit 0' TERM; echo keymount-node-ready; "
                            "while :; do sleep 1; done"],
            }]),
        }
        status, body = self.control_plane.request(
            "POST", "/api/v1/namespaces/default/pods", pod)
        if status != 201:
            raise NodeError(f"creating the probe Pod: HTTP {status}: {body[:1000]}")
        try:
            self.wait_pod_running("default", name, timeout=timeout)
            self._mark("probe_pod_running")
            _deadline_poll(lambda: "keymount-node-ready" in self.kubectl_logs(
                "default", name, "probe", check=False), timeout=timeout,
                what="`kubectl logs` of the probe Pod", interval=0.2,
                check=self.check_alive)
            self._mark("ready")
        finally:
            self.control_plane.request(
                "DELETE", f"/api/v1/namespaces/default/pods/{name}",
                {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})

    @staticmethod
    def pod_spec(containers: list, **extra: Any) -> dict:
        """A Pod spec for this node: nodeName, hostNetwork, a 1 s grace period, and
        tolerations for the taints of a node without network (kubelet 1.20 admits Pods
        against NoExecute taints only, but stay explicit)."""
        spec = {
            "nodeName": NODE_NAME,
            "hostNetwork": True,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": containers,
        }
        spec.update(extra)
        return spec

    def get_pod(self, namespace: str, name: str) -> dict | None:
        status, body = self.control_plane.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        if status == 404:
            return None
        if status != 200:
            raise NodeError(f"GET pod {namespace}/{name}: HTTP {status}: {body[:500]}")
        return json.loads(body)

    def wait_pod_running(self, namespace: str, name: str, timeout: float = 60.0) -> dict:
        """Poll until the Pod is Running with all containers started; fail fast (with
        the reason and the kubelet's log) when it cannot run."""
        fatal = {"ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError",
                 "InvalidImageName", "RunContainerError", "CrashLoopBackOff"}
        last: dict = {}

        def running():
            pod = self.get_pod(namespace, name)
            if pod is None:
                return None
            last["pod"] = pod
            st = pod.get("status", {})
            if st.get("phase") in ("Failed", "Succeeded"):
                raise NodeError(f"Pod {namespace}/{name} is {st.get('phase')}: "
                                f"{json.dumps(st)[:2000]}")
            for cs in st.get("containerStatuses", []):
                reason = (cs.get("state", {}).get("waiting") or {}).get("reason")
                if reason in fatal:
                    raise NodeError(f"Pod {namespace}/{name}: {reason}: "
                                    f"{json.dumps(cs)[:2000]}\nkubelet log:\n"
                                    f"{_tail(self.kubelet_log, 30)}")
            if st.get("phase") == "Running" and all(
                    cs.get("started") or "running" in cs.get("state", {})
                    for cs in st.get("containerStatuses", [])):
                return pod
            return None
        try:
            return _deadline_poll(running, timeout=timeout, interval=0.2,
                                  what=f"Pod {namespace}/{name} running",
                                  check=self.check_alive)
        except NodeError as exc:
            if "not met within" not in str(exc):
                raise
            raise NodeError(
                f"{exc}; last status: {json.dumps(last.get('pod', {}).get('status'))[:2000]}"
                f"\nkubelet log:\n{_tail(self.kubelet_log, 40)}\ncontainerd log:\n"
                f"{_tail(self.containerd_log, 20)}") from None

    # ------------------------------------------------------------------ logs
    def kubectl(self, *args: str, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """kubectl with the admin kubeconfig."""
        if self.kubeconfig is None:
            raise NodeError("node not started")
        result = subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def kubectl_logs(self, namespace: str, pod: str, container: str, *,
                     check: bool = True) -> str:
        """The container's log through the API server and the kubelet."""
        r = self.kubectl("logs", "-n", namespace, pod, "-c", container, check=check)
        return r.stdout if r.returncode == 0 else ""

    def file_logs(self, namespace: str, pod: str, container: str,
                  uid: str | None = None) -> str:
        """The container's log from /var/log/pods (CRI format, all restarts), as text."""
        if uid is None:
            obj = self.get_pod(namespace, pod)
            if obj is None:
                raise NodeError(f"Pod {namespace}/{pod} does not exist")
            uid = obj["metadata"]["uid"]
        directory = POD_LOGS / f"{namespace}_{pod}_{uid}" / container
        files = sorted(directory.glob("*.log"),
                       key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        out, partial = [], ""
        for path in files:
            for line in path.read_text(errors="replace").splitlines():
                # <RFC3339 time> <stdout|stderr> <P|F> <message>
                parts = line.split(" ", 3)
                if len(parts) < 3:
                    continue
                message = parts[3] if len(parts) == 4 else ""
                if parts[2] == "P":
                    partial += message
                else:
                    out.append(partial + message)
                    partial = ""
        return "\n".join(out) + ("\n" if out else "")

    def logs(self, namespace: str, pod: str, container: str) -> str:
        """``kubectl logs`` (preferred: proves the API server -> kubelet path), or the
        log file under /var/log/pods when kubectl fails.  ``last_log_source`` says
        which one answered."""
        r = self.kubectl("logs", "-n", namespace, pod, "-c", container, check=False)
        if r.returncode == 0:
            self.last_log_source = "kubectl"
            return r.stdout
        self.last_log_source = "file"
        return self.file_logs(namespace, pod, container)

    def pod_keys(self, namespace: str, pod: str, container: str = "app") -> dict | None:
        """The newest {file: sha256} a key-reporter container printed (None: it has no
        /encryption-keys); NoReport before its first line."""
        return latest_keys(self.logs(namespace, pod, container))

    # ------------------------------------------------------------------ cleanup
    def _watch_pods(self) -> None:
        """Record the UID of every Pod ever bound to this node (list, then watch), so
        that stop() can remove their directories under /var/log/pods even when the
        Pods were deleted before the kubelet collected their logs."""
        cp = self.control_plane
        selector = urllib.parse.quote(f"spec.nodeName={NODE_NAME}")
        path = f"/api/v1/pods?fieldSelector={selector}"
        version = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    status, body = cp.request("GET", path, timeout=10)
                    if status != 200:
                        raise NodeError(f"HTTP {status}")
                    listed = json.loads(body)
                    self._pod_uids.update(p["metadata"]["uid"] for p in listed["items"])
                    version = listed["metadata"]["resourceVersion"]
                request = urllib.request.Request(
                    f"{cp.server}{path}&watch=1&timeoutSeconds=20"
                    f"&allowWatchBookmarks=true&resourceVersion={version}",
                    headers={"Authorization": f"Bearer {cp.admin_token}"})
                with urllib.request.urlopen(request, timeout=30,
                                            context=cp.ssl_context()) as stream:
                    self._watch_stream = stream  # before checking _stopping: see _end_watch
                    if self._stopping.is_set():
                        break
                    for line in stream:
                        event = json.loads(line)
                        if event.get("type") == "ERROR":  # e.g. 410 Gone: list again
                            version = None
                            break
                        meta = event["object"]["metadata"]
                        if event.get("type") != "BOOKMARK":
                            self._pod_uids.add(meta["uid"])
                        version = meta["resourceVersion"]
                        if self._stopping.is_set():
                            break
            except Exception:  # the API server restarting or stopped: try again
                version = None
                self._stopping.wait(0.5)
            finally:
                self._watch_stream = None

    def _end_watch(self) -> None:
        """Stop the Pod watch now: set the flag, then shut its socket down (a read
        blocked on it returns), and wait for the thread."""
        self._stopping.set()
        stream = self._watch_stream
        if stream is not None:
            try:
                stream.fp.raw._sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                pass
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

    def _remove_pod_logs(self, w: Path) -> None:
        """Remove /var/log/pods/*_<uid> of every Pod this node ran, the matching
        /var/log/containers links, and those directories if we created them."""
        pods_dir = w / "kubelet" / "pods"
        uids = set(self._pod_uids)
        uids.update(os.listdir(pods_dir) if pods_dir.is_dir() else ())
        removed = []
        if POD_LOGS.is_dir():
            for entry in os.listdir(POD_LOGS):
                if entry.rsplit("_", 1)[-1] in uids:
                    shutil.rmtree(POD_LOGS / entry, ignore_errors=True)
                    removed.append(str(POD_LOGS / entry) + "/")
        if CONTAINER_LOGS.is_dir():
            for entry in os.listdir(CONTAINER_LOGS):
                link = CONTAINER_LOGS / entry
                try:
                    target = os.readlink(link)
                except OSError:
                    continue
                if any(target.startswith(r) for r in removed):
                    link.unlink(missing_ok=True)
        if KUBELET_VAR in self._created_dirs:
            for name in ("kubelet.sock", "kubelet_internal_checkpoint", "DEPRECATION"):
                (KUBELET_VAR / "device-plugins" / name).unlink(missing_ok=True)
        for d in (CONTAINER_LOGS, POD_LOGS, SHIM_SOCKETS, SHIM_SOCKETS.parent,
                  KUBELET_VAR / "device-plugins", KUBELET_VAR):
            if d in self._created_dirs or d.parent in self._created_dirs:
                try:
                    d.rmdir()
                except OSError:
                    pass

    def _remove_cgroups(self) -> None:
        """rmdir the cgroups of our containers that runc left (only if a shim had to be
        killed), and /k8s.io in each hierarchy if it did not exist before and is empty."""
        if not CGROUP_FS.is_dir():
            return
        ids = set(self._container_ids)
        if self.workdir is not None:  # containerd died: its tasks' bundles remain
            ids.update(p.name for p in self.workdir.glob(
                "containerd-state/io.containerd.runtime.v2.task/*/*"))
        for hierarchy in CGROUP_FS.iterdir():
            for cid in ids:
                try:
                    (hierarchy / CGROUP_PARENT / cid).rmdir()
                except OSError:
                    pass
        for parent in self._created_cgroups:
            try:
                parent.rmdir()
            except OSError:
                pass  # in use by another containerd: not ours to remove
        self._created_cgroups = []

    @staticmethod
    def _read_sysctl(name: str) -> str | None:
        try:
            return Path("/proc/sys", name).read_text().strip()
        except OSError:
            return None

    def _restore_sysctls(self) -> None:
        for name, value in self._sysctls.items():
            if value is not None and self._read_sysctl(name) != value:
                try:
                    Path("/proc/sys", name).write_text(value + "\n")
                except OSError:
                    pass
        self._sysctls = {}

    # ------------------------------------------------------------------ diagnostics
    def log_tails(self, lines: int = 30) -> str:
        return "".join(
            f"----- {label} -----\n{_tail(path, lines)}"
            for label, path in (("containerd", self.containerd_log),
                                ("kubelet", self.kubelet_log),
                                ("kube-controller-manager", self.controller_manager_log)))
