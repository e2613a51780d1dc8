"""Adafactor against optax's and against numpy re-derivations of T5X's; its factoring by T5X's logical-axis rules
(per layer for scanned parameters); schedules; optimizer-state axes.

For matrices and vectors at T5X's defaults, optax.adafactor follows the same conventions as ours (and T5X's):
second-moment decay 1 - t^-0.8 with t the 1-based step, epsilon1 added to g^2 before the moments, factoring
over the two dims (the larger, or the later on ties, as the column), v_row = mean over the column dim, update
clipped at block RMS 1.0, then scaled by the learning rate schedule at the 0-based count and by
max(RMS(param), 1e-3). So the two are compared directly. T5X's other options (weight decay, beta1, step_offset,
global-norm clipping, NaN skipping, max_parameter_scale) and its rules for higher ranks have no optax
counterpart: their tests derive the expected update in numpy.
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
    own, exactly as the same layer would be as a separate parameter (128 and 192 are both at least
    min_dim_size_to_factor, so that layer, a matrix, is factored too)."""
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
        layer_params = jax.tree.map(lambda x: x[layer], stacked)
        layer_grads = [jax.tree.map(lambda x: x[layer], g) for g in grads]
        layer_axes = {"kernel": ("embed", "mlp"), "scale": ("embed",)}
        layer_updates, _, _ = run(optimizers.adafactor(0.01, layer_axes), layer_params, layer_grads)
        for step, (a, b) in enumerate(zip(scanned_updates, layer_updates)):
            for name in ("kernel", "scale"):
                np.testing.assert_allclose(
                    a[name][layer], b[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} layer {layer} step {step}"
                )
    # With factored=False no rule is read (as in T5X): the stack is one tensor, clipped and scaled as a whole,
    # a different update, which the comparison above would tell apart.
    whole_updates, _, _ = run(optimizers.adafactor(0.01, axes, factored=False), stacked, grads)
    assert not np.allclose(whole_updates[0]["kernel"], scanned_updates[0]["kernel"], rtol=1e-2)


# The references below re-derive T5X's adafactor.py in float64 numpy. At the first step the second moment is
# g^2 + epsilon1 (its decay 1 - 1^-0.8 is 0), so an unfactored g / sqrt(v) is sign(g): RMS 1, not clipped. At the
# second step the decay is 1 - 2^-0.8.
EPSILON1 = 1e-30
SECOND_STEP_DECAY = 1.0 - 2.0**-0.8
KERNEL = np.array([[0.5, -1.5, 2.0], [1.0, 0.25, -0.75]])
KERNEL_GRADS = (np.array([[0.3, -0.2, 0.1], [-0.4, 0.6, -0.05]]), np.array([[-0.9, 0.1, 0.5], [0.2, 0.7, -1.2]]))
VECTOR = np.array([0.2, -0.4, 0.1])
VECTOR_GRADS = (np.array([0.05, 0.5, -0.3]), np.array([-0.6, 0.1, 0.4]))


def np_rms(x, axis=None):
    return np.sqrt(np.mean(np.square(x), axis=axis, keepdims=True))


def np_clip(y, axis=None):
    """Update clipping at RMS 1."""
    return y / np.maximum(1.0, np_rms(y, axis))


def np_second_step_direction(first_grad, second_grad):
    """An unfactored g / sqrt(v) at the second step, clipped."""
    v = SECOND_STEP_DECAY * (first_grad**2 + EPSILON1) + (1.0 - SECOND_STEP_DECAY) * (second_grad**2 + EPSILON1)
    return np_clip(second_grad / np.sqrt(v))


