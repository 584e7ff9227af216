"""The run's teachers: what each entry of `config.teachers` becomes, and its similarity rows.

A teacher gives, for this device's queries, their similarity to every video of the global batch
([b, B] rows of S_t). Two kinds:
  * `LiveTeacher`: a frozen model of the CE family (a run directory of ours, or a reference PyTorch
    checkpoint through `tt_jax.interop`) run forward in eval mode inside the student's jitted step
    on the same examples, reading its own text embedding. Its S_t is the model's own
    mixture-weighted similarity.
  * `PrecomputedTeacher`: the reference release format, per-video and per-caption embeddings per
    expert; S_t is their plain sum over experts (reference `trainer/trainer.py`).
The row functions run inside `jax.shard_map` over the "data" axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from tt_jax.config import TeacherEntry, teacher_model_config
from tt_jax.data.feature_store import FeatureStore
from tt_jax.distillation.view import TeacherView
from tt_jax.errors import UserInputError
from tt_jax.interop import from_reference_state_dict, load_reference_checkpoint
from tt_jax.models import CENet, Embeddings, ModelConfig, as_model_config, build_model, weighted_similarity
from tt_jax.parallel import gather_rows
from tt_jax.trained import load_trained, read_run_config


class TeacherError(UserInputError):
    """A teacher entry that cannot be used as given; the message names the entry."""


@dataclasses.dataclass(frozen=True)
class LiveTeacher:
    """A frozen model run in eval mode on the batch; its variables are passed to the step."""

    name: str
    model: CENet
    text_name: str


@dataclasses.dataclass(frozen=True)
class PrecomputedTeacher:
    """Stored embeddings, read from batch["teacher_embeddings"][stored_name]."""

    name: str
    experts: tuple[str, ...]
    stored_name: str = ""  # the release teacher file (its text embedding); "" = name

    @property
    def key(self) -> str:
        return self.stored_name or self.name


Teacher = Union[LiveTeacher, PrecomputedTeacher]


def live_model_config(config: Any, entry: TeacherEntry) -> ModelConfig:
    """The architecture of a live teacher, without loading its parameters.

    "recipe" and "reference": config.model with the entry's model_changes; "run": the model its
    run directory was trained as (read from its config.json).
    """
    if entry.source == "run":
        return as_model_config(read_run_config(entry.path).model)
    if entry.source in ("recipe", "reference"):
        return as_model_config(teacher_model_config(config, entry))
    raise TeacherError(f"teacher {entry.name!r} has source {entry.source!r}: it is not a model")


def load_teachers(
    config: Any, entries: Sequence[TeacherEntry], train_store: FeatureStore, sharding: jax.sharding.Sharding
) -> tuple[list[Teacher], dict]:
    """The teachers of `entries` and the variables of the live ones ({name: variables}), placed
    with `sharding` directly: no host copy is kept next to the device copy."""
    teachers: list[Teacher] = []
    variables = {}
    for entry in entries:
        if entry.source == "precomputed":
            stored = (train_store.teacher_embeddings or {}).get(entry.text_embedding)
            if stored is None:
                raise TeacherError(
                    f"precomputed teacher {entry.name!r} reads the release teacher file of {entry.text_embedding!r}, "
                    f"which the training features do not hold; they hold {sorted(train_store.teacher_embeddings or {})}"
                )
            teachers.append(PrecomputedTeacher(entry.name, tuple(sorted(stored["video"])), entry.text_embedding))
            continue
        if entry.source == "recipe" and not entry.path:
            raise TeacherError(
                f"teacher {entry.name!r} is trained by the recipe (source 'recipe'): run the recipe "
                "(python -m tt_jax.main), or give source 'run' with the path of its run directory"
            )
        if entry.source == "reference":
            model_config = live_model_config(config, entry)
            state_dict = load_reference_checkpoint(entry.path, trust_pickle=entry.trust_pickle)
            host_variables = from_reference_state_dict(state_dict, model_config)
            del state_dict
            variables[entry.name] = jax.device_put(host_variables, sharding)
            del host_variables
        else:  # "run", or "recipe" with the path the recipe gave it
            trained = load_trained(entry.path, sharding=sharding)
            if trained.text_name != entry.text_embedding:
                raise TeacherError(
                    f"teacher {entry.name!r} should read the text embedding {entry.text_embedding!r}, but its "
                    f"checkpoint in {entry.path} was trained on {trained.text_name!r}"
                )
            model_config, variables[entry.name] = trained.model.config, trained.variables
        train_store.validate(model_config, entry.text_embedding)
        teachers.append(LiveTeacher(entry.name, build_model(model_config), entry.text_embedding))
    return teachers, variables


def model_text(batch: Mapping[str, Any], text_name: str, model_config: ModelConfig) -> jax.Array:
    """[b, K, N, D] tokens of `text_name` for a model reading N = its text_max_tokens.

    The batch holds each text embedding once, at the longest length any model of the run reads;
    a model reading fewer tokens gets the first N, which is what loading at N gives.
    """
    return batch["text"][text_name][:, :, : model_config.text_max_tokens]


def similarity_rows(embeddings: Embeddings, model_config: ModelConfig) -> jax.Array:
    """[b, B] train-mode rows: this device's queries (K captions averaged) against all videos."""
    batch, captions, num_experts = embeddings.moe_weights.shape
    expert_names = model_config.expert_names
    video = {name: gather_rows(embeddings.video[name]) for name in expert_names}
    rows = weighted_similarity(
        {name: embeddings.text[name].reshape(batch * captions, -1) for name in expert_names},
        video,
        embeddings.moe_weights.reshape(batch * captions, num_experts),
        gather_rows(embeddings.availability),
        expert_names,
        keep_missing_modalities=model_config.keep_missing_modalities,
    )
    return jnp.mean(rows.reshape(batch, captions, -1), axis=1)


def teacher_view(teacher: Teacher, variables: Any, batch: Mapping[str, Any]) -> TeacherView:
    """This device's view of a teacher: its [b, B] rows of S_t and its per-expert [b, D] caption
    and video embeddings, all without gradient (the jitted step drops what no term reads)."""
    if isinstance(teacher, LiveTeacher):
        config = teacher.model.config
        embeddings = teacher.model.apply(
            jax.lax.stop_gradient(variables),
            batch["experts"],
            batch["availability"],
            model_text(batch, teacher.text_name, config),
            train=False,
        )
        rows = similarity_rows(embeddings, config)
        text = {name: jnp.mean(value, axis=1) for name, value in embeddings.text.items()}
        video = dict(embeddings.video)
    else:
        stored = batch["teacher_embeddings"][teacher.key]
        text = {name: stored["text"][name].reshape(stored["text"][name].shape[0], -1) for name in teacher.experts}
        video = {name: stored["video"][name] for name in teacher.experts}
        rows = None
        for name in teacher.experts:
            term = jnp.dot(text[name], gather_rows(video[name]).T)
            rows = term if rows is None else rows + term
    return jax.lax.stop_gradient(TeacherView(rows=rows, text=text, video=video))


def teacher_embedding_dims(teacher: Teacher, train_store: FeatureStore) -> dict[str, int]:
    """{expert: dimension of the teacher's joint embedding}: what feature-level terms compare."""
    if isinstance(teacher, LiveTeacher):
        config = teacher.model.config
        return {expert.name: config.embedding_dim(expert) for expert in config.experts}
    stored = train_store.teacher_embeddings[teacher.key]["video"]
    return {name: int(stored[name].shape[-1]) for name in teacher.experts}
