"""Latency of `adapt_users` for one user from 10 events, as the API calls it on a request.

The model is a published `ServingModel` from a seeded learner state (`--items` items, d = 64,
recency columns folded in). Each call is timed alone; the figure is the median of `--calls`.

    python bench/coldstart.py --items 1682,20000,100000 --calls 500
"""

import argparse
import platform
import statistics
import time

import torch

from models.coldstart import adapt_users
from models.meta import LearnerConfig
from models.synthetic import seeded_state


def time_adapt(n_items: int, n_events: int, calls: int, warm: bool) -> list[float]:
    config = LearnerConfig(slot_seconds=3600.0)
    model = seeded_state(config, n_users=1_000, n_items=n_items, seed=1).serving()
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(1, n_events, dtype=torch.bool)
    base_rows = torch.tensor([5 if warm else -1])

    times_ms = []
    for _ in range(calls + 20):
        item_rows = torch.randint(n_items, (1, n_events), generator=generator)
        started = time.perf_counter()
        adapt_users(model, item_rows, mask, base_rows)
        times_ms.append((time.perf_counter() - started) * 1000.0)
    return times_ms[20:]  # the first calls warm the allocator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1682,20000,100000")
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), one user, {args.events} events"
    )
    print(f"{'items':>8} {'new user p50 ms':>16} {'p95':>7} {'warm user p50 ms':>17} {'p95':>7}")
    for n_items in [int(n) for n in args.items.split(",")]:
        cells = []
        for warm in (False, True):
            times_ms = sorted(time_adapt(n_items, args.events, args.calls, warm))
            p95 = times_ms[int(0.95 * (len(times_ms) - 1))]
            cells.append(f"{statistics.median(times_ms):>16.3f} {p95:>7.3f}")
        print(f"{n_items:>8} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
