"""QuerYD (paragraph-video retrieval) with the reference CE settings; TeachText-CE+ with live
teachers by default.

    python -m tt_jax.main --config configs/queryd.py --config.data_dir=/path/to/data

The reference has CE and MoEE configs for QuerYD but no refined, CE+ or TeachText ones: every
variant here uses its CE experts; tt_ce_plus / ce_plus read gpt2-xl-finetune text features,
which must be extracted for QuerYD (text_embeddings/<name>.pkl), and the TeachText teachers are
trained live (the release has no teacher files). Its audio ships as an HDF5 (hickle) file: convert
it once to aggregated_audio/vggish-raw.pickle ({video id: array}), which this config reads.
Variants after the colon: see configs/msrvtt.py.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

# data_loader_queryd.json modalities.
EXPERTS = ("audio", "imagenet.resnext101_32x48d.0", "r2p1d.r2p1d-ig65m.0", "scene.densenet161.0")

SETTINGS = DatasetSettings(
    dataset="queryd",
    batch_size=128,  # data_loader_queryd.json batch_size
    num_epochs=20,  # data_loader_queryd.json trainer.epochs
    margin=0.2,  # data_loader_queryd.json loss.args.margin
    text_vlad_clusters=20,  # data_loader_queryd.json vlad_clusters.text
    text_ghost_clusters=1,  # data_loader_queryd.json ghost_clusters.text
    max_text_tokens=20,  # data_loader_queryd.json max_tokens.text
    vlad_clusters={"audio": 16},  # base_config_queryd.json vlad_clusters.audio
    max_tokens={"audio": 29},  # data_loader_queryd.json max_tokens.audio
    ce_optimizer=("ranger", 0.01, 1e-3),  # data_loader_queryd.json optimizer
    ce_text="w2v",  # data_loader_queryd.json experts.text_feat
    ce_experts=EXPERTS,
    refined_experts=EXPERTS,
    expert_files={"audio": "aggregated_audio/vggish-raw.pickle"},  # the converted hickle file
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
