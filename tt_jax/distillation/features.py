"""Feature-level distillation: the student's per-expert embeddings regressed onto a teacher's,
for the experts both have in a space of the same dimension.

  embedding_regression  TeachText's "Embd regress" baseline (paper Fig. 10a): the mean over
                        captions and shared experts of ||t^S_m - t^T_m||^2 (text side) plus the
                        same for the videos' v_m (video side).
  linas_feature         LINAS's L_Dtext + gamma L_Dvideo with MSELoss(reduction="sum"): sums over
                        the batch and every dimension; weight alpha = 0.2, gamma = 1
                        (silenceFS/LINAS model.py and train_all.sh, commit c9e459a; spec 4.3).
Several teachers: the mean over teachers of each one's loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _squared_error_sum(student: dict, teacher: dict, experts) -> jax.Array:
    return sum(jnp.sum(jnp.square(student[m] - jax.lax.stop_gradient(teacher[m]))) for m in experts)


def feature_regression_sum(student_text, student_video, teacher_text, teacher_video, experts, *, text_weight, video_weight):
    """text_weight * sum ||t^S - t^T||^2 + video_weight * sum ||v^S - v^T||^2 over rows and experts."""
    total = jnp.zeros((), jnp.float32)
    if text_weight:
        total = total + text_weight * _squared_error_sum(student_text, teacher_text, experts)
    if video_weight:
        total = total + video_weight * _squared_error_sum(student_video, teacher_video, experts)
    return total


def embedding_regression_loss(student_text, student_video, teachers, experts, *, text=True, video=True):
    """Mean over teachers of (1 / (B |experts|)) * the summed squared errors of the chosen sides.

    student_text / student_video: expert -> [B, D]; teachers: [(text, video)] in the same layout.
    """
    batch = next(iter(student_text.values())).shape[0]
    losses = [
        feature_regression_sum(
            student_text, student_video, teacher_text, teacher_video, experts,
            text_weight=float(text), video_weight=float(video),
        )
        for teacher_text, teacher_video in teachers
    ]
    return sum(losses) / (len(losses) * batch * len(experts))


def linas_feature_loss(student_text, student_video, teachers, experts, *, video_weight=1.0):
    """Mean over teachers of L_Dtext + video_weight * L_Dvideo (sums, as LINAS)."""
    losses = [
        feature_regression_sum(
            student_text, student_video, teacher_text, teacher_video, experts, text_weight=1.0, video_weight=video_weight
        )
        for teacher_text, teacher_video in teachers
    ]
    return sum(losses) / len(losses)


def _pairs(view):
    return [(teacher.text, teacher.video) for teacher in view.teachers]


def embedding_regression_share(view, experts, *, text=True, video=True):
    """This device's rows' share (the normaliser is the global batch)."""
    local = embedding_regression_loss(view.student.text, view.student.video, _pairs(view), experts, text=text, video=video)
    return local * (view.local_rows / view.global_batch)


def linas_feature_share(view, experts, *, video_weight=1.0):
    return linas_feature_loss(view.student.text, view.student.video, _pairs(view), experts, video_weight=video_weight)
