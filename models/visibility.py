"""Which keys each query may attend to, when that is more than "every earlier position of the same sequence".

Two things make it so: documents packed into one training sequence (each token sees only its own document, and its
rotary position restarts at the document's start), and context parallelism (a rank holds scattered chunks of the
sequence, so "earlier" is a matter of the tokens' positions, not of their places in the local tensor). Both reduce
to one rule: query i sees key j when they belong to the same document and j's position is not after i's. Positions
increase along a document in sequence order, so position order is causal order within it.

The model only reads these tensors; what fills them (the batch's end-of-document tokens, which chunks a rank holds)
is parallel/context.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from configs.schema import RopeScaling
from models.ops import rope_tables_at


@dataclass(frozen=True)
class Visibility:
    """Positions (batch, len) int64 of the queries and of the keys, and their document ids, None when the whole
    sequence is one document."""

    q_positions: torch.Tensor
    k_positions: torch.Tensor
    q_documents: Optional[torch.Tensor] = None
    k_documents: Optional[torch.Tensor] = None

    @classmethod
    def local(cls, positions: torch.Tensor, documents: Optional[torch.Tensor] = None) -> "Visibility":
        """Queries and keys are the same tokens."""
        return cls(positions, positions, documents, documents)

    def mask(self) -> torch.Tensor:
        """(batch, 1, queries, keys) bool, True where the query may attend to the key (SDPA's convention)."""
        visible = self.k_positions[:, None, :] <= self.q_positions[:, :, None]
        if self.q_documents is not None and self.k_documents is not None:
            visible = visible & (self.k_documents[:, None, :] == self.q_documents[:, :, None])
        return visible[:, None]


def rotary_and_mask(positions: torch.Tensor, documents: Optional[torch.Tensor], dim: int, theta: float,
                    scaling: Optional[RopeScaling]) -> tuple[tuple[torch.Tensor, torch.Tensor], Visibility]:
    """Rotary tables at each token's position, and who sees whom. Without documents every
    sequence of the batch has the same positions, so one (seq, dim / 2) table serves them all, as fused rotary
    kernels want; with documents positions restart per document and the tables are per sequence."""
    at = positions if documents is not None else positions[0]
    return rope_tables_at(at, dim, theta, scaling), Visibility.local(positions, documents)

