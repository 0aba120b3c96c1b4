"""Cost of one meta-update (`TimewiseMetaLearner.step`) on a slot of 10,000 interactions.

For each catalogue size the learner state is seeded with that many items (random rows, recency
counts, seen lists, a full replay reservoir), one slot is learned so the next update has a query
to meta-learn from and a guardrail to run, and then the timed update runs `--runs` times, each
from a fresh copy of that state. The figure is the median; the state copy is not timed.

    python bench/update.py --items 25000,50000,100000,200000 --runs 5
"""

import argparse
import copy
import platform
import statistics
import time

import torch

from models.meta import LearnerConfig, TimewiseMetaLearner
from models.synthetic import seeded_state, zipf_slot

SLOT_SECONDS = 3600.0


def time_update(n_items: int, n_users: int, n_events: int, runs: int) -> list[float]:
    config = LearnerConfig(slot_seconds=SLOT_SECONDS)
    learner = TimewiseMetaLearner(config)
    state = seeded_state(config, n_users=n_users, n_items=n_items, seed=1)
    user_ids = list(state.users.ids)
    first = zipf_slot(n_events, user_ids, n_items, 0.4, 2e5, SLOT_SECONDS, seed=2)
    state, _ = learner.step(state, first)
    timed = zipf_slot(n_events, user_ids, n_items, 0.4, 2e5 + SLOT_SECONDS, SLOT_SECONDS, seed=3)

    # a first untimed run warms the allocator and the kernels
    learner.step(copy.deepcopy(state), timed)
    times_ms = []
    for _ in range(runs):
        fresh = copy.deepcopy(state)
        started = time.perf_counter()
        learner.step(fresh, timed)
        times_ms.append((time.perf_counter() - started) * 1000.0)
    return times_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="25000,50000,100000,200000")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.events} events per slot, {args.users} users"
    )
    print(f"{'items':>8} {'median ms':>10}  runs (ms)")
    for n_items in [int(n) for n in args.items.split(",")]:
        times_ms = time_update(n_items, args.users, args.events, args.runs)
        runs = " ".join(f"{t:.0f}" for t in times_ms)
        print(f"{n_items:>8} {statistics.median(times_ms):>10.0f}  {runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
