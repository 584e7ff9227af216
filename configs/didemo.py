"""DiDeMo (paragraph-video retrieval) with the reference settings; TeachText-CE+ with live
teachers by default.

    python -m tt_jax.main --config configs/didemo.py --config.data_dir=/path/to/data

Validation on val, test on test (8392 / 1065 / 1004 videos); a video's sentences form one query,
cut to 48 tokens. Variants after the colon: see configs/msrvtt.py.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="didemo",
    caption_temperature=8.0,  # CrossKD configs_crosskd/didemo cap_t (8 in one config, 7 in another)
    batch_size=64,  # data_loader_didemo.json batch_size
    num_epochs=30,  # data_loader_didemo.json trainer.epochs
    margin=0.16642835966287484,  # data_loader_didemo.json loss.args.margin
    text_vlad_clusters=8,  # data_loader_didemo.json vlad_clusters.text
    text_ghost_clusters=0,  # data_loader_didemo.json ghost_clusters.text
    max_text_tokens=48,  # data_loader_didemo.json max_tokens.text
    vlad_clusters={"ocr": 13, "audio": 16, "speech": 55},  # data_loader_didemo.json
    max_tokens={"ocr": 8, "audio": 23, "speech": 48},  # data_loader_didemo.json
    ce_optimizer=("ranger", 0.1, 1e-3),  # data_loader_didemo.json optimizer
    face_dim=512,  # data_loader_didemo.json experts.face_dim
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
