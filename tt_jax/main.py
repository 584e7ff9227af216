"""Command line: `python -m tt_jax.main --config configs/demo.py --workdir runs/demo`.

Runs the TeachText recipe of the config (tt_jax.pipeline) and prints its report. Settings can be
changed with `--config.train.num_epochs=5`; `--config=configs/x.py:arg` passes `arg` to the file's
`get_config`. Set TT_JAX_DISTRIBUTED=1 on every host of a multi-host launch (TPU pod, SLURM) to
call `jax.distributed.initialize()`. Exit status: 0 done, 2 bad input (the message says what
to change), 143 stopped by SIGTERM after saving (rerun the command to resume).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tt_jax.cli import DEFAULT_CONFIG, EXIT_BAD_INPUT, EXIT_PREEMPTED, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints, metrics and the report are written.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax  # imported after flag parsing so that --help stays fast

    from tt_jax import pipeline, reporting
    from tt_jax.errors import UserInputError
    from tt_jax.train import Preempted

    if os.environ.get("TT_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()  # coordinator and process ids come from the TPU / SLURM environment
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # The recipe's runs (teachers, seeds) compile the same programs: compile each once.
        jax.config.update("jax_compilation_cache_dir", _WORKDIR.value.rstrip("/") + "/compilation_cache")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        if _CONFIG.value.get("study"):
            raise UserInputError(
                f"the config defines the ablation study {_CONFIG.value.study.get('name')!r}: run it with "
                "python -m tt_jax.ablate --config ...; tt_jax.main runs the recipe of a config without one"
            )
        results = pipeline.run(_CONFIG.value, _WORKDIR.value)
    except UserInputError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as stop:
        logging.warning("%s", stop)
        print(str(stop), file=sys.stderr)
        return EXIT_PREEMPTED
    if results and jax.process_index() == 0:
        print(reporting.report_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
