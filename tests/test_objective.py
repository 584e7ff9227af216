"""The sharded TeachText step: N devices compute what one device computes on the global batch.

Two students: one reading every expert, and a TeachVideo student reading one expert (scene) while
its live teacher reads all three, from the one batch holding the union of the experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tt_jax import losses, objective, optim, parallel, train
from tt_jax.models import ExpertConfig, ModelConfig, build_model, init_variables, training_similarity
from tt_jax.teachers import LiveTeacher, PrecomputedTeacher

GLOBAL_BATCH = 8
RTOL = 1e-5


EXPERTS = (ExpertConfig("scene", 10), ExpertConfig("motion", 7), ExpertConfig("audio", 4, "vlad", 2, 3, flaky=True))
STUDENTS = {"every_expert": EXPERTS, "teachvideo": EXPERTS[:1]}


def student_config(text_dim=5, experts=EXPERTS) -> ModelConfig:
    return ModelConfig(
        experts=experts,
        text_dim=text_dim,
        text_vlad_clusters=2,
        text_ghost_clusters=1,
        text_max_tokens=4,
        shared_dim=6,
    )


@functools.lru_cache(maxsize=None)
def problem(student: str = "every_expert"):
    """A global batch, a live teacher reading a richer text embedding and every expert, a
    precomputed teacher; the student reads STUDENTS[student]."""
    rng = np.random.default_rng(0)
    config, teacher_config = student_config(experts=STUDENTS[student]), student_config(text_dim=9)
    batch = {
        "experts": {
            "scene": rng.normal(size=(GLOBAL_BATCH, 10)).astype(np.float32),
            "motion": rng.normal(size=(GLOBAL_BATCH, 7)).astype(np.float32),
            "audio": rng.normal(size=(GLOBAL_BATCH, 3, 4)).astype(np.float32),
        },
        "availability": {
            "scene": np.ones(GLOBAL_BATCH, np.float32),
            "motion": np.ones(GLOBAL_BATCH, np.float32),
            "audio": np.array([1, 0, 1, 1, 0, 1, 1, 0], np.float32),
        },
        "text": {
            "poor": rng.normal(size=(GLOBAL_BATCH, 1, 4, 5)).astype(np.float32),
            "rich": rng.normal(size=(GLOBAL_BATCH, 1, 4, 9)).astype(np.float32),
        },
        "teacher_embeddings": {
            "stored": {
                "video": {e: rng.normal(size=(GLOBAL_BATCH, 6)).astype(np.float32) / 3 for e in ("a", "b")},
                "text": {e: rng.normal(size=(GLOBAL_BATCH, 1, 6)).astype(np.float32) / 3 for e in ("a", "b")},
            }
        },
    }
    batch["experts"]["audio"][batch["availability"]["audio"] == 0] = np.nan
    # Host copies: the train step donates its state, so every run must get fresh device buffers.
    student_variables = jax.device_get(init_variables(build_model(config), jax.random.key(1)))
    teacher_variables = jax.device_get({"live": init_variables(build_model(teacher_config), jax.random.key(2))})
    return config, teacher_config, batch, student_variables, teacher_variables


@functools.lru_cache(maxsize=None)
def sharded_step(num_devices: int, student: str = "every_expert"):
    config, teacher_config, batch, student_variables, teacher_variables = problem(student)
    mesh = parallel.make_mesh(num_devices)
    teachers = [
        LiveTeacher("live", build_model(teacher_config), text_name="rich"),
        PrecomputedTeacher("stored", ("a", "b")),
    ]
    objective_fn = objective.make_objective(
        build_model(config, axis_name=parallel.DATA_AXIS),
        teachers,
        objective.ObjectiveOptions(margin=0.2),
        mesh,
        student_text="poor",
    )
    optimizer = optim.build_optimizer("radam", 1e-3, 1e-5)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=student_variables["params"],
        batch_stats=student_variables["batch_stats"],
        opt_state=optimizer.init(student_variables["params"]),
    )
    (total, (terms, batch_stats)), grads = jax.jit(jax.value_and_grad(objective_fn, has_aux=True))(
        parallel.put_replicated(state.params, mesh),
        parallel.put_replicated(state.batch_stats, mesh),
        parallel.put_replicated(teacher_variables, mesh),
        parallel.global_batch_from_process_data(batch, mesh),
    )
    step = train.make_train_step(objective_fn, optimizer)
    new_state, _ = step(
        parallel.put_replicated(state, mesh),
        parallel.put_replicated(teacher_variables, mesh),
        parallel.global_batch_from_process_data(batch, mesh),
    )
    return jax.device_get(
        {"total": total, "terms": terms, "grads": grads, "batch_stats": batch_stats, "params": new_state.params}
    )


def unsharded_reference(student: str = "every_expert"):
    """The same quantities from the plain single-matrix path (no shard_map, no collectives)."""
    config, teacher_config, batch, student_variables, teacher_variables = problem(student)
    student, teacher = build_model(config), build_model(teacher_config)
    teacher_embeddings = teacher.apply(
        teacher_variables["live"], batch["experts"], batch["availability"], batch["text"]["rich"], train=False
    )
    stored = batch["teacher_embeddings"]["stored"]
    teacher_sims = jnp.stack(
        [
            training_similarity(teacher_embeddings, teacher_config.expert_names),
            losses.teacher_similarity_from_embeddings(stored["text"], stored["video"], ("a", "b")),
        ]
    )

    def loss_fn(params):
        embeddings, state = student.apply(
            {"params": params, "batch_stats": student_variables["batch_stats"]},
            batch["experts"], batch["availability"], batch["text"]["poor"], train=True, mutable=["batch_stats"],
        )
        terms = losses.teachtext_loss(training_similarity(embeddings, config.expert_names), teacher_sims, margin=0.2)
        return terms["total"], (terms, state["batch_stats"])

    (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(student_variables["params"])
    return jax.device_get({"total": total, "terms": terms, "grads": grads, "batch_stats": batch_stats})


def assert_trees_close(actual, expected, what):
    """Every leaf within RTOL of its own scale; the absolute floor is float32 noise at the scale of
    the whole tree (1e-6 of its largest entry), since a bias feeding a BatchNorm has an exactly
    zero gradient that both sides compute as rounding noise."""
    tree_scale = max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in jax.tree.leaves(expected))

    def check(path, a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        error = float(np.max(np.abs(a - e))) if a.size else 0.0
        bound = max(RTOL * float(np.max(np.abs(e), initial=0.0)), 1e-6 * tree_scale)
        assert error <= bound, f"{what} {jax.tree_util.keystr(path)}: error {error:.3g} > {bound:.3g}"

    jax.tree_util.tree_map_with_path(check, actual, expected)


@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_one_device_matches_the_unsharded_computation(student):
    sharded, reference = sharded_step(1, student), unsharded_reference(student)
    np.testing.assert_allclose(sharded["total"], reference["total"], rtol=RTOL)
    np.testing.assert_allclose(sharded["terms"]["ranking_loss"], reference["terms"]["ranking"], rtol=RTOL)
    np.testing.assert_allclose(sharded["terms"]["distillation_loss"], reference["terms"]["distillation"], rtol=RTOL)
    assert_trees_close(sharded["grads"], reference["grads"], "grads")
    assert_trees_close(sharded["batch_stats"], reference["batch_stats"], "batch_stats")


@pytest.mark.parametrize(
    "num_devices,student",
    # 2 and 4 devices in the slow job: 8 devices split every batch and gallery the furthest.
    [pytest.param(n, s, marks=pytest.mark.slow) if n < 8 else (n, s)
     for n, s in [(2, "every_expert"), (4, "every_expert"), (8, "every_expert"), (2, "teachvideo"), (8, "teachvideo")]],
)
def test_n_devices_match_one_device(num_devices, student):
    assert jax.device_count() >= num_devices, "tests run with 8 fake CPU devices (see conftest.py)"
    one, many = sharded_step(1, student), sharded_step(num_devices, student)
    for key in ("total", "terms", "grads", "batch_stats", "params"):
        assert_trees_close(many[key], one[key], key)


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.check_batch_divisible(12, parallel.make_mesh(8))


def test_student_without_the_data_axis_is_refused():
    with pytest.raises(ValueError, match="axis_name='data'"):
        objective.make_objective(build_model(student_config()), [], objective.ObjectiveOptions(margin=0.1), parallel.make_mesh(1), student_text="poor")


