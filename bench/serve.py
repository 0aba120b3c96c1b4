"""Recommendation latency and throughput through real HTTP, beside the raw in-process cost
(a benchmark, not a test).

For each catalogue size it publishes a synthetic model (d = 64) with `publish_version`, starts
uvicorn on it, and measures `GET /v1/users/{user_id}/recommendations?k=20`:

- raw: scoring plus masking plus top-k in this process on one thread (no HTTP, no Redis);
- http at 1 and at 16 concurrent clients (closed loop, keep-alive), p50 / p99 and requests/s;
- cold-start users (unknown to the model, 5 recent events each: adaptation on the request path);
- during swaps: 1 client while a new version of the same size is published every
  `--swap-every-s`, with the number of failed requests and of versions served.

Users are known to the model (personalized, no events newer than the model) and each has 20
seen items that are masked. Needs Redis (and PostgreSQL or a throw-away SQLite database):

    python bench/serve.py --redis-url redis://127.0.0.1:6379/0 --runs 3 [--write-docs]

The load client is a minimal HTTP/1.1 keep-alive client on asyncio streams, so that on a small
machine shared with the server most of the CPU is left to the server. Every Redis key written
under the benchmark's prefix is removed at the end.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.keys import RedisKeys
from app.services.model_store import publish_version
from app.services.recommend import rank_for_vector, rows_of
from app.services.snapshot import build_snapshot
from app.storage.db import make_engine
from app.storage.migrate import upgrade_to_head
from models.serving import ServingModel

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
DOC_BEGIN = "<!-- measured by bench/serve.py: begin -->"
DOC_END = "<!-- measured by bench/serve.py: end -->"
DIM = 64
SEEN_PER_USER = 20
COLD_EVENTS = 5


# the synthetic model and the users' Redis state


def synthetic_model(n_items: int, n_users: int, seed: int) -> ServingModel:
    gen = torch.Generator().manual_seed(seed)
    item_matrix = torch.randn(n_items, DIM, generator=gen) / DIM**0.5
    user_init = torch.zeros(DIM)
    return ServingModel(
        item_ids=[f"i{n}" for n in range(n_items)],
        user_ids=[f"u{n}" for n in range(n_users)],
        item_matrix=item_matrix,
        user_matrix=torch.randn(n_users, DIM, generator=gen),
        user_counts=torch.full((n_users,), 100.0),
        popularity=torch.randn(n_items, generator=gen),
        embedding_dim=DIM,
        adapt_params={
            "user_init": user_init,
            "step_size": torch.full((DIM,), 0.5),
            "adapt_steps": torch.tensor(2.0),
            "warm_prior_events": torch.tensor(10.0),
        },
    )


def write_user_state(client: redis.Redis, keys: RedisKeys, n_items: int, n_users: int) -> None:
    """Seen sets for the known users; recent events for the cold-start users `c{n}`."""
    rng = random.Random(0)
    pipe = client.pipeline(transaction=False)
    for n in range(n_users):
        pipe.sadd(keys.user_seen(f"u{n}"), *(f"i{rng.randrange(n_items)}" for _ in range(20)))
    for n in range(n_users):
        entries = [
            orjson.dumps({"item_id": f"i{rng.randrange(n_items)}", "ts": 1.0, "value": 1.0})
            for _ in range(COLD_EVENTS)
        ]
        pipe.rpush(keys.user_recent(f"c{n}"), *entries)
    pipe.execute()


# raw in-process cost


def raw_latency_ms(model: ServingModel, iterations: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    snapshot = build_snapshot(model, version=1, trained_through_slot=0)
    rng = random.Random(1)
    timings = []
    for n in range(iterations):
        user_vector = snapshot.model.user_matrix[n % len(model.user_ids)]
        seen = [f"i{rng.randrange(snapshot.n_items)}" for _ in range(SEEN_PER_USER)]
        started = time.perf_counter()
        rank_for_vector(snapshot, user_vector, 20, rows_of(snapshot, seen), None)
        timings.append((time.perf_counter() - started) * 1e3)
    return summarize(timings[iterations // 10 :])


# the HTTP load


@dataclass
class LoadResult:
    clients: int
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float
    per_s: float
    versions: int


async def _one_client(
    port: int, paths: list[bytes], stop_at: float, timings: list[float], versions: set[int]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    failures, n = 0, random.randrange(len(paths))
    try:
        while time.perf_counter() < stop_at:
            n += 1
            started = time.perf_counter()
            writer.write(paths[n % len(paths)])
            status, body = await _read_response(reader)
            timings.append((time.perf_counter() - started) * 1e3)
            if status != 200:
                failures += 1
            elif b'"model_version":' in body:
                versions.add(orjson.loads(body)["model_version"] or 0)
    finally:
        writer.close()
    return failures


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


def requests_for(users: list[str]) -> list[bytes]:
    return [
        f"GET /v1/users/{user}/recommendations?k=20 HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        for user in users
    ]


async def _load(port: int, paths: list[bytes], clients: int, duration_s: float) -> LoadResult:
    timings: list[float] = []
    versions: set[int] = set()
    await _drive(port, paths, clients, 0.5, [], set())  # warm the connections and the caches
    started = time.perf_counter()
    failures = await _drive(port, paths, clients, duration_s, timings, versions)
    elapsed_s = time.perf_counter() - started
    stats = summarize(timings)
    return LoadResult(
        clients,
        len(timings),
        failures,
        stats["p50_ms"],
        stats["p99_ms"],
        len(timings) / elapsed_s,
        len(versions),
    )


async def _drive(
    port: int,
    paths: list[bytes],
    clients: int,
    duration_s: float,
    timings: list[float],
    versions: set[int],
) -> int:
    stop_at = time.perf_counter() + duration_s
    tasks = [_one_client(port, paths, stop_at, timings, versions) for _ in range(clients)]
    return sum(await asyncio.gather(*tasks))


def load(port: int, paths: list[bytes], clients: int, duration_s: float) -> LoadResult:
    return asyncio.run(_load(port, paths, clients, duration_s))


def summarize(timings: list[float]) -> dict[str, float]:
    ordered = sorted(timings)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


# the server


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    database_url: str
    prefix: str
    keys: RedisKeys
    client: redis.Redis

    def publish(self, version: int, model: ServingModel) -> None:
        engine = make_engine(self.database_url)
        try:
            publish_version(
                engine=engine,
                client=self.client,
                keys=self.keys,
                store_path=self.workdir / "models",
                version=version,
                model=model,
                trained_through_slot=version,
                metrics={},
            )
        finally:
            engine.dispose()

    def start_server(self, port: int, workers: int, threads: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "METAREC_REDIS_URL": self.args.redis_url,
            "METAREC_DATABASE_URL": self.database_url,
            "METAREC_REDIS_PREFIX": self.prefix,
            "METAREC_DATA_DIR": str(self.workdir),
            "METAREC_MODEL_STORE_PATH": str(self.workdir / "models"),
            "METAREC_MODEL_POLL_S": "1.0",
            "METAREC_LOG_LEVEL": "warning",
            "METAREC_API_TORCH_THREADS": str(threads),
        }
        command = [sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory"]
        command += ["--port", str(port), "--workers", str(workers)]
        command += ["--no-access-log", "--log-level", "warning"]
        return subprocess.Popen(command, env=env, cwd=ROOT)


def wait_served(port: int, version: int, timeout_s: float = 300.0) -> None:
    """Until 20 answers in a row (from any worker) say `version` is served."""
    import httpx

    deadline, in_a_row = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and in_a_row < 20:
        try:
            served = httpx.get(f"http://127.0.0.1:{port}/v1/models/current").json()["served"]
            in_a_row = in_a_row + 1 if served == version else 0
        except Exception:
            in_a_row = 0
        time.sleep(0.05 if in_a_row else 0.25)
    if in_a_row < 20:
        raise RuntimeError(f"version {version} not served within {timeout_s} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_catalogue(bench: Bench, n_items: int) -> dict[str, object]:
    args = bench.args
    workers, threads = layout(args, n_items)
    model = synthetic_model(n_items, args.users, seed=0)
    raw = raw_latency_ms(model, args.raw_iterations, threads)
    write_user_state(bench.client, bench.keys, n_items, args.users)
    version = n_items  # a fresh version per catalogue: the pointer only moves forward
    bench.publish(version, model)
    del model

    port = free_port()
    server = bench.start_server(port, workers, threads)
    try:
        wait_served(port, version)
        warm_paths = requests_for([f"u{n}" for n in range(args.users)])
        cold_paths = requests_for([f"c{n}" for n in range(args.users)])
        runs = {
            "warm_1": [load(port, warm_paths, 1, args.duration_s) for _ in range(args.runs)],
            "warm_16": [load(port, warm_paths, 16, args.duration_s) for _ in range(args.runs)],
            "cold_1": [load(port, cold_paths, 1, args.duration_s) for _ in range(args.runs)],
            "swaps_1": [measure_swaps(bench, port, warm_paths, n_items, version)],
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    as_dicts = {name: [asdict(run) for run in results] for name, results in runs.items()}
    return {"items": n_items, "workers": workers, "threads": threads, "raw": raw, "runs": as_dicts}


def layout(args: argparse.Namespace, n_items: int) -> tuple[int, int]:
    """(uvicorn processes, torch threads each) for a catalogue of this size."""
    if args.big_from and n_items >= args.big_from:
        return args.big_workers, args.big_threads
    return args.workers, args.threads


def measure_swaps(
    bench: Bench, port: int, paths: list[bytes], n_items: int, version: int
) -> LoadResult:
    """1 client while versions of the same size are published every `swap_every_s`."""
    args = bench.args
    stop = threading.Event()
    published: list[int] = []

    def publish_loop() -> None:
        n = 0
        while not stop.wait(args.swap_every_s):
            n += 1
            bench.publish(version * 1000 + n, synthetic_model(n_items, args.users, seed=n))
            published.append(version * 1000 + n)

    publisher = threading.Thread(target=publish_loop)
    publisher.start()
    try:
        result = load(port, paths, 1, args.swap_duration_s)
    finally:
        stop.set()
        publisher.join()
    return result


# reporting


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = ("p50_ms", "p99_ms", "per_s")
    return {key: statistics.median(run[key] for run in runs) for key in keys} | {
        "failures": sum(run["failures"] for run in runs),
        "requests": sum(run["requests"] for run in runs),
        "versions": max(run["versions"] for run in runs),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| items | processes x threads | raw score+top-k p50 / p99 | 1 client p50 / p99 "
        "| 1 client req/s "
        "| 16 clients p50 / p99 | 16 clients req/s | cold start p50 / p99 (1 client) "
        "| during swaps p50 / p99, failed, versions seen |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        raw, runs = result["raw"], result["runs"]
        one, many = median_run(runs["warm_1"]), median_run(runs["warm_16"])
        cold, swaps = median_run(runs["cold_1"]), median_run(runs["swaps_1"])
        lines.append(
            f"| {result['items']:,} | {result['workers']} x {result['threads']} "
            f"| {raw['p50_ms']:.2f} / {raw['p99_ms']:.2f} ms "
            f"| {one['p50_ms']:.2f} / {one['p99_ms']:.2f} ms | {one['per_s']:.0f} "
            f"| {many['p50_ms']:.2f} / {many['p99_ms']:.2f} ms | {many['per_s']:.0f} "
            f"| {cold['p50_ms']:.2f} / {cold['p99_ms']:.2f} ms "
            f"| {swaps['p50_ms']:.2f} / {swaps['p99_ms']:.2f} ms, {swaps['failures']:.0f}, "
            f"{swaps['versions']:.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load_1m = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, load average {load_1m:.1f} at the end"
    )


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    begin, end = doc.index(DOC_BEGIN) + len(DOC_BEGIN), doc.index(DOC_END)
    DOCS.write_text(doc[:begin] + "\n" + text + "\n" + doc[end:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", help="default: a throw-away SQLite file")
    parser.add_argument("--items", default="10000,100000,1000000")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--big-from", type=int, default=1_000_000, help="catalogues this large use --big-*"
    )
    parser.add_argument("--big-workers", type=int, default=1)
    parser.add_argument("--big-threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--raw-iterations", type=int, default=200)
    parser.add_argument("--swap-every-s", type=float, default=1.0)
    parser.add_argument("--swap-duration-s", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    return parser.parse_args()


def new_bench(args: argparse.Namespace) -> Bench:
    """A fresh Redis prefix, model store and database: the pointer only ever moves forward."""
    workdir = Path(tempfile.mkdtemp(prefix="metarec-bench-serve-"))
    database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
    upgrade_to_head(database_url)
    prefix = f"bench-serve-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    return Bench(args, workdir, database_url, prefix, RedisKeys(prefix), client)


def clean_up(bench: Bench) -> None:
    for key in bench.client.scan_iter(match=f"{bench.prefix}:*", count=1000):
        bench.client.delete(key)
    bench.client.close()
    shutil.rmtree(bench.workdir, ignore_errors=True)


def main() -> None:
    args = parse_args()
    results = []
    for n_items in (int(n) for n in args.items.split(",")):
        bench = new_bench(args)
        try:
            results.append(measure_catalogue(bench, n_items))
        finally:
            clean_up(bench)
        print(f"{n_items:,} items done", file=sys.stderr)

    text = (
        f"Machine: {machine()}; {args.runs} runs of "
        f"{args.duration_s:.0f} s each, median shown.\n\n" + table(results)
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=1))
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
