"""Evaluator objects: variables stay where they live, one compilation per split, any mesh."""

from __future__ import annotations

import jax
import numpy as np

from test_train import tiny_config
from tt_jax import parallel
from tt_jax.evaluate import Evaluator
from tt_jax.metrics import retrieval_metrics
from tt_jax.models import build_model, init_variables
from tt_jax.models.similarity import retrieval_similarity
from tt_jax.train import run_stores
from tt_jax.models import as_model_config


def setup():
    config = tiny_config("baseline")
    store = run_stores(config)["val"]
    model = build_model(as_model_config(config.model))
    return model, store


def test_an_evaluator_runs_on_device_variables_without_host_copies_and_compiles_once():
    model, store = setup()
    mesh = parallel.make_mesh()
    evaluator = Evaluator(model, store, "poor", mesh=mesh, chunk_videos=10)
    init = jax.jit(lambda key: init_variables(model, key), out_shardings=parallel.replicated(mesh))
    on_device = [init(jax.random.key(seed)) for seed in (0, 1)]
    with jax.transfer_guard("disallow"):  # an implicit host<->device copy would raise here
        results = [evaluator.run(variables, return_similarity=True) for variables in on_device]
    assert evaluator._embed._cache_size() == 1  # one program for every chunk and every variable set
    assert results[0]["t2v"] != results[1]["t2v"]
    # Against the whole split embedded at once and ranked by the metrics module.
    host_variables = init_variables(model, jax.random.key(1))
    experts, availability, text, masks = store.eval_inputs("poor", model.config.text_max_tokens)
    whole = retrieval_similarity(model.apply(host_variables, experts, availability, text, train=False), model.config.expert_names)
    np.testing.assert_allclose(results[1]["similarity"], whole, rtol=1e-5, atol=1e-6)
    expected = retrieval_metrics(np.asarray(whole), masks)
    for direction in ("t2v", "v2t"):
        for name, value in expected[direction].items():
            assert results[1][direction][name] == np.float64(value) or abs(results[1][direction][name] - value) < 1e-9


def test_the_evaluator_gives_the_one_device_metrics_on_any_mesh():
    model, store = setup()
    variables = init_variables(model, jax.random.key(2))
    reference = Evaluator(model, store, "poor", mesh=parallel.make_mesh(1), chunk_videos=7).run(variables)
    for devices in (2, 4, 8):
        mesh = parallel.make_mesh(devices)
        evaluator = Evaluator(model, store, "poor", mesh=mesh, chunk_videos=7)
        assert evaluator.chunk_videos % devices == 0
        assert evaluator.run(jax.device_put(variables, parallel.replicated(mesh))) == reference
