"""Reading the feature releases' pickles without letting them run code.

A pickle is a small program: GLOBAL / STACK_GLOBAL name any importable object, REDUCE calls
whatever callable is on the stack, BUILD calls `__setstate__` on whatever object is there. So
allowing "only numpy" is not enough: BUILD on a real `numpy.dtype` can rewrite its flags, after
which numpy reads arbitrary memory, and from there the pickle can reach `exec`. The unpickler
here therefore never hands the pickle a real numpy object or function. Every name a release
needs resolves to a stand-in of ours:

* `numpy.dtype(spec, ...)` gives a `_DTypeRecipe`: plain numeric dtypes only (no object,
  structured, void or datetime dtypes), whose BUILD state must be exactly the state numpy itself
  pickles for that dtype;
* `_reconstruct(ndarray, ...)` + BUILD, `_frombuffer(...)` and `scalar(...)` give recipes whose
  data must be bytes of exactly the size the shape and dtype say; the arrays are made with
  `np.frombuffer` (no copy) once the pickle has finished loading;
* builtin containers, `OrderedDict`, `bytes()` of a string and `_codecs.encode` of a string,
  which run no code of the pickle's choosing.

Any other name, persistent ids, and BUILD on anything but a fresh recipe are refused with
`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import collections
import pathlib
import pickle
from typing import Any

import numpy as np

from tt_jax.errors import UserInputError

_NUMERIC_KINDS = "biufcSU"  # bool, integers, floats, complex, byte and unicode strings


class UnsafePickleError(UserInputError):
    """A pickle that names or does something a feature file has no reason to; nothing was executed."""


class CorruptPickleError(UserInputError):
    """A pickle that could not be read: truncated, damaged or not a pickle."""


class MissingFileError(UserInputError):
    """A file the dataset layout needs is not there; the message names it."""


class _Refuses:
    """Base of the stand-ins: BUILD and attribute writes from the pickle are refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"a pickle may not set the state of {type(self).__name__}")


class _DTypeRecipe(_Refuses):
    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False

    def __setstate__(self, state):
        # numpy pickles a dtype as dtype(spec, align, copy) + BUILD(state); accept only the state
        # numpy itself writes for that dtype (in either byte order).
        if self.built or not isinstance(state, tuple) or len(state) < 2 or state[1] not in "<>|=":
            raise UnsafePickleError(f"dtype {self.dtype} with an unexpected pickled state {state!r:.80}")
        dtype = self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype
        if state != dtype.__reduce__()[2]:
            raise UnsafePickleError(f"dtype {self.dtype} with a state that numpy never writes: {state!r:.80}")
        self.dtype, self.built = dtype, True


class _ArrayRecipe(_Refuses):
    __slots__ = ("array",)

    def __init__(self, array=None):
        self.array = array

    def __setstate__(self, state):
        # ndarray.__reduce__: (version, shape, dtype, is_fortran, raw bytes) after _reconstruct.
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("an array whose pickled state is not numpy's")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from_bytes(raw, _real_dtype(dtype), shape, "F" if fortran else "C")


def _real_dtype(recipe: Any) -> np.dtype:
    if not isinstance(recipe, _DTypeRecipe):
        raise UnsafePickleError("an array or scalar whose dtype was not made by numpy.dtype")
    return recipe.dtype


