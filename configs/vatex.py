"""VaTeX; TeachText-CE+ with live teachers by default.

    python -m tt_jax.main --config configs/vatex.py --config.data_dir=/path/to/data

The reference has a VaTeX loader but no config: the splits (train; the official val split halved
into val_list_split1 / val_list_split2) and the 10 test captions come from its loader; the other
numbers are the base_config.json defaults where it has one, and the MSRVTT settings (a dataset
of single-sentence captions of similar length) where it has none, marked below. Its audio ships
as an HDF5 (hickle) file: convert it once to aggregated_audio/vggish-raw.pickle. Variants after
the colon: see configs/msrvtt.py.
"""

from tt_jax.reference_recipes import DatasetSettings, release_config

SETTINGS = DatasetSettings(
    dataset="vatex",
    batch_size=64,  # not in the reference: MSRVTT's
    num_epochs=100,  # not in the reference: MSRVTT's
    margin=0.09381161988446174,  # base_config.json loss.args.margin
    text_vlad_clusters=25,  # base_config.json vlad_clusters.text
    text_ghost_clusters=0,  # base_config.json ghost_clusters.text
    max_text_tokens=37,  # not in the reference: MSRVTT's
    vlad_clusters={"ocr": 32, "audio": 16, "speech": 32},  # base_config.json vlad_clusters
    max_tokens={"ocr": 49, "audio": 29, "speech": 32},  # not in the reference: MSRVTT's
    ce_optimizer=("ranger", 0.1, 1e-3),  # base_config.json optimizer
    face_dim=512,  # base_config.json has none; MSRVTT's
    expert_files={"audio": "aggregated_audio/vggish-raw.pickle"},  # the converted hickle file
)


def get_config(arg=None):
    return release_config(SETTINGS, arg)
