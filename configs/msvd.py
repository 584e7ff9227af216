"""MSVD with the reference settings; TeachText-CE+ with live teachers by default.

    python -m tt_jax.main --config configs/msvd.py --config.data_dir=/path/to/data

Train / dev / official test: 1200 / 100 / 670 videos, up to 81 captions each. MSVD has no sound:
no audio or speech expert. Variants after the colon: see configs/msrvtt.py (the ce / moee
variants read the openai text, keyed by YouTube id in the release, which is not supported).
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="msvd",
    caption_temperature=2.0,  # CrossKD configs_crosskd/msvd cap_t (2 in one config, 4 in another)
    batch_size=16,  # data_loader_msvd.json batch_size
    num_epochs=300,  # data_loader_msvd.json trainer.epochs
    margin=0.30764700456522676,  # data_loader_msvd.json loss.args.margin
    text_vlad_clusters=12,  # data_loader_msvd.json vlad_clusters.text
    text_ghost_clusters=0,  # data_loader_msvd.json ghost_clusters.text
    max_text_tokens=30,  # data_loader_msvd.json max_tokens.text
    vlad_clusters={"ocr": 75},  # data_loader_msvd.json vlad_clusters.ocr
    max_tokens={"ocr": 30},  # data_loader_msvd.json max_tokens.ocr
    ce_optimizer=("ranger", 0.01, 5e-5),  # data_loader_msvd.json optimizer
    face_dim=512,  # data_loader_msvd.json experts.face_dim
    # data_loader_msvd.json modalities and msvd/train-full-ce-refined.json: no audio or speech.
    ce_experts=(
        "face", "i3d.i3d.0", "imagenet.resnext101_32x48d.0", "imagenet.senet154.0", "ocr",
        "r2p1d.r2p1d-ig65m.0", "scene.densenet161.0",
    ),
    refined_experts=(
        "imagenet.resnext101_32x48d.0", "imagenet.senet154.0", "r2p1d.r2p1d-ig65m-kinetics.0",
        "r2p1d.r2p1d-ig65m.0", "scene.densenet161.0",
    ),
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
