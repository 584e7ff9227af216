"""The restricted unpickler: release-shaped pickles load, crafted ones are refused before running."""

from __future__ import annotations

import collections
import os
import pickle
import pickletools

import numpy as np
import pytest

from tt_jax.data.safe_pickle import CorruptPickleError, MissingFileError, UnsafePickleError, load_pickle


def release_like() -> dict:
    rng = np.random.default_rng(0)
    return {
        "video0": rng.standard_normal(5).astype(np.float32),
        "video1": float("nan"),  # a missing expert
        "video2": [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((1, 4)).astype(np.float16)],
        "video3": {"vid_embds": {"audio": np.arange(3.0)}, "text_embds": {"audio": np.ones((2, 3))}},
        "index": np.int64(7),
        "words": [["a", "man"], ("sings",)],
        "ordered": collections.OrderedDict(b=1, a=2.5),
        "empty": np.zeros((0, 4), np.float32),
        "mask": np.array([1, 0, 1], np.uint8),
    }


def assert_same(loaded, expected):
    if isinstance(expected, dict):
        assert type(loaded) is type(expected) and list(loaded) == list(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert loaded.dtype == expected.dtype
        np.testing.assert_array_equal(loaded, expected)
    elif isinstance(expected, float) and np.isnan(expected):
        assert isinstance(loaded, float) and np.isnan(loaded)
    else:
        assert loaded == expected


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_release_shaped_pickles_load_as_pickle_loads_them(tmp_path, protocol):
    path = tmp_path / "features.pickle"
    path.write_bytes(pickle.dumps(release_like(), protocol=protocol))
    assert_same(load_pickle(path), release_like())


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class ImportsAModule:
    def __reduce__(self):
        return (__import__, ("subprocess",))


@pytest.mark.parametrize("payload, named", [(CallsEval(), "builtins.eval"), (ImportsAModule(), "builtins.__import__")])
def test_a_pickle_that_calls_anything_else_is_refused(tmp_path, payload, named):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"video0": np.ones(3), "payload": payload}))
    with pytest.raises(UnsafePickleError, match=rf"evil\.pkl asks to load {named}.*nothing in the file was executed"):
        load_pickle(path)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_pickle_that_runs_a_command_executes_nothing(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([np.ones(2), RunsACommand(marker)], protocol=protocol))
    assert "system" in " ".join(str(arg) for _, arg, _ in pickletools.genops(path.read_bytes()))
    with pytest.raises(UnsafePickleError, match=r"(posix|os|nt)\.system"):
        load_pickle(path)
    assert not marker.exists()


def test_a_hand_written_protocol_0_instance_opcode_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "inst.pkl"
    # INST: import os.system and call it with the marked tuple, the oldest way pickles call code.
    path.write_bytes(b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        load_pickle(path)
    assert not marker.exists()


def test_getattr_tricks_are_refused(tmp_path):
    path = tmp_path / "getattr.pkl"
    # STACK_GLOBAL builtins.getattr, the first step of reaching os through an allowed object.
    path.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x07getattr\x93.")
    with pytest.raises(UnsafePickleError, match=r"builtins\.getattr"):
        load_pickle(path)


def test_truncated_and_foreign_files_are_reported_as_damaged(tmp_path):
    whole = pickle.dumps(release_like(), protocol=4)
    truncated = tmp_path / "truncated.pickle"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptPickleError, match=r"truncated\.pickle is not a readable pickle.*download or unpack"):
        load_pickle(truncated)
    text = tmp_path / "notes.pkl"
    text.write_text("video0 0.1 0.2\n")
    with pytest.raises(CorruptPickleError, match=r"notes\.pkl"):
        load_pickle(text)
    with pytest.raises(MissingFileError, match=r"absent\.pkl does not exist"):
        load_pickle(tmp_path / "absent.pkl")


# -- numpy's own names, used against it ------------------------------------------------------------


class Crafted:
    """Pickles as `callable(*args)` (REDUCE), then BUILD with `state` when given: the opcodes a
    crafted file would hold, written by the real pickler."""

    def __init__(self, callable_, args, state=None):
        self.callable, self.args, self.state = callable_, args, state

    def __reduce__(self):
        return (self.callable, self.args) if self.state is None else (self.callable, self.args, self.state)


MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


@pytest.mark.parametrize(
    "payload, message",
    [
        # BUILD rewriting a dtype's flags: the first step of the known memory-reading chain.
        (Crafted(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 0x20)), "a state that numpy never writes"),
        (Crafted(np.dtype, ("O8", False, True)), "dtype object is refused"),
        (Crafted(np.dtype, ("V8", False, True)), r"dtype \|V8 is refused"),
        (Crafted(MULTIARRAY.scalar, (Crafted(np.dtype, ("O8", False, True)), b"AAAAAAAA")), "dtype object is refused"),
        (Crafted(np.ndarray, ((7,), np.dtype("u1"))), r"numpy\.ndarray\(\.\.\.\) is refused"),
        (Crafted(bytes, (np.arange(3),)), r"bytes\(\.\.\.\) is accepted only of a string"),
        (Crafted(MULTIARRAY._reconstruct, (np.ndarray, (0,), b"b"), (1, (4,), np.dtype("f4"), False, b"\0" * 3)),
         "array data of 3 bytes for shape"),
        (Crafted(np.dtype, ("f4", False, True), {"__class__": 1}), "unexpected pickled state"),
    ],
    ids=["dtype-flags", "object-dtype", "void-dtype", "object-scalar", "ndarray-view", "bytes-of-array",
         "short-data", "dict-state"],
)
def test_numpy_names_cannot_be_turned_against_the_reader(tmp_path, payload, message):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(pickle.dumps({"video0": payload}, protocol=2))
    with pytest.raises(UnsafePickleError, match=message):
        load_pickle(path)


def test_the_stand_ins_cannot_be_rebuilt(tmp_path):
    path = tmp_path / "build.pkl"
    # Protocol 4: STACK_GLOBAL numpy.dtype, then BUILD {"a": 1} on that function itself.
    path.write_bytes(b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93}\x8c\x01aK\x01sb.")
    with pytest.raises(UnsafePickleError, match="may not set the state"):
        load_pickle(path)
