"""The distillation terms a run can list, and the checked form of `config.distillation.terms`.

A config lists its terms as dicts:

    config.distillation.terms = [
        dict(method="teachtext"),                                   # TeachText, Huber delta 1
        dict(method="caption", temperature=5.0),                    # + caption distillation: ttcap
        dict(method="kl_batch", weight=0.1, schedule=dict(kind="exp")),
    ]

Each entry has `method` (a key of METHODS), an optional `name` (what its logged value is called;
default: the method), `weight` (default: the method's own, from its paper), `schedule` (a
`Schedule`'s fields; default constant) and the method's settings (METHODS[method].settings, with
their defaults). The objective adds weight(step) * value of every term to the ranking loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from tt_jax.distillation import features, kl, linas, relational, teachtext, within
from tt_jax.distillation.schedules import Schedule, term_weight
from tt_jax.distillation.view import DISTANCES, TEACHER_AGGREGATIONS, StepView, aggregate, concatenated
from tt_jax.errors import UserInputError
from tt_jax.parallel import first_local_row

RELATIONAL_INPUTS = ("similarity", "text")


class DistillationConfigError(UserInputError):
    """A distillation term that names no method or setting, or that the run cannot feed."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One kind of term: its settings and defaults, what it reads, its per-device share."""

    weight: float  # the default weight, from the method's source
    settings: Mapping[str, Any]  # setting -> default
    share: Callable[..., Any]  # (view, state, **settings) -> this device's share
    reads: str  # "teacher_rows" | "teacher_embeddings" | "student" (the student alone)
    source: str  # where the definition comes from
    has_state: bool = False


def _aggregated(function):
    return lambda view, state, **settings: function(view, **settings)


def _relational_share(view: StepView, state, *, on, distance_weight, angle_weight, aggregation, delta):
    first_row = first_local_row(view.local_rows)
    weights = dict(distance_weight=distance_weight, angle_weight=angle_weight, delta=delta)
    if on == "similarity":
        target = aggregate(view.teacher_rows(), aggregation)
        return relational.rkd_share(view.rows, target, first_row, **weights)
    student = concatenated(view.student.text, view.expert_names)
    shares = [
        relational.rkd_share(student, concatenated(teacher.text, sorted(teacher.text)), first_row, **weights)
        for teacher in view.teachers
    ]
    return sum(shares) / len(shares)


def _features_share(function):
    def share(view, state, **settings):
        return function(view, view.expert_names, **settings)

    return share


_AGGREGATION = {"aggregation": "mean"}
METHODS: dict[str, Method] = {
    "teachtext": Method(
        1.0, {**_AGGREGATION, "distance": "huber", "delta": 1.0},
        _aggregated(lambda view, distance, **s: teachtext.teachtext_share(view, kind=distance, **s)),
        "teacher_rows", "TeachText (Croitoru et al., ICCV 2021); collaborative-experts trainer/trainer.py",
    ),
    "rank_k": Method(
        1.0, {**_AGGREGATION, "k": 10, "distance": "huber", "delta": 1.0},
        _aggregated(lambda view, distance, **s: teachtext.rank_k_share(view, kind=distance, **s)),
        "teacher_rows", "TeachText ablation 'Rank K' (spec 2.4.3)",
    ),
    "rank_k_listwise": Method(
        1.0, {**_AGGREGATION, "k": 10, "temperature": 1.0},
        _aggregated(teachtext.rank_k_listwise_share),
        "teacher_rows", "DarkRank listwise loss, lenscloth/RKD metric/loss.py::HardDarkRank",
    ),
    "pdist": Method(
        1.0, dict(_AGGREGATION), _aggregated(teachtext.pdist_share),
        "teacher_rows", "TeachText ablation 'Pdist', pairwise-distance reading (spec 2.4.4)",
    ),
    "pdist_dist": Method(
        1.0, {**_AGGREGATION, "delta": 1.0}, _aggregated(teachtext.pdist_dist_share),
        "teacher_rows", "TeachText ablation 'Pdist', distance-matrix reading (spec 2.4.4)",
    ),
    "relational": Method(
        1.0, {**_AGGREGATION, "on": "similarity", "distance_weight": 1.0, "angle_weight": 2.0, "delta": 1.0},
        _relational_share,
        "teacher_rows", "RKD (Park et al., CVPR 2019), lenscloth/RKD metric/loss.py; TeachText 'Relational'",
    ),
    "embedding_regression": Method(
        1.0, {"text": True, "video": True}, _features_share(features.embedding_regression_share),
        "teacher_embeddings", "TeachText Fig. 10a 'Embd regress'",
    ),
    "kl_batch": Method(
        0.1, {**_AGGREGATION, "temperature": 0.2, "directions": "both"}, _aggregated(kl.kl_batch_share),
        "teacher_rows", "DL-DKD++ compute_kl_loss(mode='batch_score'), HuiGuanLab/DL-DKD method/model.py",
    ),
    "linas_feature": Method(
        0.2, {"video_weight": 1.0, "zero_gradients": True},
        lambda view, state, video_weight, zero_gradients: features.linas_feature_share(
            view, view.expert_names, video_weight=video_weight
        ),
        "teacher_embeddings", "LINAS (Fang et al., ECCV 2022) L_Dtext + gamma L_Dvideo, silenceFS/LINAS model.py",
    ),
    "linas_relational": Method(
        1.0,
        {**_AGGREGATION, "mask": "diag", "delta": 1.0, "rebuild_mask": True, "zero_gradients": True,
         "mask_learning_rate": 1e-3, "mask_steps": 1},
        lambda view, state, mask, aggregation, delta, rebuild_mask, **_: linas.linas_relational_share(
            view, state, mask=mask, aggregation=aggregation, delta=delta, rebuild_mask=rebuild_mask
        ),
        "teacher_rows", "LINAS L_Drel with masks diag / full / adapt (EM), silenceFS/LINAS model.py, trainer.py",
        has_state=True,
    ),
    "caption": Method(
        1.0, {"temperature": 5.0, "detach_target": False}, _aggregated(within.caption_distillation_share),
        "student", "From Within to Between (Tran et al., ACCV 2022), tqvinhcs/CrossKD RankDistilLoss (cap_w, cap_t)",
    ),
    "video": Method(
        1.0, {"temperature": 1.0, "detach_target": False}, _aggregated(within.video_distillation_share),
        "student", "From Within to Between, video distillation (vid_w, vid_t)",
    ),
}