def float32_tree(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def one_step(tx, params, grads, state=None):
    """One update from `state` (a fresh one by default): (updates, new state)."""
    params, grads = float32_tree(params), float32_tree(grads)
    updates, state = jax.jit(tx.update)(grads, tx.init(params) if state is None else state, params)
    return jax.device_get(updates), state


def test_weight_decay_is_not_scaled_by_the_learning_rate():
    """T5X: p <- (1 - weight_decay_rate) * p - lr * scale(p) * y, decayed from the parameter before the step."""
    updates, _ = one_step(optimizers.adafactor(0.1, weight_decay_rate=0.01), {"w": KERNEL}, {"w": KERNEL_GRADS[0]})
    expected = -0.1 * np_rms(KERNEL) * np.sign(KERNEL_GRADS[0]) - 0.01 * KERNEL
    np.testing.assert_allclose(updates["w"], expected, rtol=RTOL)


@pytest.mark.parametrize("weight_decay_rate", [None, 0.1])
def test_weight_decay_rate_lr_exponent(weight_decay_rate):
    """T5X: with weight_decay_rate_lr_exponent the rate is (weight_decay_rate, or 1) * lr ** exponent, lr being
    the step's learning rate."""
    schedule = lambda count: 0.2 / (1.0 + 3.0 * count)  # 0.2 at the first step, 0.05 at the second
    tx = optimizers.adafactor(schedule, weight_decay_rate=weight_decay_rate, weight_decay_rate_lr_exponent=0.5)
    grads = [float32_tree({"w": g}) for g in KERNEL_GRADS]
    (first, second), _, _ = run(tx, float32_tree({"w": KERNEL}), grads)
    rate = 1.0 if weight_decay_rate is None else weight_decay_rate
    expected_first = -0.2 * np_rms(KERNEL) * np.sign(KERNEL_GRADS[0]) - rate * 0.2**0.5 * KERNEL
    kernel = KERNEL + expected_first
    direction = np_second_step_direction(*KERNEL_GRADS)
    expected_second = -0.05 * np_rms(kernel) * direction - rate * 0.05**0.5 * kernel
    np.testing.assert_allclose(first["w"], expected_first, rtol=RTOL)
    np.testing.assert_allclose(second["w"], expected_second, rtol=RTOL)


@pytest.mark.parametrize("dtype_momentum", ["float32", "bfloat16"])
def test_beta1_momentum_of_the_scaled_update(dtype_momentum):
    """T5X: m <- beta1 * m + (1 - beta1) * lr * scale(p) * y is the step (no bias correction); m is stored in
    dtype_momentum and the step taken with m before that rounding. beta1 * m is a product in dtype_momentum (beta1
    rounded to it), which XLA may or may not round: the bfloat16 check allows that product's half ulp."""
    tx = optimizers.adafactor(0.1, beta1=0.9, dtype_momentum=dtype_momentum)
    grads = [float32_tree({"w": g}) for g in KERNEL_GRADS]
    (first, second), _, state = run(tx, float32_tree({"w": KERNEL}), grads)
    dtype = jnp.dtype(dtype_momentum)
    stored = lambda m: m.astype(dtype).astype(np.float64)
    momentum = 0.1 * (0.1 * np_rms(KERNEL) * np.sign(KERNEL_GRADS[0]))
    kernel = KERNEL - momentum
    np.testing.assert_allclose(first["w"], -momentum, rtol=RTOL)  # not rounded to dtype_momentum
    decayed = stored(np.float64(0.9)) * stored(momentum)
    momentum = decayed + 0.1 * (0.1 * np_rms(kernel) * np_second_step_direction(*KERNEL_GRADS))
    product_half_ulp = np.max(np.abs(decayed)) * float(jnp.finfo(dtype).eps) / 2
    np.testing.assert_allclose(second["w"], -momentum, rtol=RTOL, atol=product_half_ulp if dtype != np.float32 else 0)
    assert state.m["w"].dtype == dtype
    np.testing.assert_allclose(np.float64(state.m["w"]), stored(momentum), rtol=max(RTOL, float(jnp.finfo(dtype).eps)))


@pytest.mark.parametrize("step_offset, decay", [(7, 0.0), (6, SECOND_STEP_DECAY)])
def test_step_offset_restarts_the_second_moment(step_offset, decay):
    """T5X: the decay is 1 - t^-0.8 with t = step - step_offset + 1 (step 0-based): 0 at step == step_offset, so
    the moment restarts there, whatever it held."""
    tx = optimizers.adafactor(0.1, step_offset=step_offset)
    params = float32_tree({"w": KERNEL})
    state = tx.init(params)._replace(count=jnp.int32(7), v={"w": jnp.full(KERNEL.shape, 4.0)})
    updates, state = one_step(tx, params, {"w": KERNEL_GRADS[0]}, state)
    v = decay * 4.0 + (1.0 - decay) * (KERNEL_GRADS[0] ** 2 + EPSILON1)
    np.testing.assert_allclose(state.v["w"], v, rtol=RTOL)
    np.testing.assert_allclose(updates["w"], -0.1 * np_rms(KERNEL) * np_clip(KERNEL_GRADS[0] / np.sqrt(v)), rtol=RTOL)
    assert int(state.count) == 8


def test_global_norm_clip_threshold_scales_every_gradient_first():
    """T5X: before anything else, every gradient is multiplied by min(1, threshold / the global L2 norm of all)."""
    params = float32_tree({"w": KERNEL, "b": VECTOR})
    first = {"w": 10 * KERNEL_GRADS[0], "b": 10 * VECTOR_GRADS[0]}  # global norm above the threshold 1
    second = {"w": 0.1 * KERNEL_GRADS[1], "b": 0.1 * VECTOR_GRADS[1]}  # and below it
    tx = optimizers.adafactor(0.1, global_norm_clip_threshold=1.0)
    (_, updates), new_params, state = run(tx, params, [float32_tree(first), float32_tree(second)])
    global_norm = lambda grads: np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    assert global_norm(first) > 1.0 > global_norm(second)
    for name in ("w", "b"):
        clipped_first = first[name] / global_norm(first)
        v = SECOND_STEP_DECAY * (clipped_first**2 + EPSILON1) + (1.0 - SECOND_STEP_DECAY) * (second[name] ** 2 + EPSILON1)
        param = {"w": KERNEL, "b": VECTOR}[name] - 0.1 * np_rms({"w": KERNEL, "b": VECTOR}[name]) * np.sign(first[name])
        np.testing.assert_allclose(state.v[name], v, rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(updates[name], -0.1 * np_rms(param) * np_clip(second[name] / np.sqrt(v)), rtol=RTOL)


def test_skip_nan_updates_keeps_what_would_become_nan():
    """T5X keeps the old value of every entry of the parameter and of v_row, v_col, v, m that would be NaN.

    A NaN gradient entry makes the whole parameter's step NaN (the clipping RMS, and the factored moments' means,
    spread it), so the parameter keeps its value; a moment keeps only its NaN entries: the factored kernel's row
    and column of the NaN, all of the vector whose gradient is all NaN. Other parameters step as usual.
    """
    params = float32_tree({"kernel": KERNEL, "vector": VECTOR, "clean": VECTOR})
    first = {"kernel": KERNEL_GRADS[0], "vector": VECTOR_GRADS[0], "clean": VECTOR_GRADS[0]}
    nan_kernel = KERNEL_GRADS[1].copy()
    nan_kernel[0, 1] = np.nan
    second = {"kernel": nan_kernel, "vector": np.full(3, np.nan), "clean": VECTOR_GRADS[1]}
    tx = optimizers.adafactor(0.1, min_dim_size_to_factor=2, skip_nan_updates=True)  # the 2 x 3 kernel is factored
    first_updates, state = one_step(tx, params, first)
    params = optax.apply_updates(params, float32_tree(first_updates))
    updates, new_state = one_step(tx, params, second, state)

    np.testing.assert_array_equal(updates["kernel"], 0.0)
    np.testing.assert_array_equal(updates["vector"], 0.0)
    np.testing.assert_array_equal(new_state.v["vector"], state.v["vector"])
    mix = lambda old, new: SECOND_STEP_DECAY * old + (1.0 - SECOND_STEP_DECAY) * new
    squared = KERNEL_GRADS[1] ** 2 + EPSILON1
    v_row = mix(np.mean(KERNEL_GRADS[0] ** 2 + EPSILON1, axis=1), np.mean(squared, axis=1))  # rows: the 2-sized dim
    v_col = mix(np.mean(KERNEL_GRADS[0] ** 2 + EPSILON1, axis=0), np.mean(squared, axis=0))
    v_row[0], v_col[1] = state.v_row["kernel"][0], state.v_col["kernel"][1]  # the NaN's row and column: kept
    np.testing.assert_allclose(new_state.v_row["kernel"], v_row, rtol=RTOL)
    np.testing.assert_allclose(new_state.v_col["kernel"], v_col, rtol=RTOL)
    clean = VECTOR - 0.1 * np_rms(VECTOR) * np.sign(VECTOR_GRADS[0])
    expected = -0.1 * np_rms(clean) * np_second_step_direction(*VECTOR_GRADS)
    np.testing.assert_allclose(updates["clean"], expected, rtol=RTOL)
    assert int(new_state.count) == 2
    # Without skip_nan_updates the same step is NaN throughout.
    updates, _ = one_step(optimizers.adafactor(0.1, min_dim_size_to_factor=2), params, second, state)
    assert np.isnan(updates["kernel"]).all() and np.isnan(updates["vector"]).all()


def test_max_parameter_scale_caps_the_parameter_rms():
    """T5X: scale(p) = min(max(RMS(p), epsilon2), max_parameter_scale)."""
    params = {"large": 4.0 * KERNEL, "small": 0.1 * KERNEL}
    grads = {"large": KERNEL_GRADS[0], "small": KERNEL_GRADS[0]}
    updates, _ = one_step(optimizers.adafactor(0.1, max_parameter_scale=0.5), params, grads)
    assert np_rms(params["large"]) > 0.5 > np_rms(params["small"])
    np.testing.assert_allclose(updates["large"], -0.1 * 0.5 * np.sign(KERNEL_GRADS[0]), rtol=RTOL)
    np.testing.assert_allclose(updates["small"], -0.1 * np_rms(params["small"]) * np.sign(KERNEL_GRADS[0]), rtol=RTOL)


# Parameter shape and logical axes -> (v_row's shape, v_col's shape), or None for an unfactored whole v; all at
# min_dim_size_to_factor=16.
FACTORING = [
    # Rank <= 2 without a batch axis: T5X's heuristic whatever the rules say: the smaller dim (the earlier on ties)
    # is the row that v_row keeps, when it has at least min_dim_size_to_factor.
    ((24, 40), ("embed", "mlp"), ((24,), (40,))),
    ((40, 24), ("embed", "mlp"), ((24,), (40,))),  # the rules would make embed the row
    ((32, 32), ("joined_kv", "embed"), ((32,), (32,))),  # a tie: the earlier dim (joined_kv) is the row
    ((16, 32), ("heads", "relpos_buckets"), ((16,), (32,))),  # the rules would factor nothing
    ((12, 40), ("embed", "mlp"), None),  # 12 < 16
    ((32,), ("embed",), None),
    # A batch axis, or rank > 2: the rules, whatever the sizes (min_dim_size_to_factor does not apply).
    ((2, 8, 12), ("layers", "embed", "mlp"), ((2, 8), (2, 12))),
    ((2, 12, 8), ("layers", "mlp", "embed"), ((2, 8), (2, 12))),
    ((2, 8, 8), ("layers", "joined_kv", "embed"), ((2, 8), (2, 8))),
    ((8, 4, 2), ("embed", "heads", "kv"), ((8,), (4, 2))),
    ((2, 8, 4, 2), ("layers", "embed", "heads", "kv"), ((2, 8), (2, 4, 2))),
    ((2, 32), ("layers", "embed"), None),
    ((2, 16, 32), ("layers", "heads", "relpos_buckets"), None),  # a column but no row: nothing factored
    # No logical axes: the heuristic.
    ((40, 24), None, ((24,), (40,))),
    ((32,), None, None),
]


def case_id(shape, axes):
    return "x".join(map(str, shape)) + ("-" + "-".join(map(str, axes)) if axes else "-no_axes")


@pytest.mark.parametrize("shape, axes, factored_shapes", FACTORING, ids=[case_id(s, a) for s, a, _ in FACTORING])
def test_factoring_follows_t5x_logical_factor_rules(shape, axes, factored_shapes):
    tx = optimizers.adafactor(0.1, {"w": axes}, min_dim_size_to_factor=16)
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})
    shapes = (state.v_row["w"].shape, state.v_col["w"].shape, state.v["w"].shape)
    assert shapes == (((1,), (1,), shape) if factored_shapes is None else (*factored_shapes, (1,)))


