"""Train-step throughput of the CE+ student at the reference sizes: alone, with teachers, on N devices.

    python benchmarks/train_step_benchmark.py                    # MSRVTT and ActivityNet, 1/2/4/8 devices
    python benchmarks/train_step_benchmark.py --quick --tiny     # smoke test on a CPU
    python benchmarks/train_step_benchmark.py --sizes=activitynet --variants=live --devices=1
                                                                 # within 24 GB of host memory

Table (a) times one jitted training step (forward, backward, RAdam update, state donated) of the
CE+ student built from the reference MSRVTT config (batch 64, 262.7M parameters) and ActivityNet
config (batch 32, 376.0M), on one device, in three variants measured in the same process: the
student alone (ranking loss only); the student plus three live teachers of the same architecture,
each reading its own text embedding and run forward in eval mode inside the same step; and the
student plus three precomputed teachers (per-expert 768-d video and text embeddings, as in the
reference teacher files, S_t their plain sum over experts). Every variant is compiled and warmed up
first (compile time is shown apart and excluded); the variants then take turns, `--repeats` times,
each running `--steps_per_repeat` steps up to `jax.block_until_ready`, and steps/s comes from the
median turn, so a change of load on a shared machine hits every variant alike. "x student" is the
variant's step time over the student-only step time, i.e. what distillation costs (target for the
live teachers: at most 1.6x). Table (b) runs one variant (`--scaling_variant`) on 1, 2, 4 and 8
devices at the same global batch: "speed-up" is its steps/s over the 1-device steps/s, and "loss
rel. diff" compares the loss of its first step (same initial state, same batch) with the 1-device
loss, which it equals up to float32 rounding. On CPU the devices are fake
(`--xla_force_host_platform_device_count`), share the same cores and each hold a copy of the
parameters: there the speed-up measures the cost of sharding, not a parallel gain. `--tiny` keeps
the shrunk sizes of the reference fixtures (same architecture, D = 16 / 12) for a smoke test.

Table (c) (`--terms=all`, or a list of TERM_VARIANTS; `--tables=` skips (a) and (b)) times one
distillation term at a time against the student alone, each with three precomputed teachers
(the caption and video terms need none), in turns in the same run; every variant continues one
train state, so one copy of the parameters serves them all.

    python benchmarks/train_step_benchmark.py --sizes=msrvtt --tables= --terms=all
"""

from __future__ import annotations

import os

# Eight fake CPU devices for table (b). Must be set before jax initialises its backends; the flag
# only concerns the CPU platform, so it changes nothing where jax runs on a GPU or TPU.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    ).strip()

import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Mapping  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tt_jax import objective, optim, parallel, train  # noqa: E402
from tt_jax.distillation import METHODS, parse_terms  # noqa: E402
from tt_jax.distillation.terms import initial_distillation_state  # noqa: E402
from tt_jax.interop import (  # noqa: E402
    TEXT_EMBEDDING_DIMS,
    model_config_from_reference,
    training_hyperparameters_from_reference,
)
from tt_jax.models import ModelConfig, build_model, count_parameters, init_variables  # noqa: E402
from tt_jax.teachers import LiveTeacher, PrecomputedTeacher  # noqa: E402

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DEFAULT_FIXTURES = os.environ.get(
    "TT_JAX_FIXTURES", str(_REPO_ROOT.parent / "shared" / "fixtures" / "ce_reference")
)

# Every TeachText config distils from the same three teachers (distil_params.teachers).
NUM_TEACHERS = 3
VARIANTS = {
    "student": "student alone",
    "live": f"student + {NUM_TEACHERS} live teachers",
    "precomputed": f"student + {NUM_TEACHERS} precomputed teachers",
}