@dataclasses.dataclass(frozen=True)
class DistillationTerm:
    """One checked entry of `config.distillation.terms`."""

    name: str
    method: str
    weight: float
    schedule: Schedule
    settings: Mapping[str, Any]

    @property
    def definition(self) -> Method:
        return METHODS[self.method]

    @property
    def reads_teachers(self) -> bool:
        return self.definition.reads != "student"

    @property
    def scheduled(self) -> bool:
        return self.schedule.kind != "none"

    @property
    def has_state(self) -> bool:
        """Whether the term keeps state across steps (the adaptive LINAS mask)."""
        return self.definition.has_state and self.settings.get("mask") == "adapt"

    def share(self, view: StepView, state=None):
        return self.definition.share(view, state, **self.settings)

    def weight_at(self, step, steps_per_epoch: int):
        return term_weight(self.weight, self.schedule, step, steps_per_epoch)

    def to_dict(self) -> dict:
        """Every setting (what a run's identity holds; the name only labels the logs)."""
        return {
            "method": self.method,
            "weight": self.weight,
            "schedule": dataclasses.asdict(self.schedule),
            **dict(self.settings),
        }


_ENTRY_KEYS = ("method", "name", "weight", "schedule")
_CHOICES = {
    "aggregation": TEACHER_AGGREGATIONS,
    "distance": DISTANCES,
    "on": RELATIONAL_INPUTS,
    "directions": kl.KL_DIRECTIONS,
    "mask": linas.LINAS_MASKS,
}
_POSITIVE = ("delta", "temperature", "mask_learning_rate")
_NON_NEGATIVE = ("distance_weight", "angle_weight", "video_weight")
_COUNTS = ("k", "mask_steps")


