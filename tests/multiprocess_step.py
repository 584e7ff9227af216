"""Two TeachText train steps, then streamed ranks, QB-Norm and top-k of a gallery sharded over
every device, in one process of a `jax.distributed` run (run by test_multiprocess).

    python tests/multiprocess_step.py OUT PROCESS_ID NUM_PROCESSES PORT

Each process builds the same global batch with the stateless sampler, keeps its own slice of it
(`process_batch_indices`), and the global arrays are assembled with
`jax.make_array_from_process_local_data`, as training on a pod does. Process 0 writes the losses
and the updated parameters to OUT (.npz).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tt_jax import objective, optim, parallel, qbnorm, train  # noqa: E402
from tt_jax.packed_embeddings import PackedGallery, PackedQueries  # noqa: E402
from tt_jax.search import top_k  # noqa: E402
from tt_jax.streamed_ranks import streamed_ranks  # noqa: E402
from tt_jax.data import sampler  # noqa: E402
from tt_jax.data.synthetic import make_synthetic_dataset  # noqa: E402
from tt_jax.models import ExpertConfig, ModelConfig, build_model, init_variables  # noqa: E402
from tt_jax.teachers import LiveTeacher  # noqa: E402

GLOBAL_BATCH = 8
TEXT_EMBEDDINGS = {"poor": {"dim": 5, "quality": 0.3}, "rich": {"dim": 9, "quality": 1.0}}


def model_config(text_dim: int) -> ModelConfig:
    return ModelConfig(
        experts=(ExpertConfig("scene", 10), ExpertConfig("audio", 4, "vlad", 2, 3, flaky=True)),
        text_dim=text_dim,
        text_vlad_clusters=2,
        text_ghost_clusters=1,
        text_max_tokens=4,
        shared_dim=6,
    )


def retrieval_outputs(mesh) -> dict:
    """Streamed ranks, DIS ranks and top-k of random packed embeddings (the same on every
    process), the gallery sharded over every device of every process."""
    rng = np.random.default_rng(5)
    gallery = PackedGallery(rng.normal(size=(37, 6)).astype(np.float32), np.ones((37, 2), np.float32))
    queries = PackedQueries(rng.normal(size=(45, 6)).astype(np.float32), np.full((45, 2), 0.5, np.float32))
    bank = PackedQueries(rng.normal(size=(9, 6)).astype(np.float32), np.full((9, 2), 0.5, np.float32))
    targets, masks = np.arange(45) % 37, (rng.random(45) > 0.2).astype(np.float32)
    plain = streamed_ranks(queries, gallery, targets, masks, mesh=mesh, block=8).ranks
    rescoring = qbnorm.rescoring(qbnorm.QBNormSettings("dis", beta=20.0), bank, gallery, mesh=mesh, block=8)
    normalised = streamed_ranks(queries, gallery, targets, masks, mesh=mesh, block=8, rescoring=rescoring).ranks
    scores, videos = top_k(queries, gallery, 5, mesh=mesh, block=8)
    return {"retrieval_t2v": plain.text_to_video, "retrieval_v2t": plain.video_to_text,
            "retrieval_dis_t2v": normalised.text_to_video, "retrieval_top_videos": videos, "retrieval_top_scores": scores}


def main(out: str, process_id: int, num_processes: int, port: int) -> None:
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
        )
    student_config, teacher_config = model_config(5), model_config(9)
    store = make_synthetic_dataset(
        student_config,
        num_train_videos=16,
        num_val_videos=0,
        num_test_videos=0,
        captions_per_video=2,
        text_embeddings=TEXT_EMBEDDINGS,
        seed=0,
    )["train"]
    mesh = parallel.make_mesh()
    teacher = LiveTeacher("rich", build_model(teacher_config), "rich")
    teacher_variables = parallel.put_replicated({"rich": init_variables(teacher.model, jax.random.key(1))}, mesh)
    optimizer = optim.build_optimizer("radam", 1e-2, 1e-5)
    state = train.create_train_state(build_model(student_config), optimizer, jax.random.key(0))
    state = parallel.put_replicated(state, mesh)
    objective_fn = objective.make_objective(
        build_model(student_config, axis_name=parallel.DATA_AXIS),
        [teacher],
        objective.ObjectiveOptions(margin=0.1),
        mesh,
        student_text="poor",
    )
    step = train.make_train_step(objective_fn, optimizer)
    losses = []
    for step_index in range(2):
        videos, captions = sampler.process_batch_indices(
            0, 0, step_index, store.sampling_weights, GLOBAL_BATCH,
            process_index=jax.process_index(), process_count=jax.process_count(), multiple_of=jax.device_count(),
        )
        local = store.batch(videos, captions, text_names=["poor", "rich"], max_text_tokens=4)
        state, scalars = step(state, teacher_variables, parallel.global_batch_from_process_data(local, mesh))
        losses.append([float(scalars["ranking_loss"]), float(scalars["distillation_loss"])])
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.variables)
    }
    flat.update(retrieval_outputs(mesh))
    if jax.process_index() == 0:
        np.savez(out, losses=np.array(losses), devices=jax.device_count(), **flat)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
