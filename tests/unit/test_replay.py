"""The replay: parsing, slot cutting, the test-then-train protocol and its outputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import InvalidInputFile
from models.evaluation import Targets, rank_metrics
from models.history import History
from models.replay import cut_slots, load_interactions, main
from models.synthetic import StreamSpec, drifting_stream

DAY_S = 86400.0


def _write_stream(path: Path, spec: StreamSpec) -> None:
    lines = []
    for slot in drifting_stream(spec):
        for user, item, ts_s in zip(slot.user_ids, slot.item_ids, slot.ts_s, strict=True):
            lines.append(f"{user}\t{item}\t4\t{ts_s:.0f}")
    path.write_text("\n".join(lines) + "\n")


def test_load_reads_tsv_csv_headers_and_iso_timestamps(tmp_path: Path) -> None:
    tsv = tmp_path / "a.tsv"
    tsv.write_text("1\t10\t5\t100\n2\t11\t3\t200\n")
    data = load_interactions(tsv)
    assert data.users == ["1", "2"] and data.items == ["10", "11"]
    assert data.ts_s.tolist() == [100.0, 200.0] and data.values.tolist() == [5.0, 3.0]

    csv = tmp_path / "b.csv"
    csv.write_text("user,item,time\nu,i,1970-01-02T00:00:00Z\n")
    data = load_interactions(csv, header=True)
    assert data.ts_s.tolist() == [DAY_S] and data.values.tolist() == [1.0]


@pytest.mark.parametrize(
    ("text", "field"),
    [("", "path"), ("1\t2\n", "line"), ("1\t2\t3\tyesterday\n", "timestamp")],
)
def test_bad_files_raise_a_named_error(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(InvalidInputFile) as error:
        load_interactions(path)
    assert error.value.field == field
    with pytest.raises(InvalidInputFile):
        load_interactions(tmp_path / "absent.tsv")


def test_slots_are_event_time_windows_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.tsv"
    path.write_text("a\tx\t5\nb\ty\t" + str(3 * DAY_S + 5) + "\na\tz\t" + str(DAY_S - 1) + "\n")
    slots = cut_slots(load_interactions(path), DAY_S)
    assert [s.slot_id for s in slots] == [0, 3]
    assert slots[0].item_ids == ["x", "z"] and slots[1].item_ids == ["y"]


def test_targets_mask_the_past_and_count_unknown_items() -> None:
    history = History()
    first = cut_slots(_interactions([("a", "x", 0), ("a", "y", 1), ("b", "y", 2)]), DAY_S)[0]
    history.add(first)
    second = cut_slots(_interactions([("a", "x", 9), ("a", "z", 9), ("b", "x", 9)]), DAY_S)[0]
    targets = history.targets(second)
    # user a re-touched x (masked, not a target) and touched z, which no model can know yet
    assert targets.users == ["a", "b"]
    assert targets.sizes.tolist() == [1, 1]
    assert targets.columns[0].tolist() == [] and targets.columns[1].tolist() == [0]
    assert targets.seen[0].tolist() == [0, 1]


def _interactions(rows: list[tuple[str, str, float]]):  # type: ignore[no-untyped-def]
    from models.replay import Interactions

    return Interactions(
        [r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows], dtype=float),
        np.ones(len(rows), dtype=np.float32),
    )  # fmt: skip


def test_rank_metrics_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.1, 0.2, 0.3, 0.4]])
    targets = Targets(
        users=["a", "b"],
        columns=[np.array([1, 2]), np.array([0])],
        sizes=np.array([3, 1]),
        seen=[np.array([0]), np.array([], dtype=np.int64)],
    )
    recall, ndcg = rank_metrics(scores, targets, k=2)
    # user a: item 0 masked, top-2 = [1, 3]: one hit of three targets
    assert recall.tolist() == pytest.approx([1 / 3, 0.0])
    assert ndcg[0] == pytest.approx(1.0 / (1.0 + 1.0 / np.log2(3)))


def test_replay_runs_end_to_end_and_writes_its_outputs(tmp_path: Path) -> None:
    path = tmp_path / "stream.tsv"
    spec = StreamSpec(n_slots=5, n_items=120, users_per_slot=40, events_per_user=5.0, seed=2)
    _write_stream(path, spec)
    out = tmp_path / "out"
    code = main(
        [str(path), "--slot-days", "7", "--test-from", "0.5", "--seeds", "0,1", "--dim", "8",
         "--cold-start-k", "1,3", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    payload = json.loads((out / "replay.json").read_text())
    assert (out / "replay.png").stat().st_size > 0
    assert [r["seed"] for r in payload["results"]] == [0, 1]
    first = payload["results"][0]
    expected = {
        "metarec", "recent_popularity", "decayed_popularity", "alltime_popularity",
        "finetune_only", "full_retrain", "implicit_als",
    }  # fmt: skip
    assert set(first["methods"]) == expected
    for summary in first["methods"].values():
        n_test = payload["n_slots"] - payload["n_warm"]
        assert len(summary["per_slot_recall"]) == len(first["test_slots"]) == n_test >= 2
        assert 0.0 <= summary["recall"] <= 1.0
    assert set(first["cold_start"]) == {"1", "3"}
    # on a stream whose items cool after release, recent popularity beats all-time popularity
    methods = first["methods"]
    assert methods["recent_popularity"]["recall"] > methods["alltime_popularity"]["recall"]
