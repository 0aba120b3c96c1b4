"""The time-wise meta-learner: from the serving model and a closed slot to the next serving model.

One `step` on slot t (support) does, in order:

0. selection: the vectors that could answer users with no events (the learned new-user vector and
   each recency column alone), as served, are ranked on slot t's new users; the running best by
   NDCG@20 is what the next model serves them (`models.selection`).
1. meta-update: slot t is the query of the update made on slot t-1. The transfer that combined the
   old rows with slot t-1's candidate, the recency weights of new and returning users, and the
   cold-start parameters (user initialisation, per-dimension step sizes) take first-order gradient
   steps on slot t's softmax loss. This is where the learner learns how far to trust the past.
2. candidate: the rows slot t touches are fitted on the slot, starting from the serving model,
   with the item recency term as a fixed offset (the embeddings learn what recency misses).
3. transfer: new rows = keep * old + (gate + gate_count * log1p(n)) * (candidate - old), with n the
   row's events in the slot; it starts as the identity on the candidate.
4. guardrail: on the time tail of the slot (held out of the candidate's first epochs), the
   transferred rows, plain fine-tuning (the candidate) and the previous rows are compared by
   softmax loss (seen items masked, users weighted alike, all three with the recency that was
   being served); the better update is kept unless it is clearly worse than the previous rows
   (by `guardrail_z` standard errors), in which case known ids keep their old rows ("previous";
   new ids still get theirs). An update
   whose rows are not finite is never published: its rows fall back to the previous ones.
5. commit: tables grow for new ids, the chosen rows are written back, recency counts advance, and
   (old, candidate) rows are kept as `pending` for step 1 of the next slot.

Everything between slots lives in `LearnerState` and is saved with safetensors + json.
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.batch import SlotBatch
from models.coldstart import local_update
from models.errors import IncompatibleState
from models.recency import RecencyCounts
from models.recommender import (
    Candidates,
    Catalogue,
    FitConfig,
    SeenCsr,
    fit_rows,
    sample_candidates,
    seen_mask,
    softmax_nll,
)
from models.selection import best_candidate, empty_stats, fold, slot_metrics
from models.serving import ServingModel
from models.tables import IdIndex, Reservoir, RowTable, SeenItems

STATE_TENSORS = "learner.safetensors"
STATE_META = "learner.json"
STATE_FORMAT = 1
ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class LearnerConfig:
    slot_seconds: float = 3600.0
    embedding_dim: int = 64
    half_lives_slots: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    use_recency: bool = True
    use_meta: bool = True
    use_guardrail: bool = True
    seed: int = 0
    # candidate fit on the support slot
    epochs: int = 3
    batch_size: int = 512
    lr: float = 0.02
    l2: float = 1e-3
    init_scale: float = 0.1
    full_softmax_items: int = 2048
    negatives: int = 1024
    # meta-update on the query slot
    meta_lr: float = 0.02
    meta_steps: int = 10
    meta_events: int = 1024
    # cold start (Meta-SGD)
    cold_users: int = 128
    cold_max_support: int = 10
    cold_max_query: int = 20
    cold_weight: float = 1.0
    adapt_steps: int = 3
    inner_lr: float = 0.5
    support_scale_init: float = 1.0  # start at the mean of the support items' embeddings
    warm_prior_events: float = 20.0
    adapt_max_items: int = 2048  # beyond this, local steps normalise over the most popular
    # what users touched before is masked in every softmax, as serving masks it
    mask_seen: bool = True
    seen_per_user: int = 1000
    # past events replayed beside each slot (per slot event), from a uniform reservoir
    replay_ratio: float = 0.0
    replay_capacity: int = 50_000
    # guardrail
    holdout_share: float = 0.15
    min_holdout_events: int = 20
    guardrail_tolerance: float = 0.0
    guardrail_z: float = 2.0
    # users with no events: the running best of the learned vector and each recency column
    select_no_event: bool = True
    select_decay: float = 0.9

    @property
    def fit(self) -> FitConfig:
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            l2=self.l2,
            full_softmax_items=self.full_softmax_items,
            negatives=self.negatives,
        )

    @property
    def n_recency(self) -> int:
        return len(self.half_lives_slots) + 2 if self.use_recency else 0

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "LearnerConfig":
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "half_lives_slots" in values:
            values["half_lives_slots"] = tuple(values["half_lives_slots"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UpdateReport:
    metrics: dict[str, float]
    publish: bool
    choice: str  # "meta", "finetune", "previous" (update rejected for known ids) or "first"


def initial_meta(config: LearnerConfig, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Meta-parameters at the start: the transfer is the identity on the candidate."""
    d, r = config.embedding_dim, max(config.n_recency, 1)
    zeros = torch.zeros(d, device=device)
    one, zero = torch.ones(1, device=device), torch.zeros(1, device=device)
    # one scalar per table: embedding dimensions are interchangeable, so per-dimension transfer
    # parameters would only fit noise
    return {
        "keep_user": one.clone(), "gate_user": one.clone(), "gate_count_user": zero.clone(),
        "keep_item": one.clone(), "gate_item": one.clone(), "gate_count_item": zero.clone(),
        "keep_bias": one.clone(), "gate_bias": one.clone(), "gate_count_bias": zero.clone(),
        # how new and returning users weigh the item bias and (returning) their embedding
        "bias_new": one.clone(), "bias_returning": one.clone(), "dot_returning": one.clone(),
        "w_new": torch.full((r,), 1.0 / r, device=device),
        "w_returning": torch.full((r,), 1.0 / r, device=device),
        "user_init": zeros.clone(),
        "log_step": torch.full((d,), math.log(config.inner_lr), device=device),
        "support_scale": torch.full((d,), config.support_scale_init, device=device),
    }  # fmt: skip


