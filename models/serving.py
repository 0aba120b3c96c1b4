"""What the serving side needs from a trained model: plain tensors, saved with safetensors.

A user's score for every item is `item_matrix @ user_vector`. The learning code decides what the
columns hold (embedding, bias, recency features with their learned weights); serving only
multiplies.
The first `embedding_dim` columns of `item_matrix` are the pure item embedding, used for similarity.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSOR_FILE = "serving.safetensors"
META_FILE = "serving.json"


@dataclass(frozen=True)
class ServingModel:
    item_ids: list[str]
    user_ids: list[str]
    item_matrix: torch.Tensor  # [n_items, D]
    user_matrix: torch.Tensor  # [n_users, D]
    user_counts: torch.Tensor  # [n_users] events each user was trained on
    popularity: torch.Tensor  # [n_items] score for users with no events
    embedding_dim: int
    # parameters of fast adaptation (cold start and refreshing warm users), by name
    adapt_params: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.item_matrix.shape[1])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "item_matrix": self.item_matrix,
            "user_matrix": self.user_matrix,
            "user_counts": self.user_counts,
            "popularity": self.popularity,
        }
        tensors.update({f"adapt.{name}": value for name, value in self.adapt_params.items()})
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        header = {
            "item_ids": self.item_ids,
            "user_ids": self.user_ids,
            "embedding_dim": self.embedding_dim,
            "meta": self.meta,
        }
        save_file(tensors, str(directory / TENSOR_FILE))
        (directory / META_FILE).write_text(json.dumps(header))

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> "ServingModel":
        tensors = load_file(str(directory / TENSOR_FILE), device=device)
        header = json.loads((directory / META_FILE).read_text())
        adapt = {
            name.removeprefix("adapt."): t
            for name, t in tensors.items()
            if name.startswith("adapt.")
        }
        return cls(
            item_ids=list(header["item_ids"]),
            user_ids=list(header["user_ids"]),
            item_matrix=tensors["item_matrix"],
            user_matrix=tensors["user_matrix"],
            user_counts=tensors["user_counts"],
            popularity=tensors["popularity"],
            embedding_dim=int(header["embedding_dim"]),
            adapt_params=adapt,
            meta=dict(header.get("meta", {})),
        )
