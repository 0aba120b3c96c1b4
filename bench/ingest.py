"""Ingestion throughput and latency of a running metarec API (a benchmark, not a test).

Start a service first, for instance with the real Redis and a throw-away SQLite database:

    export METAREC_REDIS_URL=redis://127.0.0.1:6379/0 METAREC_REDIS_PREFIX=bench-ingest
    export METAREC_DATABASE_URL=sqlite:////tmp/metarec-bench.db
    metarec migrate
    uvicorn --factory app.api.main:create_app --port 8000 --workers 2 --no-access-log

(or `metarec api`, one process), then

    python bench/ingest.py --url http://127.0.0.1:8000 --write-docs

`uvicorn --workers N` shares one listening socket, and a burst of new connections tends to land
on one process (5 of 64 on one, 59 on the other, measured). With `--spawn N` the benchmark
instead starts N API processes itself, each on its own SO_REUSEPORT socket at the `--url` port,
so the kernel spreads connections by address; they read the same METAREC_* variables, and are
stopped at the end.

Two loads, each run `--runs` times and reported as the median run:

- batched: POSTs of `--batch-size` events from `--batch-concurrency` connections at once;
- single: one event per POST from `--single-concurrency` connections, each sending its next
  request as soon as the previous one is answered (closed loop), with per-request latency.

Every event has a fresh event_id and a timestamp near now, so each run stores new events. The
client is a minimal HTTP/1.1 keep-alive client on asyncio streams, lighter than a general one, so
that on a small machine shared with the server most of the CPU is left to the server. Bodies are
encoded before the clock starts. Afterwards remove the events it stored, for instance with
`redis-cli --scan --pattern 'bench-ingest:*' | xargs -n 1000 redis-cli del`.
"""

import argparse
import asyncio
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SPAWN_READY_S = 90.0

# one API process on its own SO_REUSEPORT socket (argv: host, port)
_SERVE_ONE = """
import socket, sys, uvicorn
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind((sys.argv[1], int(sys.argv[2])))
config = uvicorn.Config(
    "app.api.main:create_app", factory=True, access_log=False, log_level="warning"
)
uvicorn.Server(config).run(sockets=[sock])
"""
SECTION_TITLE = "## Ingestion"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    api_key: str | None


