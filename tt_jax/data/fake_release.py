"""A tiny dataset written in exactly a release's layout, for tests and benchmarks without downloads.

`write_fake_release(data_dir, "msrvtt", experts=..., text_dims=...)` writes, under
`<data_dir>/<folder>/<root_feat_folder>/`, every file `read_release` reads for that dataset: the
split lists of every split choice (DiDeMo's with ".mp4"), each expert's pickle ({video id: [D] or
[T, D]}, the float nan where a flaky expert is missing), each text embedding's token features
({video id: [[n_tokens, D] per caption]}), the raw captions, the three TeachText teacher files,
the denoising masks and the less80 train list, and MSRVTT's 1k-A caption index. Values are random:
the files exercise the format, not learning.
"""

from __future__ import annotations

import pathlib
import pickle
from typing import Mapping, Optional, Sequence

import numpy as np

from tt_jax.data.release_layout import (
    DATASETS,
    DENOISING,
    DENOISING_FOLDER,
    TEACHER_FILES,
    TEACHER_FOLDER,
)
from tt_jax.models.config import ExpertConfig

TEACHER_DIM = 768  # ce_shared_dim of the refined teachers whose embeddings the release stores


def _dump(path: pathlib.Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)


def _video_ids(dataset: str, count: int, offset: int) -> list[str]:
    prefix = {"msrvtt": "video", "activitynet": "v_", "didemo": "clip_", "msvd": "vid"}.get(dataset, "video_")
    return [f"{prefix}{offset + index}" for index in range(count)]


def write_fake_release(
    data_dir: str | pathlib.Path,
    dataset: str,
    *,
    experts: Sequence[ExpertConfig],
    text_dims: Mapping[str, int],
    num_videos: Mapping[str, int] = (("train", 12), ("val", 6), ("test", 6)),
    captions_per_video: tuple[int, int] = (2, 4),
    tokens_per_caption: tuple[int, int] = (1, 6),
    missing_rate: float = 0.25,
    seed: int = 0,
    root_feat_folder: Optional[str] = None,
    dtype: str = "float32",
    teacher_dim: int = TEACHER_DIM,
    expert_files: Optional[Mapping[str, str]] = None,
    teachers: bool = True,
) -> pathlib.Path:
    """Writes the fake release and returns its feature root.

    experts: the experts to write (name, input_dim, temporal, max_tokens, flaky); text_dims:
    {text embedding: token dim}; num_videos: videos per split (train, val, test); a split choice
    whose val list is its test list (ActivityNet) gets no videos of its own for val.
    teachers: whether to write the three teacher files (the largest part of a small release).
    """
    layout = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    root = pathlib.Path(data_dir) / layout.folder / (root_feat_folder or layout.root_feat_folder)
    sizes = dict(num_videos)
    suffix = ".mp4" if layout.strip_extension else ""  # DiDeMo lists video files

    # Split lists: the default split choice partitions the videos; the other choices (MSRVTT 1k-A,
    # 1k-B) are drawn from the same videos.
    default = layout.splits[layout.default_split]
    train = _video_ids(dataset, sizes["train"], 0)
    test = _video_ids(dataset, sizes["test"], sizes["train"])
    val = test if default.val == default.test else _video_ids(dataset, sizes["val"], sizes["train"] + sizes["test"])
    every_video = train + test + ([] if val is test else val)
    lists = {default.train: train, default.val: val, default.test: test}
    for choice in layout.splits.values():
        lists.setdefault(choice.train, train + (val if val is not test else []))
        lists.setdefault(choice.test, test)
        lists.setdefault(choice.val, test)
    for name, ids in lists.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{video}{suffix}\n" for video in ids))

    for expert in experts:
        relative = (expert_files or {}).get(expert.name) or layout.expert_files[expert.name]
        if relative.endswith(".hickle"):  # written as the converted pickle the reader is pointed at
            relative = relative[: -len(".hickle")] + ".pickle"
        table = {}
        for video in every_video:
            if expert.flaky and rng.random() < missing_rate:
                table[video] = float("nan")  # the release's mark of a missing expert
            elif expert.temporal == "vlad":
                length = int(rng.integers(1, expert.max_tokens + 3))  # some longer than max_tokens
                table[video] = rng.standard_normal((length, expert.input_dim)).astype(dtype)
            else:
                table[video] = rng.standard_normal(expert.input_dim).astype(dtype)
        _dump(root / relative, table)

    captions = {video: int(rng.integers(captions_per_video[0], captions_per_video[1] + 1)) for video in every_video}
    for embedding, dim in text_dims.items():
        table = {
            video: [
                rng.standard_normal((int(rng.integers(*tokens_per_caption, endpoint=True)), dim)).astype(dtype)
                for _ in range(count)
            ]
            for video, count in captions.items()
        }
        files = layout.text_files.get(embedding, (f"{layout.text_folder}/{embedding}.pkl",))
        if len(files) == 1:
            _dump(root / files[0], table)
        else:  # ActivityNet's openai features: the training videos in one file, the rest in the other
            trained = set(lists[default.train])
            _dump(root / files[0], {v: c for v, c in table.items() if v in trained})
            _dump(root / files[1], {v: c for v, c in table.items() if v not in trained})
    words = ["a", "man", "is", "playing", "guitar", "on", "stage", "people", "dance"]
    _dump(
        root / layout.raw_captions,
        {video: [list(rng.choice(words, size=4)) for _ in range(count)] for video, count in captions.items()},
    )

    for choice in layout.splits.values():
        if choice.test_caption_index:  # MSRVTT 1k-A: the one caption each test video is queried with
            _dump(root / choice.test_caption_index, {v: int(rng.integers(captions[v])) for v in lists[choice.test]})

    training_videos = sorted(set(lists[default.train]) | {v for c in layout.splits.values() for v in lists[c.train]})
    expert_names = [expert.name for expert in experts]
    for file in TEACHER_FILES.values() if teachers else ():
        teacher = {}
        for video in training_videos:
            query_count = 1 if layout.fuse_captions else captions[video]
            teacher[video] = {
                "vid_embds": {e: rng.standard_normal(teacher_dim).astype(dtype) for e in expert_names},
                "text_embds": {e: rng.standard_normal((query_count, teacher_dim)).astype(dtype) for e in expert_names},
            }
        _dump(root / TEACHER_FOLDER / file, teacher)

    for mask_file, train_list in DENOISING.values():
        masks = {}
        for video in training_videos:
            mask = (rng.random(captions[video]) < 0.7).astype(np.float32)
            mask[int(rng.integers(captions[video]))] = 1  # every video keeps a caption
            masks[video] = mask
        _dump(root / DENOISING_FOLDER / mask_file, masks)
        if train_list:
            kept = lists[default.train][: max(1, (4 * len(lists[default.train])) // 5)]
            (root / DENOISING_FOLDER / train_list).write_text("".join(f"{v}{suffix}\n" for v in kept))
    return root
