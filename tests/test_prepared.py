"""Prepared (TFDS ArrayRecord) copies of a release: the same stores and batches as the pickles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_release import REPO, dataset_config, shrunk, write_release_for
from tt_jax.data.sources import release_request
from tt_jax.train import data_needs, run_stores

pytest.importorskip("tensorflow_datasets")
from tt_jax.data import prepared  # noqa: E402
from tt_jax.data.prepared import CHECKSUMS_FILE, PreparedDatasetError, load_prepared, prepare_release, prepared_dir  # noqa: E402


def assert_same_store(prepared, pickled):
    assert prepared.video_ids == pickled.video_ids
    for name in pickled.experts:
        np.testing.assert_array_equal(prepared.experts[name], pickled.experts[name])
        np.testing.assert_array_equal(prepared.availability[name], pickled.availability[name])
    assert prepared.text.keys() == pickled.text.keys()
    for name, table in pickled.text.items():
        np.testing.assert_array_equal(prepared.text[name].tokens, table.tokens)
        np.testing.assert_array_equal(prepared.text[name].lengths, table.lengths)
        np.testing.assert_array_equal(prepared.text[name].starts, table.starts)
    if pickled.caption_weights is None:
        assert prepared.caption_weights is None
    else:
        np.testing.assert_array_equal(prepared.caption_weights, pickled.caption_weights)
    assert (prepared.teacher_embeddings is None) == (pickled.teacher_embeddings is None)
    for name, teacher in (pickled.teacher_embeddings or {}).items():
        for part in ("video", "text"):
            for expert, array in teacher[part].items():
                np.testing.assert_array_equal(prepared.teacher_embeddings[name][part][expert], array)


@pytest.mark.parametrize(
    "dataset, arg, part_bytes",
    [("msrvtt", "tt_ce_plus,precomputed,less100", 1 << 29), ("activitynet", None, 1 << 29), ("msrvtt", None, 2000)],
)
def test_a_prepared_release_gives_the_same_stores_and_batches(dataset, arg, part_bytes, tmp_path, monkeypatch):
    """part_bytes 2000 writes each split as several TFDS splits of a few videos each."""
    monkeypatch.setattr(prepared, "PART_BYTES", part_bytes)
    config = shrunk(dataset_config(dataset, arg), tmp_path / "data")
    write_release_for(config, tmp_path / "data")
    pickled = run_stores(config)
    request = release_request(config.data, data_needs(config))
    directory = prepare_release(request, tmp_path / "tfds", num_shards=2)
    parts = json.loads((directory / prepared.SIZES_FILE).read_text())["train"]["parts"]
    assert (len(parts) > 2) == (part_bytes == 2000)
    assert all(list(directory.glob(f"*{part}.array_record-*")) for part in parts)
    if part_bytes > 2000:  # 2 shards as asked; parts of a video or two get fewer
        assert len(list(directory.glob(f"*{parts[0]}.array_record-*-of-00002"))) == 2
    with config.unlocked():
        config.data.source, config.data.tfds_dir = "tfds", str(tmp_path / "tfds")
    loaded = run_stores(config)
    for split in ("train", "val", "test"):
        assert_same_store(loaded[split], pickled[split])
    if dataset == "activitynet":
        assert loaded["val"] is loaded["test"]  # val1 is written and loaded once
    # Identical batches: the same rows and caption slots from either source.
    videos, captions = np.array([3, 0, 5, 1]), np.array([[1], [0], [0], [2]]) % pickled["train"].max_captions
    names = list(data_needs(config).text_max_tokens)
    batches = [side["train"].batch(videos, captions, text_names=names, max_text_tokens=5) for side in (loaded, pickled)]
    jax.tree.map(np.testing.assert_array_equal, *batches)


def test_an_altered_or_absent_prepared_dataset_is_refused(tmp_path):
    config = shrunk(dataset_config("didemo"), tmp_path / "data")
    write_release_for(config, tmp_path / "data")
    request = release_request(config.data, data_needs(config))
    with pytest.raises(PreparedDatasetError, match=r"holds no finished prepared dataset.*python -m tt_jax\.prepare"):
        load_prepared(request, tmp_path / "tfds")
    directory = prepare_release(request, tmp_path / "tfds")
    assert directory == prepared_dir(request, tmp_path / "tfds")
    assert json.loads((directory / CHECKSUMS_FILE).read_text())
    shard = next(directory.glob("*train_part0000.array_record*"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PreparedDatasetError, match=r"files changed, missing or added since preparation: \['tt_release-train_part0000"):
        load_prepared(request, tmp_path / "tfds")


def test_the_prepare_command_writes_what_training_reads(tmp_path):
    config = shrunk(dataset_config("msvd"), tmp_path / "data")
    write_release_for(config, tmp_path / "data")
    overrides = [f"--config.data_dir={tmp_path / 'data'}", f"--tfds_dir={tmp_path / 'tfds'}"]
    # The command line cannot shrink the experts; the shrunk config goes through a file.
    config_file = tmp_path / "shrunk.py"
    config_file.write_text(
        "import ml_collections\n"
        f"def get_config():\n    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "tt_jax.prepare", f"--config={config_file}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prepared msvd in" in done.stdout
    assert prepared_dir(release_request(config.data, data_needs(config)), tmp_path / "tfds").is_dir()