@dataclass(frozen=True)
class RunResult:
    events: int
    seconds: float
    latencies_ms: list[float]
    failures: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def latency_ms(self, quantile: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads sized responses."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        key_header = f"X-API-Key: {target.api_key}\r\n" if target.api_key else ""
        self.head = (
            f"POST /v1/events HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Content-Type: application/json\r\n{key_header}Content-Length: "
        ).encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        answer = await self.reader.readexactly(int(match.group(1))) if match else b""
        return status, answer

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def make_bodies(count: int, events_per_body: int, run_tag: str) -> list[bytes]:
    """`count` request bodies of fresh events spread over 1000 users and 5000 items."""
    now_s = time.time()
    bodies = []
    for body_index in range(count):
        events = []
        for i in range(events_per_body):
            n = body_index * events_per_body + i
            events.append(
                {
                    "user_id": f"bench-u{n % 1000}",
                    "item_id": f"bench-i{(n * 7919) % 5000}",
                    "timestamp": now_s - (n % 50) * 0.1,
                    "event_id": f"{run_tag}-{n}",
                }
            )
        bodies.append(orjson.dumps({"events": events}))
    return bodies


async def run_load(target: Target, bodies: list[bytes], concurrency: int) -> RunResult:
    """Post every body once from `concurrency` connections; each sends its next at once."""
    connections = [HttpConnection(target) for _ in range(concurrency)]
    await asyncio.gather(*(connection.open() for connection in connections))
    queue = iter(bodies)
    latencies_ms: list[float] = []
    accepted = [0]
    failures = [0]

    async def drive(connection: HttpConnection) -> None:
        for body in queue:
            started = time.perf_counter()
            status, answer = await connection.post(body)
            latencies_ms.append((time.perf_counter() - started) * 1e3)
            if status == 202:
                accepted[0] += orjson.loads(answer)["accepted"]
            else:
                failures[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(drive(connection) for connection in connections))
    seconds = time.perf_counter() - started
    await asyncio.gather(*(connection.close() for connection in connections))
    return RunResult(accepted[0], seconds, latencies_ms, failures[0])


def median_run(results: list[RunResult]) -> RunResult:
    ordered = sorted(results, key=lambda result: result.events_per_s)
    return ordered[len(ordered) // 2]


async def measure(args: argparse.Namespace, target: Target) -> dict[str, list[RunResult]]:
    results: dict[str, list[RunResult]] = {"batched": [], "single": []}
    batch_count = max(1, args.batch_events // args.batch_size)
    for run in range(args.runs):
        tag = uuid.uuid4().hex[:8]
        bodies = make_bodies(batch_count, args.batch_size, f"b{tag}")
        result = await run_load(target, bodies, args.batch_concurrency)
        results["batched"].append(result)
        _print_run("batched", run, result)

        bodies = make_bodies(args.single_events, 1, f"s{tag}")
        result = await run_load(target, bodies, args.single_concurrency)
        results["single"].append(result)
        _print_run("single", run, result)
    return results


def _print_run(load: str, run: int, result: RunResult) -> None:
    print(
        f"{load:8s} run {run + 1}: {result.events_per_s:9,.0f} events/s  "
        f"p50 {result.latency_ms(0.5):7.1f} ms  p99 {result.latency_ms(0.99):7.1f} ms  "
        f"failures {result.failures}",
        flush=True,
    )


def report(args: argparse.Namespace, results: dict[str, list[RunResult]]) -> str:
    batched, single = median_run(results["batched"]), median_run(results["single"])
    command = shlex.join(["python", "bench/ingest.py", *sys.argv[1:]])
    server = args.server or "(not given: pass --server to record how the service was started)"
    if args.spawn:
        server = f"{args.spawn} uvicorn processes, each on its own SO_REUSEPORT socket (--spawn)"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {_machine()}, client and server on the same "
        "machine. Median of "
        f"{args.runs} runs (by events/s); latency is per request, from send to full answer.",
        "",
        f"- server: `{server}`",
        f"- command: `{command}`",
        "",
        "| load | events/s | p50 ms | p99 ms | requests | failed |",
        "|---|---:|---:|---:|---:|---:|",
        _row(
            f"batched, {args.batch_size} events per POST, {args.batch_concurrency} connections",
            batched,
        ),
        _row(f"single event per POST, {args.single_concurrency} connections", single),
        "",
        "All runs (events/s): batched "
        + ", ".join(f"{r.events_per_s:,.0f}" for r in results["batched"])
        + "; single "
        + ", ".join(f"{r.events_per_s:,.0f}" for r in results["single"])
        + ".",
    ]
    return "\n".join(lines)


def _row(load: str, result: RunResult) -> str:
    return (
        f"| {load} | {result.events_per_s:,.0f} | {result.latency_ms(0.5):.1f} | "
        f"{result.latency_ms(0.99):.1f} | {len(result.latencies_ms):,} | {result.failures} |"
    )


def _machine() -> str:
    cores = os.cpu_count() or 0
    load = (
        f", 1-minute load {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    )
    return f"{platform.machine()} Linux, {cores} cores{load}, Python {platform.python_version()}"


BEGIN_MARK = "<!-- measured by bench/ingest.py: begin -->"
END_MARK = "<!-- measured by bench/ingest.py: end -->"


def write_section(text: str, path: Path = DOCS_PATH) -> None:
    """Put `text` between the markers of the `## Ingestion` section, leaving everything else as
    it was; the markers (and the section) are added when missing."""
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN_MARK}\n{text}\n{END_MARK}"
    begin, end = document.find(BEGIN_MARK), document.find(END_MARK)
    if 0 <= begin < end:
        path.write_text(document[:begin] + block + document[end + len(END_MARK) :])
        return

    section = document.find(f"\n{SECTION_TITLE}\n")
    if section < 0:
        path.write_text(f"{document.rstrip()}\n\n{SECTION_TITLE}\n\n{block}\n")
        return
    next_section = document.find("\n## ", section + 1)
    cut = len(document) if next_section < 0 else next_section
    path.write_text(f"{document[:cut].rstrip()}\n\n{block}\n{document[cut:]}")


def spawn_servers(target: Target, processes: int) -> list[subprocess.Popen[bytes]]:
    """Start `processes` API processes on the target port and wait until they answer."""
    if not os.environ.get("METAREC_REDIS_URL"):
        raise SystemExit("--spawn needs METAREC_REDIS_URL (and METAREC_DATABASE_URL) set")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _SERVE_ONE, target.host, str(target.port)]
    servers = [subprocess.Popen(command, cwd=REPO_ROOT, env=env) for _ in range(processes)]

    deadline = time.monotonic() + SPAWN_READY_S
    while time.monotonic() < deadline:
        if all(server.poll() is None for server in servers) and _answers(target):
            time.sleep(2.0)  # the last process may still be starting
            return servers
        time.sleep(0.5)
    stop_servers(servers)
    raise SystemExit(f"the spawned API did not answer within {SPAWN_READY_S:.0f} s")


def _answers(target: Target) -> bool:
    try:
        with socket.create_connection((target.host, target.port), timeout=1.0) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def stop_servers(servers: list[subprocess.Popen[bytes]]) -> None:
    for server in servers:
        server.send_signal(signal.SIGTERM)
    for server in servers:
        server.wait(timeout=30)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of a running metarec API")
    parser.add_argument("--api-key", default=os.environ.get("METAREC_BENCH_API_KEY"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--batch-events", type=int, default=100_000, help="events per run")
    parser.add_argument("--single-concurrency", type=int, default=64)
    parser.add_argument("--single-events", type=int, default=10_000, help="requests per run")
    parser.add_argument("--server", help="how the service was started, recorded in the docs")
    parser.add_argument(
        "--spawn", type=int, default=0, help="start this many API processes (SO_REUSEPORT)"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"write the figures into {DOCS_PATH.name}"
    )
    return parser.parse_args()


def main() -> int:
    args = _parse_args()
    url = urlsplit(args.url)
    target = Target(url.hostname or "127.0.0.1", url.port or 80, args.api_key)
    servers = spawn_servers(target, args.spawn) if args.spawn else []
    try:
        results = asyncio.run(measure(args, target))
    finally:
        stop_servers(servers)
    text = report(args, results)
    print()
    print(text)
    if args.write_docs:
        write_section(text)
        print(f"\nwritten to {DOCS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
