"""Where each dataset of the Collaborative Experts / TeachText feature releases keeps what.

A release unpacks to `<data_dir>/<folder>/<root_feat_folder>/` (TeachText's "high-quality" tars:
`high-quality/structured-symlinks`; the original CE tars: `structured-symlinks`). Under it:

    <split lists>.txt                       one video id per line (DiDeMo lines end in ".mp4")
    aggregated_*/<model>-avg.pickle         fixed experts: {video id: [D] or [1, D], or float nan}
    aggregated_{audio,speech}*/...pickle    variable experts: {video id: [T, D], or float nan}
    aggregated_text_feats/<embedding>.pkl   text: {video id: [[n_tokens, D] per caption]}
    raw-captions.pkl                        {video id: [[word, ...] per caption]}
    teachers/train-full-ce-refined-text-<embedding>.pkl
                                            {train video id: {"vid_embds": {expert: [768]},
                                                              "text_embds": {expert: [K, 768]}}}
    denoising_masks/denoise-less{80,100}.pkl  {train video id: [K] 0/1}; denoise-less80.txt a train list

Paths, split files and caption counts are the reference's (`teachtext_ce_spec.md` section 5, from
`misc/datasets/*` and each `data_loader/<Dataset>_dataset.py`). VaTeX and QuerYD ship no split
lists or feature manifests in the reference repository: their file names below follow the other
datasets' pattern and can be changed per run with `config.data.expert_files`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

HIGH_QUALITY_ROOT = "high-quality/structured-symlinks"  # base_config.json root_feat_folder
TEXT_FEATURES_FOLDER = "aggregated_text_feats"
TEACHER_FOLDER = "teachers"
DENOISING_FOLDER = "denoising_masks"

# The three TeachText teachers (distil_params.teachers of every TT config): text embedding -> file.
TEACHER_FILES = {
    "w2v": "train-full-ce-refined-text-w2v.pkl",
    "gpt2-xl": "train-full-ce-refined-text-gpt2-xl.pkl",
    "gpt2-xl-finetune": "train-full-ce-refined-text-gpt2-xl-finetuned.pkl",
}

# Caption-denoising variants (configs/msrvtt/*-denoising-*.json): mask file, optional train list.
# QuerYD's and VaTeX's loaders read their audio from `.hickle` files (HDF5, not pickle).
HICKLE_NOTE = (
    "is an HDF5 (hickle) file, which this reader does not open; convert it once to a pickle of the same "
    "{video id: array} dict (hickle.load, then pickle.dump) and point the expert at the new file with "
    "--config.data.expert_files"
)

DENOISING = {
    "less100": ("denoise-less100.pkl", None),
    "less80": ("denoise-less80.pkl", "denoise-less80.txt"),
}


def _visual_experts(kinetics_stride: int = 32) -> dict[str, str]:
    """The five fixed visual experts of the refined / CE+ / TeachText configs and i3d (CE only).

    Directory names come from feat_aggregation (fps, pixels, stride, offset, inner stride) through
    BaseDataset.visual_feat_paths.
    """
    imagenet = "aggregated_imagenet_25fps_256px_stride1_offset0"
    r2p1d = "aggregated_r2p1d_30fps_256px_stride{}_offset0_inner_stride1"
    return {
        "imagenet.resnext101_32x48d.0": f"{imagenet}/resnext101_32x48d-avg.pickle",
        "imagenet.senet154.0": f"{imagenet}/senet154-avg.pickle",
        "r2p1d.r2p1d-ig65m.0": f"{r2p1d.format(32)}/r2p1d-ig65m-avg.pickle",
        "r2p1d.r2p1d-ig65m-kinetics.0": f"{r2p1d.format(kinetics_stride)}/r2p1d-ig65m-kinetics-avg.pickle",
        "scene.densenet161.0": "aggregated_scene_25fps_256px_stride1_offset0/densenet161-avg.pickle",
        "i3d.i3d.0": "aggregated_i3d_25fps_256px_stride25_offset0_inner_stride1/i3d-avg.pickle",
    }


@dataclasses.dataclass(frozen=True)
class Splits:
    """The split list files of one split choice; `val` may be the test list (no separate val)."""

    train: str
    val: str
    test: str
    # MSRVTT 1k-A: {test video id: caption index}, the one caption each test video is queried with.
    test_caption_index: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """One dataset's release: folder, split lists, expert files and caption conventions."""

    name: str
    folder: str  # under data_dir
    splits: Mapping[str, Splits]  # split choice -> lists; the first is the default
    expert_files: Mapping[str, str]  # expert name -> pickle path under the feature root
    fuse_captions: bool  # paragraph retrieval: a video's captions form one query
    test_captions: int  # K of the evaluation set (caption slots per video)
    raw_captions: str = "raw-captions.pkl"
    text_folder: str = TEXT_FEATURES_FOLDER
    root_feat_folder: str = HIGH_QUALITY_ROOT
    # Text embeddings stored under other names than <text_folder>/<embedding>.pkl (the original CE
    # "openai" features); several files hold disjoint videos and are merged.
    text_files: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    strip_extension: bool = False  # split list lines are file names: keep what precedes the first "."

    @property
    def default_split(self) -> str:
        return next(iter(self.splits))


