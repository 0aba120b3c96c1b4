"""The methods a replay compares: metarec itself and the baselines, behind one small interface.

Each method scores users over the replay's item universe ([B, N] tensor, -inf for items it cannot
score). Personalised baselines that do not know a user fall back to recent popularity, as a
deployed system would; metarec answers such users with its own learned popularity.
"""

import math
from dataclasses import replace

import numpy as np
import torch

from models.batch import SlotBatch
from models.coldstart import adapt_users
from models.evaluation import Targets, decayed_counts, rank_metrics
from models.history import History
from models.meta import LearnerConfig, LearnerState, TimewiseMetaLearner
from models.serving import ServingModel

HALF_LIVES_SLOTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, math.inf)
ALS_REGULARIZATION = (0.01, 0.1, 1.0)
RECENT_EVENTS = 10  # the events a user vector is refreshed from, as the API does


class Method:
    name = "method"

    def __init__(self) -> None:
        self.chosen: dict[str, float] = {}

    def warmup(self, targets: Targets, history: History) -> None:
        """A warm-up slot to choose hyper-parameters on (never a test slot)."""

    def learn(self, slot: SlotBatch, history: History, is_test: bool) -> None:
        """Learn `slot`; `history` does not hold it yet."""

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        raise NotImplementedError


def _broadcast(counts: np.ndarray, n_users: int) -> torch.Tensor:
    return torch.from_numpy(counts).float().expand(n_users, -1).clone()


class RecentPopularity(Method):
    name = "recent_popularity"

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        return _broadcast(history.counts(-1), len(users))


class AllTimePopularity(Method):
    name = "alltime_popularity"

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        return _broadcast(
            decayed_counts(history.slot_counts, history.n_items, math.inf), len(users)
        )


class DecayedPopularity(Method):
    """Popularity decayed over slots; the half-life is the best one on the warm-up slots."""

    name = "decayed_popularity"

    def __init__(self) -> None:
        super().__init__()
        self._recall: dict[float, list[float]] = {h: [] for h in HALF_LIVES_SLOTS}

    def warmup(self, targets: Targets, history: History) -> None:
        if not targets.users:
            return
        for half_life, recalls in self._recall.items():
            counts = decayed_counts(history.slot_counts, history.n_items, half_life)
            recall, _ = rank_metrics(_broadcast(counts, len(targets.users)), targets)
            recalls.append(float(recall.mean()))

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        if "half_life_slots" not in self.chosen:
            means = {h: float(np.mean(r)) if r else 0.0 for h, r in self._recall.items()}
            best = max(means, key=lambda h: means[h]) if any(means.values()) else 2.0
            self.chosen["half_life_slots"] = best
        counts = decayed_counts(
            history.slot_counts, history.n_items, self.chosen["half_life_slots"]
        )
        return _broadcast(counts, len(users))


def _model_scores(model: ServingModel, vectors: torch.Tensor, history: History) -> torch.Tensor:
    """Scores [B, N_universe] of user vectors under a served model."""
    columns = torch.from_numpy(history.items.lookup(model.item_ids))
    scores = torch.full((vectors.shape[0], history.n_items), -math.inf)
    known = columns >= 0
    scores[:, columns[known]] = (vectors @ model.item_matrix.T).float().cpu()[:, known]
    return scores


def _with_fallback(model: ServingModel, users: list[str], history: History) -> torch.Tensor:
    """A known user's own row; recent popularity for a user the model does not know."""
    scores = RecentPopularity().scores(users, history)
    rows = {user: row for row, user in enumerate(model.user_ids)}
    known = [i for i, user in enumerate(users) if user in rows]
    if known:
        vectors = model.user_matrix[[rows[users[i]] for i in known]]
        scores[known] = _model_scores(model, vectors, history)
    return scores


class MetarecMethod(Method):
    """The time-wise meta-learner, driven exactly as the worker and the API drive it."""

    name = "metarec"

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        self.learner = TimewiseMetaLearner(config)
        self.state: LearnerState | None = None
        self.served: ServingModel | None = None
        self.choices: list[str] = []
        self.update_ms: list[float] = []

    def learn(self, slot: SlotBatch, history: History, is_test: bool) -> None:
        self.state, report = self.learner.step(self.state, slot)
        if report.publish or self.served is None:
            self.served = self.state.serving()
        self.choices.append(report.choice if report.publish else "rejected")
        self.update_ms.append(report.metrics["update_ms"])

    def vectors(self, model: ServingModel, users: list[str], history: History) -> torch.Tensor:
        """User vectors as the API computes them: refreshed from the user's recent events."""
        rows = {user: row for row, user in enumerate(model.user_ids)}
        item_rows = {item: row for row, item in enumerate(model.item_ids)}
        events = [
            [item_rows[i] for i in history.user_recent.get(user, []) if i in item_rows][
                -RECENT_EVENTS:
            ]
            for user in users
        ]
        return adapt_users(model, *_padded(events), torch.tensor([rows.get(u, -1) for u in users]))

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        assert self.served is not None
        return _model_scores(self.served, self.vectors(self.served, users, history), history)

    def cold_track(
        self, slot: SlotBatch, history: History, ks: list[int]
    ) -> dict[int, dict[str, float]]:
        """Users whose first event falls in `slot`: adapt from their first k events there and
        rank the rest, against recent popularity and the mean of the support items' embeddings."""
        assert self.served is not None
        model = self.served
        first_events: dict[str, list[str]] = {}
        for user, item in zip(slot.user_ids, slot.item_ids, strict=True):
            if not history.knows_user(user) and item not in first_events.setdefault(user, []):
                first_events[user].append(item)
        item_rows = {item: row for row, item in enumerate(model.item_ids)}

        results: dict[int, dict[str, float]] = {}
        for k in ks:
            users = [u for u, items in first_events.items() if len(items) > k]
            if not users:
                continue
            support = [first_events[u][:k] for u in users]
            targets = _support_targets(
                users, support, [first_events[u][k:] for u in users], history
            )
            rows = [[item_rows[i] for i in s if i in item_rows] for s in support]
            adapted = adapt_users(model, *_padded(rows), torch.full((len(users),), -1))
            mean_vectors = _mean_embedding_vectors(model, rows)

            results[k] = {}
            for name, scores in (
                ("metarec", _model_scores(model, adapted, history)),
                ("recent_popularity", RecentPopularity().scores(users, history)),
                ("mean_item_embedding", _model_scores(model, mean_vectors, history)),
            ):
                recall, ndcg = rank_metrics(scores, targets)
                results[k][name] = float(recall.mean())
                results[k][f"{name}_ndcg"] = float(ndcg.mean())
        return results


