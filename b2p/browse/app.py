"""Serve the FiftyOne App for a b2p dataset on a local address and keep it up until Ctrl+C / SIGTERM."""

from __future__ import annotations

import logging
import signal
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from b2p.errors import B2PError


def app_url(address: str, port: int, dataset: str | None = None) -> str:
    host = "localhost" if address in ("", "0.0.0.0") else address
    return f"http://{host}:{port}/" + (f"datasets/{dataset}" if dataset else "")


def wait_http_ok(url: str, timeout: float = 120.0) -> float:
    """Poll `url` until it answers HTTP 200; return the seconds waited, or raise a B2PError."""
    t0 = time.perf_counter()
    last = ""
    while time.perf_counter() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
                last = f"HTTP {r.status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise B2PError(f"the FiftyOne App did not answer at {url} within {timeout:.0f} s (last: {last})")


def launch(
    name: str,
    address: str = "127.0.0.1",
    port: int = 5151,
    wait: bool = True,
    on_ready: Callable[[str, float], None] | None = None,
) -> Any:
    """Open dataset `name` in the FiftyOne App served at http://address:port (remote mode: no browser
    is opened here). Waits until the server answers, calls `on_ready(url, seconds)`, then blocks until
    interrupted when `wait`; returns the fo.Session (closed if it waited)."""
    from b2p.browse.fo_env import connect, import_fiftyone, port_in_use

    fo = import_fiftyone()
    connect(fo)
    if not fo.dataset_exists(name):
        raise B2PError(f"no FiftyOne dataset {name!r}; build it first (b2p browse without --build-only builds it)")
    if port_in_use(address, port):
        # FiftyOne would silently attach to whatever server holds the port (maybe another database)
        raise B2PError(f"port {port} on {address} is already in use; pass another --port")
    ds = fo.load_dataset(name)
    t0 = time.perf_counter()
    # FiftyOne logs ssh-tunnel instructions and a banner for remote sessions; we print the local URL instead
    session_logger = logging.getLogger("fiftyone.core.session.session")
    level = session_logger.level
    session_logger.setLevel(logging.WARNING)
    try:
        session = fo.launch_app(ds, remote=True, address=address, port=port, auto=False)
    finally:
        session_logger.setLevel(level)
    url = app_url(address, port, name)
    wait_http_ok(app_url(address, port))
    if on_ready:
        on_ready(url, time.perf_counter() - t0)
    if not wait:
        return session

    # SIGTERM (systemd, `kill`, a test harness) should close the App as cleanly as Ctrl+C does
    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        session.close()
    return session
