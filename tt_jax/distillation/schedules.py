"""Weight schedules of a distillation term: lambda(e) = weight * w(e), usable on any term.

The dynamic schedules of DL-DKD (`method/train.py` of HuiGuanLab/DL-DKD, branch iccv, commit
1cd1739; spec section 3.4), with e the 0-based epoch index, set once per epoch:

    none       w(e) = 1
    exp        w(e) = k^e                       k = 0.95 (every released DL-DKD script)
    linear     w(e) = max(k e + b, floor)       k = -0.01, b = 1, floor = 0.05
    sigmoid    w(e) = k / (k + exp(100 e / k))  k = 800 (halves at e = 8 ln 800 ~ 53.5)

and the "up" variants (`exp_up`, `linear_up`, `sigmoid_up`; decay_way 4/5/6), which grow instead:
lambda(e) = weight * (1 - w(e)) + up_offset, with up_offset = 0.1 (loss_init_weight). With
unit "step" the epoch is fractional, e = step / steps_per_epoch, so the weight moves every step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

SCHEDULE_KINDS = ("none", "exp", "linear", "sigmoid", "exp_up", "linear_up", "sigmoid_up")
SCHEDULE_UNITS = ("epoch", "step")
# The constant k of each decay (DL-DKD train.py defaults).
DEFAULT_K = {"exp": 0.95, "linear": -0.01, "sigmoid": 800.0}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a term's weight moves over training; the defaults keep it constant."""

    kind: str = "none"
    k: Optional[float] = None  # None: the kind's DL-DKD default (DEFAULT_K)
    b: float = 1.0  # linear: the value at e = 0
    floor: float = 0.05  # linear: the smallest w(e)
    up_offset: float = 0.1  # "up" kinds: added to weight * (1 - w(e))
    unit: str = "epoch"

    @property
    def decay(self) -> str:
        return self.kind.removesuffix("_up")

    @property
    def constant(self) -> float:
        return DEFAULT_K[self.decay] if self.k is None else float(self.k)

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty if nothing)."""
        found = []
        if self.kind not in SCHEDULE_KINDS:
            found.append(f"kind {self.kind!r} is not one of {list(SCHEDULE_KINDS)}")
            return found
        if self.unit not in SCHEDULE_UNITS:
            found.append(f"unit {self.unit!r} is not one of {list(SCHEDULE_UNITS)}")
        if self.decay == "exp" and not 0 < self.constant:
            found.append(f"exp needs k > 0, got {self.constant}")
        if self.decay == "sigmoid" and not 0 < self.constant:
            found.append(f"sigmoid needs k > 0, got {self.constant}")
        return found


def decay_factor(schedule: Schedule, epoch):
    """w(e) of the schedule's decay at (possibly fractional, possibly traced) epoch e."""
    epoch = jnp.asarray(epoch, jnp.float32)
    k = schedule.constant if schedule.decay != "none" else 0.0
    if schedule.decay == "none":
        return jnp.ones_like(epoch)
    if schedule.decay == "exp":
        return jnp.power(k, epoch)
    if schedule.decay == "linear":
        return jnp.maximum(k * epoch + schedule.b, schedule.floor)
    if schedule.decay == "sigmoid":
        return k / (k + jnp.exp(100.0 * epoch / k))
    raise ValueError(f"unknown schedule kind {schedule.kind!r}; choose one of {SCHEDULE_KINDS}")


def schedule_epoch(schedule: Schedule, step, steps_per_epoch: int):
    """The e of a step: its 0-based epoch index, or with unit "step" the fractional epoch."""
    step = jnp.asarray(step, jnp.float32)
    if schedule.unit == "step":
        return step / steps_per_epoch
    return jnp.floor(step / steps_per_epoch)


def term_weight(weight: float, schedule: Schedule, step, steps_per_epoch: int):
    """lambda at `step`: weight * w(e), or weight * (1 - w(e)) + up_offset for the "up" kinds."""
    factor = decay_factor(schedule, schedule_epoch(schedule, step, steps_per_epoch))
    if schedule.kind.endswith("_up"):
        return weight * (1.0 - factor) + schedule.up_offset
    return weight * factor
