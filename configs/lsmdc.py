"""LSMDC with the reference settings; TeachText-CE+ with live teachers by default.

    python -m tt_jax.main --config configs/lsmdc.py --config.data_dir=/path/to/data

One caption per clip; the split lists ship only in the access-controlled tar. The reference
loader's audio and speech paths differ from the names in the HQ tar: rename the files or pass
--config.data.expert_files. Variants after the colon: see configs/msrvtt.py.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="lsmdc",
    batch_size=256,  # data_loader_lsmdc.json batch_size
    num_epochs=15,  # data_loader_lsmdc.json trainer.epochs
    margin=0.12132983763957966,  # data_loader_lsmdc.json loss.args.margin
    text_vlad_clusters=43,  # data_loader_lsmdc.json vlad_clusters.text
    text_ghost_clusters=0,  # data_loader_lsmdc.json ghost_clusters.text
    max_text_tokens=36,  # data_loader_lsmdc.json max_tokens.text
    vlad_clusters={"ocr": 30, "audio": 3, "speech": 5},  # data_loader_lsmdc.json
    max_tokens={"ocr": 6, "audio": 11, "speech": 35},  # data_loader_lsmdc.json
    ce_optimizer=("ranger", 0.01, 1e-3),  # data_loader_lsmdc.json optimizer
    ce_text="w2v",  # data_loader_lsmdc.json experts.text_feat
    face_dim=128,  # data_loader_lsmdc.json experts.face_dim
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