def transfer(
    old: torch.Tensor, candidate: torch.Tensor, slot_counts: torch.Tensor,
    keep: torch.Tensor, gate: torch.Tensor, gate_count: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """keep * old + (gate + gate_count * log1p(n)) * (candidate - old), row-wise."""
    scale = gate + gate_count * torch.log1p(slot_counts).unsqueeze(-1)  # [T, d]
    return keep * old + scale * (candidate - old)


@dataclass
class LearnerState:
    config: LearnerConfig
    users: IdIndex
    items: IdIndex
    user_emb: RowTable  # [U, d]
    user_counts: RowTable  # [U] events each user was trained on
    item_emb: RowTable  # [N, d]
    item_bias: RowTable  # [N]
    recency: RecencyCounts  # [N, 2 + H]
    seen: SeenItems  # per user row, the items touched before
    reservoir: Reservoir  # a uniform sample of past events
    meta: dict[str, torch.Tensor]
    meta_opt: dict[str, torch.Tensor]  # Adam moments of the meta-parameters and "step"
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    slots_seen: int = 0
    # running ranking scores of the no-event candidates (models.selection)
    selection: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, config: LearnerConfig, device: str | torch.device) -> "LearnerState":
        d = config.embedding_dim
        meta = initial_meta(config, device)
        half_lives_s = [h * config.slot_seconds for h in config.half_lives_slots]
        return cls(
            config=config,
            users=IdIndex(),
            items=IdIndex(),
            user_emb=RowTable(torch.zeros(0, d, device=device)),
            user_counts=RowTable(torch.zeros(0, device=device)),
            item_emb=RowTable(torch.zeros(0, d, device=device)),
            item_bias=RowTable(torch.zeros(0, device=device)),
            recency=RecencyCounts(half_lives_s, device=device),
            seen=SeenItems(config.seen_per_user),
            reservoir=Reservoir(
                config.replay_capacity,
                torch.zeros(0, dtype=torch.long, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
            ),
            meta=meta,
            meta_opt=_adam_init(meta),
        )

    @property
    def device(self) -> torch.device:
        return self.item_emb.values.device

    def recency_features(self) -> torch.Tensor:
        n_items = len(self.items)
        if not self.config.use_recency:
            return torch.zeros(n_items, 0, device=self.device)
        return self.recency.features()  # [N, R]

    def serving(self) -> ServingModel:
        """The published form: item_matrix = [v | b | f], user rows = [u | 1 | w_returning]."""
        d, n_users = self.config.embedding_dim, len(self.users)
        features = self.recency_features()
        r = int(features.shape[1])
        w_new, w_returning = self.meta["w_new"][:r], self.meta["w_returning"][:r]

        item_matrix = torch.cat(
            [self.item_emb.values, self.item_bias.values.unsqueeze(1), features], dim=1
        )
        meta = self.meta
        user_matrix = torch.cat(
            [
                meta["dot_returning"] * self.user_emb.values,
                meta["bias_returning"].expand(n_users, 1),
                w_returning.expand(n_users, r),
            ],
            dim=1,
        )
        user_init = torch.cat([meta["user_init"], meta["bias_new"], w_new])
        tail = torch.zeros(1 + r, device=self.device)
        step_size = torch.cat([self.meta["log_step"].exp(), tail])
        support_scale = torch.cat([self.meta["support_scale"], tail])
        learned = (item_matrix @ user_init).detach()
        n_candidates = min(self.config.adapt_max_items, learned.shape[0])
        candidate_rows = torch.topk(learned, n_candidates).indices
        no_event = self.no_event_vector(user_init)
        popularity = (item_matrix @ no_event).detach()
        return ServingModel(
            item_ids=list(self.items.ids),
            user_ids=list(self.users.ids),
            item_matrix=item_matrix.detach().clone(),
            user_matrix=user_matrix.detach().clone(),
            user_counts=self.user_counts.values.detach().clone(),
            popularity=popularity,
            embedding_dim=d,
            adapt_params={
                "user_init": user_init.detach().clone(),
                "step_size": step_size.detach().clone(),
                "adapt_steps": torch.tensor(float(self.config.adapt_steps)),
                "warm_prior_events": torch.tensor(self.config.warm_prior_events),
                "candidate_rows": candidate_rows,
                "support_scale": support_scale.detach().clone(),
                "no_event_init": no_event.detach().clone(),
            },
            meta={
                "slots_seen": self.slots_seen,
                "no_event_source": self.no_event_source(),
                "clock_ts_s": self.recency.clock_ts_s,
                "recency_columns": _recency_columns(self.config),
            },
        )

    def no_event_vector(self, user_init: torch.Tensor) -> torch.Tensor:
        """The served vector of a user with no events: `user_init`, or one recency column."""
        best = best_candidate(self.selection)
        if best == 0:
            return user_init
        vector = torch.zeros_like(user_init)
        vector[self.config.embedding_dim + best] = 1.0  # after [embedding | bias]
        return vector

    def no_event_source(self) -> str:
        best = best_candidate(self.selection)
        return "learned" if best == 0 else _recency_columns(self.config)[best - 1]

    def no_event_candidates(self, n_items: int) -> torch.Tensor:
        """[n_items, 1 + R] scores of the first items: the learned vector's, each recency
        column's."""
        features = self.recency_features()[:n_items]
        r = int(features.shape[1])
        meta = self.meta
        learned = (
            self.item_emb.values[:n_items] @ meta["user_init"]
            + meta["bias_new"] * self.item_bias.values[:n_items]
            + features @ meta["w_new"][:r]
        )
        return torch.cat([learned.unsqueeze(1), features], dim=1)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "user_emb": self.user_emb.values,
            "user_counts": self.user_counts.values,
            "item_emb": self.item_emb.values,
            "item_bias": self.item_bias.values,
            "recency": self.recency.counts,
        }
        for prefix, group in (
            ("meta.", self.meta),
            ("opt.", self.meta_opt),
            ("pending.", self.pending),
            ("select.", self.selection),
        ):
            tensors.update({prefix + name: value for name, value in group.items()})
        seen_indptr, seen_items = self.seen.to_arrays()
        tensors["seen_indptr"] = torch.from_numpy(seen_indptr)
        tensors["seen_items"] = torch.from_numpy(seen_items)
        tensors["reservoir_users"] = self.reservoir.users
        tensors["reservoir_items"] = self.reservoir.items
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        header = {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "user_ids": self.users.ids,
            "item_ids": self.items.ids,
            "clock_ts_s": self.recency.clock_ts_s,
            "slots_seen": self.slots_seen,
            "reservoir_offered": self.reservoir.offered,
        }
        save_file(tensors, str(directory / STATE_TENSORS))
        (directory / STATE_META).write_text(json.dumps(header))

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> "LearnerState":
        from safetensors.torch import load_file

        if not (directory / STATE_META).exists() or not (directory / STATE_TENSORS).exists():
            raise IncompatibleState(f"no learner state in {directory}", field="directory")
        header = json.loads((directory / STATE_META).read_text())
        if header.get("format") != STATE_FORMAT:
            raise IncompatibleState(f"state format {header.get('format')!r}", field="format")
        tensors = load_file(str(directory / STATE_TENSORS), device=str(device))
        config = LearnerConfig.from_json(header["config"])

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        state = cls(
            config=config,
            users=IdIndex(header["user_ids"]),
            items=IdIndex(header["item_ids"]),
            user_emb=RowTable(tensors["user_emb"]),
            user_counts=RowTable(tensors["user_counts"]),
            item_emb=RowTable(tensors["item_emb"]),
            item_bias=RowTable(tensors["item_bias"]),
            recency=RecencyCounts(
                [h * config.slot_seconds for h in config.half_lives_slots],
                counts=tensors["recency"],
                clock_ts_s=header["clock_ts_s"],
            ),
            seen=SeenItems.from_arrays(
                config.seen_per_user,
                tensors["seen_indptr"].cpu().numpy(),
                tensors["seen_items"].cpu().numpy(),
            ),
            reservoir=Reservoir(
                config.replay_capacity,
                tensors["reservoir_users"],
                tensors["reservoir_items"],
                int(header["reservoir_offered"]),
            ),
            meta=group("meta."),
            meta_opt=group("opt."),
            pending=group("pending."),
            slots_seen=int(header["slots_seen"]),
            selection=group("select."),
        )
        state.check()
        return state

    def check(self) -> None:
        """Raise IncompatibleState unless the tables agree with each other."""
        n_users, n_items = len(self.users), len(self.items)
        sizes = {
            "user_emb": (len(self.user_emb), n_users),
            "user_counts": (len(self.user_counts), n_users),
            "item_emb": (len(self.item_emb), n_items),
            "item_bias": (len(self.item_bias), n_items),
            "recency": (int(self.recency.counts.shape[0]), n_items),
            "seen": (len(self.seen), n_users),
        }
        for name, (got, want) in sizes.items():
            if got != want:
                raise IncompatibleState(f"{name} has {got} rows, the ids say {want}", field=name)
        missing = set(initial_meta(self.config, "cpu")) - set(self.meta)
        if missing:
            raise IncompatibleState(f"meta-parameters missing: {sorted(missing)}", field="meta")


