"""Variants of keymount against the reference, side by side in one interleaved run: to
bisect where keymount's own work goes, one change at a time.

    .venv/bin/python bench/variants.py [--rounds 8] [--seconds 3] [--connections 16] DIR...

Each DIR holds a `webhook` package (a copy of this repository's, edited: a stage cut
out, another codec, ...); `.` is the repository's own. Each runs as `keymount serve`
in bench/admission.py's production configuration, imported from DIR: the process checks
that the package it imported is DIR's. (`python -m webhook` with PYTHONPATH=DIR would
not do: the working directory comes first on sys.path, so every variant would run the
repository's code.) Servers are pinned to CPU 0 and wrk to CPU 1, as in `make bench`;
each round measures the reference and then every variant, so each ratio compares
servers measured seconds apart. Prints each server's median requests/s and CPU per
request, and the median (min-max) of its per-round ratios to the reference.

For example, keymount's server with the reference's handler (the floor under keymount's
own work):

    mkdir -p /tmp/floor && cp -r webhook /tmp/floor/
    # edit /tmp/floor/webhook/server.py: answer() returns the reference's response
    .venv/bin/python bench/variants.py . /tmp/floor
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from admission import (  # noqa: E402
    BARE,
    REFERENCE_NAME,
    Server,
    free_port,
    prepare,
    review_body,
    wait_ready,
    write_keys,
    wrk,
)

# Runs `keymount serve` from the package in argv[1]'s directory, and only from there.
LAUNCH = '''
import sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import webhook
assert webhook.__file__.startswith(root), f"imported {webhook.__file__}, not {root}"
sys.argv[0] = "keymount"
from webhook.cli import run
run()
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", metavar="DIR",
                        help="a directory holding a webhook package; . for this repository")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3, help="per wrk measurement")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    roots = [str(Path(d).resolve()) for d in args.variants]
    for root in roots:
        if not (Path(root) / "webhook" / "__init__.py").is_file():
            raise SystemExit(f"{root} holds no webhook package")
    body = review_body()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs, context = prepare(tmp, body)
        write_keys(tmp / "keys", 1, 5)
        tls = [str(certs.tls_cert), str(certs.tls_key)]
        port = free_port()
        servers = [Server(REFERENCE_NAME, [sys.executable, "-c", BARE, str(port), *tls,
                                           "uvloop-orjson"], port, tmp / "reference.log")]
        try:
            for n, root in enumerate(roots):
                port, probe = free_port(), free_port()
                servers.append(Server(root, [
                    sys.executable, "-c", LAUNCH, root, "serve", "--host", "127.0.0.1",
                    "--port", str(port), "--probe-port", str(probe), "--keys-from",
                    str(tmp / "keys"), "--tls-cert", tls[0], "--tls-key", tls[1],
                    "--log-format", "json", "--log-level", "info", "--shutdown-grace", "0"],
                    port, tmp / f"variant-{n}.log", probe=probe))
            for server in servers:
                asyncio.run(wait_ready(server, context, body))
            rps: dict[str, list[float]] = {s.name: [] for s in servers}
            cpu: dict[str, list[float]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):
                for server in servers:
                    rate, micros = wrk(server, tmp / "body.json", args.connections,
                                       args.seconds)
                    rps[server.name].append(rate)
                    cpu[server.name].append(micros)
        finally:
            for server in servers:
                server.stop()
    reference = servers[0].name
    print(f"{args.rounds} rounds of {args.seconds} s at {args.connections} connections; "
          f"ratios to the reference, per round: median (min-max)")
    print("| server | req/s | CPU us/req | throughput ratio | CPU ratio |")
    print("|---|---|---|---|---|")
    for server in servers:
        name = server.name
        rates = sorted(a / b for a, b in zip(rps[name], rps[reference], strict=True))
        costs = sorted(a / b for a, b in zip(cpu[name], cpu[reference], strict=True))
        print(f"| {name} | {statistics.median(rps[name]):,.0f} | "
              f"{statistics.median(cpu[name]):.1f} | {statistics.median(rates):.2f}x "
              f"({rates[0]:.2f}-{rates[-1]:.2f}) | {statistics.median(costs):.2f}x "
              f"({costs[0]:.2f}-{costs[-1]:.2f}) |")


if __name__ == "__main__":
    main()
