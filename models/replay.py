"""`metarec replay`: replay a timestamped interactions file slot by slot (test-then-train).

The file is cut into event-time slots. The first `--test-from` share of the slots only trains;
from then on, before slot s is learned, the model published after slot s-1 ranks every known item
for every user active in slot s (items the user touched before s masked), and Recall@20 and
NDCG@20 are averaged over those users, then over the test slots. metarec is driven through the
same calls the worker makes (`TimewiseMetaLearner.step`, `LearnerState.serving`, `adapt_users`),
next to baselines in the same run. A cold-start track scores users whose first event falls in
slot s from their first k events in that slot.

    python -m models.replay u.data --slot-days 7 --test-from 0.3 --seeds 0,1,2 --out var/replay
"""

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from models.baselines import (
    AllTimePopularity,
    DecayedPopularity,
    FineTuneOnly,
    FullRetrain,
    ImplicitALS,
    MetarecMethod,
    Method,
    RecentPopularity,
)
from models.batch import SlotBatch
from models.errors import InvalidInputFile
from models.evaluation import rank_metrics
from models.history import History
from models.meta import LearnerConfig

METRIC_K = 20


@dataclass(frozen=True)
class Interactions:
    users: list[str]
    items: list[str]
    ts_s: np.ndarray  # float64
    values: np.ndarray  # float32


def _parse_ts(text: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise InvalidInputFile(
            f"line {line}: timestamp {text!r} is not a number or ISO 8601", "timestamp"
        ) from exc


def load_interactions(path: Path, sep: str | None = None, header: bool = False) -> Interactions:
    """Rows of user, item, [rating,] timestamp; the separator is guessed when not given."""
    if not path.exists():
        raise InvalidInputFile(f"no such file: {path}", field="path")
    with path.open(newline="") as handle:
        first = handle.readline()
        sep = sep or ("\t" if "\t" in first else ("," if "," in first else None))
        handle.seek(0)
        lines = handle.read().splitlines()
    if header:
        lines = lines[1:]

    users, items, ts_s, values = [], [], [], []
    reader = csv.reader(lines, delimiter=sep) if sep else (line.split() for line in lines)
    for number, fields in enumerate(reader, start=2 if header else 1):
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) not in (3, 4):
            raise InvalidInputFile(f"line {number}: {len(fields)} fields, want 3 or 4", "line")
        users.append(fields[0].strip())
        items.append(fields[1].strip())
        ts_s.append(_parse_ts(fields[-1].strip(), number))
        values.append(float(fields[2]) if len(fields) == 4 else 1.0)
    if not users:
        raise InvalidInputFile(f"{path} holds no interactions", field="path")
    return Interactions(users, items, np.asarray(ts_s), np.asarray(values, dtype=np.float32))


def cut_slots(data: Interactions, slot_seconds: float) -> list[SlotBatch]:
    """One SlotBatch per non-empty event-time slot, in time order (events sorted within)."""
    order = np.argsort(data.ts_s, kind="stable")
    slot_ids = np.floor(data.ts_s[order] / slot_seconds).astype(np.int64)
    bounds = np.flatnonzero(np.diff(slot_ids)) + 1
    slots = []
    for chunk in np.split(np.arange(order.shape[0]), bounds):
        picked = order[chunk]
        slots.append(
            SlotBatch(
                user_ids=[data.users[i] for i in picked],
                item_ids=[data.items[i] for i in picked],
                ts_s=data.ts_s[picked],
                values=data.values[picked],
                slot_id=int(slot_ids[chunk[0]]),
            )
        )
    return slots


@dataclass
class MethodScores:
    recall: list[float] = field(default_factory=list)  # per test slot
    ndcg: list[float] = field(default_factory=list)
    recall_new: list[float] = field(default_factory=list)
    recall_returning: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        def mean(values: list[float]) -> float:
            finite = [v for v in values if not math.isnan(v)]
            return float(np.mean(finite)) if finite else math.nan

        return {
            "recall": mean(self.recall),
            "ndcg": mean(self.ndcg),
            "recall_new_users": mean(self.recall_new),
            "recall_returning_users": mean(self.recall_returning),
        }