def _recency_columns(config: LearnerConfig) -> list[str]:
    if not config.use_recency:
        return []
    decays = [f"decay_{h:g}_slots" for h in config.half_lives_slots]
    return ["newest_slot", *decays, "all_time"]


def _adam_init(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {f"m.{name}": torch.zeros_like(p) for name, p in params.items()}
    state.update({f"v.{name}": torch.zeros_like(p) for name, p in params.items()})
    device = next(iter(params.values())).device
    state["step"] = torch.zeros((), device=device)
    return state


def _adam_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    opt: dict[str, torch.Tensor],
    lr: float,
) -> None:
    """One Adam step, in place, with its moments kept in `opt` (so they can be saved)."""
    beta1, beta2 = ADAM_BETAS
    opt["step"] += 1
    step = float(opt["step"])
    for name, grad in grads.items():
        m, v = opt[f"m.{name}"], opt[f"v.{name}"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1**step)
        v_hat = v / (1 - beta2**step)
        params[name].sub_(lr * m_hat / (v_hat.sqrt() + 1e-8))


@dataclass(frozen=True)
class SlotRows:
    """A slot's positive events mapped to rows; new ids get rows after the existing ones."""

    user_rows: torch.Tensor  # [E]
    item_rows: torch.Tensor  # [E]
    ts_s: torch.Tensor  # [E] float64, sorted
    new_user_ids: list[str]
    new_item_ids: list[str]
    n_users_before: int
    n_items_before: int

    @property
    def n_events(self) -> int:
        return int(self.user_rows.shape[0])


def map_rows(state: LearnerState, slot: SlotBatch) -> SlotRows:
    """Rows of a validated slot's positive events, in time order; the state is not changed."""
    slot = slot.sorted_by_time()
    positive = np.asarray(slot.values) > 0
    user_ids = [key for key, keep in zip(slot.user_ids, positive, strict=True) if keep]
    item_ids = [key for key, keep in zip(slot.item_ids, positive, strict=True) if keep]

    user_rows, new_users = state.users.plan(user_ids)
    item_rows, new_items = state.items.plan(item_ids)
    device = state.device
    return SlotRows(
        user_rows=torch.from_numpy(user_rows).to(device),
        item_rows=torch.from_numpy(item_rows).to(device),
        ts_s=torch.from_numpy(np.asarray(slot.ts_s, dtype=np.float64)[positive]).to(device),
        new_user_ids=new_users,
        new_item_ids=new_items,
        n_users_before=len(state.users),
        n_items_before=len(state.items),
    )


