"""The tiny TeachText recipe in one process of a `jax.distributed` run (run by test_multiprocess).

    python tests/multiprocess_pipeline.py WORKDIR PROCESS_ID NUM_PROCESSES PORT

Every process runs `tt_jax.pipeline.run` on the same config and workdir, as every host of a pod
does: a teacher, then the distilled student reading it as a live teacher, Orbax checkpoints
written by all processes together, evaluation, results and the report written by process 0.
"""

import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from tt_jax import pipeline  # noqa: E402

TINY = pathlib.Path(__file__).with_name("configs") / "tiny.py"


def recipe_config():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.pipeline.seeds = (0,)
    config.pipeline.stages = ("teachers", "student_teachtext", "report")
    config.train.num_epochs = 2
    return config


def main(workdir: str, process_id: int, num_processes: int, port: int) -> None:
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
        )
    pipeline.run(recipe_config(), workdir)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
