import contextlib
import os
import sys
from pathlib import Path
from ssl import SSLContext

import pytest
from aiohttp import web
from hypothesis import HealthCheck, settings
from yarl import URL

from webhook.server import Runtime, keeping_keys, webhook_server

sys.path.insert(0, str(Path(__file__).parent))

# Property tests judge keymount's answers, never the machine's speed. Hypothesis's
# per-example deadline and its too_slow health check (time spent generating data)
# fail on a loaded or shared 2-core machine, in CI and in `make test` alike, so this
# profile is the default everywhere; it keeps every strategy and example count.
# HYPOTHESIS_PROFILE=default brings back Hypothesis's own timing checks.
settings.register_profile("keymount", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "keymount"))


@pytest.fixture
async def webhook_site():
    """Factory: `webhook_site(runtime, ssl=context)` serves the webhook port's own HTTP
    server (webhook.server.webhook_server) with its key source on 127.0.0.1 and a free
    port, as `keymount serve` does without the connection guard; stopped after the test."""
    stack = contextlib.AsyncExitStack()

    async def start(runtime: Runtime, *, ssl: SSLContext) -> Site:
        await stack.enter_async_context(keeping_keys(runtime))
        runner = web.ServerRunner(webhook_server(runtime))
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl)
        await site.start()
        return Site(runner.addresses[0][1])

    async with stack:
        yield start


class Site:
    """Where `webhook_site` listens."""

    def __init__(self, port: int) -> None:
        self.port = port

    def make_url(self, path: str) -> URL:
        return URL.build(scheme="https", host="127.0.0.1", port=self.port, path=path)