_QUICK = flags.DEFINE_bool("quick", False, "1 warm-up step and 2 turns of 1 step: a smoke test.")
_TINY = flags.DEFINE_bool("tiny", False, "Keep the fixtures' shrunk model sizes (for a CPU smoke test).")
_SIZES = flags.DEFINE_list("sizes", ["msrvtt", "activitynet"], "Model sizes to measure.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts for the scaling table.")
_VARIANTS = flags.DEFINE_multi_enum(
    "variants", list(VARIANTS), list(VARIANTS),
    "Variants of table (a); each holds its own state, so fewer need less memory ('student' is always kept).",
)
_SCALING_VARIANT = flags.DEFINE_enum("scaling_variant", "live", list(VARIANTS), "Variant of table (b).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 3, "Steps before timing (the first compiles).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed turns per variant; steps/s is from the median.")
_STEPS_PER_REPEAT = flags.DEFINE_integer("steps_per_repeat", 5, "Steps per timed turn.")
_TABLES = flags.DEFINE_list("tables", ["a", "b"], "Tables to measure: a, b and (with --terms) c.")
_TERMS = flags.DEFINE_list(
    "terms", [], "Table (c): the distillation term variants to time (keys of TERM_VARIANTS, or 'all'); empty skips it."
)
_FIXTURES = flags.DEFINE_string(
    "fixtures", _DEFAULT_FIXTURES, "Folder of the reference fixtures (their effective_config)."
)

# Table (c): one distillation term each, with the 3 precomputed teachers (the cheapest teachers,
# so that the term's own cost shows) or, for the terms of the student alone, no teachers.
TERM_VARIANTS = {
    "teachtext": [dict(method="teachtext")],
    "rank_k": [dict(method="rank_k", k=10)],
    "rank_k_listwise": [dict(method="rank_k_listwise", k=10)],
    "pdist": [dict(method="pdist")],
    "pdist_dist": [dict(method="pdist_dist")],
    "relational": [dict(method="relational")],
    "relational_text": [dict(method="relational", on="text")],
    "rkd_angle_text": [dict(method="relational", on="text", distance_weight=0.0)],
    "embedding_regression": [dict(method="embedding_regression")],
    "kl_batch": [dict(method="kl_batch")],
    "linas_feature": [dict(method="linas_feature")],
    "linas_adapt": [dict(method="linas_relational", mask="adapt")],
    "caption": [dict(method="caption")],
    "video": [dict(method="video")],
    "ttcap": [dict(method="teachtext"), dict(method="caption")],
}

# Per-expert dimension of the reference teacher files (`vid_embds` / `text_embds`): the teachers
# are CE models with ce_shared_dim 768.
TEACHER_EMBEDDING_DIM = 768


@dataclasses.dataclass(frozen=True)
class Size:
    """A reference CE+ config, as a fixture's effective_config with its shrunk entries restored.

    The fixture was produced from the real config with only size-related entries overridden (its
    json lists them under "overrides"); `full_size` puts back the real config's values.
    """

    name: str
    fixture: str
    full_size: Mapping[str, Any]
    batch_size: int
    reference_million_parameters: float  # the reference CENet instantiated with the real config


SIZES = {
    "msrvtt": Size(
        name="msrvtt",
        # Inherits the reference configs/msrvtt/train-gpt2-xl-finetuned-mte-adam.json.
        fixture="msrvtt_ce_plus_small",
        full_size={
            "text_dim": TEXT_EMBEDDING_DIMS["gpt2-xl-finetune"],  # CE+ text feature (the fixture uses w2v)
            "ce_shared_dim": 768,  # base_config.json ce_shared_dim
            # data_loader_msrvtt.json via the MSRVTT CE configs: VLAD clusters and max_tokens.
            "arch_args": {"vlad_clusters": {"text": 28, "audio": 8, "speech": 19}},
            "max_tokens": {"text": 37, "audio": 29, "speech": 32},
        },
        batch_size=64,  # MSRVTT data_loader batch_size
        reference_million_parameters=262.7,
    ),
    "activitynet": Size(
        name="activitynet",
        # Inherits the reference configs/activity-net/train-gpt2-xl-finetuned-mte-adam.json.
        fixture="activitynet_fused_small",
        full_size={
            "ce_shared_dim": 768,  # base_config.json ce_shared_dim
            # data_loader_activity-net.json via the ActivityNet CE configs: VLAD clusters, max_tokens.
            "arch_args": {"vlad_clusters": {"text": 39, "audio": 6, "speech": 100}},
            "max_tokens": {"text": 49, "audio": 4, "speech": 29},
            # feat_aggregation feat_dims of the fixed experts (the fixture shrinks them): the
            # feature extractors' output sizes, the same as in the MSRVTT config.
            "raw_input_dims": {
                "imagenet.resnext101_32x48d.0": 2048,
                "imagenet.senet154.0": 2048,
                "r2p1d.r2p1d-ig65m-kinetics.0": 512,
                "r2p1d.r2p1d-ig65m.0": 512,
                "scene.densenet161.0": 2208,
            },
        },
        batch_size=32,  # ActivityNet data_loader batch_size
        reference_million_parameters=376.0,
    ),
}


def _merged(base: Mapping, override: Mapping) -> dict:
    """`base` with the entries of `override` replaced; nested mappings merge."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_size(size: Size, fixtures: pathlib.Path, tiny: bool) -> tuple[ModelConfig, dict]:
    """(model config, training hyperparameters) of `size`, real or (tiny) as the fixture has it."""
    path = fixtures / f"{size.fixture}.json"
    if not path.is_file():
        raise SystemExit(f"reference fixture {path} not found; pass --fixtures or set TT_JAX_FIXTURES")
    with path.open() as handle:
        effective = json.load(handle)["effective_config"]
    if not tiny:
        effective = _merged(effective, size.full_size)
    return model_config_from_reference(effective), training_hyperparameters_from_reference(effective)


# ---------------------------------------------------------------------------------------------
# Inputs, teachers and steps.
# ---------------------------------------------------------------------------------------------


def random_batch(config: ModelConfig, batch_size: int, teacher_names: tuple[str, ...], seed: int = 0) -> dict:
    """A host batch with every input any variant reads.

    "text" holds the student's embedding ("student") and one per live teacher; flaky experts miss
    about one video in ten (NaN rows, availability 0, as in the feature release).
    """
    rng = np.random.default_rng(seed)
    experts, availability = {}, {}
    for expert in config.experts:
        features = rng.standard_normal((batch_size,) + expert.input_shape, dtype=np.float32)
        present = np.ones(batch_size, np.float32)
        if expert.flaky:
            present[1:] = rng.random(batch_size - 1) > 0.1
            features[present == 0] = np.nan
        experts[expert.name], availability[expert.name] = features, present
    text_shape = (batch_size, 1, config.text_max_tokens, config.text_dim)
    text = {name: rng.standard_normal(text_shape, dtype=np.float32) for name in ("student",) + teacher_names}

    def unit_rows(shape):
        rows = rng.standard_normal(shape, dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=-1, keepdims=True)

    # The teachers embed like the student (768-d at the reference sizes, TEACHER_EMBEDDING_DIM), so
    # that the feature-level terms can compare them.
    dims = {expert.name: config.embedding_dim(expert) for expert in config.experts}
    teacher_embeddings = {
        name: {
            "video": {e: unit_rows((batch_size, dims[e])) for e in config.expert_names},
            "text": {e: unit_rows((batch_size, 1, dims[e])) for e in config.expert_names},
        }
        for name in teacher_names
    }
    return {"experts": experts, "availability": availability, "text": text, "teacher_embeddings": teacher_embeddings}


@dataclasses.dataclass
class StepUnderTest:
    """One compiled train step with its own (donated) state and its inputs on the mesh."""

    step: Callable
    state: train.TrainState
    teacher_variables: dict
    batch: dict
    first_loss: float = math.nan  # loss of the first step, from the initial state
    first_call_s: float = math.nan  # compile + one step
    turn_seconds: list = dataclasses.field(default_factory=list)

    def run(self, num_steps: int) -> float:
        """Seconds for `num_steps` steps, up to their results being ready."""
        start = time.perf_counter()
        for _ in range(num_steps):
            self.state, scalars = self.step(self.state, self.teacher_variables, self.batch)
        jax.block_until_ready((self.state, scalars))
        return time.perf_counter() - start

    def steps_per_second(self, steps_per_turn: int) -> float:
        return steps_per_turn / statistics.median(self.turn_seconds)


def build_step(
    variant: str,
    config: ModelConfig,
    hyperparameters: dict,
    host_batch: dict,
    teacher_names: tuple[str, ...],
    mesh: jax.sharding.Mesh,
    terms=None,
    state=None,
) -> StepUnderTest:
    """The train step of `variant` on `mesh`, with a fresh student (always the same initial values).

    terms: distillation term entries (default: TeachText's when there are teachers); state: a
    train state to start from instead of a fresh one (table (c) passes one state along)."""
    if variant == "live":
        teachers = [LiveTeacher(name, build_model(config), text_name=name) for name in teacher_names]
    elif variant == "precomputed":
        teachers = [PrecomputedTeacher(name, config.expert_names) for name in teacher_names]
    else:
        teachers = []
    optimizer = optim.build_optimizer(
        hyperparameters["optimizer"], hyperparameters["learning_rate"], hyperparameters["weight_decay"]
    )
    parsed = None if terms is None else parse_terms(terms)
    objective_fn = objective.make_objective(
        build_model(config, axis_name=parallel.DATA_AXIS),
        teachers,
        objective.ObjectiveOptions(
            margin=hyperparameters["margin"], fix_norm=hyperparameters["fix_norm"], terms=parsed
        ),
        mesh,
        student_text="student",
    )
    replicated = parallel.replicated(mesh)
    distillation = parallel.put_replicated(initial_distillation_state(parsed or ()), mesh)
    if state is None:
        state = jax.jit(train.create_train_state, static_argnums=(0, 1), out_shardings=replicated)(
            build_model(config), optimizer, jax.random.key(0)
        )
    state = state.replace(distillation=distillation)
    init_teacher = jax.jit(init_variables, static_argnums=0, out_shardings=replicated)
    teacher_variables = {
        teacher.name: init_teacher(teacher.model, jax.random.key(index + 1))
        for index, teacher in enumerate(teachers)
        if isinstance(teacher, LiveTeacher)
    }
    batch = {
        "experts": host_batch["experts"],
        "availability": host_batch["availability"],
        "text": {"student": host_batch["text"]["student"]},
    }
    if variant == "live":
        batch["text"].update({name: host_batch["text"][name] for name in teacher_names})
    if variant == "precomputed":
        batch["teacher_embeddings"] = host_batch["teacher_embeddings"]
    parallel.check_batch_divisible(len(host_batch["text"]["student"]), mesh)
    return StepUnderTest(
        step=train.make_train_step(objective_fn, optimizer),
        state=state,
        teacher_variables=teacher_variables,
        batch=parallel.global_batch_from_process_data(batch, mesh),
    )


def warm_up(under_test: StepUnderTest, warmup_steps: int) -> None:
    """Compiles (first call, its loss kept for the checks) and runs the remaining warm-up steps."""
    start = time.perf_counter()
    under_test.state, scalars = under_test.step(under_test.state, under_test.teacher_variables, under_test.batch)
    under_test.first_loss = float(scalars["loss"])
    under_test.first_call_s = time.perf_counter() - start
    if warmup_steps > 1:
        under_test.run(warmup_steps - 1)


def time_in_turns(steps: list[StepUnderTest], repeats: int, steps_per_turn: int) -> None:
    """Each step runs `steps_per_turn` steps in turn with the others, `repeats` times.

    The transfer guard turns any hidden host<->device copy inside the timed loop into an error.
    """
    with jax.transfer_guard("disallow"):
        for _ in range(repeats):
            for under_test in steps:
                under_test.turn_seconds.append(under_test.run(steps_per_turn))


# ---------------------------------------------------------------------------------------------
# The two tables.
# ---------------------------------------------------------------------------------------------


def measure_variants(size: Size, config, hyperparameters, teacher_names, timing) -> list[tuple]:
    """Table (a) rows for one size: (variant, steps/s, compile s) on one device."""
    host_batch = random_batch(config, size.batch_size, teacher_names)
    mesh = parallel.make_mesh(1)
    steps = {}
    for variant in [v for v in VARIANTS if v == "student" or v in _VARIANTS.value]:
        print(f"  {size.name}: compiling {VARIANTS[variant]} ...", file=sys.stderr, flush=True)
        steps[variant] = build_step(variant, config, hyperparameters, host_batch, teacher_names, mesh)
        warm_up(steps[variant], timing["warmup_steps"])
    time_in_turns(list(steps.values()), timing["repeats"], timing["steps_per_repeat"])
    rows = []
    for variant, under_test in steps.items():
        steps_per_s = under_test.steps_per_second(timing["steps_per_repeat"])
        compile_s = max(under_test.first_call_s - 1.0 / steps_per_s, 0.0)
        rows.append((variant, steps_per_s, compile_s))
    return rows


def measure_terms(size: Size, config, hyperparameters, teacher_names, timing, names) -> list[tuple]:
    """Table (c) rows for one size: (variant, steps/s) on one device, the student alone first.

    Every variant continues the same train state (handed from one to the next, each swapping in
    its own distillation state), so one copy of the parameters and moments serves them all."""
    host_batch = random_batch(config, size.batch_size, teacher_names)
    mesh = parallel.make_mesh(1)
    steps = {"student": build_step("student", config, hyperparameters, host_batch, teacher_names, mesh, terms=[])}
    warm_up(steps["student"], timing["warmup_steps"])
    for name in names:
        entries = TERM_VARIANTS[name]
        needs_teachers = any(METHODS[entry["method"]].reads != "student" for entry in entries)
        print(f"  {size.name}: compiling the {name} term ...", file=sys.stderr, flush=True)
        shared = next(reversed(steps.values())).state
        steps[name] = build_step(
            "precomputed" if needs_teachers else "student", config, hyperparameters, host_batch, teacher_names,
            mesh, terms=entries, state=shared,
        )
        warm_up(steps[name], timing["warmup_steps"])
    order = list(steps.values())
    with jax.transfer_guard("disallow"):
        for _ in range(timing["repeats"]):
            for index, under_test in enumerate(order):
                previous = order[index - 1]
                under_test.state = previous.state.replace(distillation=under_test.state.distillation)
                under_test.turn_seconds.append(under_test.run(timing["steps_per_repeat"]))
    return [(name, under_test.steps_per_second(timing["steps_per_repeat"])) for name, under_test in steps.items()]


def measure_scaling(size: Size, config, hyperparameters, teacher_names, device_counts, timing) -> list[tuple]:
    """Table (b) rows for one size: (devices, steps/s, first-step loss), one count at a time."""
    host_batch = random_batch(config, size.batch_size, teacher_names)
    rows = []
    for num_devices in device_counts:
        print(f"  {size.name}: compiling on {num_devices} device(s) ...", file=sys.stderr, flush=True)
        mesh = parallel.make_mesh(num_devices)
        under_test = build_step(_SCALING_VARIANT.value, config, hyperparameters, host_batch, teacher_names, mesh)
        warm_up(under_test, timing["warmup_steps"])
        time_in_turns([under_test], timing["repeats"], timing["steps_per_repeat"])
        rows.append((num_devices, under_test.steps_per_second(timing["steps_per_repeat"]), under_test.first_loss))
        del under_test  # one copy of the parameters per device: free them before the next count
    return rows


def device_counts_to_measure() -> list[int]:
    """--devices, sorted, with 1 (the baseline) added and counts beyond this machine's dropped."""
    try:
        requested = sorted({1} | {int(count) for count in _DEVICES.value})
    except ValueError:
        raise app.UsageError(f"--devices must be integers, got {_DEVICES.value}")
    available = jax.device_count()
    skipped = [count for count in requested if count > available]
    if skipped:
        print(f"skipping {skipped} devices: only {available} available", file=sys.stderr)
    return [count for count in requested if count <= available]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [name for name in _SIZES.value if name not in SIZES]
    if unknown:
        raise app.UsageError(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    timing = dict(warmup_steps=_WARMUP_STEPS.value, repeats=_REPEATS.value, steps_per_repeat=_STEPS_PER_REPEAT.value)
    if _QUICK.value:
        timing = dict(warmup_steps=1, repeats=2, steps_per_repeat=1)
    device_counts = device_counts_to_measure()

    term_names = list(TERM_VARIANTS) if _TERMS.value == ["all"] else _TERMS.value
    unknown_terms = [name for name in term_names if name not in TERM_VARIANTS]
    if unknown_terms:
        raise app.UsageError(f"unknown --terms {unknown_terms}; choose from {list(TERM_VARIANTS)} or 'all'")
    tables = set(_TABLES.value) | ({"c"} if term_names else set())
    variant_rows, scaling_rows, term_rows = [], [], []
    for name in _SIZES.value:
        size = SIZES[name]
        config, hyperparameters = load_size(size, pathlib.Path(_FIXTURES.value), _TINY.value)
        millions = count_parameters(config) / 1e6
        if not _TINY.value and abs(millions - size.reference_million_parameters) > 0.05:
            raise SystemExit(
                f"{size.name}: the restored config has {millions:.1f}M parameters, the reference "
                f"config {size.reference_million_parameters}M: the sizes in SIZES are wrong"
            )
        teacher_names = tuple(f"teacher_{index + 1}" for index in range(NUM_TEACHERS))
        if "a" in tables:
            for variant, steps_per_s, compile_s in measure_variants(size, config, hyperparameters, teacher_names, timing):
                variant_rows.append((size, millions, variant, steps_per_s, compile_s))
        if "b" in tables:
            for num_devices, steps_per_s, loss in measure_scaling(
                size, config, hyperparameters, teacher_names, device_counts, timing
            ):
                scaling_rows.append((size, num_devices, steps_per_s, loss))
        if "c" in tables:
            for variant, steps_per_s in measure_terms(size, config, hyperparameters, teacher_names, timing, term_names):
                term_rows.append((size, variant, steps_per_s))

    device = jax.devices()[0]
    print(
        f"devices: {jax.device_count()} x {device.platform} ({device.device_kind}); "
        f"sizes: {'fixtures (tiny)' if _TINY.value else 'reference'}; "
        f"timing: {timing['warmup_steps']} warm-up steps, median of {timing['repeats']} turns "
        f"of {timing['steps_per_repeat']} steps\n"
    )
    if term_rows:
        print_term_table(term_rows)
    if not variant_rows:
        return
    header = f"{'size':<12} {'params':>8} {'batch':>5}  {'variant':<33} {'compile s':>9} {'steps/s':>8} {'x student':>9}"
    print("(a) one device")
    print(header)
    print("-" * len(header))
    student_steps_per_s = {}
    for size, millions, variant, steps_per_s, compile_s in variant_rows:
        student_steps_per_s.setdefault(size.name, steps_per_s)  # "student" comes first
        ratio = student_steps_per_s[size.name] / steps_per_s
        print(
            f"{size.name:<12} {millions:>7.1f}M {size.batch_size:>5}  {VARIANTS[variant]:<33} "
            f"{compile_s:>9.1f} {steps_per_s:>8.2f} {ratio:>8.2f}x"
        )
    print(
        "x student: step time over the student-only step time (target for 3 live teachers: <= 1.6x)."
        "\ncompile s: first call minus one timed step.\n"
    )

    header = f"{'size':<12} {'batch':>5} {'devices':>7} {'steps/s':>8} {'speed-up':>8} {'loss':>10} {'loss rel. diff':>14}"
    print(f"(b) {VARIANTS[_SCALING_VARIANT.value]}, fixed global batch")
    print(header)
    print("-" * len(header))
    one_device = {}
    for size, num_devices, steps_per_s, loss in scaling_rows:
        one_device.setdefault(size.name, (steps_per_s, loss))  # 1 device comes first
        base_steps_per_s, base_loss = one_device[size.name]
        relative_difference = abs(loss - base_loss) / max(abs(base_loss), 1e-30)
        print(
            f"{size.name:<12} {size.batch_size:>5} {num_devices:>7} {steps_per_s:>8.2f} "
            f"{steps_per_s / base_steps_per_s:>7.2f}x {loss:>10.6f} {relative_difference:>14.1e}"
        )
    print(
        "speed-up: steps/s over the 1-device steps/s. loss: the first step's (same initial state and"
        " batch on every count);\nits rel. diff to the 1-device loss should be float32 rounding"
        " (<~1e-6). Fake CPU devices share the same cores."
    )


def print_term_table(term_rows) -> None:
    header = f"{'size':<12} {'batch':>5}  {'term':<22} {'teachers':<12} {'steps/s':>8} {'x student':>9}"
    print("(c) one device, one distillation term each")
    print(header)
    print("-" * len(header))
    student = {}
    for size, variant, steps_per_s in term_rows:
        student.setdefault(size.name, steps_per_s)  # the student alone comes first
        entries = TERM_VARIANTS.get(variant, [])
        teachers = "3 precomp." if any(METHODS[e["method"]].reads != "student" for e in entries) else "none"
        print(
            f"{size.name:<12} {size.batch_size:>5}  {variant:<22} {teachers:<12} {steps_per_s:>8.2f} "
            f"{student[size.name] / steps_per_s:>8.2f}x"
        )
    print(
        "x student: step time over the student-only step time, all measured in turns in this run"
        " (the teachtext row is the cost of 3 precomputed teachers plus TeachText's Huber).\n"
    )


if __name__ == "__main__":
    app.run(main)