def _with_rows(
    table: torch.Tensor, wanted: torch.Tensor, replaced_rows: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """table[wanted], except that rows listed in `replaced_rows` (sorted) come from `values`."""
    if replaced_rows.numel() == 0:
        return table[wanted]
    position = torch.searchsorted(replaced_rows, wanted).clamp(max=replaced_rows.shape[0] - 1)
    hit = (replaced_rows[position] == wanted).view(-1, *([1] * (table.dim() - 1)))
    return torch.where(hit, values[position], table[wanted])


@dataclass(frozen=True)
class QueryEvents:
    """A slot's events on known items, scored by the model the previous update produced."""

    users: torch.Tensor  # [B] user rows
    items: torch.Tensor  # [B] item rows
    is_new: torch.Tensor  # [B] the user was not known before the slot
    seen: SeenCsr | None  # over the distinct users
    seen_index: torch.Tensor  # [B] index of each event's user in `seen`
    weights: torch.Tensor  # [B] 1 / (the user's events), so every user counts alike


@dataclass(frozen=True)
class ColdEpisodes:
    """New users of a slot split in time: the first k events support, the next ones query."""

    support: torch.Tensor  # [B, K] item rows
    support_mask: torch.Tensor  # [B, K]
    query: torch.Tensor  # [B, Q] item rows
    query_mask: torch.Tensor  # [B, Q]


def cold_episodes(
    rows: SlotRows, max_users: int, max_support: int, max_query: int, generator: torch.Generator
) -> ColdEpisodes | None:
    """Episodes from the slot's new users that have two or more events on known items."""
    known = rows.item_rows < rows.n_items_before
    is_new = rows.user_rows >= rows.n_users_before
    users = rows.user_rows[known & is_new].cpu().numpy()
    items = rows.item_rows[known & is_new].cpu().numpy()
    by_user: dict[int, list[int]] = {}
    for user, item in zip(users.tolist(), items.tolist(), strict=True):
        by_user.setdefault(user, []).append(item)
    eligible = [events for events in by_user.values() if len(events) >= 2]
    if not eligible:
        return None

    # a random subset of users, each with a random support size
    order = torch.randperm(len(eligible), generator=generator)[:max_users].tolist()
    splits = []
    for index in order:
        events = eligible[index]
        k = 1 + int(torch.randint(min(max_support, len(events) - 1), (1,), generator=generator))
        splits.append((events[:k], events[k : k + max_query]))
    support, support_mask = _pad([s for s, _ in splits], rows.item_rows.device)
    query, query_mask = _pad([q for _, q in splits], rows.item_rows.device)
    return ColdEpisodes(support, support_mask, query, query_mask)


def _pad(lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(values) for values in lists)
    padded = torch.zeros(len(lists), width, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for row, values in enumerate(lists):
        padded[row, : len(values)] = torch.tensor(values, dtype=torch.long)
        mask[row, : len(values)] = True
    return padded.to(device), mask.to(device)


class TimewiseMetaLearner:
    """Turns a closed slot into the next learner state; holds nothing between slots itself."""

    def __init__(self, config: LearnerConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or LearnerConfig()
        self.device = torch.device(device)

    def new_state(self) -> LearnerState:
        return LearnerState.empty(self.config, self.device)

    def step(
        self, state: LearnerState | None, slot: SlotBatch
    ) -> tuple[LearnerState, UpdateReport]:
        """Learn from `slot`; raises EmptySlot / InvalidEvents before changing anything."""
        started_s = time.perf_counter()
        slot.validate()
        state = self._adopt(state)
        rows = map_rows(state, slot)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + state.slots_seen)

        # new ids get rows now; any failure below takes them back out
        self._grow(state, rows, generator)
        try:
            report = self._update(state, rows, generator, len(slot))
        except BaseException:
            self._shrink(state, rows.n_users_before, rows.n_items_before)
            raise
        report.metrics["update_ms"] = (time.perf_counter() - started_s) * 1000.0
        return state, report

    def _adopt(self, state: LearnerState | None) -> LearnerState:
        if state is None:
            return self.new_state()
        for name in ("embedding_dim", "half_lives_slots", "use_recency", "slot_seconds"):
            if getattr(state.config, name) != getattr(self.config, name):
                raise IncompatibleState(
                    f"the state was built with {name}={getattr(state.config, name)!r}, "
                    f"the learner has {getattr(self.config, name)!r}",
                    field=name,
                )
        if state.device.type != self.device.type:
            raise IncompatibleState(f"the state lives on {state.device}", field="device")
        state.config = self.config
        return state

    def _grow(self, state: LearnerState, rows: SlotRows, generator: torch.Generator) -> None:
        d, scale = (
            self.config.embedding_dim,
            self.config.init_scale / math.sqrt(self.config.embedding_dim),
        )
        n_users, n_items = len(rows.new_user_ids), len(rows.new_item_ids)
        user_noise = torch.randn(n_users, d, generator=generator).to(self.device) * scale
        item_noise = torch.randn(n_items, d, generator=generator).to(self.device) * scale

        state.users.extend(rows.new_user_ids)
        state.user_emb.append(state.meta["user_init"].detach() + user_noise)
        state.user_counts.append(torch.zeros(n_users, device=self.device))
        state.items.extend(rows.new_item_ids)
        state.item_emb.append(item_noise)
        state.item_bias.append(torch.zeros(n_items, device=self.device))
        state.recency.grow(len(state.items))
        state.seen.grow(len(state.users))

    def _shrink(self, state: LearnerState, n_users: int, n_items: int) -> None:
        state.users.truncate(n_users)
        state.user_emb.truncate(n_users)
        state.user_counts.truncate(n_users)
        state.items.truncate(n_items)
        state.item_emb.truncate(n_items)
        state.item_bias.truncate(n_items)
        state.recency.table.truncate(n_items)
        state.seen.truncate(n_users)

    def _update(
        self, state: LearnerState, rows: SlotRows, generator: torch.Generator, n_raw: int
    ) -> UpdateReport:
        config = self.config
        metrics: dict[str, float] = {
            "events": float(n_raw),
            "positive_events": float(rows.n_events),
            "new_users": float(len(rows.new_user_ids)),
            "new_items": float(len(rows.new_item_ids)),
        }
        meta = {name: value.detach().clone() for name, value in state.meta.items()}
        opt = {name: value.detach().clone() for name, value in state.meta_opt.items()}

        # 0. the no-event candidates, as they were served, ranked on the slot's new users
        selection = self._select_no_event(state, rows, metrics)

        # 1. this slot is the query of the previous update: meta-parameters learn from it
        started_s = time.perf_counter()
        if config.use_meta and state.slots_seen > 0:
            metrics.update(self._meta_update(state, rows, meta, opt, generator))
        metrics["meta_ms"] = (time.perf_counter() - started_s) * 1000.0

        # 2. the candidate: the touched rows fitted on the slot (and a replay of past events),
        # starting from the serving model
        started_s = time.perf_counter()
        n_replay = round(config.replay_ratio * rows.n_events)
        replay_users, replay_items = state.reservoir.sample(n_replay, generator)
        all_users = torch.cat([rows.user_rows, replay_users])
        all_items = torch.cat([rows.item_rows, replay_items])
        touched_users, all_event_user = torch.unique(all_users, return_inverse=True)
        touched_items, all_event_item = torch.unique(all_items, return_inverse=True)
        event_user, event_item = all_event_user[: rows.n_events], all_event_item[: rows.n_events]
        replayed = (all_event_user[rows.n_events :], all_event_item[rows.n_events :])
        old = (
            state.user_emb.values[touched_users].clone(),
            state.item_emb.values[touched_items].clone(),
            state.item_bias.values[touched_items].clone(),
        )
        offset = self._offsets(state.recency_features(), meta)[1]
        catalogue = Catalogue(
            state.item_emb.values, state.item_bias.values, offset,
            dot_scale=meta["dot_returning"].item(), bias_scale=meta["bias_returning"].item(),
        )  # fmt: skip
        split = self._holdout_start(state, rows)
        seen = self._seen_csr(state, touched_users)
        choice, publish = ("meta" if config.use_meta else "finetune"), True
        if state.slots_seen == 0:
            choice = "first"

        if split < rows.n_events:
            # 3. guardrail: fit without the time tail, compare on it, then learn the tail too
            first_epochs = max(1, config.epochs - 1)
            candidate = fit_rows(
                catalogue, old[0], touched_items,
                torch.cat([event_user[:split], replayed[0]]),
                torch.cat([event_item[:split], replayed[1]]),
                config.fit, generator, epochs=first_epochs, seen=seen,
            )  # fmt: skip
            guard, choice = self._guardrail(
                state, rows, split, meta, (touched_users, touched_items),
                (event_user, event_item), old, candidate, generator,
            )  # fmt: skip
            metrics.update(guard)
            candidate = fit_rows(
                catalogue, candidate[0], touched_items, all_event_user, all_event_item,
                config.fit, generator, epochs=1, item_start=(candidate[1], candidate[2]),
                seen=seen,
            )  # fmt: skip
        else:
            candidate = fit_rows(
                catalogue, old[0], touched_items, all_event_user, all_event_item, config.fit,
                generator, seen=seen,
            )  # fmt: skip
        metrics["fit_ms"] = (time.perf_counter() - started_s) * 1000.0

        # 4. the transfer combines old and candidate rows; commit the chosen ones
        counts = (
            torch.bincount(event_user, minlength=touched_users.shape[0]).to(old[0].dtype),
            torch.bincount(event_item, minlength=touched_items.shape[0]).to(old[0].dtype),
        )
        chosen = self._combine(old, candidate, counts, meta, use_transfer=choice != "finetune")
        if choice == "previous":
            chosen = self._keep_existing(old, chosen, touched_users, touched_items, rows)
        if not all(bool(torch.isfinite(part).all()) for part in chosen):
            chosen, publish = old, False
        self._commit(state, rows, (touched_users, touched_items), old, candidate, chosen, counts)
        state.reservoir.offer(rows.user_rows, rows.item_rows, generator)
        state.meta, state.meta_opt, state.selection = meta, opt, selection
        metrics["published"] = float(publish)
        return UpdateReport(metrics=metrics, publish=publish, choice=choice)

    def _select_no_event(
        self, state: LearnerState, rows: SlotRows, metrics: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """The running scores after this slot's new users (unchanged when there are none)."""
        config = self.config
        if not config.select_no_event or state.slots_seen == 0 or rows.n_items_before == 0:
            return state.selection
        is_new = rows.user_rows >= rows.n_users_before
        if not bool(is_new.any()):
            return state.selection
        with torch.no_grad():
            scores = state.no_event_candidates(rows.n_items_before)
            ndcg, recall, n_users = slot_metrics(
                scores, rows.user_rows[is_new], rows.item_rows[is_new]
            )
        stats = state.selection or empty_stats(int(scores.shape[1]), state.device)
        metrics["no_event_users"] = float(n_users)
        metrics["no_event_ndcg_learned"] = float(ndcg[0])
        metrics["no_event_ndcg_best_recency"] = float(ndcg[1:].max()) if ndcg.shape[0] > 1 else 0.0
        return fold(stats, ndcg, recall, n_users, config.select_decay)

    def _seen_csr(
        self,
        state: LearnerState,
        user_rows: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SeenCsr | None:
        """What each of `user_rows` touched before the slot (plus `extra` (user index, item row)
        pairs), as CSR; None when masking is off."""
        if not self.config.mask_seen:
            return None
        indptr, items = state.seen.csr(user_rows.cpu().numpy())
        if extra is not None and extra[0].numel():
            lists = np.split(items, indptr[1:-1])
            users_np, items_np = extra[0].cpu().numpy(), extra[1].cpu().numpy()
            order = np.argsort(users_np, kind="stable")
            present, starts = np.unique(users_np[order], return_index=True)
            for user, chunk in zip(present, np.split(items_np[order], starts[1:]), strict=True):
                lists[user] = np.concatenate([lists[user], chunk])
            lengths = np.fromiter((a.shape[0] for a in lists), dtype=np.int64, count=len(lists))
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            items = np.concatenate(lists) if lists else items
        return SeenCsr.from_numpy(indptr, items, state.device)

    def _holdout_start(self, state: LearnerState, rows: SlotRows) -> int:
        """Index of the first held-out event (the time tail), or n_events when there is none."""
        config = self.config
        if not config.use_guardrail or state.slots_seen == 0:
            return rows.n_events
        n_holdout = round(rows.n_events * config.holdout_share)
        if n_holdout < config.min_holdout_events or n_holdout >= rows.n_events:
            return rows.n_events
        return rows.n_events - n_holdout

    def _offsets(
        self, features: torch.Tensor, meta: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The recency term of every item for (new users, returning users)."""
        r = int(features.shape[1])
        return features @ meta["w_new"][:r], features @ meta["w_returning"][:r]

    def _item_terms(
        self, features: torch.Tensor, bias: torch.Tensor, meta: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias plus recency of every item, as (new users, returning users) weigh them."""
        recency_new, recency_returning = self._offsets(features, meta)
        return (
            meta["bias_new"] * bias + recency_new,
            meta["bias_returning"] * bias + recency_returning,
        )

    def _combine(
        self,
        old: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        counts: tuple[torch.Tensor, torch.Tensor],
        meta: dict[str, torch.Tensor],
        use_transfer: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not use_transfer:
            return candidate
        users = transfer(
            old[0], candidate[0], counts[0],
            meta["keep_user"], meta["gate_user"], meta["gate_count_user"],
        )  # fmt: skip
        items = transfer(
            old[1], candidate[1], counts[1],
            meta["keep_item"], meta["gate_item"], meta["gate_count_item"],
        )  # fmt: skip
        bias = transfer(
            old[2].unsqueeze(1), candidate[2].unsqueeze(1), counts[1],
            meta["keep_bias"], meta["gate_bias"], meta["gate_count_bias"],
        ).squeeze(1)  # fmt: skip
        return users, items, bias

    def _keep_existing(
        self,
        old: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        chosen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        touched_users: torch.Tensor,
        touched_items: torch.Tensor,
        rows: SlotRows,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A rejected update keeps the previous rows; only rows of new ids take the update."""
        new_user = (touched_users >= rows.n_users_before).unsqueeze(1)
        new_item = touched_items >= rows.n_items_before
        return (
            torch.where(new_user, chosen[0], old[0]),
            torch.where(new_item.unsqueeze(1), chosen[1], old[1]),
            torch.where(new_item, chosen[2], old[2]),
        )

    def _commit(
        self,
        state: LearnerState,
        rows: SlotRows,
        touched: tuple[torch.Tensor, torch.Tensor],
        old: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        chosen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        counts: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        touched_users, touched_items = touched
        state.user_emb.values[touched_users] = chosen[0]
        state.item_emb.values[touched_items] = chosen[1]
        state.item_bias.values[touched_items] = chosen[2]
        ones = torch.ones(rows.n_events, device=state.device)
        state.user_counts.values.index_add_(0, rows.user_rows, ones)
        state.recency.advance(rows.item_rows, rows.ts_s)
        state.seen.extend(rows.user_rows.cpu().numpy(), rows.item_rows.cpu().numpy())

        # what the next slot's meta-update needs: the rows before and the candidate's rows
        state.pending = {
            "user_rows": touched_users, "old_users": old[0], "cand_users": candidate[0],
            "user_slot_counts": counts[0],
            "item_rows": touched_items, "old_items": old[1], "cand_items": candidate[1],
            "old_bias": old[2], "cand_bias": candidate[2], "item_slot_counts": counts[1],
        }  # fmt: skip
        state.slots_seen += 1

    def _meta_update(
        self,
        state: LearnerState,
        rows: SlotRows,
        meta: dict[str, torch.Tensor],
        opt: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> dict[str, float]:
        """First-order meta-steps of the transfer, recency weights and cold-start parameters on
        this slot, scored by the model the previous update produced."""
        config = self.config
        query = self._query_events(state, rows, generator)
        if query is None:
            return {}
        episodes = cold_episodes(
            rows, config.cold_users, config.cold_max_support, config.cold_max_query, generator
        )
        n_items = rows.n_items_before
        features = state.recency_features()[:n_items]
        candidates = sample_candidates(
            query.items, n_items, config.full_softmax_items, config.negatives, generator
        )

        params = {name: value.clone().requires_grad_(True) for name, value in meta.items()}
        losses: list[tuple[float, float]] = []
        for _ in range(config.meta_steps):
            query_loss = self.query_loss(state, params, query, candidates, features)
            cold_loss = torch.zeros((), device=state.device)
            if episodes is not None:
                cold_loss = self.cold_loss(state, params, episodes, features, generator)
            total = query_loss + config.cold_weight * cold_loss
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
            with torch.no_grad():
                present = {name: g for name, g in zip(params, grads, strict=True) if g is not None}
                _adam_step(params, present, opt, config.meta_lr)
            losses.append((query_loss.item(), cold_loss.item()))

        meta.update({name: value.detach() for name, value in params.items()})
        return {
            "query_events": float(query.items.shape[0]),
            "query_nll_first": losses[0][0],
            "query_nll_last": losses[-1][0],
            "cold_users": float(0 if episodes is None else episodes.support.shape[0]),
            "cold_nll_first": losses[0][1],
            "cold_nll_last": losses[-1][1],
        }

    def _query_events(
        self, state: LearnerState, rows: SlotRows, generator: torch.Generator
    ) -> QueryEvents | None:
        """The slot's events on items already known (a random subset when there are many)."""
        known = rows.item_rows < rows.n_items_before
        users, items = rows.user_rows[known], rows.item_rows[known]
        if items.numel() == 0:
            return None
        if items.numel() > self.config.meta_events:
            pick = torch.randperm(items.numel(), generator=generator)[: self.config.meta_events]
            pick = pick.to(items.device)
            users, items = users[pick], items[pick]
        distinct, seen_index = torch.unique(users, return_inverse=True)
        per_user = torch.bincount(seen_index).to(torch.float32)
        weights = 1.0 / per_user[seen_index]
        return QueryEvents(
            users=users,
            items=items,
            is_new=users >= rows.n_users_before,
            seen=self._seen_csr(state, distinct),
            seen_index=seen_index,
            weights=weights / weights.sum(),
        )

    def query_loss(
        self,
        state: LearnerState,
        params: dict[str, torch.Tensor],
        query: QueryEvents,
        candidates: Candidates,
        features: torch.Tensor,
    ) -> torch.Tensor:
        """Mean softmax loss of the query events under the model the transfer produced from the
        pending (old, candidate) rows; a function of the meta-parameters only."""
        users, is_new = query.users, query.is_new
        pending = state.pending
        table_users, table_items = state.user_emb.values, state.item_emb.values
        table_bias = state.item_bias.values

        # the rows the last update transferred, recomputed with the current parameters
        no_rows = torch.zeros(0, dtype=torch.long, device=state.device)
        user_rows, item_rows = no_rows, no_rows
        users_t = items_t = bias_t = table_users[:0]
        if pending:
            user_rows, item_rows = pending["user_rows"], pending["item_rows"]
            users_t = transfer(
                pending["old_users"], pending["cand_users"], pending["user_slot_counts"],
                params["keep_user"], params["gate_user"], params["gate_count_user"],
            )  # fmt: skip
            items_t = transfer(
                pending["old_items"], pending["cand_items"], pending["item_slot_counts"],
                params["keep_item"], params["gate_item"], params["gate_count_item"],
            )  # fmt: skip
            bias_t = transfer(
                pending["old_bias"].unsqueeze(1), pending["cand_bias"].unsqueeze(1),
                pending["item_slot_counts"],
                params["keep_bias"], params["gate_bias"], params["gate_count_bias"],
            ).squeeze(1)  # fmt: skip

        # users: their transferred row when returning, the learned initialisation when new
        safe_users = torch.where(is_new, torch.zeros_like(users), users)
        known_vecs = _with_rows(table_users, safe_users, user_rows, users_t)  # [B, d]
        known_vecs = params["dot_returning"] * known_vecs
        user_vecs = torch.where(is_new.unsqueeze(1), params["user_init"], known_vecs)

        # items: candidates of the softmax with their transferred rows and recency terms
        rows_c = candidates.rows
        if rows_c is None:
            rows_c = torch.arange(features.shape[0], device=state.device)
        emb = _with_rows(table_items, rows_c, item_rows, items_t)  # [C, d]
        bias = _with_rows(table_bias, rows_c, item_rows, bias_t)  # [C]
        term_new, term_returning = self._item_terms(features[rows_c], bias, params)
        offset = torch.where(is_new.unsqueeze(1), term_new, term_returning)  # [B, C]
        if query.seen is not None:
            mask = seen_mask(
                query.seen, query.seen_index, query.items, candidates.rows, features.shape[0]
            )
            offset = offset.masked_fill(mask, -math.inf)
        no_bias = torch.zeros_like(bias)  # the bias is inside the item terms
        nll = softmax_nll(user_vecs, emb, no_bias, offset, candidates.target, candidates.correction)
        return (nll * query.weights).sum()

    def cold_loss(
        self,
        state: LearnerState,
        params: dict[str, torch.Tensor],
        episodes: ColdEpisodes,
        features: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Meta-SGD: adapt the learned initialisation on each new user's support events with the
        learned step sizes, then score the user's query events (support items masked)."""
        config, r = self.config, int(features.shape[1])
        n_items = int(features.shape[0])

        # the softmax runs over the catalogue, or over the episodes' items plus negatives
        support, query = episodes.support, episodes.query
        rows = torch.arange(n_items, device=state.device)
        correction = torch.zeros(n_items, device=state.device)
        if n_items > config.full_softmax_items:
            used = torch.cat([support[episodes.support_mask], query[episodes.query_mask]])
            candidates = sample_candidates(
                used, n_items, config.full_softmax_items, config.negatives, generator
            )
            assert candidates.rows is not None and isinstance(candidates.correction, torch.Tensor)
            rows, correction = candidates.rows, candidates.correction
            n_used = int(used.unique().shape[0])
            support = torch.searchsorted(rows[:n_used], support).clamp(max=n_used - 1)
            query = torch.searchsorted(rows[:n_used], query).clamp(max=n_used - 1)
        items = torch.cat(
            [
                state.item_emb.values[rows],
                state.item_bias.values[rows].unsqueeze(1),
                features[rows],
                correction.unsqueeze(1),
            ],
            dim=1,
        ).detach()  # [C, D + 1]; the last column carries the sampling correction

        # the local update, differentiable in the initialisation and the step sizes
        one = torch.ones(1, device=state.device)
        start = torch.cat([params["user_init"], params["bias_new"], params["w_new"][:r], one])
        zeros = torch.zeros(r + 2, device=state.device)
        step_size = torch.cat([params["log_step"].exp(), zeros])
        support_scale = torch.cat([params["support_scale"], zeros])
        batch = support.shape[0]
        adapted = local_update(
            items, start.expand(batch, -1), support, episodes.support_mask, step_size,
            config.adapt_steps, support_scale,
        )  # fmt: skip

        # query events scored with the support items masked, as the API excludes seen items
        logits = adapted @ items.T  # [B, C]
        hits = torch.zeros_like(logits).scatter_add_(1, support, episodes.support_mask.float())
        logits = logits.masked_fill(hits > 0, -math.inf)
        query_mask = episodes.query_mask & ~(hits.gather(1, query) > 0)
        log_probs = F.log_softmax(logits, dim=1).gather(1, query)  # [B, Q]
        log_probs = torch.where(query_mask, log_probs, torch.zeros_like(log_probs))

        # every user counts alike, as in the per-user ranking metrics
        per_user = query_mask.sum(1)
        user_loss = -log_probs.sum(1) / per_user.clamp(min=1)
        return user_loss[per_user > 0].mean() if bool((per_user > 0).any()) else user_loss.sum()

    def _guardrail(
        self,
        state: LearnerState,
        rows: SlotRows,
        split: int,
        meta: dict[str, torch.Tensor],
        touched: tuple[torch.Tensor, torch.Tensor],
        events: tuple[torch.Tensor, torch.Tensor],
        old: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        candidate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        generator: torch.Generator,
    ) -> tuple[dict[str, float], str]:
        """Softmax loss on the slot's time tail of: the transferred rows, plain fine-tuning
        and the previous rows, all with the recency that was served. Returns (metrics, choice)."""
        config = self.config
        n_users, n_items = rows.n_users_before, rows.n_items_before
        keep = rows.item_rows[split:] < n_items
        if int(keep.sum()) < config.min_holdout_events:
            return {"holdout_events": float(keep.sum())}, "meta"
        hold_event_user = events[0][split:][keep]
        hold_users, hold_items = rows.user_rows[split:][keep], rows.item_rows[split:][keep]

        # the recency that was being served: the comparison is about the learned rows
        features_before = state.recency_features()[:n_items]

        # who each model knows: the previous one its old users, the others also the fit's users
        fit_counts = [
            torch.bincount(events[0][:split], minlength=touched[0].shape[0]),
            torch.bincount(events[1][:split], minlength=touched[1].shape[0]),
        ]
        unknown_before = hold_users >= n_users
        unknown_after = unknown_before & (fit_counts[0][hold_event_user] == 0)
        candidates = sample_candidates(
            hold_items, n_items, config.full_softmax_items, config.negatives, generator
        )
        fit_counts_f = (fit_counts[0].to(old[0].dtype), fit_counts[1].to(old[0].dtype))
        transferred = self._combine(old, candidate, fit_counts_f, meta, use_transfer=True)

        # items each user touched before the tail (earlier slots and the slot's first part)
        seen = self._seen_csr(state, touched[0], (events[0][:split], rows.item_rows[:split]))
        mask = None
        if seen is not None:
            mask = seen_mask(seen, hold_event_user, hold_items, candidates.rows, n_items)

        def nll(
            rows_x: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            features: torch.Tensor,
            unknown: torch.Tensor,
        ) -> torch.Tensor:
            known_vecs = meta["dot_returning"] * rows_x[0][hold_event_user]
            user_vecs = torch.where(unknown.unsqueeze(1), meta["user_init"], known_vecs)
            rows_c = candidates.rows
            if rows_c is None:
                rows_c = torch.arange(n_items, device=state.device)
            emb = _with_rows(state.item_emb.values, rows_c, touched[1], rows_x[1])
            bias = _with_rows(state.item_bias.values, rows_c, touched[1], rows_x[2])
            term_new, term_returning = self._item_terms(features[rows_c], bias, meta)
            offset = torch.where(unknown.unsqueeze(1), term_new, term_returning)
            if mask is not None:
                offset = offset.masked_fill(mask, -math.inf)
            losses = softmax_nll(
                user_vecs, emb, torch.zeros_like(bias), offset, candidates.target,
                candidates.correction,
            )  # fmt: skip
            return losses  # [H]

        # every user of the tail counts alike, as in the per-user ranking metrics
        per_user = torch.bincount(hold_event_user)[hold_event_user].to(torch.float64)
        weights = (1.0 / per_user) / (1.0 / per_user).sum()  # [H]
        with torch.no_grad():
            losses = {
                "previous": nll(old, features_before, unknown_before),
                "finetune": nll(candidate, features_before, unknown_after),
                "meta": nll(transferred, features_before, unknown_after),
            }
        means = {name: float((value * weights).sum()) for name, value in losses.items()}
        choice = "meta" if means["meta"] <= means["finetune"] else "finetune"

        # the update is refused for known ids only when it is clearly worse: by more than
        # `guardrail_z` standard errors of the paired (weighted) differences, plus the tolerance
        diff = (losses[choice] - losses["previous"]).to(torch.float64)
        mean_diff = float((diff * weights).sum())
        std_error = float(((diff - mean_diff).pow(2) * weights.pow(2)).sum().sqrt())
        if mean_diff > config.guardrail_z * std_error + config.guardrail_tolerance:
            choice = "previous"
        metrics = {
            "holdout_events": float(hold_items.shape[0]),
            "holdout_nll_meta": means["meta"],
            "holdout_nll_finetune": means["finetune"],
            "holdout_nll_previous": means["previous"],
        }
        return metrics, choice
