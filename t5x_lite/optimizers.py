"""Optimizers and learning-rate schedules.

`adafactor` is T5X's `adafactor.Adafactor` (Shazeer & Stern, 2018) as an optax transformation, with T5X's
defaults: second-moment decay 1 - t^-0.8, update clipping at RMS 1.0, updates scaled by the parameter's RMS, no
momentum, no weight decay. It factors the second moment by the parameters' logical axes with T5X's rules
(`STANDARD_LOGICAL_FACTOR_RULES`): `layers`, the leading axis of a scanned parameter, is a batch axis, so each
layer of a scanned stack is factored, clipped and scaled on its own. Any optax optimizer works too (AdamW, ...);
`build` gives an optimizer the parameters' logical axes when it asks for them.
"""
from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from t5x_lite.partitioning import is_logical_axes, path_names

Schedule = Callable[[jax.Array], jax.Array]


def rsqrt_decay_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5's `constant * rsqrt_decay`: base / sqrt(max(step, warmup_steps)) (0.01 for the first 10k steps)."""

    def schedule(step):
        return base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, warmup_steps).astype(jnp.float32))

    return schedule


def constant_schedule(learning_rate: float = 1e-3) -> Schedule:
    return optax.constant_schedule(learning_rate)


def warmup_cosine_schedule(
    peak_learning_rate: float = 1e-3, warmup_steps: int = 1000, decay_steps: int = 100_000, end_learning_rate: float = 0.0
) -> Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to `end_learning_rate` at `decay_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps, decay_steps, end_learning_rate)


# T5X's `adafactor.standard_logical_factor_rules`: what Adafactor's second moment does with each logical axis of a
# parameter. "row": v_row keeps it and v_col averages over it; "column": the other way round; "batch": independent
# copies (a scanned stack's layers), never averaged over, not even for update clipping and the parameter scale;
# "none": not factored along it.
STANDARD_LOGICAL_FACTOR_RULES: Mapping[str | None, str] = MappingProxyType({
    "vocab": "column",
    "embed": "row",
    "mlp": "column",
    "heads": "column",
    "kv": "column",
    "joined_kv": "column",
    "relpos_buckets": "none",
    "layers": "batch",
    "stack": "batch",
    "q_wi_fused": "column",
    "o_wo_fused": "column",
    "multiquery_heads": "column",
    "kv_fused": "column",
    "layer_norm_scale": "none",
    "mlp_activations": "column",
})
FACTOR_KINDS = ("row", "column", "batch", "none")


class AdafactorState(NamedTuple):
    """The step count and, for each field of T5X's per-parameter state (`_Moments`), a tree like the parameters."""

    count: jax.Array  # int32[]: the steps taken
    v_row: Any
    v_col: Any
    v: Any
    m: Any


class _Moments(NamedTuple):
    """One parameter's state, T5X's `_AdafactorParamState`; a field the parameter does not use is float32[1]."""

    v_row: jax.Array  # float32[param's shape less col_dims]: the second moment's mean over the columns
    v_col: jax.Array  # float32[param's shape less row_dims]: its mean over the rows
    v: jax.Array  # float32[param's shape]: the whole second moment, when not factored
    m: jax.Array  # dtype_momentum[param's shape]: the first moment, with beta1


class _ParamStep(NamedTuple):
    """One parameter's update (its dtype and shape) and new state."""

    update: jax.Array
    moments: _Moments


class _Layout(NamedTuple):
    """How Adafactor treats one parameter.

    rms_dims: the dims that update clipping and the parameter scale take their RMS over (all but batch dims).
    row_dims, col_dims: the factored dims, both empty when the second moment is kept whole.
    """

    rms_dims: tuple[int, ...]
    row_dims: tuple[int, ...] = ()
    col_dims: tuple[int, ...] = ()

    @property
    def factored(self) -> bool:
        return bool(self.row_dims)


def _layout(
    name: str,
    shape: Sequence[int],
    axes: Sequence[str | None] | None,
    rules: Mapping[str | None, str],
    *,
    factored: bool,
    min_dim_size_to_factor: int,
) -> _Layout:
    """T5X's choice for the parameter `name` of `shape` and logical `axes` (None when it has none).

    - factored=False: nothing is factored and the RMS is over every dim, a batch dim too (T5X reads no rule then).
    - Rank <= 2 without a batch axis, or no logical axes: T5X's heuristic (`_heuristic_layout`), the
      original Adafactor's (and optax's) two-largest-dims rule. The rules' row and column are not used (their
      names must still be known): for our kernels they agree wherever the `embed` dim is the smaller, and
      swapping rows and columns changes v_row's and v_col's shapes but not the update.
    - Otherwise the rules (`_factor_kinds`): every row and column axis is factored, whatever its size
      (min_dim_size_to_factor does not apply), and batch axes are left out of every mean. A scanned
      [layers, embed, mlp] kernel thus takes each layer's own update wherever that layer, as a matrix, would be
      factored (both dims >= min_dim_size_to_factor); with a smaller dim only the stack is factored, as in T5X.
    """
    all_dims = tuple(range(len(shape)))
    if not factored:
        return _Layout(all_dims)
    if axes is None:
        return _heuristic_layout(name, shape, min_dim_size_to_factor)
    if len(axes) != len(shape):
        raise ValueError(f"parameter {name}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}")
    kinds = _factor_kinds(name, axes, rules)
    if len(shape) <= 2 and "batch" not in kinds:
        return _heuristic_layout(name, shape, min_dim_size_to_factor)
    dims_of = lambda kind: tuple(d for d in all_dims if kinds[d] == kind)
    return _Layout(tuple(d for d in all_dims if kinds[d] != "batch"), dims_of("row"), dims_of("column"))


def _factor_kinds(name: str, axes: Sequence[str | None], rules: Mapping[str | None, str]) -> tuple[str, ...]:
    """Each axis's kind by the rules. As in T5X, unless there is both a row and a column axis nothing is
    factored (rows and columns become "none"), and row and column axes together with a "none" one are refused."""
    unknown = [axis for axis in axes if axis not in rules]
    if unknown:
        raise ValueError(
            f"parameter {name}: logical axes {unknown} have no Adafactor factor rule (rules for "
            f"{sorted(rules, key=str)}); pass logical_factor_rules with them"
        )
    kinds = tuple(rules[axis] for axis in axes)
    if {"row", "column", "none"} <= set(kinds):
        raise ValueError(
            f"parameter {name}: logical axes {tuple(axes)} have the factor kinds {kinds}; a parameter with row and "
            "column axes may have batch axes but no 'none' one"
        )
    if "row" not in kinds or "column" not in kinds:
        kinds = tuple("none" if kind in ("row", "column") else kind for kind in kinds)
    return kinds


def _heuristic_layout(name: str, shape: Sequence[int], min_dim_size_to_factor: int) -> _Layout:
    """T5X's fallback: a matrix is factored with its smaller dim (the earlier on ties) as the row and the larger as
    the column, when the smaller has at least min_dim_size_to_factor; a vector never; a higher rank is refused."""
    if len(shape) > 2:
        raise ValueError(
            f"parameter {name} of shape {tuple(shape)} has no logical axes: Adafactor factors a parameter of rank > 2 "
            "only by its axes' rules, as T5X does; give it logical axes, or pass factored=False"
        )
    all_dims = tuple(range(len(shape)))
    if len(shape) < 2:
        return _Layout(all_dims)
    row, column = sorted(all_dims, key=lambda d: (shape[d], d))
    if shape[row] < min_dim_size_to_factor:
        return _Layout(all_dims)
    return _Layout(all_dims, (row,), (column,))


def _without(shape: Sequence[int], dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(size for d, size in enumerate(shape) if d not in dims)


def _rms(x: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=dims, keepdims=True))


def _field_trees(tree: Any, node_type: type) -> list[Any]:
    """A tree whose leaves are `node_type` NamedTuples -> one tree per field."""
    is_node = lambda x: isinstance(x, node_type)
    return [jax.tree.map(lambda node, i=i: node[i], tree, is_leaf=is_node) for i in range(len(node_type._fields))]


def _second_moment_decay(count: jax.Array, decay_rate: float, step_offset: int) -> jax.Array:
    """T5X's `1 - t^-decay_rate` with t = count - step_offset + 1: 0 at the first step and again at step_offset,
    so the second moments start afresh there (fine-tuning)."""
    t = (count - step_offset).astype(jnp.float32) + 1.0
    return 1.0 - t ** (-decay_rate)


def _weight_decay(
    learning_rate: jax.Array, weight_decay_rate: float | None, weight_decay_rate_lr_exponent: float | None
) -> jax.Array | float | None:
    """T5X's decoupled weight decay rate: weight_decay_rate, times learning_rate ** weight_decay_rate_lr_exponent
    when the exponent is set (a rate of None or 0 then counts as 1)."""
    if weight_decay_rate_lr_exponent:
        return (weight_decay_rate or 1.0) * learning_rate**weight_decay_rate_lr_exponent
    return weight_decay_rate


def _clip_by_global_norm(grads: Any, threshold: float) -> Any:
    """T5X's global-norm clipping: every gradient times min(1, threshold / the L2 norm of all of them)."""
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = threshold / jnp.maximum(norm, threshold)
    return jax.tree.map(lambda g: g * scale, grads)


def _scaled_gradient(
    grad: jax.Array, layout: _Layout, moments: _Moments, decay: jax.Array, epsilon1: float
) -> tuple[jax.Array, _Moments]:
    """grad / sqrt(second moment), the moment factored into row and column means when the layout says so.

    grad: float32[param's shape]. Returns it scaled, and the moments with the new v_row, v_col, v.
    """
    grad_squared = jnp.square(grad) + epsilon1
    if not layout.factored:
        v = decay * moments.v + (1.0 - decay) * grad_squared
        return grad * jax.lax.rsqrt(v), moments._replace(v=v)
    v_row = decay * moments.v_row + (1.0 - decay) * jnp.mean(grad_squared, axis=layout.col_dims)
    v_col = decay * moments.v_col + (1.0 - decay) * jnp.mean(grad_squared, axis=layout.row_dims)
    # v ~ v_row * v_col / mean(v_row), the means within each batch index (layer).
    row_moment = jnp.expand_dims(v_row, layout.col_dims)
    column_moment = jnp.expand_dims(v_col, layout.row_dims)
    row_factor = jax.lax.rsqrt(row_moment / jnp.mean(row_moment, axis=layout.row_dims, keepdims=True))
    return grad * row_factor * jax.lax.rsqrt(column_moment), moments._replace(v_row=v_row, v_col=v_col)


def _parameter_scale(
    param: jax.Array, rms_dims: tuple[int, ...], epsilon2: float, max_parameter_scale: float | None
) -> jax.Array:
    """RMS(param) over rms_dims, at least epsilon2 and at most max_parameter_scale (when set)."""
    scale = jnp.maximum(_rms(param, rms_dims), epsilon2)
    if max_parameter_scale is not None:
        scale = jnp.minimum(scale, max_parameter_scale)
    return scale


def _check_adafactor_arguments(beta1: float | None, logical_factor_rules: Mapping[str | None, str]) -> None:
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ValueError(f"adafactor: beta1={beta1}; valid: None (no momentum) or a value in [0, 1)")
    bad = {axis: kind for axis, kind in logical_factor_rules.items() if kind not in FACTOR_KINDS}
    if bad:
        raise ValueError(f"adafactor: logical_factor_rules {bad} name no factor kind; valid kinds: {FACTOR_KINDS}")


def adafactor(
    learning_rate: float | Schedule = rsqrt_decay_schedule(),
    logical_axes: Any = None,
    *,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    beta1: float | None = None,
    dtype_momentum: Any = jnp.float32,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    max_parameter_scale: float | None = None,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    logical_factor_rules: Mapping[str | None, str] = STANDARD_LOGICAL_FACTOR_RULES,
    weight_decay_rate: float | None = None,
    weight_decay_rate_lr_exponent: float | None = None,
    global_norm_clip_threshold: float | None = None,
    skip_nan_updates: bool = False,
) -> optax.GradientTransformation:
    """T5X's `adafactor.Adafactor` as an optax transformation whose updates already include the learning rate.

    With lr the schedule at the step count before this step, each parameter p with gradient g takes the update
    -(lr * scale(p) * clip(g / sqrt(v)), or its momentum m) - weight_decay * p.

    learning_rate: a number or a schedule of the 0-based step count.
    logical_axes: a tree like the parameters whose leaves are tuples of logical axis names (or None); it decides
      the factoring (see `_layout`). Without it every parameter takes T5X's heuristic, which refuses rank > 2.
    decay_rate, step_offset: the second moment v decays by 1 - t^-decay_rate with t = step - step_offset + 1
      (step 0-based). Continuing a run's optimizer state from step N, step_offset=N starts v afresh; before
      step N, t <= 0 and v is not finite (as in T5X). gin/runs/finetune.gin starts at step 0 with a fresh state.
    beta1: with a value, the update is the momentum m = beta1 * m + (1 - beta1) * (lr * scale * clipped g / sqrt(v))
      (no bias correction, not reset by step_offset), kept in dtype_momentum (as in T5X, beta1 * m is taken in
      that dtype too).
    clipping_threshold: the update g / sqrt(v) is divided by max(1, its RMS / clipping_threshold); None: no clipping.
    multiply_by_parameter_scale: scale(p) = RMS(p) floored at epsilon2 and capped at max_parameter_scale (when set);
      otherwise 1.
    epsilon1: added to g^2 before the moments.
    factored, min_dim_size_to_factor, logical_factor_rules: which parameters have a factored second moment (v_row,
      v_col) and along which dims; logical_factor_rules maps every logical axis name to "row", "column", "batch"
      or "none" (T5X's standard rules by default).
    weight_decay_rate, weight_decay_rate_lr_exponent: decoupled weight decay, weight_decay * p with weight_decay =
      weight_decay_rate, not scaled by the learning rate, unless the exponent is set: then weight_decay =
      (weight_decay_rate, or 1 if None or 0) * lr ** weight_decay_rate_lr_exponent.
    global_norm_clip_threshold: the gradients are first scaled by min(1, threshold / their global L2 norm).
    skip_nan_updates: wherever a parameter or state entry would become NaN, it keeps its value.
    """
    _check_adafactor_arguments(beta1, logical_factor_rules)
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    momentum_dtype = jnp.dtype(dtype_momentum)
    placeholder = lambda: jnp.zeros((1,), jnp.float32)

    def layouts_of(params):
        axes = logical_axes if logical_axes is not None else jax.tree.map(lambda _: None, params)
        return jax.tree_util.tree_map_with_path(
            lambda path, param, param_axes: _layout(
                "/".join(path_names(path)),
                param.shape,
                param_axes,
                logical_factor_rules,
                factored=factored,
                min_dim_size_to_factor=min_dim_size_to_factor,
            ),
            params,
            axes,
        )

    def initial_moments(param, layout):
        zeros = lambda dims: jnp.zeros(_without(param.shape, dims), jnp.float32)
        return _Moments(
            v_row=zeros(layout.col_dims) if layout.factored else placeholder(),
            v_col=zeros(layout.row_dims) if layout.factored else placeholder(),
            v=placeholder() if layout.factored else zeros(()),
            m=jnp.zeros(param.shape, momentum_dtype) if beta1 is not None else placeholder(),
        )

    def init(params):
        moments = jax.tree.map(initial_moments, params, layouts_of(params))
        return AdafactorState(jnp.zeros([], jnp.int32), *_field_trees(moments, _Moments))

    def update(grads, state, params):
        if params is None:
            raise ValueError("adafactor needs the parameters in update(grads, state, params)")
        decay = _second_moment_decay(state.count, decay_rate, step_offset)
        lr = schedule(state.count)
        weight_decay = _weight_decay(lr, weight_decay_rate, weight_decay_rate_lr_exponent)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if global_norm_clip_threshold:
            grads = _clip_by_global_norm(grads, global_norm_clip_threshold)

        def param_step(grad, param, layout, moments):
            param32 = param.astype(jnp.float32)
            scaled, new_moments = _scaled_gradient(grad, layout, moments, decay, epsilon1)
            if clipping_threshold is not None:
                scaled = scaled / jnp.maximum(1.0, _rms(scaled, layout.rms_dims) / clipping_threshold)
            step_size = lr
            if multiply_by_parameter_scale:
                step_size = step_size * _parameter_scale(param32, layout.rms_dims, epsilon2, max_parameter_scale)
            subtrahend = step_size * scaled
            if beta1 is not None:
                subtrahend = beta1 * moments.m + (1.0 - beta1) * subtrahend
                new_moments = new_moments._replace(m=subtrahend.astype(momentum_dtype))
            update = -subtrahend
            if weight_decay is not None:
                update = update - weight_decay * param32
            if skip_nan_updates:
                update = jnp.where(jnp.isnan(update), 0.0, update)
                new_moments = jax.tree.map(lambda new, old: jnp.where(jnp.isnan(new), old, new), new_moments, moments)
            return _ParamStep(update.astype(param.dtype), new_moments)

        moments = jax.tree.map(_Moments, state.v_row, state.v_col, state.v, state.m)
        steps = jax.tree.map(param_step, grads, params, layouts_of(params), moments)
        updates, new_moments = _field_trees(steps, _ParamStep)
        return updates, AdafactorState(state.count + 1, *_field_trees(new_moments, _Moments))

    return optax.GradientTransformation(init, update)


def adamw(
    learning_rate: float | Schedule = 1e-3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    gradient_clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """optax.adamw, optionally after global-norm gradient clipping."""
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if gradient_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(gradient_clip_norm), tx)
    return tx


def build(optimizer_fn: Callable[..., optax.GradientTransformation], logical_axes: Any) -> optax.GradientTransformation:
    """Calls `optimizer_fn`, giving it the parameters' logical axes when it has a `logical_axes` argument."""
    if "logical_axes" in inspect.signature(optimizer_fn).parameters:
        return optimizer_fn(logical_axes=logical_axes)
    return optimizer_fn()


def state_logical_axes(
    abstract_state: Any,
    abstract_params: Any,
    params_logical_axes: Any,
    logical_factor_rules: Mapping[str | None, str] = STANDARD_LOGICAL_FACTOR_RULES,
) -> Any:
    """Logical axes of every optimizer-state leaf, so that the state is sharded like its parameter.

    A state leaf belongs to the parameter whose path ends its own path (optax states hold trees that mirror
    the parameters). It takes the parameter's axes when it has the parameter's shape (Adafactor's v and m), the
    axes less the averaged dims when it is Adafactor's v_row or v_col (by `logical_factor_rules`, as the
    optimizer factored them), the axes less one dim when it has the parameter's shape less that dim, and is
    replicated otherwise (counters, placeholders).
    """
    params = {
        path_names(path): (tuple(leaf.shape), axes)
        for (path, leaf), axes in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(params_logical_axes, is_leaf=is_logical_axes),
        )
    }

    def axes_of(path, leaf):
        names = path_names(path)
        for start in range(len(names)):
            if names[start:] in params:
                shape, axes = params[names[start:]]
                break
        else:
            return None
        if axes is None:
            return None
        if tuple(leaf.shape) == shape:
            return tuple(axes)
        # Adafactor's v_row and v_col: the shape alone cannot tell which dims were averaged over when two have the
        # same size (a square kernel), so take them from the layout.
        field = names[start - 1] if start else None
        averaged = _factored_moment_averaged_dims(field, names[start:], shape, axes, logical_factor_rules)
        if averaged and _without(shape, averaged) == tuple(leaf.shape):
            return tuple(a for d, a in enumerate(axes) if d not in averaged)
        for d in range(len(shape)):
            if _without(shape, (d,)) == tuple(leaf.shape):
                return tuple(a for i, a in enumerate(axes) if i != d)
        return None

    return jax.tree_util.tree_map_with_path(axes_of, abstract_state)


def _factored_moment_averaged_dims(
    field: str | None,
    param_names: tuple[str, ...],
    shape: tuple[int, ...],
    axes: Sequence[str | None],
    rules: Mapping[str | None, str],
) -> tuple[int, ...]:
    """The dims Adafactor's v_row (the columns) or v_col (the rows) of a factored parameter averages over; ()
    for any other field, or when the rules do not know all of the parameter's axes."""
    if field not in ("v_row", "v_col") or any(axis not in rules for axis in axes):
        return ()
    layout = _layout("/".join(param_names), shape, axes, rules, factored=True, min_dim_size_to_factor=0)
    return layout.col_dims if field == "v_row" else layout.row_dims
