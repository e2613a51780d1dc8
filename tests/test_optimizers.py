"""Adafactor against optax's, per-layer factoring of scanned parameters, schedules, optimizer-state axes.

optax.adafactor follows the same conventions as ours (and T5X's): second-moment decay 1 - t^-0.8 with t the
1-based step, epsilon1 added to g^2 before the moments, factoring over the two largest dims (the later on
ties), v_row = mean over the column dim, update clipped at block RMS 1.0, then scaled by the learning rate
schedule at the 0-based count and by max(RMS(param), 1e-3). So the two are compared directly.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_lite import models, optimizers, partitioning
from tests.helpers import TINY

# Measured: at most 5e-7 relative difference in the updates over 5 steps (float32 rounding: rsqrt vs **-0.5,
# order of the means). Updates are of order 1e-4..0.3, so atol 1e-9 only matters for near-zero entries.
RTOL, ATOL = 1e-5, 1e-9


def run(tx, params, grads_per_step):
    """Applies `tx` for each gradient in turn; returns the list of updates and the final params."""
    state = tx.init(params)
    update_fn = jax.jit(tx.update)
    updates_seen = []
    for grads in grads_per_step:
        updates, state = update_fn(grads, state, params)
        updates_seen.append(jax.device_get(updates))
        params = optax.apply_updates(params, updates)
    return updates_seen, jax.device_get(params), state


def random_tree(rng, shapes, scales):
    """Arrays whose rows and columns have very different scales, so that factoring matters."""
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape)
        for dim, n in enumerate(shape):
            x = x * np.exp(rng.uniform(-scales, scales, n)).reshape([n if d == dim else 1 for d in range(len(shape))])
        out[name] = jnp.asarray(x, jnp.float32)
    return out


SHAPES = {"kernel": (256, 384), "bias": (384,), "small": (64, 96)}


@pytest.mark.parametrize("with_logical_axes", [False, True])
def test_adafactor_matches_optax(with_logical_axes):
    rng = np.random.default_rng(0)
    params = random_tree(rng, SHAPES, 0.5)
    params["small"] = params["small"] * 1e-5  # RMS below 1e-3: the parameter scale's floor is used
    grads = [random_tree(rng, SHAPES, 1.0) for _ in range(5)]
    # A warm-up of 3 steps makes the learning rate change over the run (schedule indexing must agree).
    schedule = optimizers.rsqrt_decay_schedule(0.1, warmup_steps=3)
    axes = {"kernel": ("embed", "mlp"), "bias": ("embed",), "small": ("embed", "mlp")} if with_logical_axes else None
    ours = optimizers.adafactor(schedule, axes)
    reference = optax.adafactor(
        schedule,
        min_dim_size_to_factor=128,
        decay_rate=0.8,
        multiply_by_parameter_scale=True,
        clipping_threshold=1.0,
        momentum=None,
        eps=1e-30,
    )
    our_updates, our_params, our_state = run(ours, params, grads)
    ref_updates, ref_params, ref_state = run(reference, params, grads)
    # The kernel is factored, the bias and the small kernel (64 < 128) are not.
    assert our_state.v_row["kernel"].shape == (256,) and our_state.v_col["kernel"].shape == (384,)
    assert our_state.v["bias"].shape == (384,) and our_state.v["small"].shape == (64, 96)
    for name in SHAPES:
        for step, (a, b) in enumerate(zip(our_updates, ref_updates)):
            np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} at step {step}")
        # Parameters of order 1 moved by updates of order 0.05: rounding of p + u is ~1e-7 absolute.
        np.testing.assert_allclose(our_params[name], ref_params[name], rtol=RTOL, atol=1e-6)
    # optax chains scale_by_factored_rms (state 0) with stateless clipping and scaling.
    np.testing.assert_allclose(our_state.v_row["kernel"], ref_state[0].v_row["kernel"], rtol=RTOL)
    np.testing.assert_allclose(our_state.v_col["kernel"], ref_state[0].v_col["kernel"], rtol=RTOL)
    # The comparison is not vacuous: the first update of the kernel is clipped and not a plain sign(g) step.
    first = our_updates[0]["kernel"] / (0.1 / np.sqrt(3) * np.sqrt(np.mean(np.square(params["kernel"]))))
    assert np.sqrt(np.mean(np.square(first))) == pytest.approx(1.0, rel=1e-4)  # clipped at RMS 1
    assert np.std(np.abs(first)) > 0.1


def test_scanned_parameter_is_updated_layer_by_layer():
    """[layers, embed, mlp] with a `layers` logical axis: each layer is factored, clipped and scaled on its
    own, exactly as the same layer would be as a separate parameter."""
    rng = np.random.default_rng(1)
    num_layers = 3
    # Each layer has its own scale, so a moment, clip or RMS shared across layers would show.
    layer_scales = np.array([1e-2, 1.0, 30.0], np.float32)
    stacked = {
        "kernel": random_tree(rng, {"k": (num_layers, 128, 192)}, 0.5)["k"] * layer_scales[:, None, None],
        "scale": random_tree(rng, {"s": (num_layers, 128)}, 0.5)["s"] * layer_scales[:, None],
    }
    grads = [
        {
            "kernel": random_tree(rng, {"k": (num_layers, 128, 192)}, 1.0)["k"] / layer_scales[:, None, None],
            "scale": random_tree(rng, {"s": (num_layers, 128)}, 1.0)["s"] * layer_scales[:, None],
        }
        for _ in range(4)
    ]
    axes = {"kernel": ("layers", "embed", "mlp"), "scale": ("layers", "embed")}
    scanned_updates, _, scanned_state = run(optimizers.adafactor(0.01, axes), stacked, grads)
    assert scanned_state.v_row["kernel"].shape == (num_layers, 128)
    assert scanned_state.v_col["kernel"].shape == (num_layers, 192)
    for layer in range(num_layers):
        one = jax.tree.map(lambda x: x[layer], stacked)
        one_grads = [jax.tree.map(lambda x: x[layer], g) for g in grads]
        one_axes = {"kernel": ("embed", "mlp"), "scale": ("embed",)}
        layer_updates, _, _ = run(optimizers.adafactor(0.01, one_axes), one, one_grads)
        for step, (a, b) in enumerate(zip(scanned_updates, layer_updates)):
            for name in ("kernel", "scale"):
                np.testing.assert_allclose(
                    a[name][layer], b[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} layer {layer} step {step}"
                )
    # Without the `layers` name the stack is one 3-D tensor (factored over its two largest dims, clipped and
    # scaled as a whole), which is a different update: the test above can tell the two apart.
    whole_updates, _, _ = run(optimizers.adafactor(0.01), stacked, grads)
    assert not np.allclose(whole_updates[0]["kernel"], scanned_updates[0]["kernel"], rtol=1e-2)


def test_rsqrt_decay_schedule():
    schedule = optimizers.rsqrt_decay_schedule()
    for step in (0, 1, 5000, 9999, 10_000):
        np.testing.assert_allclose(schedule(jnp.asarray(step)), 0.01, rtol=1e-6)
    for step in (10_001, 40_000, 250_000, 1_000_000):
        np.testing.assert_allclose(schedule(jnp.asarray(step)), 1.0 / np.sqrt(step), rtol=1e-6)
    np.testing.assert_allclose(optimizers.rsqrt_decay_schedule(2.0, 100)(jnp.asarray(400)), 0.1, rtol=1e-6)


def test_warmup_cosine_schedule_endpoints():
    schedule = optimizers.warmup_cosine_schedule(peak_learning_rate=1e-3, warmup_steps=100, decay_steps=1100,
                                                 end_learning_rate=1e-5)
    value = lambda step: float(schedule(jnp.asarray(step)))
    assert value(0) == 0.0
    np.testing.assert_allclose(value(50), 5e-4, rtol=1e-5)  # linear warm-up
    np.testing.assert_allclose(value(100), 1e-3, rtol=1e-6)  # the peak
    np.testing.assert_allclose(value(600), (1e-3 + 1e-5) / 2, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(value(1100), 1e-5, rtol=1e-5)  # the end ...
    np.testing.assert_allclose(value(5000), 1e-5, rtol=1e-5)  # ... and after it


def tiny_abstract_params():
    boxed = jax.eval_shape(models.EncoderDecoderModel(TINY).init, jax.random.PRNGKey(0))
    return nn.unbox(boxed), partitioning.logical_axes(boxed)


def test_state_logical_axes_of_adamw():
    params, axes = tiny_abstract_params()
    tx = optimizers.adamw(1e-3)  # clip_by_global_norm then adamw: a chain of states
    state = jax.eval_shape(tx.init, params)
    state_axes = optimizers.state_logical_axes(state, params, axes)
    adam_state = state_axes[1][0]
    assert isinstance(adam_state, optax.ScaleByAdamState)
    for moments in (adam_state.mu, adam_state.nu):
        assert moments == axes
    assert adam_state.count is None
    counters = [a for a in jax.tree.leaves(state_axes, is_leaf=partitioning.is_logical_axes) if a is None]
    # Only the adam counter is unnamed (the other states are empty).
    assert len(counters) == 1
    assert adam_state.mu["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] == ("embed", "mlp")


def test_state_logical_axes_of_adafactor():
    params, axes = tiny_abstract_params()
    tx = optimizers.adafactor(logical_axes=axes, min_dim_size_to_factor=16)
    state = jax.eval_shape(tx.init, params)
    state_axes = optimizers.state_logical_axes(state, params, axes)
    assert state_axes.count is None
    mlp = lambda tree: tree["decoder"]["layers_1"]["mlp"]
    attention = lambda tree: tree["encoder"]["layers_0"]["attention"]
    # wi_0 [embed 32, mlp 64]: v_row keeps the rows (drops the larger mlp dim), v_col the columns.
    assert mlp(state_axes.v_row)["wi_0"]["kernel"] == ("embed",)
    assert mlp(state_axes.v_col)["wi_0"]["kernel"] == ("mlp",)
    # wo [mlp 64, embed 32]: the larger dim comes first; v_row still keeps the smaller one.
    assert mlp(state.v_row)["wo"]["kernel"].shape == (32,)
    assert mlp(state_axes.v_row)["wo"]["kernel"] == ("embed",)
    assert mlp(state_axes.v_col)["wo"]["kernel"] == ("mlp",)
    # A square kernel [embed 32, joined_kv 32]: the shapes of v_row and v_col are equal, the axes are not.
    assert attention(state_axes.v_row)["query"]["kernel"] == ("embed",)
    assert attention(state_axes.v_col)["query"]["kernel"] == ("joined_kv",)
    assert attention(state_axes.v_row)["out"]["kernel"] == ("joined_kv",)
    assert attention(state_axes.v_col)["out"]["kernel"] == ("embed",)
    # Unfactored parameters keep their full second moment; the placeholders are replicated.
    assert state_axes.v["decoder"]["decoder_norm"]["scale"] == ("embed",)
    assert state_axes.v["encoder"]["relpos_bias"]["rel_embedding"] == ("heads", "relpos_buckets")
    assert mlp(state_axes.v)["wi_0"]["kernel"] is None
    assert state_axes.v_row["decoder"]["decoder_norm"]["scale"] is None


def test_state_logical_axes_of_scanned_adafactor():
    """A scanned square kernel [layers 2, embed 32, joined_kv 32]: the moments keep the `layers` axis."""
    params = {
        "query": jax.ShapeDtypeStruct((2, 32, 32), jnp.float32),
        "wi": jax.ShapeDtypeStruct((32, 32, 64), jnp.float32),
    }
    axes = {"query": ("layers", "embed", "joined_kv"), "wi": ("layers", "embed", "mlp")}
    tx = optimizers.adafactor(logical_axes=axes, min_dim_size_to_factor=16)
    state_axes = optimizers.state_logical_axes(jax.eval_shape(tx.init, params), params, axes)
    assert state_axes.v_row["query"] == ("layers", "embed")
    assert state_axes.v_col["query"] == ("layers", "joined_kv")
    # 32 layers of [32, 64]: v_col [layers, mlp] has the shape of "wi less embed" and of "wi less layers".
    assert state_axes.v_row["wi"] == ("layers", "embed")
    assert state_axes.v_col["wi"] == ("layers", "mlp")


def test_build_passes_logical_axes_only_when_asked():
    axes = {"w": ("embed", "mlp")}
    seen = {}

    def wants_axes(logical_axes=None):
        seen["axes"] = logical_axes
        return optax.sgd(0.1)

    optimizers.build(wants_axes, axes)
    assert seen["axes"] is axes
    assert isinstance(optimizers.build(lambda: optax.sgd(0.1), axes), optax.GradientTransformation)
