"""The time-wise meta-learner on small synthetic streams with a planted drift."""

import copy
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.batch import SlotBatch
from models.coldstart import adapt_users
from models.errors import EmptySlot, IncompatibleState, InvalidEvents
from models.meta import (
    LearnerConfig,
    LearnerState,
    QueryEvents,
    TimewiseMetaLearner,
    initial_meta,
    transfer,
)
from models.recommender import Candidates
from models.serving import ServingModel
from models.synthetic import StreamSpec, drifting_stream

SPEC = StreamSpec(n_slots=6, n_items=200, users_per_slot=80, events_per_user=6.0, seed=3)
CONFIG = LearnerConfig(
    slot_seconds=SPEC.slot_seconds, embedding_dim=16, epochs=3, batch_size=128, meta_events=512,
    cold_users=64, min_holdout_events=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def stream() -> list[SlotBatch]:
    return drifting_stream(SPEC)


def _run(config: LearnerConfig, slots: list[SlotBatch]) -> LearnerState:
    learner, state = TimewiseMetaLearner(config), None
    for slot in slots:
        state, _ = learner.step(state, slot)
    assert state is not None
    return state


def _query_recall(model: ServingModel, slot: SlotBatch, k: int = 20) -> float:
    """Recall@k on `slot` of the users the model can score (new users get its popularity)."""
    items = {item: row for row, item in enumerate(model.item_ids)}
    users = {user: row for row, user in enumerate(model.user_ids)}
    targets: dict[str, set[int]] = {}
    for user, item in zip(slot.user_ids, slot.item_ids, strict=True):
        targets.setdefault(user, set()).add(items.get(item, -1))
    names = list(targets)
    base = torch.tensor([users.get(u, -1) for u in names])
    empty = torch.zeros(len(names), 1, dtype=torch.long)
    vectors = adapt_users(model, empty, torch.zeros_like(empty, dtype=torch.bool), base)
    top = torch.topk(vectors @ model.item_matrix.T, k, dim=1).indices.numpy()
    recalls = [
        len(set(top[i].tolist()) & targets[u]) / len(targets[u]) for i, u in enumerate(names)
    ]
    return float(np.mean(recalls))


def test_meta_learner_beats_a_frozen_model_on_the_query_slot(stream: list[SlotBatch]) -> None:
    learner = TimewiseMetaLearner(CONFIG)
    state, _ = learner.step(None, stream[0])
    frozen = state.serving()
    for slot in stream[1:-1]:
        state, report = learner.step(state, slot)
        assert report.publish
    query = stream[-1]

    learned, stale = _query_recall(state.serving(), query), _query_recall(frozen, query)
    assert learned > stale + 0.05, (learned, stale)


def test_meta_update_lowers_the_query_loss(stream: list[SlotBatch]) -> None:
    learner, state = TimewiseMetaLearner(CONFIG), None
    reports = []
    for slot in stream:
        state, report = learner.step(state, slot)
        reports.append(report)
    later = reports[1:]
    assert all(r.metrics["query_nll_last"] < r.metrics["query_nll_first"] for r in later)
    assert all(r.choice in {"meta", "finetune", "previous"} for r in later)
    assert reports[0].choice == "first"


def test_transfer_starts_as_the_identity_on_the_candidate() -> None:
    meta = initial_meta(CONFIG, "cpu")
    old, candidate = torch.randn(5, 16), torch.randn(5, 16)
    counts = torch.tensor([1.0, 2.0, 0.0, 7.0, 3.0])
    for table in ("user", "item"):
        combined = transfer(
            old, candidate, counts,
            meta[f"keep_{table}"], meta[f"gate_{table}"], meta[f"gate_count_{table}"],
        )  # fmt: skip
        torch.testing.assert_close(combined, candidate)


def test_first_update_publishes_the_fitted_rows(stream: list[SlotBatch]) -> None:
    state, report = TimewiseMetaLearner(CONFIG).step(None, stream[0])
    assert report.publish and report.choice == "first"
    pending = state.pending
    torch.testing.assert_close(state.user_emb.values[pending["user_rows"]], pending["cand_users"])
    torch.testing.assert_close(state.item_emb.values[pending["item_rows"]], pending["cand_items"])


def _tiny_state() -> tuple[TimewiseMetaLearner, LearnerState]:
    """Two users, three items, d = 2, no recency: a case small enough to differentiate by hand."""
    config = LearnerConfig(slot_seconds=60.0, embedding_dim=2, use_recency=False, mask_seen=False)
    learner = TimewiseMetaLearner(config)
    state = LearnerState.empty(config, "cpu")
    state.users.extend(["a", "b"])
    state.items.extend(["x", "y", "z"])
    state.user_emb.append(torch.tensor([[0.5, -0.2], [0.1, 0.3]]))
    state.user_counts.append(torch.tensor([3.0, 1.0]))
    state.item_emb.append(torch.tensor([[0.3, 0.1], [-0.4, 0.6], [0.2, -0.5]]))
    state.item_bias.append(torch.tensor([0.1, -0.2, 0.05]))
    state.recency.grow(3)
    state.seen.grow(2)
    state.pending = {
        "user_rows": torch.tensor([0]),
        "old_users": torch.tensor([[0.2, 0.1]]),
        "cand_users": torch.tensor([[0.5, -0.2]]),
        "user_slot_counts": torch.tensor([2.0]),
        "item_rows": torch.tensor([1, 2]),
        "old_items": torch.tensor([[-0.1, 0.2], [0.4, -0.1]]),
        "cand_items": torch.tensor([[-0.4, 0.6], [0.2, -0.5]]),
        "old_bias": torch.tensor([0.0, 0.1]),
        "cand_bias": torch.tensor([-0.2, 0.05]),
        "item_slot_counts": torch.tensor([1.0, 4.0]),
    }
    return learner, state


def test_first_order_gradients_match_a_hand_built_reference() -> None:
    learner, state = _tiny_state()
    params = {k: v.clone().requires_grad_(True) for k, v in state.meta.items()}
    params["keep_user"].data.fill_(0.9)
    params["gate_item"].data.fill_(0.7)
    params["gate_count_item"].data.fill_(0.1)
    query = QueryEvents(
        users=torch.tensor([0]), items=torch.tensor([1]), is_new=torch.tensor([False]),
        seen=None, seen_index=torch.tensor([0]), weights=torch.tensor([1.0]),
    )  # fmt: skip
    candidates = Candidates(rows=None, correction=0.0, target=torch.tensor([1]))
    loss = learner.query_loss(state, params, query, candidates, torch.zeros(3, 0))
    loss.backward()

    # by hand: rows after the transfer, softmax, and d loss / d parameter = sum_j (p_j - y_j) ds_j
    p = {k: float(v.detach()) for k, v in params.items() if v.numel() == 1}
    pend = {k: v.numpy().astype(np.float64) for k, v in state.pending.items()}
    old_u, cand_u = pend["old_users"][0], pend["cand_users"][0]
    user = p["keep_user"] * old_u + (p["gate_user"] + p["gate_count_user"] * math.log1p(2)) * (
        cand_u - old_u
    )
    items = state.item_emb.values.numpy().astype(np.float64).copy()
    bias = state.item_bias.values.numpy().astype(np.float64).copy()
    item_scale = [p["gate_item"] + p["gate_count_item"] * math.log1p(n) for n in (1.0, 4.0)]
    bias_scale = [p["gate_bias"] + p["gate_count_bias"] * math.log1p(n) for n in (1.0, 4.0)]
    for k, row in enumerate((1, 2)):
        o, c = pend["old_items"][k], pend["cand_items"][k]
        items[row] = p["keep_item"] * o + item_scale[k] * (c - o)
        ob, cb = pend["old_bias"][k], pend["cand_bias"][k]
        bias[row] = p["keep_bias"] * ob + bias_scale[k] * (cb - ob)
    scores = items @ user + bias
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    residual = probs - np.array([0.0, 1.0, 0.0])  # d loss / d score

    expected = {
        "gate_user": residual @ (items @ (cand_u - old_u)),
        "keep_user": residual @ (items @ old_u),
        "keep_item": sum(
            residual[row] * user @ pend["old_items"][k] for k, row in enumerate((1, 2))
        ),
        "gate_item": sum(
            residual[row] * user @ (pend["cand_items"][k] - pend["old_items"][k])
            for k, row in enumerate((1, 2))
        ),
        "gate_bias": sum(
            residual[row] * (pend["cand_bias"][k] - pend["old_bias"][k])
            for k, row in enumerate((1, 2))
        ),
    }
    assert float(loss.detach()) == pytest.approx(-math.log(probs[1]), rel=1e-5)
    for name, value in expected.items():
        assert params[name].grad is not None
        assert float(params[name].grad) == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_state_survives_a_save_load_round_trip(stream: list[SlotBatch], tmp_path: Path) -> None:
    learner = TimewiseMetaLearner(CONFIG)
    state = _run(CONFIG, stream[:3])
    state.save(tmp_path)
    loaded = LearnerState.load(tmp_path, "cpu")

    assert loaded.users.ids == state.users.ids and loaded.items.ids == state.items.ids
    assert loaded.config == state.config and loaded.slots_seen == state.slots_seen
    for name in ("user_emb", "user_counts", "item_emb", "item_bias"):
        torch.testing.assert_close(getattr(loaded, name).values, getattr(state, name).values)
    torch.testing.assert_close(loaded.recency.counts, state.recency.counts)
    for group in ("meta", "meta_opt", "pending", "selection"):
        assert getattr(loaded, group).keys() == getattr(state, group).keys()

    # resuming from the checkpoint gives exactly the update the live state gives
    live, _ = learner.step(copy.deepcopy(state), stream[3])
    resumed, _ = learner.step(loaded, stream[3])
    torch.testing.assert_close(resumed.user_emb.values, live.user_emb.values)
    torch.testing.assert_close(resumed.serving().item_matrix, live.serving().item_matrix)


def test_serving_model_folds_recency_into_the_matrices(stream: list[SlotBatch]) -> None:
    state = _run(CONFIG, stream[:2])
    model = state.serving()
    d, r = CONFIG.embedding_dim, CONFIG.n_recency
    assert model.item_matrix.shape == (len(state.items), d + 1 + r)
    assert model.user_matrix.shape == (len(state.users), d + 1 + r)
    bias_weight = state.meta["bias_returning"].expand(len(state.users))
    torch.testing.assert_close(model.user_matrix[:, d], bias_weight)
    dot = state.meta["dot_returning"] * state.user_emb.values
    torch.testing.assert_close(model.user_matrix[:, :d], dot)
    torch.testing.assert_close(model.item_matrix[:, d], state.item_bias.values)
    no_event = model.adapt_params["no_event_init"]
    torch.testing.assert_close(model.popularity, model.item_matrix @ no_event)
    # users with no events get the learned vector or one recency column, whichever ranked best
    learned = torch.equal(no_event, model.adapt_params["user_init"])
    one_hot = bool((no_event[d + 1 :] == 1).sum() == 1 and (no_event != 0).sum() == 1)
    assert learned or one_hot


def _slot(values: list[float], users: list[str] | None = None) -> SlotBatch:
    n = len(values)
    return SlotBatch(
        user_ids=users or [f"u{i}" for i in range(n)],
        item_ids=[f"i{i}" for i in range(n)],
        ts_s=np.arange(n, dtype=np.float64),
        values=np.asarray(values, dtype=np.float32),
    )


def test_bad_slots_raise_named_errors_and_change_nothing(stream: list[SlotBatch]) -> None:
    learner = TimewiseMetaLearner(CONFIG)
    state = _run(CONFIG, stream[:1])
    n_users, n_items = len(state.users), len(state.items)

    with pytest.raises(EmptySlot):
        learner.step(state, _slot([]))
    with pytest.raises(EmptySlot):
        learner.step(state, _slot([0.0, -1.0]))  # nothing positive to learn from
    with pytest.raises(InvalidEvents) as error:
        learner.step(state, _slot([1.0, math.nan]))
    assert error.value.field == "values"
    bad_ts = replace(_slot([1.0, 1.0]), ts_s=np.array([0.0, math.inf]))
    with pytest.raises(InvalidEvents):
        learner.step(state, bad_ts)
    with pytest.raises(InvalidEvents):
        learner.step(state, replace(_slot([1.0, 1.0]), item_ids=["i0"]))
    assert (len(state.users), len(state.items)) == (n_users, n_items)


def test_a_state_from_another_configuration_is_refused(
    stream: list[SlotBatch], tmp_path: Path
) -> None:
    state = _run(CONFIG, stream[:1])
    other = TimewiseMetaLearner(replace(CONFIG, embedding_dim=8))
    with pytest.raises(IncompatibleState):
        other.step(state, stream[1])
    with pytest.raises(IncompatibleState):
        LearnerState.load(tmp_path / "missing")


def test_an_update_that_is_not_finite_is_not_published(
    stream: list[SlotBatch], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.meta

    state = _run(CONFIG, stream[:2])
    before = state.user_emb.values.clone()

    def diverged(*args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        users, items = args[1], args[2]
        assert isinstance(users, torch.Tensor) and isinstance(items, torch.Tensor)
        n_items = items.shape[0]
        nan = math.nan
        return (
            torch.full_like(users, nan),
            torch.full((n_items, users.shape[1]), nan),
            torch.full((n_items,), nan),
        )

    monkeypatch.setattr(models.meta, "fit_rows", diverged)
    state, report = TimewiseMetaLearner(CONFIG).step(state, stream[2])
    assert not report.publish
    assert (
        torch.isfinite(state.user_emb.values).all() and torch.isfinite(state.item_emb.values).all()
    )
    torch.testing.assert_close(state.user_emb.values[: before.shape[0]], before)


def test_replayed_past_events_join_the_fit(stream: list[SlotBatch]) -> None:
    config = replace(CONFIG, replay_ratio=1.0, replay_capacity=300)
    state = _run(config, stream[:3])
    assert len(state.reservoir) == 300
    state, _ = TimewiseMetaLearner(config).step(state, stream[3])
    slot_users = set(state.users.lookup(stream[3].user_ids).tolist())
    fitted_users = set(state.pending["user_rows"].tolist())
    assert fitted_users > slot_users  # rows of replayed users were refitted too
