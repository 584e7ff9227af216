"""Distillation terms: each method of the TeachText family as a pure loss term (DESIGN decision 9).

A term is a function of what the sharded step already has (`view.StepView`: the student's and the
teachers' similarity rows, the per-expert embeddings) returning this device's share of a scalar;
`terms.METHODS` lists them, `terms.distillation_terms(config)` reads a run's list, and
`schedules` gives any term a DL-DKD weight schedule. Every term also has a whole-array form, for
notebooks and as the oracle its sharded form is tested against (the functions exported here).
"""

from tt_jax.distillation.features import embedding_regression_loss, linas_feature_loss
from tt_jax.distillation.kl import kl_batch_loss
from tt_jax.distillation.linas import linas_relational_loss, mask_objective
from tt_jax.distillation.relational import rkd_angle_loss, rkd_distance_loss, rkd_loss
from tt_jax.distillation.schedules import SCHEDULE_KINDS, Schedule, decay_factor, term_weight
from tt_jax.distillation.teachtext import (
    pdist_dist_loss,
    pdist_loss,
    rank_k_listwise_loss,
    rank_k_loss,
    teachtext_loss,
)
from tt_jax.distillation.terms import METHODS, DistillationConfigError, DistillationTerm, distillation_terms, parse_terms
from tt_jax.distillation.view import StepView, StudentView, TeacherView, aggregate, distance
from tt_jax.distillation.within import caption_distillation_loss, video_distillation_loss

__all__ = [
    "METHODS",
    "SCHEDULE_KINDS",
    "DistillationConfigError",
    "DistillationTerm",
    "Schedule",
    "StepView",
    "StudentView",
    "TeacherView",
    "aggregate",
    "caption_distillation_loss",
    "decay_factor",
    "distance",
    "distillation_terms",
    "parse_terms",
    "embedding_regression_loss",
    "kl_batch_loss",
    "linas_feature_loss",
    "linas_relational_loss",
    "mask_objective",
    "pdist_dist_loss",
    "pdist_loss",
    "rank_k_listwise_loss",
    "rank_k_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "teachtext_loss",
    "term_weight",
    "video_distillation_loss",
]
