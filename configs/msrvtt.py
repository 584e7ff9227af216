"""MSRVTT with the reference settings; TeachText-CE+ with live teachers by default.

    python -m tt_jax.main --config configs/msrvtt.py --config.data_dir=/path/to/data
    python -m tt_jax.main --config configs/msrvtt.py:ce_plus,jsfusion --config.data_dir=...

Variants after the colon (comma-separated, see tt_jax/reference_recipes.py): tt_ce_plus
(default), tt_ce, ce_plus, ce, moee; live (default) or precomputed teachers; less100 / less80
caption denoising; the split full (default: 6513 / 497 / 2990 videos), jsfusion (1k-A) or miech
(1k-B). The ce / tt_ce / moee variants read the openai text and the i3d, face and ocr experts,
which only the original CE feature tars hold.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="msrvtt",
    batch_size=64,  # data_loader_msrvtt.json data_loader.args.batch_size
    num_epochs=100,  # data_loader_msrvtt.json trainer.epochs
    margin=0.09381161988446174,  # base_config.json loss.args.margin
    text_vlad_clusters=28,  # data_loader_msrvtt.json arch.args.vlad_clusters.text
    text_ghost_clusters=1,  # data_loader_msrvtt.json arch.args.ghost_clusters.text
    max_text_tokens=37,  # data_loader_msrvtt.json max_tokens.text
    vlad_clusters={"ocr": 43, "audio": 8, "speech": 19},  # data_loader_msrvtt.json vlad_clusters
    max_tokens={"ocr": 49, "audio": 29, "speech": 32},  # data_loader_msrvtt.json max_tokens
    ce_optimizer=("ranger", 0.1, 1e-3),  # base_config.json optimizer (Ranger lr 0.1, wd 1e-3)
    face_dim=512,  # data_loader_msrvtt.json experts.face_dim
    val_first_caption_only=True,  # data_loader_msrvtt.json num_test_captions 1 (20 at test time)
    # msrvtt/train-full-moee.json: its own clusters, token counts, margin and include_self.
    moee_changes=dict(
        margin=0.12638433919050676,
        text_vlad_clusters=50,
        text_ghost_clusters=2,
        max_text_tokens=19,
        vlad_clusters={"ocr": 20, "audio": 27, "speech": 45},
        max_tokens={"ocr": 3, "audio": 17, "speech": 32},
        include_self=False,
    ),
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
