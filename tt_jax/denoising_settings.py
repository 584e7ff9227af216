"""The denoising settings (config.denoising) and the rule that turns ranks into kept captions.

Kept apart from the ranking (tt_jax.denoising) so that the config can check them without
importing the models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from tt_jax.distillation.view import TEACHER_AGGREGATIONS
from tt_jax.errors import UserInputError

RULES = ("aggregate", "any", "all")
TIES = ("optimistic", "average")


class DenoisingError(UserInputError):
    """Denoising settings, or their outcome, that leave nothing sensible to train on."""


@dataclasses.dataclass(frozen=True)
class DenoisingSettings:
    """config.denoising, checked. max_rank: R (the paper: 40 on MSRVTT, 100 on MSVD)."""

    max_rank: int
    rule: str = "aggregate"
    aggregation: str = "mean"
    ties: str = "optimistic"

    def __post_init__(self):
        whole = isinstance(self.max_rank, (int, np.integer)) and not isinstance(self.max_rank, bool)
        if not whole or self.max_rank < 1:
            raise DenoisingError(
                f"denoising.max_rank is {self.max_rank!r}: a caption is kept when the teachers rank its video "
                "within the top max_rank, so it must be a whole number of at least 1 (the paper uses 40 on MSRVTT "
                "and 100 on MSVD); leave it unset to train on every caption"
            )
        for name, value, valid in (("rule", self.rule, RULES), ("aggregation", self.aggregation, TEACHER_AGGREGATIONS),
                                   ("ties", self.ties, TIES)):
            if value not in valid:
                raise DenoisingError(f"denoising.{name} is {value!r}; choose one of {list(valid)}")
        if self.rule != "aggregate" and self.aggregation != "mean":
            raise DenoisingError(
                f"denoising.aggregation {self.aggregation!r} says how the rule 'aggregate' combines the teachers; "
                f"the rule {self.rule!r} reads each teacher's own rank, so leave the aggregation at 'mean'"
            )

        object.__setattr__(self, "max_rank", int(self.max_rank))

    @classmethod
    def from_config(cls, config: Any) -> Optional["DenoisingSettings"]:
        """The run's settings, or None when denoising is off (denoising.max_rank unset)."""
        group = config.get("denoising") or {}
        if group.get("max_rank") is None:
            return None
        return cls(
            max_rank=group["max_rank"],
            rule=group.get("rule", "aggregate"),
            aggregation=group.get("aggregation", "mean"),
            ties=group.get("ties", "optimistic"),
        )

    @property
    def file_stem(self) -> str:
        """The mask file's name: the release's "denoise-less<R>", then any non-default setting."""
        parts = [f"denoise-less{self.max_rank}"]
        parts += [value for value, default in ((self.rule, "aggregate"), (self.aggregation, "mean"), (self.ties, "optimistic"))
                  if value != default]
        return "-".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kept_captions(ranks: np.ndarray, max_rank: int, rule: str) -> np.ndarray:
    """[...] whether each caption is kept, from [T + 1, ...] ranks (row 0: the aggregate's)."""
    if rule == "aggregate":
        return ranks[0] <= max_rank
    within = ranks[1:] <= max_rank
    if rule == "any":  # dropped when any teacher ranks it worse than R
        return np.all(within, axis=0)
    if rule == "all":  # dropped only when every teacher does
        return np.any(within, axis=0)
    raise DenoisingError(f"denoising.rule is {rule!r}; choose one of {list(RULES)}")
