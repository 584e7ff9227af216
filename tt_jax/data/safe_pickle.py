"""Reading the feature releases' pickles without letting them run code.

A pickle is a small program: its GLOBAL / STACK_GLOBAL opcodes name any importable callable and
its REDUCE opcode calls it, so `pickle.load` on a crafted file can run `os.system`. The releases
need far less: builtin containers, numbers and strings (which pickle encodes without naming any
callable), numpy arrays, numpy scalars and dtypes, and `collections.OrderedDict`. The unpickler
here resolves only those names and refuses every other one before anything is called, so a
crafted file fails with `UnsafePickleError` having executed nothing.
"""

from __future__ import annotations

import _compat_pickle
import pathlib
import pickle
from typing import Any

from tt_jax.errors import UserInputError

# (module, name) pairs a release pickle may name. numpy arrays pickle as
# `_reconstruct(ndarray, shape, dtype)` + `__setstate__`, scalars as `scalar(dtype, bytes)`;
# numpy 2 writes `numpy._core`, numpy 1 `numpy.core`. `_codecs.encode` rebuilds bytes in
# protocol-2 pickles written by Python 3; the containers below have no side effects.
_ALLOWED = frozenset(
    [(core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")]
    + [(core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("_codecs", "encode"), ("collections", "OrderedDict")]
    + [("builtins", name) for name in ("set", "frozenset", "list", "tuple", "dict", "bytes", "bytearray", "complex")]
)

# numpy dtype classes (numpy.dtypes.Float32DType, ...) that numpy >= 1.25 may name when pickling a dtype.
_ALLOWED_MODULE_PREFIXES = ("numpy.dtypes",)


class UnsafePickleError(UserInputError):
    """A pickle that names something a feature file has no reason to name; nothing was executed."""


class CorruptPickleError(UserInputError):
    """A pickle that could not be read: truncated, damaged or not a pickle."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")  # the releases hold Python 2 era pickles too
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocols 0-2, e.g. __builtin__.set) are checked as Python 3 reads them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED or (module.startswith(_ALLOWED_MODULE_PREFIXES) and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source} asks to load {module}.{name}, which a feature file has no reason to name; "
            "it was refused and nothing in the file was executed. Only numpy arrays, numbers, strings and "
            "containers are read; replace the file with one from the feature release"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source} uses persistent ids, which feature files do not; refused")


def load_pickle(path: str | pathlib.Path) -> Any:
    """The object in the pickle at `path`, read with the restricted unpickler.

    Raises FileNotFoundError-like `UserInputError`s with the path for a missing file,
    `UnsafePickleError` for a file that names anything outside the allow-list, and
    `CorruptPickleError` for one that is truncated or not a pickle.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    try:
        with path.open("rb") as handle:
            return _RestrictedUnpickler(handle, source=str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError) as error:
        raise CorruptPickleError(
            f"{path} is not a readable pickle ({error.__class__.__name__}: {error}); the file is truncated or "
            "damaged: download or unpack it again"
        ) from error


class MissingFileError(UserInputError):
    """A file the dataset layout needs is not there; the message names it."""
