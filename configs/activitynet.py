"""ActivityNet (paragraph-video retrieval, val1) with the reference settings; TeachText-CE+ with
live teachers by default.

    python -m tt_jax.main --config configs/activitynet.py --config.data_dir=/path/to/data

A video's sentences form one query, cut to 49 tokens; val1 (4917 videos) is both the validation
and the test split, as in the reference. Variants after the colon: see configs/msrvtt.py.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="activitynet",
    caption_temperature=10.0,  # CrossKD configs_crosskd/activity-net cap_t
    batch_size=32,  # data_loader_activity-net.json batch_size
    num_epochs=150,  # data_loader_activity-net.json trainer.epochs
    margin=0.060496613740311816,  # data_loader_activity-net.json loss.args.margin
    text_vlad_clusters=39,  # data_loader_activity-net.json vlad_clusters.text
    text_ghost_clusters=0,  # data_loader_activity-net.json ghost_clusters.text
    max_text_tokens=49,  # data_loader_activity-net.json max_tokens.text
    vlad_clusters={"ocr": 44, "audio": 6, "speech": 100},  # data_loader_activity-net.json
    max_tokens={"ocr": 6, "audio": 4, "speech": 29},  # data_loader_activity-net.json
    ce_optimizer=("ranger", 0.1, 1e-3),  # base_config.json optimizer
    face_dim=512,  # data_loader_activity-net.json experts.face_dim
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