def test_multi_column_factoring_matches_numpy():
    """[embed 6, heads 4, kv 5], T5X's rule (row, column, column): v_row averages g^2 over heads and kv, v_col over
    embed, and g is divided by sqrt(v_row / mean(v_row) * v_col)."""
    rng = np.random.default_rng(2)
    param, grad = rng.standard_normal((6, 4, 5)), rng.standard_normal((6, 4, 5)) * np.exp(rng.uniform(-1, 1, 6))[:, None, None]
    updates, state = one_step(optimizers.adafactor(0.1, {"w": ("embed", "heads", "kv")}), {"w": param}, {"w": grad})
    squared = grad**2 + EPSILON1
    v_row, v_col = np.mean(squared, axis=(1, 2)), np.mean(squared, axis=0)
    direction = grad / np.sqrt(v_row / np.mean(v_row))[:, None, None] / np.sqrt(v_col)[None]
    np.testing.assert_allclose(state.v_row["w"], v_row, rtol=RTOL)
    np.testing.assert_allclose(state.v_col["w"], v_col, rtol=RTOL)
    np.testing.assert_allclose(updates["w"], -0.1 * np_rms(param) * np_clip(direction), rtol=RTOL)


def test_scanned_square_kernel_is_factored_by_its_axes_layer_by_layer():
    """[layers 2, joined_kv 6, embed 6], an attention output kernel: the rules make embed the row (v_row is
    [layers, embed]) whatever the sizes, and each layer is averaged, clipped and scaled on its own."""
    rng = np.random.default_rng(3)
    layer_scales = np.array([0.01, 10.0])[:, None, None]
    param, grad = rng.standard_normal((2, 6, 6)) * layer_scales, rng.standard_normal((2, 6, 6)) / layer_scales
    grad = grad * np.exp(rng.uniform(-1, 1, 6))  # embed columns of different scales
    tx = optimizers.adafactor(0.1, {"w": ("layers", "joined_kv", "embed")})
    updates, state = one_step(tx, {"w": param}, {"w": grad})
    squared = grad**2 + EPSILON1
    v_row, v_col = np.mean(squared, axis=1), np.mean(squared, axis=2)  # [layers, embed], [layers, joined_kv]
    row_factor = np.sqrt(v_row / np.mean(v_row, axis=1, keepdims=True))[:, None, :]
    direction = grad / row_factor / np.sqrt(v_col)[:, :, None]
    expected = -0.1 * np_rms(param, (1, 2)) * np_clip(direction, (1, 2))
    np.testing.assert_allclose(state.v_row["w"], v_row, rtol=RTOL)
    np.testing.assert_allclose(state.v_col["w"], v_col, rtol=RTOL)
    np.testing.assert_allclose(updates["w"], expected, rtol=RTOL)


