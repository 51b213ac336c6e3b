"""Processes keymount starts end with the process that started them.

A process killed outright (SIGKILL, the OOM killer) passes no signal on to its
children. In a container with its own PID namespace the kernel ends them all with
PID 1; anywhere else (a systemd unit without its cgroup killed, a shell, a test run)
they would live on: `serve --workers` workers still answering on the shared port
(SO_REUSEPORT) beside whatever starts next, and the review worker (webhook/offload.py)
holding its memory. Linux's parent-death signal closes that gap.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int, *, signum: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `signum` when `parent` (the pid that started
    it) dies. If it died already, `signum` now. Elsewhere than Linux, nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        # Gone before prctl took effect: the signal will never come.
        os.kill(os.getpid(), signum)
