"""The state a training step changes, and how to build it (concretely or as shapes only)."""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from tt_jax.models import CENet, init_variables


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes; a checkpoint holds exactly this."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # {term name: state} of the distillation terms that keep state across steps (the adaptive
    # LINAS mask); empty for every other run.
    distillation: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """The model variables, as `model.apply` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: CENet, optimizer: optax.GradientTransformation, rng: jax.Array, distillation: Optional[dict] = None
) -> TrainState:
    """distillation: the terms' initial state (`tt_jax.objective.initial_distillation_state`)."""
    variables = init_variables(model, rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
        distillation=distillation or {},
    )


def abstract_train_state(
    model: CENet,
    optimizer: optax.GradientTransformation,
    sharding: Optional[jax.sharding.Sharding] = None,
    distillation: Optional[dict] = None,
) -> TrainState:
    """The state's shapes and dtypes (no computation), each leaf placed with `sharding` when given:
    what a checkpoint restore needs to know."""
    shapes = jax.eval_shape(lambda: create_train_state(model, optimizer, jax.random.key(0), distillation))
    if sharding is None:
        return shapes
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes)
