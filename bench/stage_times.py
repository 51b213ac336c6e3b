"""Each stage of keymount's own work per admission, timed in place under load and in a
loop over one review: what the server's handler does between the HTTP stack's parts.

    .venv/bin/python bench/stage_times.py [--seconds 6] [--connections 16]

In place: `keymount serve` as in production (bench/admission.py's configuration) under
wrk, each stage's function wrapped with a perf_counter timer in the server process
(webhook/server.py's module names: read_body, read_review, decide_at_once and decide,
log_decision, complete and the answer's encoding), the sums read back at the end. In a loop: the
same functions, called 20,000 times in a row on the same review. The difference is what
running between TLS, the event loop and aiohttp costs each stage (caches, branch
predictors, the other core's load), which a loop does not see. Writes
bench/results/stage_times.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from admission import (  # noqa: E402
    RESULTS,
    SERVER_CPU,
    Server,
    free_port,
    prepare,
    review_body,
    wait_ready,
    write_keys,
    wrk,
)

# Runs in the server process before keymount starts: each stage's module-level name in
# webhook/server.py is replaced by a timed wrapper (the handler looks them up at each
# call), and SIGUSR1 writes the sums as JSON to $STAGES_OUT and starts them afresh.
TIMERS = '''
import json, os, signal, time
import orjson
import webhook.server as server
sums = {}
def timed(name, function, is_async=False):
    clock = time.perf_counter_ns
    def note(started):
        entry = sums.setdefault(name, [0, 0])
        entry[0] += clock() - started
        entry[1] += 1
    if is_async:
        async def wrapper(*args, **kwargs):
            started = clock()
            try:
                return await function(*args, **kwargs)
            finally:
                note(started)
    else:
        def wrapper(*args, **kwargs):
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                note(started)
    return wrapper
server.read_body = timed("read the body", server.read_body, True)
server.read_review = timed("decode and check the review", server.read_review)
server.decide = timed("decide", server.decide, True)
server.decide_at_once = timed("decide", server.decide_at_once)
server.log_decision = timed("log the decision", server.log_decision)
server.complete = timed("complete the answer", server.complete)
class Codec:
    Fragment, OPT_APPEND_NEWLINE = orjson.Fragment, orjson.OPT_APPEND_NEWLINE
    loads = staticmethod(orjson.loads)
    dumps = staticmethod(timed("encode the answer", orjson.dumps))
server.orjson = Codec
def dump(*_):
    with open(os.environ["STAGES_OUT"], "w") as out:
        json.dump(sums, out)
    sums.clear()
signal.signal(signal.SIGUSR1, dump)
import sys
sys.argv[0] = "keymount"
from webhook.cli import run
run()
'''


def in_place(seconds: int, connections: int) -> tuple[dict[str, float], float, float]:
    """Microseconds per admission of each stage in the server under wrk, its requests
    a second and its CPU microseconds a request."""
    body = review_body()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs, context = prepare(tmp, body)
        write_keys(tmp / "keys", 1, 5)
        out = tmp / "stages.json"
        port, probe = free_port(), free_port()
        os.environ["STAGES_OUT"] = str(out)
        server = Server("keymount", [
            sys.executable, "-c", TIMERS, "serve", "--host", "127.0.0.1", "--port",
            str(port), "--probe-port", str(probe), "--keys-from", str(tmp / "keys"),
            "--tls-cert", str(certs.tls_cert), "--tls-key", str(certs.tls_key),
            "--log-format", "json", "--log-level", "info", "--shutdown-grace", "0"],
            port, tmp / "keymount.log", probe=probe)
        try:
            asyncio.run(wait_ready(server, context, body))
            wrk(server, tmp / "body.json", connections, 2)  # warm up, then start afresh
            sums = read_sums(server, out)
            rate, cpu = wrk(server, tmp / "body.json", connections, seconds)
            sums = read_sums(server, out)
        finally:
            server.stop()
    return {name: total / count / 1000 for name, (total, count) in sums.items()}, rate, cpu


def read_sums(server: Server, out: Path) -> dict[str, list[int]]:
    out.unlink(missing_ok=True)
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return dict(json.loads(out.read_text()))
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise SystemExit("the server did not write its stage times")


def in_a_loop() -> dict[str, float]:
    """The same stages, called in a row on one review (no HTTP, no TLS)."""
    import orjson

    from webhook import server
    from webhook.admission import complete, parse_review
    from webhook.config import Settings
    from webhook.decisions import View, route
    from webhook.logs import DecisionLog, LineSink
    from webhook.podverdicts import PodVerdicts

    from builders import key_secret, keyring_of, random_key

    body = review_body()
    review = parse_review(body)
    keyring = keyring_of(*(key_secret(f"key-{n}", random_key(), index=n,
                                      namespace=review.namespace) for n in range(1, 6)),
                         namespace=review.namespace)
    settings = Settings()
    handler = route("mutate", review)
    # As the server decides: with its remembered verdicts (all but the first admission
    # of a workload's Pods find theirs there).
    remembered = PodVerdicts()
    verdict = handler(review, View(keyring, settings, source="cache", pod_verdicts=remembered))
    decisions = DecisionLog(LineSink(os.open(os.devnull, os.O_WRONLY)))
    answer = complete(review, verdict.response)

    def best(function: object, n: int = 20_000) -> float:
        fastest = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                function()  # type: ignore[operator]
            fastest = min(fastest, time.perf_counter() - started)
        return fastest / n * 1e6
    return {
        "decode and check the review": best(lambda: parse_review(body)),
        "decide": best(lambda: handler(review, View(keyring, settings, source="cache",
                                                    pod_verdicts=remembered))),
        "log the decision": best(lambda: server.log_decision(
            decisions, review, verdict, webhook="mutate", elapsed=0.0001)),
        "complete the answer": best(lambda: complete(review, verdict.response)),
        "encode the answer": best(lambda: orjson.dumps(answer)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    placed, rate, cpu = in_place(args.seconds, args.connections)
    os.sched_setaffinity(0, {int(SERVER_CPU)})  # on the core the server ran on
    loop = in_a_loop()
    lines = [f"keymount under wrk ({args.connections} connections, {args.seconds} s, "
             f"{rate:,.0f} req/s, {cpu:.0f} us of CPU a request), each stage's wall time "
             f"per admission, and the same stage in a loop over one review:", "",
             "| stage | in place, us | in a loop, us | ratio |", "|---|---|---|---|"]
    for name, micros in placed.items():
        alone = loop.get(name)
        lines.append(f"| {name} | {micros:.1f} | "
                     + (f"{alone:.1f} | {micros / alone:.1f}x |" if alone else "- | - |"))
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stage_times.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
