"""A recipe small enough for tests: two experts, one teacher, 4 steps per epoch."""

import ml_collections

from tt_jax.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "baseline" runs only the baseline student of seed 0 (one training run)."""
    config = default_config()
    config.model = ml_collections.ConfigDict(
        dict(
            experts=[
                dict(name="audio", input_dim=6, temporal="vlad", vlad_clusters=2, max_tokens=4, flaky=True),
                dict(name="scene", input_dim=12),
            ],
            text_dim=16,
            text_vlad_clusters=2,
            text_max_tokens=5,
            shared_dim=8,
        )
    )
    config.data.text_embedding = "poor"
    config.data.synthetic = ml_collections.ConfigDict(
        dict(
            seed=3,
            num_train_videos=64,
            num_val_videos=24,
            num_test_videos=24,
            captions_per_video=2,
            text_embeddings={"poor": {"dim": 16, "quality": 0.6}, "rich": {"dim": 8, "quality": 1.0}},
            # An easy world, so that a dozen steps learn something measurable.
            latent_dim=4,
            num_topics=0,
            caption_noise=0.2,
            expert_noise=0.2,
            token_noise=0.3,
        )
    )
    config.train.batch_size = 16
    config.train.num_epochs = 3
    config.train.optimizer = "adam"  # no RAdam warm-up: a dozen steps must learn
    config.train.learning_rate = 1e-2
    config.train.log_every_steps = 2
    config.train.eval_chunk_videos = 10  # chunks with a padded last one
    config.teachers = [dict(name="teacher_rich", source="recipe", text_embedding="rich", model_changes=dict(text_dim=8))]
    config.pipeline.seeds = (0, 1)
    if arg == "baseline":
        config.pipeline.seeds = (0,)
        config.pipeline.stages = ("student_baseline", "report")
        config.teachers = []
        config.distillation.terms = []
    elif arg:
        raise ValueError(f"unknown argument {arg!r}")
    return config
