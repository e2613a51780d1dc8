"""Optimizers and learning-rate schedules.

`adafactor` is T5's optimizer (Shazeer & Stern, 2018) with T5's defaults: second-moment decay
1 - t^-0.8, update clipping at RMS 1.0, updates scaled by the parameter's RMS, no momentum. It factors the
second moment along logical axes: the `layers` axis of a scanned parameter is a batch axis, so a scanned
stack is factored, clipped and scaled per layer, exactly like the unscanned one. Any optax optimizer works
too (AdamW, ...); `build` gives an optimizer the parameters' logical axes when it asks for them.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from t5x_lite.partitioning import is_logical_axes, path_names

Schedule = Callable[[jax.Array], jax.Array]

# Logical axes that Adafactor treats as independent copies (never factored or reduced over).
BATCH_AXES = ("layers",)


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


class AdafactorState(NamedTuple):
    count: jax.Array
    # Each tree mirrors the parameters; a leaf not used by its parameter is a float32[1] placeholder.
    v_row: Any
    v_col: Any
    v: Any


class _Layout(NamedTuple):
    batch_dims: tuple[int, ...]
    factored: tuple[int, int] | None  # (d_row, d_col): v_row reduces d_col, v_col reduces d_row

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(d for d in range(ndim) if d not in self.batch_dims)


def _layout(shape: Sequence[int], axes: Sequence[str | None] | None, min_dim_size_to_factor: int, factored: bool) -> _Layout:
    names = tuple(axes) if axes is not None else (None,) * len(shape)
    batch_dims = tuple(d for d, name in enumerate(names) if name in BATCH_AXES)
    free = [d for d in range(len(shape)) if d not in batch_dims]
    if not factored or len(free) < 2:
        return _Layout(batch_dims, None)
    # The two largest free dims (the later one on ties), as in the original Adafactor.
    by_size = sorted(free, key=lambda d: (shape[d], d))
    d_row, d_col = by_size[-2], by_size[-1]
    if shape[d_row] < min_dim_size_to_factor:
        return _Layout(batch_dims, None)
    return _Layout(batch_dims, (d_row, d_col))


def _rms(x: jax.Array, dims: tuple[int, ...]) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=dims, keepdims=True))


def adafactor(
    learning_rate: float | Schedule = rsqrt_decay_schedule(),
    logical_axes: Any = None,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    min_dim_size_to_factor: int = 128,
    factored: bool = True,
    weight_decay_rate: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor as an optax transformation whose updates already include the learning rate.

    logical_axes: a tree like the parameters whose leaves are tuples of logical axis names (or None);
      without it no axis is a batch axis.
    """
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def layouts(params):
        if logical_axes is None:
            axes = jax.tree.map(lambda _: None, params)
        else:
            axes = logical_axes
        return jax.tree.map(
            lambda p, a: _layout(p.shape, a, min_dim_size_to_factor, factored),
            params,
            axes,
            is_leaf=is_logical_axes,
        )

    placeholder = lambda: jnp.zeros((1,), jnp.float32)

    def init(params):
        lay = layouts(params)
        is_layout = lambda x: isinstance(x, _Layout)

        def v_row(p, l):
            return jnp.zeros(_drop(p.shape, l.factored[1]), jnp.float32) if l.factored else placeholder()

        def v_col(p, l):
            return jnp.zeros(_drop(p.shape, l.factored[0]), jnp.float32) if l.factored else placeholder()

        def v(p, l):
            return placeholder() if l.factored else jnp.zeros(p.shape, jnp.float32)

        return AdafactorState(
            count=jnp.zeros([], jnp.int32),
            v_row=jax.tree.map(v_row, params, lay, is_leaf=is_layout),
            v_col=jax.tree.map(v_col, params, lay, is_leaf=is_layout),
            v=jax.tree.map(v, params, lay, is_leaf=is_layout),
        )

    def update(grads, state, params):
        if params is None:
            raise ValueError("adafactor needs the parameters in update(grads, state, params)")
        lay = layouts(params)
        step = state.count + 1
        decay = 1.0 - step.astype(jnp.float32) ** (-decay_rate)
        lr = schedule(state.count)

        def one(g, p, l, vr, vc, v):
            g = g.astype(jnp.float32)
            reduce = l.reduce_dims(g.ndim)
            g_sq = jnp.square(g) + epsilon1
            if l.factored:
                d_row, d_col = l.factored
                vr = decay * vr + (1.0 - decay) * jnp.mean(g_sq, axis=d_col)
                vc = decay * vc + (1.0 - decay) * jnp.mean(g_sq, axis=d_row)
                # In v_row (d_col removed) the row dim keeps its index only if it came before d_col.
                row_dim_in_vr = d_row if d_row < d_col else d_row - 1
                row_factor = jax.lax.rsqrt(vr / jnp.mean(vr, axis=row_dim_in_vr, keepdims=True))
                col_factor = jax.lax.rsqrt(vc)
                y = g * jnp.expand_dims(row_factor, d_col) * jnp.expand_dims(col_factor, d_row)
            else:
                v = decay * v + (1.0 - decay) * g_sq
                y = g * jax.lax.rsqrt(v)
            if clipping_threshold is not None:
                y = y / jnp.maximum(1.0, _rms(y, reduce) / clipping_threshold)
            scale = lr
            if multiply_by_parameter_scale:
                scale = scale * jnp.maximum(_rms(p.astype(jnp.float32), reduce), epsilon2)
            update = -scale * y
            if weight_decay_rate:
                update = update - lr * weight_decay_rate * p
            return update.astype(p.dtype), vr, vc, v

        is_layout = lambda x: isinstance(x, _Layout)
        flat = jax.tree.map(one, grads, params, lay, state.v_row, state.v_col, state.v, is_leaf=is_layout)
        pick = lambda i: jax.tree.map(lambda t: t[i], flat, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 4)
        return pick(0), AdafactorState(step, pick(1), pick(2), pick(3))

    return optax.GradientTransformation(init, update)


def _drop(shape: Sequence[int], dim: int) -> tuple[int, ...]:
    return tuple(s for d, s in enumerate(shape) if d != dim)


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


def state_logical_axes(abstract_state: Any, abstract_params: Any, params_logical_axes: Any) -> Any:
    """Logical axes of every optimizer-state leaf, so that the state is sharded like its parameter.

    A state leaf belongs to the parameter whose path ends its own path (optax states hold trees that mirror
    the parameters). It takes the parameter's axes when it has the parameter's shape, the axes less one
    dimension when it is a factored moment (the parameter's shape less that dimension), and is replicated
    otherwise (counters, placeholders).
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
        # Adafactor's v_row drops the column dim and v_col the row dim; when two dims have the same size (a
        # square kernel) the shape alone cannot tell which was dropped, so take it from the layout.
        field = names[start - 1] if start else None
        factored_dims = _layout(shape, axes, 0, True).factored
        if field in ("v_row", "v_col") and factored_dims:
            dropped = factored_dims[1] if field == "v_row" else factored_dims[0]
            if _drop(shape, dropped) == tuple(leaf.shape):
                return tuple(a for i, a in enumerate(axes) if i != dropped)
        for d in range(len(shape)):
            if _drop(shape, d) == tuple(leaf.shape):
                return tuple(a for i, a in enumerate(axes) if i != d)
        return None

    return jax.tree_util.tree_map_with_path(axes_of, abstract_state)