def _array_from_bytes(raw: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    if isinstance(raw, str):  # Python 2 pickles hold the bytes as latin-1 text
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError(f"array data must be bytes, got {type(raw).__name__}")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise UnsafePickleError(f"array shape must be a tuple of sizes, got {shape!r:.80}")
    if order not in ("C", "F"):
        raise UnsafePickleError(f"array order must be C or F, got {order!r:.20}")
    count = 1
    for n in shape:
        count *= n
    if len(raw) != count * dtype.itemsize:
        raise UnsafePickleError(f"array data of {len(raw)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype).reshape(shape, order=order)


def _dtype(spec, align=False, copy=False, *extra) -> _DTypeRecipe:
    if extra or not isinstance(spec, str) or not isinstance(align, bool) or not isinstance(copy, bool):
        raise UnsafePickleError(f"numpy.dtype called with {spec!r:.40}: only a type string is accepted")
    try:
        dtype = np.dtype(spec)
    except TypeError as error:
        raise UnsafePickleError(f"unknown dtype {spec!r:.40}") from error
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(f"dtype {dtype} is refused: feature files hold numbers and strings only")
    return _DTypeRecipe(dtype)


def _reconstruct(subtype, shape, dtype) -> _ArrayRecipe:
    if subtype is not _NDARRAY:
        raise UnsafePickleError("only plain numpy arrays are read")
    return _ArrayRecipe()


def _frombuffer(buffer, dtype, shape, order) -> _ArrayRecipe:
    return _ArrayRecipe(_array_from_bytes(buffer, _real_dtype(dtype), shape, order))


def _scalar(dtype, raw=b"") -> _ArrayRecipe:
    dtype = _real_dtype(dtype)
    return _ArrayRecipe(_array_from_bytes(raw, dtype, (), "C"))  # a 0-d array, made a scalar after loading


def _bytes(*args) -> bytes:
    if args and not (len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str)):
        raise UnsafePickleError("bytes(...) is accepted only of a string")
    return bytes(*args)


def _encode(text, encoding="utf-8") -> bytes:
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise UnsafePickleError("_codecs.encode is accepted only of a string")
    return codecs.encode(text, encoding)


class _Callable(_Refuses):
    """A stand-in function: callable by REDUCE, closed to BUILD and attribute writes."""

    __slots__ = ("_function",)

    def __init__(self, function):
        object.__setattr__(self, "_function", function)

    def __setattr__(self, name, value):
        raise UnsafePickleError("a pickle may not change a function")

    def __call__(self, *args):
        return self._function(*args)


class _NdarrayMarker(_Refuses):
    """What numpy.ndarray resolves to: accepted only as _reconstruct's first argument."""

    __slots__ = ()

    def __call__(self, *args):
        raise UnsafePickleError("numpy.ndarray(...) is refused: it can view arbitrary memory")


_NDARRAY = _NdarrayMarker()

_NAMES = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Callable(_dtype)}
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NAMES[(_core, "_reconstruct")] = _Callable(_reconstruct)
    _NAMES[(_core, "scalar")] = _Callable(_scalar)
for _core in ("numpy.core.numeric", "numpy._core.numeric"):
    _NAMES[(_core, "_frombuffer")] = _Callable(_frombuffer)
_NAMES[("builtins", "bytes")] = _Callable(_bytes)
_NAMES[("_codecs", "encode")] = _Callable(_encode)
_NAMES[("collections", "OrderedDict")] = collections.OrderedDict  # a C type: its attributes cannot be set
for _name in ("set", "frozenset", "list", "tuple", "dict", "complex"):
    _NAMES[("builtins", _name)] = getattr(builtins, _name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")  # the releases hold Python 2 era pickles too
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocols 0-2, e.g. __builtin__.set) are checked as Python 3 reads them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _NAMES:
            return _NAMES[(module, name)]
        raise UnsafePickleError(
            f"{self._source} asks to load {module}.{name}, which a feature file has no reason to name; "
            "it was refused and nothing in the file was executed. Only numpy arrays, numbers, strings and "
            "containers are read; replace the file with one from the feature release"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source} uses persistent ids, which feature files do not; refused")


def _materialised(value: Any) -> Any:
    """`value` with every recipe replaced by its array (0-d ones by their numpy scalar); containers
    are updated in place (tuples rebuilt). A recipe where no array belongs is refused."""
    if isinstance(value, _ArrayRecipe):
        if value.array is None:
            raise UnsafePickleError("an array recipe without data")
        return value.array[()] if value.array.ndim == 0 else value.array
    if isinstance(value, _Refuses):
        raise UnsafePickleError(f"a bare {type(value).__name__} in the data")
    if isinstance(value, dict):
        if any(isinstance(key, _Refuses) for key in value):
            raise UnsafePickleError("a dict keyed by a numpy stand-in")
        for key, item in value.items():
            value[key] = _materialised(item)
        return value
    if isinstance(value, list):
        value[:] = [_materialised(item) for item in value]
        return value
    if isinstance(value, tuple):
        return tuple(_materialised(item) for item in value)
    if isinstance(value, (set, frozenset)) and any(isinstance(item, _Refuses) for item in value):
        raise UnsafePickleError("a set holding a numpy stand-in")
    return value


def load_pickle(path: str | pathlib.Path) -> Any:
    """The object in the pickle at `path`, read with the restricted unpickler.

    Raises `MissingFileError` (naming the path) for a missing file, `UnsafePickleError` for a
    file that names or does anything outside what feature files need, and `CorruptPickleError`
    for one that is truncated or not a pickle.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    try:
        with path.open("rb") as handle:
            return _materialised(_RestrictedUnpickler(handle, source=str(path)).load())
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, MemoryError, RecursionError) as error:
        raise CorruptPickleError(
            f"{path} is not a readable pickle ({error.__class__.__name__}: {error}); the file is truncated or "
            "damaged: download or unpack it again"
        ) from error
