"""Where keymount's CPU goes under load: `keymount serve` as in production (bench/
admission.py's configuration: TLS, JSON decision logs at info, metrics, the key cache)
under wrk, sampled by py-spy, and each sample's time put in one bucket by the
innermost frame that names a part of the stack.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/cpu_profile.py [--seconds 20] [--connections 16]

Prints a Markdown table (share of samples and microseconds per request, from the
server's CPU time over the same window) and writes the raw stacks to
bench/results/profile.txt (py-spy's collapsed format: flamegraph.pl reads it).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from admission import (  # noqa: E402
    CLIENT_CPU,
    RESULTS,
    SERVER_CPU,
    Server,
    free_port,
    prepare,
    review_body,
    wait_ready,
    write_keys,
    wrk_script,
)

# (bucket, substrings of a frame "function (file)"): the first bucket, scanning from the
# innermost frame outwards, whose pattern matches a frame takes the sample.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("decode (msgspec, orjson: webhook/decoding.py)", ("decoding.py",)),
    ("decision log line (webhook/logs.py)", ("logs.py", "log_decision")),
    ("metrics (webhook/metrics.py)", ("metrics.py",)),
    ("connection guard (webhook/connections.py)", ("connections.py",)),
    ("parse and check the review (webhook/admission.py)", ("admission.py",)),
    ("decision (decisions, keyguard, injection)",
     ("decisions.py", "keyguard.py", "injection.py", "keys.py", "selectors.py")),
    ("keymount's handler (webhook/server.py)", ("server.py",)),
    ("aiohttp: HTTP parsing, request and response objects", ("aiohttp",)),
    ("TLS and the event loop (uvloop, ssl)", ("uvloop", "ssl", "sslproto", "asyncio")),
]


def bucket_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, patterns in BUCKETS:
            if any(p in frame for p in patterns):
                return name
    return "other (interpreter, GC, idle stacks)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=int, default=400, help="py-spy samples a second")
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "py-spy"):
        if not shutil.which(tool) and not (Path(sys.executable).parent / tool).exists():
            raise SystemExit(f"{tool} is needed (apt-get install wrk; pip install py-spy)")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = review_body()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs, context = prepare(tmp, body)
        write_keys(tmp / "keys", 1, 5)
        port, probe = free_port(), free_port()
        server = Server("keymount", [
            sys.executable, "-m", "webhook", "serve", "--host", "127.0.0.1", "--port",
            str(port), "--probe-port", str(probe), "--keys-from", str(tmp / "keys"),
            "--tls-cert", str(certs.tls_cert), "--tls-key", str(certs.tls_key),
            "--log-format", "json", "--log-level", "info", "--shutdown-grace", "0"],
            port, tmp / "keymount.log", probe=probe)
        try:
            import asyncio
            asyncio.run(wait_ready(server, context, body))
            script = wrk_script(tmp / "body.json")
            load = subprocess.Popen(
                ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{args.connections}",
                 f"-d{args.seconds + 4}s", "-s", str(script), server.url],
                stdout=subprocess.PIPE, text=True)
            time.sleep(2)  # past the connections' handshakes
            cpu0 = server.cpu_seconds()
            raw = RESULTS / "profile.txt"
            subprocess.run(["taskset", "-c", CLIENT_CPU, spy, "record", "--pid",
                            str(server.proc.pid), "--rate", str(args.rate), "--duration",
                            str(args.seconds), "--format", "raw", "--nonblocking",
                            "--output", str(raw)], check=True, capture_output=True)
            cpu = server.cpu_seconds() - cpu0
            out, _ = load.communicate(timeout=60)
            rate = float(next(r for r in out.splitlines()
                              if r.startswith("Requests/sec:")).split()[1])
        finally:
            server.stop()
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[bucket_of(stack)] += int(n)
    total = sum(counts.values())
    per_request = cpu / (rate * args.seconds) * 1e6
    lines = [f"keymount under wrk ({args.connections} connections, {args.seconds} s, "
             f"{rate:,.0f} req/s, {per_request:.0f} us of CPU a request; "
             f"{total:,} samples at {args.rate}/s; server on CPU {SERVER_CPU}):", "",
             "| where | share | us a request |", "|---|---|---|"]
    for name, n in counts.most_common():
        lines.append(f"| {name} | {n / total * 100:.1f}% | {n / total * per_request:.0f} |")
    text = "\n".join(lines)
    (RESULTS / "profile.md").write_text(text + "\n")
    print(text)
    print(f"\nraw stacks: {raw} ({os.path.getsize(raw):,} bytes)")


if __name__ == "__main__":
    main()
