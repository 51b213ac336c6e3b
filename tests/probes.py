"""Reading a running keymount's probe port: readiness and one metric's value."""

from __future__ import annotations

import re
import urllib.error
import urllib.request


def ready(probe_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/readyz",
                                    timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def metric(probe_port: int, name: str, labels: str = "") -> float:
    """The value of a sample of /metrics (`labels` as Prometheus prints them), 0 when
    absent. Without `labels`, the sum of every sample of that name; with `serve
    --workers`, the sum over the workers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = set(labels.split(",")) if labels else set()
    total, found = 0.0, False
    for match in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([0-9.e+-]+|[+-]Inf)$",
                             text, re.MULTILINE):
        have = set(match.group(2).split(",")) if match.group(2) else set()
        own = {label for label in have if not label.startswith("worker=")}
        if match.group(1) == name and (not labels or wanted == own):
            total, found = total + float(match.group(3)), True
    return total if found else 0.0
