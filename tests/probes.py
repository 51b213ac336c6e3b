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
    """One sample of /metrics (`labels` as Prometheus prints them), 0 when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
