"""Host memory and time to load an ActivityNet-sized feature release.

    python benchmarks/release_loading_benchmark.py                 # 10,009 train + 4,917 val videos
    python benchmarks/release_loading_benchmark.py --scale=0.1     # a tenth of the videos

Writes a fake release in the real layout (`tt_jax.data.fake_release`) with ActivityNet's sizes:
the CE+ experts at their reference dims (five fixed visual experts, VGGish audio and w2v speech
cut to 4 and 29 tokens) and gpt2-xl-finetune paragraphs (1600-d tokens, 3 to 5 sentences of 8 to
20 tokens: mostly longer than the 49 tokens kept). Each setting is then loaded by
`read_release` in a fresh process, which reports its resident memory just before loading
(Python, numpy, jax and the package) and its peak during loading (Linux VmHWM, reset before the
load): "peak / features" is
(peak - before) over the bytes of the arrays the stores hold, the cost of loading beyond the
features themselves. With the tfds extra installed, a third row loads the same data from its
prepared (TFDS ArrayRecord) copy. Values are random; sizes and file structure are the release's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SCALE = flags.DEFINE_float("scale", 1.0, "Fraction of ActivityNet's videos to write.")
_DIR = flags.DEFINE_string("dir", "", "Where to write the release (default: a temporary folder, removed after).")

TRAIN_VIDEOS, VAL_VIDEOS = 10_009, 4_917  # ActivityNet train_list.txt, val_1_list.txt


def experts():
    from tt_jax.models import ExpertConfig
    from tt_jax.reference_recipes import FIXED_EXPERT_DIMS, REFINED_EXPERTS

    # data_loader_activity-net.json: audio 6 clusters / 4 tokens, speech 100 clusters / 29 tokens.
    vlad = {"audio": ExpertConfig("audio", 128, "vlad", 6, 4, True), "speech": ExpertConfig("speech", 300, "vlad", 100, 29, True)}
    return tuple(vlad.get(name) or ExpertConfig(name, FIXED_EXPERT_DIMS[name]) for name in REFINED_EXPERTS)


def _status_bytes(field: str) -> int:
    """A memory figure of this process from Linux's /proc/self/status (VmRSS: now, VmHWM: peak)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this benchmark needs Linux")


def request(data_dir: str, dtype: str):
    from tt_jax.data.release import ReleaseRequest

    return ReleaseRequest(dataset="activitynet", data_dir=data_dir, experts=experts(),
                          text_max_tokens={"gpt2-xl-finetune": 49}, feature_dtype=dtype)


def load_in_this_process(data_dir: str, dtype: str, tfds_dir: str) -> dict:
    """Loads the release (or its prepared copy in tfds_dir) and returns the measurements (run in a
    child process)."""
    from tt_jax.data.feature_store import distinct_nbytes
    from tt_jax.data.release import read_release

    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if tfds_dir:
        from tt_jax.data.prepared import load_prepared

        stores = load_prepared(request(data_dir, dtype), tfds_dir)
    else:
        stores = read_release(request(data_dir, dtype))
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    videos = {name: store.num_videos for name, store in stores.items()}
    return dict(seconds=seconds, before=before, peak=peak, feature_bytes=distinct_nbytes(stores), videos=videos)


def main(argv) -> None:
    if len(argv) == 3 and argv[1] == "--child":
        print(json.dumps(load_in_this_process(*json.loads(argv[2]))))
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tt_jax.data.fake_release import write_fake_release

    scale = _SCALE.value
    sizes = {"train": max(1, round(TRAIN_VIDEOS * scale)), "val": max(1, round(VAL_VIDEOS * scale)), "test": max(1, round(VAL_VIDEOS * scale))}
    with tempfile.TemporaryDirectory(dir=_DIR.value or None) as data_dir:
        start = time.perf_counter()
        root = write_fake_release(
            data_dir, "activitynet", experts=experts(), text_dims={"gpt2-xl-finetune": 1600},
            num_videos=tuple(sizes.items()), captions_per_video=(3, 5), tokens_per_caption=(8, 20),
            missing_rate=0.1, teachers=False,
        )
        write_seconds = time.perf_counter() - start
        on_disk = sum(path.stat().st_size for path in pathlib.Path(root).rglob("*") if path.is_file())
        settings = [("pickles", "float32", ""), ("pickles", "float16", "")]
        prepare_seconds = None
        try:
            from tt_jax.data.prepared import prepare_release
        except ImportError:
            print("tensorflow-datasets is not installed: no prepared-copy row", file=sys.stderr)
        else:
            start = time.perf_counter()
            prepare_release(request(data_dir, "float32"), f"{data_dir}/tfds")
            prepare_seconds = time.perf_counter() - start
            settings.append(("prepared", "float32", f"{data_dir}/tfds"))
        rows = []
        for source, dtype, tfds_dir in settings:
            child = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps([data_dir, dtype, tfds_dir])],
                check=True, capture_output=True, text=True,
            )
            rows.append((source, dtype, json.loads(child.stdout.strip().splitlines()[-1])))

    gib = 1024**3
    print(
        f"ActivityNet-sized release: {sizes['train']} train + {sizes['val']} val1 videos, {on_disk / gib:.2f} GiB "
        f"of pickles (written in {write_seconds:.0f} s); CE+ experts and gpt2-xl-finetune text (49 tokens kept)\n"
    )
    header = (f"{'source':<9} {'storage':<8} {'features GiB':>12} {'before GiB':>10} {'peak GiB':>9} "
              f"{'peak / features':>15} {'load s':>7}")
    print(header)
    print("-" * len(header))
    for source, dtype, row in rows:
        features = row["feature_bytes"]
        ratio = (row["peak"] - row["before"]) / features
        print(
            f"{source:<9} {dtype:<8} {features / gib:>12.2f} {row['before'] / gib:>10.2f} {row['peak'] / gib:>9.2f} "
            f"{ratio:>15.2f} {row['seconds']:>7.1f}"
        )
    if prepare_seconds is not None:
        print(f"\nprepared: the release converted once by tt_jax.prepare ({prepare_seconds:.0f} s), read from ArrayRecord.")
    print("\npeak / features: (peak resident memory - resident memory before loading) / bytes of the stored arrays "
          "(target: at most 1.3).")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        main(sys.argv)
    else:
        app.run(main)