DATASETS: dict[str, DatasetLayout] = {
    "msrvtt": DatasetLayout(
        name="msrvtt",
        folder="MSRVTT",
        splits={
            # Full (full-val / full-test): 6513 / 497 / 2990 videos.
            "full": Splits("train_list_full.txt", "val_list_full.txt", "test_list_full.txt"),
            # 1k-A (jsfusion): 9000 train, 1000 test videos (listed as val_list_jsfusion.txt) with
            # one fixed caption each; no separate validation split (the reference validates on it).
            "jsfusion": Splits(
                "train_list_jsfusion.txt", "val_list_jsfusion.txt", "val_list_jsfusion.txt",
                test_caption_index="jsfusion_val_caption_idx.pkl",
            ),
            # 1k-B (miech): 6656 train, 1000 test videos.
            "miech": Splits("train_list_miech.txt", "test_list_miech.txt", "test_list_miech.txt"),
        },
        expert_files={
            **_visual_experts(),
            "audio": "aggregated_audio_feats/Audio_MSRVTT_new.pickle",
            "speech": "aggregated_speech/speech-w2v.pickle",
            "ocr": "aggregated_ocr_feats/ocr-raw.pickle",
            "face": "aggregated_face_feats/facefeats-avg.pickle",
        },
        fuse_captions=False,
        test_captions=20,
        text_files={"openai": ("aggregated_text_feats/w2v_MSRVTT_openAIGPT.pickle",)},
    ),
    "activitynet": DatasetLayout(
        name="activitynet",
        folder="activity-net",
        # val1 (4917 videos) is both the validation and the test split; val_2 is unused.
        splits={"val1": Splits("train_list.txt", "val_1_list.txt", "val_1_list.txt")},
        expert_files={
            **_visual_experts(),
            "audio": "aggregated_audio/vggish-audio-raw.pickle",
            "speech": "aggregated_speech/goog_w2v-speech-raw.pickle",
            "ocr": "aggregated_ocr_feats/ocr-w2v.pkl",
            "face": "aggregated_facefeats_25fps_256px_stride1/face-avg.pickle",
        },
        fuse_captions=True,
        test_captions=1,
        raw_captions="raw-captions-train-val_1.pkl",
        text_files={"openai": ("aggregated_text_feats/openai-train.pkl", "aggregated_text_feats/openai-val1.pkl")},
    ),
    "didemo": DatasetLayout(
        name="didemo",
        folder="DiDeMo",
        splits={"test": Splits("train_list.txt", "val_list.txt", "test_list.txt")},
        expert_files={
            **_visual_experts(),
            "audio": "aggregated_audio_feats/vggish-audio-raw.pickle",
            "speech": "aggregated_speech_feats/stt_w2v.pickle",
            "ocr": "aggregated_ocr_feats/ocr-feats.pkl",
            "face": "aggregated_facefeats_25fps_256px_stride1/face-avg.pickle",
        },
        fuse_captions=True,
        test_captions=1,
        strip_extension=True,  # DiDeMo lists video files (<id>.mp4)
        text_files={"openai": ("aggregated_text_feats/openai-feats.pkl",)},
    ),
    "msvd": DatasetLayout(
        name="msvd",
        folder="MSVD",
        # dev (val) -> official test; up to 81 captions per test video. No audio or speech.
        splits={"official": Splits("train_list.txt", "val_list.txt", "test_list.txt")},
        expert_files={
            # MSVD's kinetics features come from the stride-8 directory.
            **_visual_experts(kinetics_stride=8),
            "ocr": "aggregated_ocr_feats/ocr-w2v.pickle",
            "face": "aggregated_face_feats/face-avg.pickle",
        },
        fuse_captions=False,
        test_captions=81,
    ),
    "lsmdc": DatasetLayout(
        name="lsmdc",
        folder="LSMDC",
        splits={"full": Splits("train_list.txt", "val_list.txt", "test_list.txt")},
        expert_files={
            **_visual_experts(),
            # The loader's paths; the HQ tar lists aggregated_audio_feats/vggish-audio-raw.pickle
            # and aggregated_speech_feats/speech-w2v.pickle instead (rename or override).
            "audio": "aggregated_audio/vggish-raw.pickle",
            "speech": "aggregated_speech/speech-w2v.pickle",
            "ocr": "aggregated_ocr_feats/ocr-w2v.pkl",
            "face": "antoine/face-max-with-blank-val.pickle",
        },
        fuse_captions=False,
        test_captions=1,
        text_files={"openai": ("aggregated_text_feats/openai-text.pickle",)},
    ),
    "vatex": DatasetLayout(
        name="vatex",
        folder="VaTeX",
        # The official val split halved: split1 validates (full-val), split2 tests (full-test).
        splits={"full": Splits("train_list.txt", "val_list_split1.txt", "val_list_split2.txt")},
        expert_files={
            **_visual_experts(),
            "audio": "aggregated_audio/vggish-raw.hickle",  # HDF5: convert (see HICKLE_NOTE)
            "speech": "aggregated_speech/speech-w2v.pickle",
        },
        fuse_captions=False,
        test_captions=10,
        text_folder="text-embeddings",
    ),
    "queryd": DatasetLayout(
        name="queryd",
        folder="QuerYD",
        splits={"test": Splits("train_list.txt", "val_list.txt", "test_list.txt")},
        expert_files={
            **_visual_experts(),
            "audio": "aggregated_audio/vggish-raw.hickle",  # HDF5: convert (see HICKLE_NOTE)
            "speech": "aggregated_speech/speech-w2v.pickle",
        },
        fuse_captions=True,
        test_captions=1,
        raw_captions="raw_captions_combined_filtered.pkl",
        text_folder="text_embeddings",
        root_feat_folder="structured-symlinks",  # data_loader_queryd.json
    ),
}
