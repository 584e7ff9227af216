"""Discovery and loading of the reference fixtures (`*.npz` + `*.json` pairs).

Fixtures are told apart by their contents, not their names, so a new fixture of a known kind
dropped into the folder (`TT_JAX_FIXTURES`, or any folder passed to `discover`) is tested with
no code change:
  * model fixtures hold `params/*` arrays and an `effective_config`;
  * metrics fixtures hold `case/<name>/sims` arrays;
  * optimiser fixtures hold `schedule/*` arrays and per-parameter `pI/init` trajectories.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from conftest import FIXTURE_DIR

MODEL, METRICS, OPTIMIZER = "model", "metrics", "optimizer"


@dataclasses.dataclass(frozen=True)
class Fixture:
    name: str
    kind: str
    npz_path: pathlib.Path
    json_path: pathlib.Path

    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.npz_path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def meta(self) -> dict:
        with self.json_path.open() as handle:
            return json.load(handle)


def _kind_of(keys: list[str], meta: dict) -> str | None:
    if any(k.startswith("params/") for k in keys) and "effective_config" in meta:
        return MODEL
    if any(k.startswith("case/") and k.endswith("/sims") for k in keys):
        return METRICS
    if any(k.startswith("schedule/") for k in keys) and any(k.endswith("/init") for k in keys):
        return OPTIMIZER
    return None


def discover(kind: str, folder: pathlib.Path = FIXTURE_DIR) -> list[Fixture]:
    """Every fixture of `kind` in `folder`, sorted by name."""
    found = []
    for npz_path in sorted(folder.glob("*.npz")):
        json_path = npz_path.with_suffix(".json")
        if not json_path.is_file():
            continue
        with np.load(npz_path, allow_pickle=False) as data:
            keys = list(data.files)
        with json_path.open() as handle:
            meta = json.load(handle)
        if _kind_of(keys, meta) == kind:
            found.append(Fixture(npz_path.stem, kind, npz_path, json_path))
    return found


def write_fixture(
    folder: pathlib.Path, name: str, arrays: dict[str, np.ndarray], meta: dict
) -> Fixture:
    """Stores a fixture as the reference ones are stored: `name.npz` holding plain arrays only
    (loadable with allow_pickle=False) and `name.json` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = folder / f"{name}.npz", folder / f"{name}.json"
    np.savez(npz_path, **arrays)
    meta = dict(meta, fixture=name, npz_bytes=npz_path.stat().st_size)
    with json_path.open("w") as handle:
        json.dump(meta, handle, indent=1)
    return Fixture(name, _kind_of(list(arrays), meta), npz_path, json_path)


def subtree(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays under `prefix/`, keyed by the rest of their name."""
    prefix = prefix.rstrip("/") + "/"
    return {key[len(prefix) :]: value for key, value in arrays.items() if key.startswith(prefix)}