def _setting(where: str, key: str, value: Any, default: Any) -> Any:
    """`value` as the type of its default, or a DistillationConfigError saying what it should be."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise DistillationConfigError(f"{where}.{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DistillationConfigError(f"{where}.{key} must be a whole number of at least 1, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DistillationConfigError(f"{where}.{key} must be a finite number, got {value!r}")
        value = float(value)
        if key in _POSITIVE and not value > 0:
            raise DistillationConfigError(
                f"{where}.{key} must be greater than 0, got {value}"
                + (" (a temperature divides the similarities)" if key == "temperature" else "")
            )
        if key in _NON_NEGATIVE and value < 0:
            raise DistillationConfigError(f"{where}.{key} must be 0 or more, got {value}")
        return value
    if key in _CHOICES and value not in _CHOICES[key]:
        raise DistillationConfigError(f"{where}.{key} is {value!r}; choose one of {list(_CHOICES[key])}")
    return value


def _schedule(where: str, raw: Any) -> Schedule:
    if raw is None:
        return Schedule()
    if not hasattr(raw, "items"):
        raise DistillationConfigError(f"{where}.schedule must be a dict of {list(Schedule.__dataclass_fields__)}, got {raw!r}")
    values = dict(raw.items())
    fields = list(Schedule.__dataclass_fields__)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DistillationConfigError(f"{where}.schedule has unknown keys {unknown}; a schedule has {fields}")
    for key in ("k", "b", "floor", "up_offset"):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise DistillationConfigError(f"{where}.schedule.{key} must be a finite number, got {value!r}")
        if value is not None:
            values[key] = float(value)
    schedule = Schedule(**values)
    problems = schedule.problems()
    if problems:
        raise DistillationConfigError(f"{where}.schedule: " + "; ".join(problems))
    return schedule


def distillation_terms(config: Any) -> tuple[DistillationTerm, ...]:
    """The checked `config.distillation.terms` (each with every setting resolved)."""
    return parse_terms(config.distillation.get("terms") or ())


def parse_terms(entries: Sequence[Mapping[str, Any]]) -> tuple[DistillationTerm, ...]:
    """Checked terms from a list of entries as `config.distillation.terms` holds them."""
    terms = []
    for index, raw in enumerate(entries):
        where = f"config.distillation.terms[{index}]"
        if not hasattr(raw, "items"):
            raise DistillationConfigError(f"{where} must be a dict with a 'method' (one of {sorted(METHODS)}), got {raw!r}")
        values = dict(raw.items())
        method = values.get("method")
        if method not in METHODS:
            raise DistillationConfigError(f"{where}.method is {method!r}; choose one of {sorted(METHODS)}")
        definition = METHODS[method]
        unknown = sorted(set(values) - set(_ENTRY_KEYS) - set(definition.settings))
        if unknown:
            raise DistillationConfigError(
                f"{where} ({method}) has unknown settings {unknown}; {method} takes {sorted(definition.settings)} "
                f"besides {list(_ENTRY_KEYS)}"
            )
        weight = _setting(where, "weight", values.get("weight", definition.weight), 0.0)
        if weight < 0:
            raise DistillationConfigError(f"{where}.weight must be 0 or more, got {weight}")
        settings = {
            key: _setting(where, key, values.get(key, default), default) for key, default in definition.settings.items()
        }
        if method == "embedding_regression" and not (settings["text"] or settings["video"]):
            raise DistillationConfigError(f"{where} (embedding_regression) regresses neither side: set text or video to true")
        name = str(values.get("name") or method)
        terms.append(DistillationTerm(name, method, weight, _schedule(where, values.get("schedule")), settings))
    names = [term.name for term in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DistillationConfigError(
            f"config.distillation.terms names must be unique; {repeated} appear more than once (give each a 'name')"
        )
    return tuple(terms)


def check_terms_for_run(
    terms: Sequence[DistillationTerm],
    *,
    num_teachers: int,
    smallest_batch: int,
    student_dims: Mapping[str, int],
    teacher_dims: Mapping[str, Optional[Mapping[str, int]]],
) -> None:
    """Stops before training when the run cannot feed a term: no teachers, K above the batch,
    embeddings of other dimensions. teacher_dims: {teacher: {expert: embedding dim}, or None
    where they are not known yet (a precomputed teacher before its data is loaded)}."""
    readers = [term.name for term in terms if term.reads_teachers]
    if readers and not num_teachers:
        raise DistillationConfigError(
            f"the distillation terms {readers} distil from teachers, and config.teachers is empty: list the "
            "teachers, or leave those terms out of config.distillation.terms (an empty list trains on the "
            "ranking loss alone)"
        )
    if num_teachers and not readers:
        raise DistillationConfigError(
            f"config.teachers lists {num_teachers} teachers but no term of config.distillation.terms reads them "
            f"(terms: {[term.name for term in terms]}); add a teacher-reading term such as dict(method='teachtext'), "
            "or empty config.teachers"
        )
    for term in terms:
        where = f"distillation term {term.name!r} ({term.method})"
        k = term.settings.get("k")
        if k is not None and k > smallest_batch:
            raise DistillationConfigError(
                f"{where} has k = {k}, more than the {smallest_batch} videos of the run's smallest batch; "
                f"choose k <= {smallest_batch} or a larger train.batch_size"
            )
        needs_embeddings = term.definition.reads == "teacher_embeddings" or term.settings.get("on") == "text"
        if not needs_embeddings:
            continue
        for teacher, dims in teacher_dims.items():
            if dims is None or term.definition.reads != "teacher_embeddings":
                continue
            wrong = {
                expert: (dim, dims.get(expert)) for expert, dim in student_dims.items() if dims.get(expert) != dim
            }
            if wrong:
                shown = ", ".join(f"{e}: student {s}, teacher {t if t is not None else 'absent'}" for e, (s, t) in wrong.items())
                raise DistillationConfigError(
                    f"{where} regresses the student's embeddings onto teacher {teacher!r}'s, but they differ in "
                    f"{shown}; give the teacher the student's experts and shared_dim, or use a term that compares "
                    "similarities (teachtext, relational)"
                )


def initial_distillation_state(terms: Sequence[DistillationTerm]) -> dict:
    """{term name: state} of the terms that keep state across steps (the adaptive LINAS mask),
    as the train state carries it."""
    return {
        term.name: linas.initial_mask_state(term.settings["mask_learning_rate"]) for term in terms if term.has_state
    }
