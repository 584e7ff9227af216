"""Within-modality distillation ("From Within to Between", Tran et al., ACCV 2022;
tqvinhcs/CrossKD trainer/trainer.py and model/loss.py::RankDistilLoss, commit 8d0f337; spec 7).

The teacher is the student itself: its caption-caption similarities S^tt and video-video
similarities S^vv from the same forward pass, each pair weighted with the mixture weights of the
corresponding caption-video pair (so S^tt is not symmetric):

    S^tt_ij = sum_m w'_ijm <t_i^m, t_j^m>,   S^vv_ij = sum_m w'_ijm <v_i^m, v_j^m>,

with w' the availability-renormalised weights of caption i against video j (2.1 of the spec).

  caption  L_cap = 1/B sum_i KL(softmax_j(S^tt_ij / tau) || softmax_j(S_ij / tau)), tau = 5 on MSRVTT
           (cap_t: ActivityNet 10, DiDeMo 8, MSVD 2): each caption's distribution over the batch's
           videos pulled toward its distribution over their captions.
  video    L_vid = 1/B sum_j KL(softmax_i(S^vv_ji / tau) || softmax_i(S_ij / tau)): each video's
           distribution over captions toward its distribution over videos (vid_w = 0 in every
           released config).

The released code does not detach the target, so gradients also flow into S^tt / S^vv; that is
the default here, and `detach_target` stops them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tt_jax.distillation.view import kl_rows
from tt_jax.models.similarity import weighted_similarity
from tt_jax.parallel import first_local_row, gather_rows


def within_similarity(rows: dict, others: dict, moe_weights, availability, experts, *, keep_missing_modalities=False):
    """[b, B] S^tt (text embeddings) or S^vv (video embeddings) of rows against the others, with
    the mixture weights of each row's caption against each other video."""
    return weighted_similarity(rows, others, moe_weights, availability, experts, keep_missing_modalities=keep_missing_modalities)


def _maybe_detach(target, detach):
    return jax.lax.stop_gradient(target) if detach else target


# -- whole arrays: text / video expert -> [B, D], moe_weights [B, M], availability [B, M] ---------


def caption_distillation_loss(text, video, moe_weights, availability, experts, *, temperature=5.0,
                              detach_target=False, keep_missing_modalities=False):
    similarity = weighted_similarity(text, video, moe_weights, availability, experts, keep_missing_modalities=keep_missing_modalities)
    target = within_similarity(text, text, moe_weights, availability, experts, keep_missing_modalities=keep_missing_modalities)
    target = _maybe_detach(target, detach_target)
    return jnp.mean(kl_rows(target / temperature, similarity / temperature))


def video_distillation_loss(text, video, moe_weights, availability, experts, *, temperature=1.0,
                            detach_target=False, keep_missing_modalities=False):
    similarity = weighted_similarity(text, video, moe_weights, availability, experts, keep_missing_modalities=keep_missing_modalities)
    target = within_similarity(video, video, moe_weights, availability, experts, keep_missing_modalities=keep_missing_modalities)
    target = _maybe_detach(target, detach_target)
    return jnp.mean(kl_rows(target / temperature, similarity.T / temperature))


# -- a device's share ------------------------------------------------------------------------------


def caption_distillation_share(view, *, temperature=5.0, detach_target=False):
    student = view.student
    target = within_similarity(
        student.text, {m: gather_rows(t) for m, t in student.text.items()}, student.moe_weights,
        gather_rows(student.availability), view.expert_names, keep_missing_modalities=view.keep_missing_modalities,
    )
    target = _maybe_detach(target, detach_target)
    return jnp.sum(kl_rows(target / temperature, view.rows / temperature)) / view.global_batch


def video_distillation_share(view, *, temperature=1.0, detach_target=False):
    """Row j of S^vv is this device's video j against every video, weighted by caption j's
    mixture weights; its student side is column j of S, taken from the gathered rows."""
    student = view.student
    target = within_similarity(
        student.video, {m: gather_rows(v) for m, v in student.video.items()}, student.moe_weights,
        gather_rows(student.availability), view.expert_names, keep_missing_modalities=view.keep_missing_modalities,
    )
    target = _maybe_detach(target, detach_target)
    rows = view.local_rows
    columns = jax.lax.dynamic_slice_in_dim(gather_rows(view.rows), first_local_row(rows), rows, axis=1).T  # [b, B]: S[:, j]
    return jnp.sum(kl_rows(target / temperature, columns / temperature)) / view.global_batch
