"""Shared test setup: eight CPU devices, strict rank promotion and the reference fixture folder."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Eight fake CPU devices, so that sharded code is tested against its one-device result. Must be set
# before jax initialises its backends.
# The tests' programs are tiny, so compiling them is most of the suite's time: LLVM's optimisation
# level 0 compiles about a quarter faster and changes the speed of the code, not its results (XLA's
# CPU backend does not reassociate float arithmetic at any level). The subprocesses tests start
# set it too.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS]
).strip()

# One compilation cache for the session: the many short runs of the same tiny configs, here and in
# the subprocesses the tests start, compile each program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="tt_jax_tests_compilation_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest

# Similarity matrices invite silent broadcasting bugs; make them errors.
jax.config.update("jax_numpy_rank_promotion", "raise")

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_DIR = pathlib.Path(
    os.environ.get("TT_JAX_FIXTURES", _REPO_ROOT.parent / "shared" / "fixtures" / "ce_reference")
)


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not FIXTURE_DIR.is_dir():
        pytest.fail(
            f"reference fixtures not found at {FIXTURE_DIR}; "
            "set TT_JAX_FIXTURES to the folder holding the ce_reference *.npz/*.json files"
        )
    return FIXTURE_DIR
