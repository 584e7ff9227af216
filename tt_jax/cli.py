"""What the command-line entry points share (tt_jax.main, tt_jax.ablate): exit statuses, the
default config file and flag parsing that reports a bad config as one line with exit status 2."""

import pathlib
import sys

from absl import flags

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a terminated command


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown keys, wrong types) as one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
    except (KeyError, AttributeError, TypeError, ValueError) as error:  # raised by config overrides
        message = str(error).strip("\"'")
    if "--config" in message or "config" in " ".join(argv):
        from tt_jax.config import default_config

        message += f"\nvalid top-level config keys: {sorted(default_config().keys())}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
