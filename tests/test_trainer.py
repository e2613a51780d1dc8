"""The train and eval steps: microbatching, scanned == unscanned, loss normalisation, dropout, eval sums, bf16.

Every trainer starts from the same initial parameters (those of the single-device reference run), so runs
differ only in what is under test. Trainers are built once per configuration: each one compiles its step.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import losses, models, network, optimizers, partitioning
from t5x_lite import trainer as trainer_lib
from tests.helpers import TINY, random_batch

# Adafactor factors every kernel of the tiny model at this threshold (the default, 128, factors none).
ADAFACTOR = functools.partial(optimizers.adafactor, min_dim_size_to_factor=16)
SGD = optax.sgd(1.0)
NUM_STEPS = 3

# float32, different summation orders (microbatch accumulation, sharding, scan). Measured: parameters within
# 2.4e-7 absolute (at most 2% of atol + rtol * |p|) after 1 step (microbatches, (1, 1) and (4, 2)) and after 3
# (scan); metrics within 2.3e-7 relative. Adafactor's update does not change when a parameter's gradient is
# scaled, so the gradient's scale is checked through the logged grad_norm.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
METRIC_RTOL = 5e-6


def build_trainer(config=TINY, mesh_shape=(1, 1), optimizer=ADAFACTOR, *, num_microbatches=1, seed=0, **model_kwargs):
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    model = models.EncoderDecoderModel(config, **model_kwargs)
    return trainer_lib.Trainer(
        model,
        partitioning.Partitioner(mesh_shape, devices=devices),
        optimizer,
        num_microbatches=num_microbatches,
        learning_rate_fn=optimizers.rsqrt_decay_schedule(),
        seed=seed,
    )


make_trainer = functools.cache(build_trainer)


def fresh_state(trainer, params):
    """A step-0 state of `trainer` holding these (host) parameters, laid out by its shardings."""
    shardings = trainer.state_shardings
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings.opt_state)(params)
    return trainer_lib.TrainState(step=jax.device_put(np.int32(0), shardings.step), params=params, opt_state=opt_state)


def train(trainer, state, batches):
    """-> (host params after each step, host metrics of each step)."""
    params, metrics = [], []
    for batch in batches:
        state, step_metrics = trainer.train_step(state, batch)
        params.append(jax.device_get(state.params))
        metrics.append(jax.device_get(step_metrics))
    return params, metrics


def batches(num_steps=NUM_STEPS):
    return [random_batch(seed=step) for step in range(num_steps)]


@pytest.fixture(scope="module")
def reference():
    """The single-device, full-batch, unscanned float32 run every other run is compared with."""
    trainer = make_trainer()
    state = trainer.init_state()
    init_params = jax.device_get(state.params)
    params, metrics = train(trainer, state, batches())
    return {"init": init_params, "params": params, "metrics": metrics}


def assert_trees_close(actual, expected, rtol=PARAM_RTOL, atol=PARAM_ATOL):
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_expected = jax.tree.leaves(expected)
    assert len(flat_actual) == len(flat_expected)
    for (path, a), b in zip(flat_actual, flat_expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def max_change(after, before):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_reference_run_learns_and_logs(reference):
    metrics = reference["metrics"]
    assert [float(m["weight"]) for m in metrics] == [float(b["decoder_loss_weights"].sum()) for b in batches()]
    np.testing.assert_allclose([m["learning_rate"] for m in metrics], 0.01, rtol=1e-6)
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    # Every step changes every parameter by much more than the tolerances used below.
    for before, after in zip([reference["init"]] + reference["params"][:-1], reference["params"]):
        changes = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after, before)
        assert min(jax.tree.leaves(changes)) > 1e-4


@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2)], ids=["mesh1x1", "mesh4x2"])
def test_microbatches_give_the_full_batch_update(mesh_shape, reference):
    trainer = make_trainer(mesh_shape=mesh_shape, num_microbatches=4)
    params, metrics = train(trainer, fresh_state(trainer, reference["init"]), batches(1))
    assert_trees_close(params[0], reference["params"][0])
    for name in ("loss", "z_loss", "accuracy", "weight", "grad_norm"):
        np.testing.assert_allclose(metrics[0][name], reference["metrics"][0][name], rtol=METRIC_RTOL, err_msg=name)


def test_batch_must_divide_into_microbatches(reference):
    trainer = make_trainer(num_microbatches=4)
    with pytest.raises(ValueError, match="batch size 6 does not divide into num_microbatches=4"):
        trainer.train_step(fresh_state(trainer, reference["init"]), random_batch(batch_size=6))
    with pytest.raises(ValueError, match="num_microbatches must be >= 1, got 0"):
        build_trainer(num_microbatches=0)


def test_scanned_and_unscanned_train_to_the_same_parameters(reference):
    """Adafactor factors, clips and scales each layer of the scanned stack on its own, like the unscanned."""
    trainer = make_trainer(dataclasses.replace(TINY, scan_layers=True))
    state = fresh_state(trainer, network.scan_params(reference["init"]))
    assert state.opt_state.v_row["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32)
    params, metrics = train(trainer, state, batches())
    np.testing.assert_allclose(
        [m["loss"] for m in metrics], [m["loss"] for m in reference["metrics"]], rtol=METRIC_RTOL
    )
    assert_trees_close(network.unscan_params(params[-1]), reference["params"][-1])


def reference_loss(logits, batch, z_loss):
    """Per-token cross entropy + z_loss * logZ^2, averaged over the loss weights, in float64."""
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    target_logits = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    per_token = log_z - target_logits + z_loss * log_z**2
    correct = np.argmax(logits, -1) == targets
    total = weights.sum()
    return {
        "loss": (per_token * weights).sum() / total,
        "z_loss": (z_loss * log_z**2 * weights).sum() / total,
        "accuracy": (correct * weights).sum() / total,
    }


def test_logged_loss_is_the_mean_per_token_loss(reference):
    trainer = make_trainer()
    batch = batches(1)[0]
    logits = jax.jit(trainer.model.logits)(reference["init"], batch)
    expected = reference_loss(logits, batch, trainer.model.z_loss)
    metrics = reference["metrics"][0]
    np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], expected["z_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], expected["accuracy"], atol=1e-7)
    assert expected["z_loss"] > 1e-4 * expected["loss"]  # z-loss is a visible part of the checked loss
    # The untrained model gets no token right; make it right on every other example to check the accuracy.
    # (Teacher forcing: the logits do not depend on the targets, only on which are padding.)
    predictions = np.argmax(np.asarray(logits), -1)
    half_right = dict(batch)
    replace = (np.arange(8)[:, None] % 2 == 0) & (batch["decoder_target_tokens"] > 0) & (predictions > 0)
    half_right["decoder_target_tokens"] = np.where(replace, predictions, batch["decoder_target_tokens"])
    expected = reference_loss(logits, half_right, trainer.model.z_loss)
    assert expected["accuracy"] > 0.3
    evaluated = trainer_lib.accumulate([trainer.eval_step(reference["init"], half_right)])
    np.testing.assert_allclose(evaluated["accuracy"], expected["accuracy"], atol=1e-7)
    np.testing.assert_allclose(evaluated["loss"], expected["loss"], rtol=1e-6)


@pytest.mark.parametrize("factor, denominator", [(None, 1.0), (1000.0, 1000.0), ("NUM_TOTAL_TARGET_TOKENS", 64.0)])
def test_loss_normalizing_factor_scales_the_gradient(reference, factor, denominator):
    """One SGD step (lr 1): the update is minus the gradient. With T5X's loss_normalizing_factor the summed loss is
    divided by D (None: 1, a number, the batch's 8 x 8 target positions) instead of the batch's weight W, so the
    gradient is the per-token gradient times W / D; the optimised loss is logged under its own name, and the
    per-token loss is logged as `loss` either way."""
    per_token = make_trainer(optimizer=SGD)
    scaled = make_trainer(optimizer=SGD, loss_normalizing_factor=factor)
    batch = batches(1)
    p_params, p_metrics = train(per_token, fresh_state(per_token, reference["init"]), batch)
    c_params, c_metrics = train(scaled, fresh_state(scaled, reference["init"]), batch)
    ratio = float(batch[0]["decoder_loss_weights"].sum()) / denominator
    np.testing.assert_allclose(c_metrics[0]["grad_norm"], p_metrics[0]["grad_norm"] * ratio, rtol=1e-6)
    grads = lambda params: jax.tree.map(lambda before, after: before - after, reference["init"], params[0])
    # The gradients come back as params - (params - gradient): rounding at the parameters' scale (up to ~4).
    # Measured for 1000: within 1.2e-7 absolute (12% of atol); the smallest leaf's largest gradient is 3e-4.
    # Summed (ratio 44), the gradients are larger, and so is their rounding.
    assert_trees_close(grads(c_params), jax.tree.map(lambda g: g * ratio, grads(p_params)), atol=PARAM_ATOL * max(1, ratio))
    assert max_change(c_params[0], reference["init"]) > 1e-3
    np.testing.assert_allclose(c_metrics[0][scaled.model.objective_name], p_metrics[0]["loss"] * ratio, rtol=1e-6)
    np.testing.assert_allclose(p_metrics[0]["loss/NUM_REAL_TARGET_TOKENS"], p_metrics[0]["loss"], rtol=1e-6)
    for name in ("loss", "z_loss", "accuracy", "weight"):
        np.testing.assert_allclose(c_metrics[0][name], p_metrics[0][name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(p_metrics[0][name], reference["metrics"][0][name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("num_microbatches", [1, 4])
def test_average_per_sequence_weighs_every_sequence_the_same(reference, num_microbatches):
    """AVERAGE_PER_SEQUENCE: the gradient is that of the mean over sequences of each sequence's mean token loss
    (autodiff of that written out), with or without microbatches."""
    trainer = make_trainer(optimizer=SGD, loss_normalizing_factor="AVERAGE_PER_SEQUENCE",
                           num_microbatches=num_microbatches)
    batch = batches(1)[0]
    weights = batch["decoder_loss_weights"]
    assert len(set(weights.sum(-1))) > 1  # sequences of different lengths: per sequence differs from per token

    def mean_of_sequence_means(params):
        logits = trainer.model.logits(params, batch)
        loss, _ = losses.cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"], z_loss=trainer.model.z_loss)
        return jnp.mean(jnp.sum(loss * weights, -1) / weights.sum(-1))

    expected, expected_grads = jax.value_and_grad(mean_of_sequence_means)(reference["init"])
    params, metrics = train(trainer, fresh_state(trainer, reference["init"]), [batch])
    np.testing.assert_allclose(metrics[0]["loss/AVERAGE_PER_SEQUENCE"], expected, rtol=1e-6)
    assert abs(float(metrics[0]["loss"]) - float(expected)) > 1e-4  # the per-token loss is another number
    assert_trees_close(jax.tree.map(lambda before, after: before - after, reference["init"], params[0]),
                       expected_grads)


def test_dropout_changes_the_run_and_the_seed_reproduces_it(reference):
    config = dataclasses.replace(TINY, dropout_rate=0.1)
    first = make_trainer(config)
    again = build_trainer(config)  # a new trainer with the same seed (and its own compilation)
    two_steps = batches(2)
    params, metrics = train(first, fresh_state(first, reference["init"]), two_steps)
    params_again, metrics_again = train(again, fresh_state(again, reference["init"]), two_steps)
    for a, b in zip(jax.tree.leaves(params + metrics), jax.tree.leaves(params_again + metrics_again)):
        np.testing.assert_array_equal(a, b)
    # Dropout is on: the loss of the first step (same parameters, same batch) and the parameters differ. The
    # untrained model's loss moves little (measured 3.9e-4 at the first step), but far more than float32 rounding.
    for step in range(2):
        assert abs(float(metrics[step]["loss"]) - float(reference["metrics"][step]["loss"])) > 1e-4
    assert max_change(params[1], reference["params"][1]) > 1e-3


def test_eval_sums_accumulate_to_the_train_metrics(reference):
    trainer = make_trainer()
    batch = batches(1)[0]
    whole = trainer_lib.accumulate([trainer.eval_step(reference["init"], batch)])
    halves = trainer_lib.accumulate(
        [
            trainer.eval_step(reference["init"], {k: v[half] for k, v in batch.items()})
            for half in (slice(0, 4), slice(4, 8))
        ]
    )
    train_metrics = reference["metrics"][0]  # computed before that step's update
    for name in ("loss", "z_loss", "accuracy", "weight"):
        np.testing.assert_allclose(whole[name], train_metrics[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(halves[name], train_metrics[name], rtol=1e-6, err_msg=name)


def test_bfloat16_activations_train_with_float32_parameters(reference):
    trainer = make_trainer(dataclasses.replace(TINY, dtype="bfloat16"))
    same_batch = batches(1) * 4
    params, metrics = train(trainer, fresh_state(trainer, reference["init"]), same_batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params[-1]))
    losses = [float(m["loss"]) for m in metrics]
    assert all(np.isfinite(losses))
    # bf16 keeps 8 bits of mantissa (norms, softmax and the loss are in float32): the first loss is the float32
    # one within 5e-3 (measured 1.5e-4).
    np.testing.assert_allclose(losses[0], reference["metrics"][0]["loss"], rtol=5e-3)
    # Measured 5.36, 4.69, 4.14, 3.63 on the repeated batch.
    assert all(later < earlier - 0.1 for earlier, later in zip(losses, losses[1:])), losses