def _group_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def run_seed(
    slots: list[SlotBatch],
    n_warm: int,
    config: LearnerConfig,
    cold_ks: list[int],
    progress: "object | None" = None,
) -> dict[str, object]:
    """One replay with one seed; returns per-method and cold-start results."""
    history = History()
    metarec = MetarecMethod(config)
    methods: list[Method] = [
        metarec,
        RecentPopularity(),
        DecayedPopularity(),
        AllTimePopularity(),
        FineTuneOnly(config),
        FullRetrain(config),
        ImplicitALS(seed=config.seed),
    ]
    scores = {method.name: MethodScores() for method in methods}
    seconds = {method.name: 0.0 for method in methods}
    cold: dict[int, dict[str, list[float]]] = {k: {} for k in cold_ks}
    test_slot_ids: list[int] = []
    new_user_share: list[float] = []

    for index, slot in enumerate(slots):
        # score slot s with what was learned through slot s-1 (nothing of s leaks)
        if index >= 1:
            targets = history.targets(slot)
            if index < n_warm:
                for method in methods:
                    started_s = time.perf_counter()
                    method.warmup(targets, history)
                    seconds[method.name] += time.perf_counter() - started_s
            elif targets.users:
                test_slot_ids.append(int(slot.slot_id or index))
                is_new = np.array([not history.knows_user(u) for u in targets.users])
                new_user_share.append(float(is_new.mean()))
                for method in methods:
                    started_s = time.perf_counter()
                    ranked = method.scores(targets.users, history)
                    seconds[method.name] += time.perf_counter() - started_s
                    recall, ndcg = rank_metrics(ranked, targets)
                    record = scores[method.name]
                    record.recall.append(float(recall.mean()))
                    record.ndcg.append(float(ndcg.mean()))
                    record.recall_new.append(_group_mean(recall, is_new))
                    record.recall_returning.append(_group_mean(recall, ~is_new))
                for k, by_method in metarec.cold_track(slot, history, cold_ks).items():
                    for name, value in by_method.items():
                        cold[k].setdefault(name, []).append(value)

        # then learn slot s
        for method in methods:
            started_s = time.perf_counter()
            method.learn(slot, history, is_test=index >= n_warm)
            seconds[method.name] += time.perf_counter() - started_s
        history.add(slot)
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]

    return {
        "seed": config.seed,
        "test_slots": test_slot_ids,
        "seconds": seconds,
        "new_user_share": new_user_share,
        "methods": {
            name: {**s.summary(), "per_slot_recall": s.recall, "per_slot_ndcg": s.ndcg}
            for name, s in scores.items()
        },
        "cold_start": {
            str(k): {name: float(np.nanmean(v)) if v else math.nan for name, v in by.items()}
            for k, by in cold.items()
        },
        "choices": metarec.choices,
        "update_ms": metarec.update_ms,
        "chosen": {m.name: m.chosen for m in methods if m.chosen},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarec replay",
        description="Replay a timestamped interactions file slot by slot (test-then-train).",
    )
    parser.add_argument("path", type=Path, help="CSV/TSV: user, item, [rating,] timestamp")
    parser.add_argument("--sep", default=None, help="field separator (default: guessed)")
    parser.add_argument("--header", action="store_true", help="the first line is a header")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--slot-days", type=float, default=None)
    size.add_argument("--slot-seconds", type=float, default=None)
    parser.add_argument("--test-from", type=float, default=0.3, help="share of warm-up slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed)")
    parser.add_argument("--cold-start-k", default="1,3,5,10")
    parser.add_argument("--dim", type=int, default=LearnerConfig.embedding_dim)
    parser.add_argument("--out", type=Path, default=None, help="directory for JSON and PNG")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _print_table(results: list[dict[str, object]]) -> None:
    names = list(results[0]["methods"])  # type: ignore[call-overload]
    seeds = [r["seed"] for r in results]
    header = f"{'method':<22}" + "".join(
        f"{'R@20 s' + str(s):>10}{'N@20 s' + str(s):>10}" for s in seeds
    )
    print(header + f"{'R@20 new':>10}{'R@20 ret':>10}")
    for name in names:
        line = f"{name:<22}"
        for result in results:
            summary = result["methods"][name]  # type: ignore[index]
            line += f"{summary['recall']:>10.4f}{summary['ndcg']:>10.4f}"
        first = results[0]["methods"][name]  # type: ignore[index]
        line += f"{first['recall_new_users']:>10.4f}{first['recall_returning_users']:>10.4f}"
        print(line)

    print("\ncold start (users whose first event is in the slot), Recall@20 [NDCG@20]")
    for k, _by in results[0]["cold_start"].items():  # type: ignore[attr-defined]
        cells = []
        for name in ("metarec", "recent_popularity", "mean_item_embedding"):
            values = [r["cold_start"][k].get(name, math.nan) for r in results]  # type: ignore[index]
            ndcgs = [r["cold_start"][k].get(name + "_ndcg", math.nan) for r in results]  # type: ignore[index]
            cells.append(f"{name} {np.mean(values):.4f} [{np.mean(ndcgs):.4f}]")
        print(f"  k={k:<3} " + "  ".join(cells))


