"""A stateless training sampler: the batch of a step is a pure function of (seed, epoch, step, process).

Why stateless: a restart (preemption, a new pod slice) resumes from the (epoch, step) stored in the
checkpoint and reproduces exactly the batches the interrupted run would have seen, with no
iterator state to save, and every process of a pod computes the same global batch and keeps its
own slice without talking to the others.

What an epoch is (the reference, `teachtext_ce_spec.md` 5.4 and 6): one pass over the training
videos in a fresh random order, one caption per video drawn uniformly over its real captions or in
proportion to its denoising weights, and the last partial batch kept (`drop_last=False`). A sharded
step needs the batch to be a multiple of the device count, so the last batch is truncated to the
largest multiple of `multiple_of` (and dropped if that is 0): those few videos skip the epoch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import numpy as np

from tt_jax.errors import UserInputError

# splitmix64 constants (Steele, Lea & Flood 2014), used to hash (seed, epoch, video) into a uniform.
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


class SamplerError(UserInputError):
    """A sampling request that cannot be met (batch sizes, process counts, positions, weights)."""


@dataclasses.dataclass(frozen=True)
class SamplerPosition:
    """Where training stands: `step` batches of `epoch` are done. Stored in checkpoints."""

    epoch: int = 0
    step: int = 0

    def __post_init__(self):
        if self.epoch < 0 or self.step < 0:
            raise SamplerError(f"a sampler position is non-negative, got epoch {self.epoch}, step {self.step}")

    def to_dict(self) -> dict:
        return {"epoch": int(self.epoch), "step": int(self.step)}

    @classmethod
    def from_dict(cls, values: Mapping) -> "SamplerPosition":
        if set(values) != {"epoch", "step"}:
            raise SamplerError(f"a sampler position has keys 'epoch' and 'step', got {sorted(values)}")
        return cls(epoch=int(values["epoch"]), step=int(values["step"]))


def advance(position: SamplerPosition, steps_in_epoch: int) -> SamplerPosition:
    """The position after one more step; wraps to the next epoch after `steps_in_epoch` steps."""
    if position.step >= steps_in_epoch:
        raise SamplerError(f"step {position.step} is past the end of an epoch of {steps_in_epoch} steps")
    if position.step + 1 == steps_in_epoch:
        return SamplerPosition(epoch=position.epoch + 1, step=0)
    return SamplerPosition(epoch=position.epoch, step=position.step + 1)


def position_at(global_step: int, steps_in_epoch: int) -> SamplerPosition:
    """The position reached after `global_step` steps from the start (epochs all have `steps_in_epoch`)."""
    if steps_in_epoch <= 0:
        raise SamplerError(f"steps_in_epoch must be positive, got {steps_in_epoch}")
    return SamplerPosition(*divmod(int(global_step), steps_in_epoch))


def _check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise SamplerError(f"seed and epoch must be non-negative integers, got seed {seed}, epoch {epoch}")


@functools.lru_cache(maxsize=4)
def _cached_order(seed: int, epoch: int, num_videos: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_videos)
    order.flags.writeable = False  # shared between calls
    return order


def epoch_order(seed: int, epoch: int, num_videos: int) -> np.ndarray:
    """[V] the order in which epoch `epoch` visits the videos: a permutation seeded with [seed, epoch].

    Cached (read-only) so that the steps of one epoch do not each redraw it: O(V) per epoch, not per step.
    """
    _check_seed(seed, epoch)
    return _cached_order(int(seed), int(epoch), int(num_videos))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def _uniform_per_video(seed: int, epoch: int, videos: np.ndarray) -> np.ndarray:
    """[len(videos)] float64 uniforms in [0, 1), one per (seed, epoch, video), independent of which
    other videos are asked for: a counter-based generator, so a batch costs O(B), not O(V)."""
    key = _splitmix64(_splitmix64(np.array([seed], np.uint64)) ^ np.uint64(epoch))
    bits = _splitmix64(key ^ np.asarray(videos).astype(np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def caption_choice(
    seed: int, epoch: int, caption_weights: np.ndarray, videos: np.ndarray | None = None
) -> np.ndarray:
    """[V] (or [len(videos)]) int: the caption slot each video shows in epoch `epoch`.

    caption_weights: [V, K] non-negative; the caption mask (0/1, uniform over real captions) or
    denoising weights (a caption is drawn with probability weight / row sum). Inverse CDF on the
    row's cumulative weights, vectorised; only the rows of `videos` are read when it is given.
    The draw of a video depends only on (seed, epoch, video), not on its batch.
    """
    _check_seed(seed, epoch)
    weights = np.asarray(caption_weights, np.float64)
    if weights.ndim != 2:
        raise SamplerError(f"caption weights must be [V, K], got shape {weights.shape}")
    videos = np.arange(weights.shape[0]) if videos is None else np.asarray(videos, np.int64)
    rows = weights[videos]  # [B, K]
    if np.any(rows < 0) or not np.all(np.isfinite(rows)):
        raise SamplerError("caption weights must be finite and non-negative")
    cumulative = np.cumsum(rows, axis=1)  # [B, K]
    totals = cumulative[:, -1]
    if np.any(totals <= 0):
        bad = videos[totals <= 0]
        raise SamplerError(f"videos {bad[:10].tolist()} have no caption to draw (all weights zero)")
    targets = _uniform_per_video(seed, epoch, videos) * totals  # [B] in [0, total)
    chosen = np.sum(cumulative <= targets[:, None], axis=1)  # first slot whose cumulative weight exceeds target
    # Rounding can push the target onto the total; the last slot with weight is then the right answer.
    last_with_weight = rows.shape[1] - 1 - np.argmax(rows[:, ::-1] > 0, axis=1)
    return np.minimum(chosen, last_with_weight)


def _check_batch_size(global_batch_size: int, multiple_of: int) -> None:
    if global_batch_size <= 0 or multiple_of <= 0:
        raise SamplerError(
            f"global_batch_size and multiple_of must be positive, got {global_batch_size} and {multiple_of}"
        )
    if global_batch_size % multiple_of:
        raise SamplerError(
            f"global batch size {global_batch_size} is not a multiple of {multiple_of} (the device count): "
            "every batch must split evenly over the devices"
        )


def last_batch_size(
    num_videos: int, global_batch_size: int, *, drop_remainder: bool = False, multiple_of: int = 1
) -> int:
    """Size of the epoch's last batch: the remainder truncated to a multiple of `multiple_of`
    (the full batch size if the videos divide evenly)."""
    steps = steps_per_epoch(num_videos, global_batch_size, drop_remainder=drop_remainder, multiple_of=multiple_of)
    return min(global_batch_size, num_videos - (steps - 1) * global_batch_size) // multiple_of * multiple_of


def steps_per_epoch(
    num_videos: int, global_batch_size: int, *, drop_remainder: bool = False, multiple_of: int = 1
) -> int:
    """Batches in one pass over `num_videos` videos.

    The reference keeps the last partial batch; here it is truncated to the largest multiple of
    `multiple_of` and dropped when that is 0 (or always, with drop_remainder).
    """
    _check_batch_size(global_batch_size, multiple_of)
    full, remainder = divmod(num_videos, global_batch_size)
    keeps_last = not drop_remainder and remainder // multiple_of > 0
    steps = full + int(keeps_last)
    if steps == 0:
        raise SamplerError(
            f"{num_videos} videos make no batch of {global_batch_size}"
            + ("" if drop_remainder else f" (nor a partial batch that is a multiple of {multiple_of})")
        )
    return steps


def global_batch_indices(
    seed: int,
    epoch: int,
    step: int,
    caption_weights: np.ndarray,
    global_batch_size: int,
    *,
    multiple_of: int = 1,
    drop_remainder: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole global batch of (epoch, step): (videos [b] int64, captions [b, 1] int64).

    caption_weights: [V, K], `FeatureStore.sampling_weights` (caption mask or denoising weights);
    V is the number of training videos. b = global_batch_size, except for the epoch's last batch.
    """
    num_videos = np.shape(caption_weights)[0]
    steps = steps_per_epoch(num_videos, global_batch_size, drop_remainder=drop_remainder, multiple_of=multiple_of)
    if not 0 <= step < steps:
        raise SamplerError(f"step {step} is outside the epoch's {steps} steps")
    start = step * global_batch_size
    size = min(global_batch_size, num_videos - start) // multiple_of * multiple_of
    videos = epoch_order(seed, epoch, num_videos)[start : start + size].astype(np.int64)
    captions = caption_choice(seed, epoch, caption_weights, videos)
    return videos, captions[:, None].astype(np.int64)