def test_factored_false_reads_no_rules():
    """T5X with factored=False reads no factor rule, so even the `layers` axis is averaged over: a scanned stack
    is scaled (and clipped) as a whole."""
    rng = np.random.default_rng(4)
    param = rng.standard_normal((2, 3, 4)) * np.array([0.1, 10.0])[:, None, None]
    grad = rng.standard_normal((2, 3, 4))
    tx = optimizers.adafactor(0.1, {"w": ("layers", "embed", "mlp")}, factored=False)
    updates, _ = one_step(tx, {"w": param}, {"w": grad})
    np.testing.assert_allclose(updates["w"], -0.1 * np_rms(param) * np.sign(grad), rtol=RTOL)


def test_logical_factor_rules_can_name_more_axes():
    rules = {**optimizers.STANDARD_LOGICAL_FACTOR_RULES, "expert": "batch"}
    tx = optimizers.adafactor(0.1, {"w": ("expert", "embed", "mlp")}, logical_factor_rules=rules)
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((4, 8, 12), jnp.float32)})
    assert state.v_row["w"].shape == (4, 8) and state.v_col["w"].shape == (4, 12)


@pytest.mark.parametrize(
    "shape, axes, options, message",
    [
        ((4, 4, 4), None, {}, r"parameter w of shape \(4, 4, 4\) has no logical axes"),
        ((4, 8), ("embed", "expert"), {}, r"parameter w: logical axes \['expert'\] have no Adafactor factor rule"),
        ((2, 4, 8), ("embed", "mlp", "relpos_buckets"), {}, r"\('row', 'column', 'none'\).* no 'none' one"),
        ((4, 8), ("embed",), {}, r"logical axes \('embed',\) do not match its shape \(4, 8\)"),
        ((4, 8), ("embed", "mlp"), {"logical_factor_rules": {"embed": "rows", "mlp": "column"}}, r"\{'embed': 'rows'\}"),
        ((4, 8), ("embed", "mlp"), {"beta1": 1.5}, r"beta1=1.5; valid: None \(no momentum\) or a value in \[0, 1\)"),
    ],
    ids=["rank3_without_axes", "unknown_axis", "row_column_and_none", "axes_of_another_rank", "bad_kind", "bad_beta1"],
)
def test_adafactor_errors_name_the_bad_value(shape, axes, options, message):
    with pytest.raises(ValueError, match=message):
        optimizers.adafactor(0.1, {"w": axes}, **options).init({"w": jnp.zeros(shape)})


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
    tx = optimizers.adafactor(logical_axes=axes, min_dim_size_to_factor=16, beta1=0.9)
    state = jax.eval_shape(tx.init, params)
    state_axes = optimizers.state_logical_axes(state, params, axes)
    assert state_axes.count is None
    assert state_axes.m == axes  # the first moment has its parameter's shape
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
    """Scanned square kernels [layers 2, embed 32, joined_kv 32] and [layers 2, joined_kv 32, embed 32]: the
    moments keep the `layers` axis, and v_row keeps `embed`, the rules' row, in both."""
    params = {
        "query": jax.ShapeDtypeStruct((2, 32, 32), jnp.float32),
        "out": jax.ShapeDtypeStruct((2, 32, 32), jnp.float32),
        "wi": jax.ShapeDtypeStruct((32, 32, 64), jnp.float32),
    }
    axes = {
        "query": ("layers", "embed", "joined_kv"),
        "out": ("layers", "joined_kv", "embed"),
        "wi": ("layers", "embed", "mlp"),
    }
    tx = optimizers.adafactor(logical_axes=axes)
    state_axes = optimizers.state_logical_axes(jax.eval_shape(tx.init, params), params, axes)
    assert state_axes.v_row["query"] == ("layers", "embed")
    assert state_axes.v_col["query"] == ("layers", "joined_kv")
    assert state_axes.v_row["out"] == ("layers", "embed")
    assert state_axes.v_col["out"] == ("layers", "joined_kv")
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
