"""`keymount serve` as a real process on loopback, for tests that attack it."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import yaml

import probes
from builders import key_secret, pod, random_key, review
from polling import poll


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, tmp: Path, *args: str, keys: int = 2, namespace: str = "default",
                 workers: int = 1, event_loop: str = "uvloop", wait: bool = True,
                 certs: Path | None = None):
        self.tmp, self.workers, self.event_loop = tmp, workers, event_loop
        self.keys_dir = tmp / "keys"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        self.key_bytes = [random_key() for _ in range(keys)]
        for i, key in enumerate(self.key_bytes, start=1):
            (self.keys_dir / f"k{i}.yaml").write_text(yaml.safe_dump(
                key_secret(f"k{i}", key, namespace=namespace, index=i)))
        # Servers started one after another may share a pair: making one costs a process.
        self.certs = certs or tmp / "certs"
        if certs is None:
            subprocess.run([sys.executable, "-m", "webhook", "certs", "--service", "keymount",
                            "--namespace", "keymount", "--out", str(self.certs), "--ip",
                            "127.0.0.1"], check=True, capture_output=True)
        self.port, self.probe = free_port(), free_port()
        self.log = tmp / "serve.log"
        self._log_handle = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port",
             str(self.port), "--probe-port", str(self.probe), "--keys-from",
             str(self.keys_dir), "--tls-cert", str(self.certs / "tls.crt"),
             "--tls-key", str(self.certs / "tls.key"), "--workers", str(workers),
             "--event-loop", event_loop, *args],
            stdout=self._log_handle, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        poll(lambda: self.ready() or self.proc.poll() is not None, what="keymount ready")
        assert self.proc.poll() is None, self.log.read_text()[-2000:]

    def ready(self) -> bool:
        return probes.ready(self.probe)

    def context(self, cafile: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(cafile or self.certs / "ca.crt"))

    def connection(self, timeout: float = 10) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                           context=self.context())

    @staticmethod
    def body(namespace: str = "default", **kw) -> bytes:
        return json.dumps(review(pod(), namespace=namespace, **kw)).encode()

    def post(self, conn: http.client.HTTPSConnection, body: bytes | None = None,
             path: str = "/mutate") -> tuple[int, dict]:
        conn.request("POST", path, body=body or self.body(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def metric(self, name: str, labels: str = "") -> float:
        return probes.metric(self.probe, name, labels)

    @property
    def memory_limit_mib(self) -> int:
        """The Deployment's limit for one process, plus what docs/operations.md
        ("Workers") says each further worker needs."""
        return 256 + 128 * (self.workers - 1)

    def pids(self) -> list[int]:
        """keymount's process, and its workers' (`--workers`)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [self.proc.pid, *(int(pid) for pid in children.split())]

    def memory_mib(self, field: str = "VmRSS") -> float:
        """VmRSS now, or VmHWM: the peak resident size so far; summed over the
        processes, as a container's memory limit counts them."""
        total = 0
        for pid in self.pids():
            text = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))
        return total / 1024

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._log_handle.close()

    def logs(self) -> str:
        return self.log.read_text()
