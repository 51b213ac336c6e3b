"""The serving certificate: TLS contexts, and swapping in a renewed pair safely.

Every handshake is served by the newest context that loaded as a *matching* pair:
the listening context's SNI callback (called by OpenSSL for every ClientHello, with or
without a server name) hands the connection to it. A renewed pair is loaded into a
fresh context, so files written in any order (cert first, key later, as
`keymount certs --out` and cert-manager do) or swapped by a symlink (the kubelet's
`..data` for Secret volumes) never break a new handshake: until both files match, the
previous pair keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable

log = logging.getLogger("keymount.server")


def build_ssl_context(cert_file: str, key_file: str, *,
                      client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2 or newer, HTTP/1.1; with `client_ca`, a client certificate signed by it is
    required (an API server configured to present one: docs/operations.md)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=client_ca)
    return context


Stamp = tuple[tuple[int, int, int] | None, ...]


class CertReloader:
    """Holds the current serving context and replaces it when the files change."""

    def __init__(self, cert_file: str, key_file: str, *, client_ca: str | None = None,
                 on_reload: Callable[[str], None] = lambda result: None,
                 interval: float = 1.0) -> None:
        self.cert_file, self.key_file, self.client_ca = cert_file, key_file, client_ca
        self.on_reload, self.interval = on_reload, interval
        self.current = build_ssl_context(cert_file, key_file, client_ca=client_ca)
        self._stamp = self._read_stamp()
        self._failed_stamp: Stamp | None = None
        # The listening context: it only picks the current one for each handshake.
        self.listening = build_ssl_context(cert_file, key_file, client_ca=client_ca)
        self.listening.sni_callback = self._select

    def _select(self, connection: ssl.SSLObject, server_name: str | None,
                context: ssl.SSLContext) -> None:
        connection.context = self.current

    def _read_stamp(self) -> Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in (self.cert_file, self.key_file, self.client_ca):
            if path is None:
                continue
            try:
                st = os.stat(path)  # follows symlinks: a swapped ..data link counts
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        try:
            fresh = build_ssl_context(self.cert_file, self.key_file, client_ca=self.client_ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if stamp != self._failed_stamp:  # once per state of the files, not per tick
                self._failed_stamp = stamp
                self.on_reload("error")
                log.warning("serving certificate files changed but do not load as a pair "
                            "yet; the previous pair keeps serving",
                            extra={"error": type(exc).__name__})
            return False
        self.current, self._stamp, self._failed_stamp = fresh, stamp, None
        self.on_reload("success")
        log.info("serving certificate reloaded", extra={"cert": self.cert_file})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.reload_if_changed()