def _padded(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(values) for values in lists] + [1])
    rows = torch.zeros(len(lists), width, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for index, values in enumerate(lists):
        rows[index, : len(values)] = torch.tensor(values, dtype=torch.long)
        mask[index, : len(values)] = True
    return rows, mask


def _mean_embedding_vectors(model: ServingModel, rows: list[list[int]]) -> torch.Tensor:
    """The learned new-user vector with its taste part replaced by the mean support embedding."""
    d = model.embedding_dim
    vectors = model.adapt_params["user_init"].expand(len(rows), -1).clone()
    for index, support in enumerate(rows):
        if support:
            vectors[index, :d] = model.item_matrix[support, :d].mean(0)
    return vectors


def _support_targets(
    users: list[str], support: list[list[str]], query: list[list[str]], history: History
) -> Targets:
    def columns(items: list[str]) -> np.ndarray:
        found = history.items.lookup(items)
        return np.asarray(sorted(found[found >= 0]), dtype=np.int64)

    return Targets(
        users=users,
        columns=[columns(q) for q in query],
        sizes=np.asarray([len(q) for q in query], dtype=np.int64),
        seen=[columns(s) for s in support],
    )


class FineTuneOnly(Method):
    """The same embeddings and loss, fine-tuned on each slot; no recency, no meta-learning."""

    name = "finetune_only"

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        plain = replace(config, use_meta=False, use_recency=False, use_guardrail=False)
        self.learner = TimewiseMetaLearner(plain)
        self.state: LearnerState | None = None

    def learn(self, slot: SlotBatch, history: History, is_test: bool) -> None:
        self.state, _ = self.learner.step(self.state, slot)

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        assert self.state is not None
        return _with_fallback(self.state.serving(), users, history)


class FullRetrain(Method):
    """The same embeddings and loss, trained from scratch on everything before the slot."""

    name = "full_retrain"

    def __init__(
        self, config: LearnerConfig, epochs: int = 5, batch_size: int = 1024, negatives: int = 512
    ) -> None:
        super().__init__()
        # a sampled softmax keeps a from-scratch fit on the whole history affordable per slot
        self.config = replace(
            config, use_meta=False, use_recency=False, use_guardrail=False, epochs=epochs,
            batch_size=batch_size, full_softmax_items=0, negatives=negatives,
        )  # fmt: skip

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        state, _ = TimewiseMetaLearner(self.config).step(None, history.all_events())
        return _with_fallback(state.serving(), users, history)


class ImplicitALS(Method):
    """`implicit`'s alternating least squares, refitted on everything before the slot; its
    regularisation is the best one on the warm-up slots."""

    name = "implicit_als"

    def __init__(self, seed: int, factors: int = 64, iterations: int = 15) -> None:
        super().__init__()
        self.seed, self.factors, self.iterations = seed, factors, iterations
        self._recall: dict[float, list[float]] = {r: [] for r in ALS_REGULARIZATION}

    def _fit_scores(
        self, users: list[str], history: History, regularization: float
    ) -> torch.Tensor:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        matrix, user_rows = history.user_item_matrix()
        # one thread for implicit and none extra for BLAS under it: the cores are shared
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=regularization, iterations=self.iterations,
                random_state=self.seed, num_threads=1,
            )  # fmt: skip
            model.fit(matrix, show_progress=False)
        scores = RecentPopularity().scores(users, history)
        known = [i for i, user in enumerate(users) if user in user_rows]
        if known:
            user_factors = model.user_factors[[user_rows[users[i]] for i in known]]
            scores[known] = torch.from_numpy(user_factors @ model.item_factors.T).float()
        return scores

    def warmup(self, targets: Targets, history: History) -> None:
        if not targets.users or len(history.slot_counts) < 2:
            return
        for regularization, recalls in self._recall.items():
            recall, _ = rank_metrics(
                self._fit_scores(targets.users, history, regularization), targets
            )
            recalls.append(float(recall.mean()))

    def scores(self, users: list[str], history: History) -> torch.Tensor:
        if "regularization" not in self.chosen:
            means = {r: float(np.mean(v)) if v else 0.0 for r, v in self._recall.items()}
            self.chosen["regularization"] = max(means, key=lambda r: means[r])
        return self._fit_scores(users, history, self.chosen["regularization"])
