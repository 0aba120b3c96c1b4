"""How soon a user's recommendations reflect an event they just posted (a benchmark, not a test).

It publishes a synthetic model, starts uvicorn on it, and for each trial:

- new user: `GET` answers `popular`; `POST /v1/events` one event; `GET` until the answer is
  `cold_start` and no longer holds the item;
- known user: `GET` gives a top item; `POST` an event on that item; `GET` until the item is gone
  and the scores have changed (their vector is refreshed by the event, newer than the model).

The delay runs from just before the POST is sent until the first GET that reflects the event
has been answered, so it includes the POST's own latency. Needs Redis:

    python bench/freshness.py --redis-url redis://127.0.0.1:6379/0 --trials 300 [--write-docs]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import (  # the same synthetic setup as the latency benchmark
    DOCS,
    clean_up,
    free_port,
    machine,
    new_bench,
    synthetic_model,
    wait_served,
    write_user_state,
)

DOC_BEGIN = "<!-- measured by bench/freshness.py: begin -->"
DOC_END = "<!-- measured by bench/freshness.py: end -->"


def item_ids(response: httpx.Response) -> list[str]:
    return [entry["item_id"] for entry in response.json()["items"]]


def post_event(http: httpx.Client, user_id: str, item_id: str) -> None:
    response = http.post("/v1/events", json={"events": [{"user_id": user_id, "item_id": item_id}]})
    response.raise_for_status()


def new_user_delay_ms(http: httpx.Client, user_id: str, item_id: str) -> tuple[float, int]:
    path = f"/v1/users/{user_id}/recommendations"
    assert http.get(path).json()["strategy"] == "popular"
    started = time.perf_counter()
    post_event(http, user_id, item_id)
    for polls in range(1, 1000):
        response = http.get(path)
        if response.json()["strategy"] == "cold_start" and item_id not in item_ids(response):
            return (time.perf_counter() - started) * 1e3, polls
    raise RuntimeError(f"{user_id}'s event was never reflected")


def scores(response: httpx.Response) -> dict[str, float]:
    return {entry["item_id"]: entry["score"] for entry in response.json()["items"]}


def known_user_delay_ms(http: httpx.Client, user_id: str) -> tuple[float, int]:
    path = f"/v1/users/{user_id}/recommendations"
    before = scores(http.get(path))
    top_item = next(iter(before))
    started = time.perf_counter()
    post_event(http, user_id, top_item)
    for polls in range(1, 1000):
        after = scores(http.get(path))
        # reflected: the item is excluded as seen and the user's vector moved (scores changed)
        rescored = any(after[item] != score for item, score in before.items() if item in after)
        if top_item not in after and rescored:
            return (time.perf_counter() - started) * 1e3, polls
    raise RuntimeError(f"{user_id}'s event was never reflected")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def run_trials(port: int, args: argparse.Namespace) -> dict[str, list[float]]:
    rng = random.Random(0)
    delays: dict[str, list[float]] = {"new user": [], "known user": []}
    polls: list[int] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as http:
        for trial in range(args.trials):
            item_id = f"i{rng.randrange(args.items)}"
            delay_ms, n = new_user_delay_ms(http, f"fresh-{trial}", item_id)
            delays["new user"].append(delay_ms)
            polls.append(n)
            delay_ms, n = known_user_delay_ms(http, f"u{trial % args.users}")
            delays["known user"].append(delay_ms)
            polls.append(n)
    print(f"GETs needed per trial: max {max(polls)}, mean {statistics.mean(polls):.2f}")
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", help="default: a throw-away SQLite file")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    bench = new_bench(args)
    try:
        write_user_state(bench.client, bench.keys, args.items, args.users)
        bench.publish(1, synthetic_model(args.items, args.users, seed=0))
        port = free_port()
        server = bench.start_server(port, args.workers, threads=1)
        try:
            wait_served(port, 1)
            delays = run_trials(port, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        clean_up(bench)

    lines = [
        f"Machine: {machine()}; uvicorn --workers {args.workers}; {args.items:,} items; "
        f"{args.trials} trials of each kind.",
        "",
        "| user | p50 | p99 | max |",
        "|---|---:|---:|---:|",
    ]
    for kind, values in delays.items():
        lines.append(
            f"| {kind} | {percentile(values, 0.5):.1f} ms | {percentile(values, 0.99):.1f} ms "
            f"| {max(values):.1f} ms |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = DOCS.read_text()
        begin, end = doc.index(DOC_BEGIN) + len(DOC_BEGIN), doc.index(DOC_END)
        DOCS.write_text(doc[:begin] + "\n" + text + "\n" + doc[end:])


if __name__ == "__main__":
    main()
