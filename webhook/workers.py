"""`keymount serve --workers N`: N worker processes share the webhook port.

One Python process answers on one core. Given more, the supervisor (this module) starts
N copies of `keymount serve`, each with its own key cache and watch, all listening on
the webhook port with SO_REUSEPORT, so the kernel spreads new connections across them
(docs/operations.md, "Workers"). The supervisor itself holds no keys and answers no
admission; it serves the probe port for all of them:

- `/readyz` is 200 only once every worker has listed its key Secrets, and 503 from the
  moment SIGTERM arrives;
- `/healthz` is 200 while every worker runs;
- `/metrics` is every worker's metrics with a `worker` label.

Each worker reports to the supervisor over a pipe: `probe <port>` once its private
probe port (loopback) listens, then `ready` once its cache is listed. SIGTERM (or
SIGINT) is passed to every worker, which drains as a single process does; the
supervisor exits 0 once all have exited 0. A worker that exits on its own takes the
others down and the supervisor exits 1: Kubernetes restarts the container, which is
simpler to reason about than a half-populated set. Under `--controller` only worker 0
campaigns for the controller Lease (cli.build_controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("keymount.server")


def worker_argv(argv: Sequence[str], *, report_fd: int, index: int,
                supervisor: int) -> list[str]:
    """The command line of one worker: the supervisor's own `serve` arguments, with
    the last word on what each worker must do differently (argparse keeps the last
    occurrence of a flag, and flags beat KEYMOUNT_* variables). --worker-report-fd
    also moves the worker's probes to a free loopback port (cli._serve);
    --worker-index tells worker 0 that it is the one to campaign for the controller
    Lease under --controller (cli.build_controller); --worker-supervisor names the
    process whose death ends the worker (parentdeath.end_with_parent: SIGTERM, so it
    drains)."""
    return [sys.executable, "-m", "webhook", *argv, "--workers", "1",
            "--worker-report-fd", str(report_fd), "--worker-index", str(index),
            "--worker-supervisor", str(supervisor)]


def merge_metrics(texts: Sequence[str]) -> bytes:
    """Each worker's /metrics text as one exposition, every sample labelled with its
    worker's index; families keep the order they first appear in."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name,
                                        (family.documentation, family.type, []))
            entry[2].extend(sample._replace(labels={**sample.labels, "worker": str(index)})
                            for sample in family.samples)
    lines: list[str] = []
    for name, (documentation, kind, samples) in families.items():
        exposed = name + "_total" if kind == "counter" else name
        lines.append(f"# HELP {exposed} {_escape_help(documentation)}")
        lines.append(f"# TYPE {exposed} {kind}")
        for sample in samples:
            labels = ",".join(f'{key}="{_escape_label(value)}"'
                              for key, value in sample.labels.items())
            lines.append(f"{sample.name}{{{labels}}} {_number(sample.value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(float(value))


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    probe_port: int | None = None
    ready: bool = False


@dataclass
class Supervisor:
    argv: Sequence[str]  # the `serve` command line, as given
    workers: int
    host: str
    probe_port: int
    stop_timeout: float  # grace + shutdown timeout + a margin
    running: list[Worker] = field(default_factory=list)
    draining: bool = False

    @property
    def ready(self) -> bool:
        return (not self.draining and len(self.running) == self.workers
                and all(w.ready and w.process.returncode is None for w in self.running))

    @property
    def alive(self) -> bool:
        return bool(self.running) and all(w.process.returncode is None for w in self.running)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        probe_runner = web.AppRunner(self.probe_app(), access_log=None)
        await probe_runner.setup()
        followers: list[asyncio.Task[None]] = []
        try:
            await web.TCPSite(probe_runner, self.host, self.probe_port).start()
            for index in range(self.workers):
                worker, read_fd = await self._spawn(index)
                followers.append(asyncio.create_task(self._follow(worker, read_fd)))
            waits = {asyncio.create_task(w.process.wait()): w for w in self.running}
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({*waits, stopping},
                                         return_when=asyncio.FIRST_COMPLETED)
            self.draining = True
            crashed = next((waits[t] for t in done if t in waits), None)
            if crashed is not None:
                log.error("a worker exited on its own; stopping the others",
                          extra={"worker": crashed.index, "pid": crashed.process.pid,
                                 "exit_code": crashed.process.returncode})
            else:
                log.info("passing SIGTERM to the workers", extra={"workers": self.workers})
            codes = await self._stop_all()
            stopping.cancel()
            for waiting in waits:
                waiting.cancel()
            if crashed is not None:
                return 1
            return 0 if all(code == 0 for code in codes) else 1
        finally:
            for task in followers:
                task.cancel()
            await self._stop_all()  # a no-op once they are gone; never leave orphans
            await probe_runner.cleanup()

    async def _spawn(self, index: int) -> tuple[Worker, int]:
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *worker_argv(self.argv, report_fd=write_fd, index=index,
                             supervisor=os.getpid()), pass_fds=(write_fd,),
                stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = Worker(index, process)
        self.running.append(worker)
        log.info("worker started", extra={"worker": index, "pid": process.pid})
        return worker, read_fd

    async def _follow(self, worker: Worker, read_fd: int) -> None:
        """Read the worker's reports until it closes the pipe (it exits)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
        try:
            while line := (await reader.readline()).decode(errors="replace").strip():
                what, _, value = line.partition(" ")
                if what == "probe" and value.isdigit():
                    worker.probe_port = int(value)
                elif what == "ready":
                    worker.ready = True
                    log.info("worker ready", extra={"worker": worker.index,
                                                    "pid": worker.process.pid})
        finally:
            transport.close()

    async def _stop_all(self) -> list[int]:
        for worker in self.running:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        codes = []
        for worker in self.running:
            try:
                codes.append(await asyncio.wait_for(worker.process.wait(), self.stop_timeout))
            except TimeoutError:
                log.error("worker did not stop in time; killed",
                          extra={"worker": worker.index, "pid": worker.process.pid})
                worker.process.kill()
                codes.append(await worker.process.wait())
        return codes

    # --- the probe port ------------------------------------------------------------

    def probe_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self.alive:
            return web.Response(status=503, text="a worker is not running\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="shutting down\n")
        if not self.ready:
            ready = sum(w.ready for w in self.running)
            return web.Response(status=503, text=f"{ready} of {self.workers} workers have "
                                                 f"listed their key Secrets\n")
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            texts = await asyncio.gather(*(self._scrape(session, w) for w in self.running))
        return web.Response(body=merge_metrics(texts),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    @staticmethod
    async def _scrape(session: aiohttp.ClientSession, worker: Worker) -> str:
        if worker.probe_port is None or worker.process.returncode is not None:
            return ""
        try:
            async with session.get(f"http://127.0.0.1:{worker.probe_port}/metrics") as resp:
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return ""  # that worker's samples are missing from this scrape, not invented