def process_batch_indices(
    seed: int,
    epoch: int,
    step: int,
    caption_weights: np.ndarray,
    global_batch_size: int,
    *,
    process_index: int,
    process_count: int,
    multiple_of: int = 1,
    drop_remainder: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's contiguous slice of the global batch: (videos [b / P], captions [b / P, 1]).

    Process p holds rows [p*b/P, (p+1)*b/P), the rows its devices hold in a batch sharded on "data"
    (`jax.make_array_from_process_local_data`). Use multiple_of = the global device count, which
    every process count divides, so that the last batch also splits evenly.
    """
    if not 0 <= process_index < process_count:
        raise SamplerError(f"process_index {process_index} is outside [0, {process_count})")
    if global_batch_size % process_count:
        raise SamplerError(
            f"global batch size {global_batch_size} does not split evenly over {process_count} processes"
        )
    videos, captions = global_batch_indices(
        seed, epoch, step, caption_weights, global_batch_size,
        multiple_of=multiple_of, drop_remainder=drop_remainder,
    )
    if len(videos) % process_count:
        raise SamplerError(
            f"a batch of {len(videos)} does not split evenly over {process_count} processes; make the global "
            f"batch size and multiple_of multiples of the process count (multiple_of=jax.device_count())"
        )
    per_process = len(videos) // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    return videos[rows], captions[rows]
