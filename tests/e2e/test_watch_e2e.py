"""The Kubernetes key source's recovery, against the real API server.

A half-open connection is the failure a watch cannot see by itself: the peer is gone
but no FIN or RST arrives, so a blocking read waits forever. A loopback TCP relay
in front of the API server plays that part: `freeze()` stops relaying on the
connections it has (they stay open, silent), while new connections go through.
"""

from __future__ import annotations

import asyncio
import json

from kubernetes import config

from webhook.cluster import KubernetesKeySource, WatchTimings
from webhook.config import Settings
from webhook.metrics import Metrics
from webhook.store import KeyStore

from apihelpers import create_key
from polling import wait_for


class FreezingRelay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: set[asyncio.StreamWriter] = set()
        self.live: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """Existing connections go silent without closing: half-open, as seen from keymount."""
        self.frozen |= self.live

    async def _accept(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.live.add(writer)

        async def pump(src, dst, owner):
            try:
                while data := await src.read(65536):
                    if owner in self.frozen:
                        continue  # swallow: nothing arrives, nothing closes
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass

        await asyncio.gather(pump(reader, up_writer, writer), pump(up_reader, writer, writer))

    async def stop(self) -> None:
        self.server.close()
        for writer in self.live:
            writer.close()


async def test_a_half_open_watch_times_out_and_the_cache_recovers_by_relisting(
        api, namespace, control_plane, tmp_path):
    relay = FreezingRelay(control_plane.apiserver_port)
    port = await relay.start()
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "kc",
                                                token=control_plane.keymount_token)
    document = json.loads(open(kubeconfig).read())
    document["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    (tmp_path / "relayed").write_text(json.dumps(document))

    store, metrics = KeyStore(), Metrics()
    source = KubernetesKeySource(
        config.new_client_from_config(config_file=str(tmp_path / "relayed")),
        settings=Settings(), store=store, metrics=metrics, namespaces=[namespace],
        timings=WatchTimings(watch_seconds=300, read_timeout=2.0, resync_seconds=3600,
                             retry_seconds=0.1))
    await source.load()
    task = asyncio.create_task(source.run())
    try:
        await asyncio.to_thread(create_key, api, namespace, "first")
        await wait_for(lambda: store.keyring(namespace).newest is not None, timeout=10,
                       what="first key through the watch")

        relay.freeze()
        await asyncio.to_thread(create_key, api, namespace, "second", index=2)
        await wait_for(lambda: [r.name for r in store.keyring(namespace).keys] ==
                       ["first", "second"], timeout=15,
                       what="second key after the frozen watch timed out")
        restarts = metrics.registry.get_sample_value("keymount_watch_restarts_total")
        assert restarts >= 1
    finally:
        task.cancel()
        await relay.stop()
