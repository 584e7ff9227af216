"""Command line: convert a config's release once into a prepared (TFDS ArrayRecord) dataset.

    python -m tt_jax.prepare --config configs/activitynet.py --config.data_dir=/data --tfds_dir=/shared/tfds

Reads what the config's runs read (its experts, text embeddings, teacher files, split, denoising)
and writes it under `--tfds_dir` (tt_jax/data/prepared.py); then train from it with
`--config.data.source=tfds --config.data.tfds_dir=/shared/tfds`. Needs `pip install -e '.[tfds]'`.
Exit status: 0 done, 2 bad input.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<dataset>.py).", lock_config=True)
_TFDS_DIR = flags.DEFINE_string("tfds_dir", None, "Where to write the prepared dataset (shared storage on a pod).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "ArrayRecord files per split (default: by size).")
flags.mark_flags_as_required(["config", "tfds_dir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tt_jax.config import check_config
    from tt_jax.data.prepared import prepare_release
    from tt_jax.data.sources import release_request
    from tt_jax.errors import UserInputError
    from tt_jax.train import data_needs

    try:
        config = check_config(_CONFIG.value)
        request = release_request(config.data, data_needs(config))
        directory = prepare_release(request, _TFDS_DIR.value, num_shards=_NUM_SHARDS.value)
    except UserInputError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"prepared {request.dataset} in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