def _plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    first = results[0]
    for name, _summary in first["methods"].items():  # type: ignore[attr-defined]
        recall = np.mean([r["methods"][name]["per_slot_recall"] for r in results], axis=0)  # type: ignore[index]
        ndcg = np.mean([r["methods"][name]["per_slot_ndcg"] for r in results], axis=0)  # type: ignore[index]
        width = 2.5 if name == "metarec" else 1.2
        axes[0].plot(first["test_slots"], recall, label=name, linewidth=width)
        axes[1].plot(first["test_slots"], ndcg, label=name, linewidth=width)
    axes[0].set_ylabel("Recall@20")
    axes[1].set_ylabel("NDCG@20")
    axes[1].set_xlabel("slot id")
    axes[0].legend(fontsize=8, ncol=2)
    axes[0].set_title(f"test-then-train replay, mean over seeds {[r['seed'] for r in results]}")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    slot_seconds = args.slot_seconds or (args.slot_days or 1.0) * 86400.0
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    cold_ks = [int(k) for k in args.cold_start_k.split(",") if k.strip()]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = load_interactions(args.path, sep=args.sep, header=args.header)
    slots = cut_slots(data, slot_seconds)
    n_warm = max(1, min(len(slots) - 1, math.floor(args.test_from * len(slots))))
    print(
        f"{len(data.users)} events, {len(slots)} slots of {slot_seconds:g} s, "
        f"{n_warm} warm-up and {len(slots) - n_warm} test slots, seeds {seeds}"
    )

    from tqdm import tqdm

    started_s = time.perf_counter()
    results = []
    with tqdm(total=len(slots) * len(seeds), disable=args.no_progress, unit="slot") as bar:
        for seed in seeds:
            config = LearnerConfig(slot_seconds=slot_seconds, embedding_dim=args.dim, seed=seed)
            results.append(run_seed(slots, n_warm, config, cold_ks, progress=bar))
    elapsed_s = time.perf_counter() - started_s
    _print_table(results)
    print(f"\n{elapsed_s:.0f} s for {len(seeds)} seed(s)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(sys.argv),
            "path": str(args.path),
            "slot_seconds": slot_seconds,
            "test_from": args.test_from,
            "n_slots": len(slots),
            "n_warm": n_warm,
            "elapsed_s": elapsed_s,
            "results": results,
        }
        (args.out / "replay.json").write_text(json.dumps(payload, indent=1))
        _plot(results, args.out / "replay.png")
        print(f"wrote {args.out / 'replay.json'} and {args.out / 'replay.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
