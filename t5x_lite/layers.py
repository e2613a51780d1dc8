"""Flax building blocks of T5.1.1.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`,
`relpos_buckets`, and `layers` when scanned) and key activations are constrained with logical names
(`batch`, `length`, `embed`, `mlp`, `joined_kv`, `heads`, `kv`, `vocab`). The rules in
`partitioning.py` map them onto a mesh; nothing here knows about meshes.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Initializer = Callable[..., Array]

# Large negative logit for masked attention positions; finite so that fully masked rows (padding) stay
# NaN-free.
NEG_INF = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction and no bias, computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (features,), jnp.float32
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (x32 * scale).astype(self.dtype)


class Dense(nn.Module):
    """A bias-free dense layer with a 2-D kernel [in, out] carrying logical axis names."""

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Initializer = default_kernel_init
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def kernel(self, in_features: int) -> Array:
        """The float32 kernel [in_features, features] (created at the first call)."""
        return self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (in_features, self.features),
            jnp.float32,
        )

    def __call__(self, x: Array) -> Array:
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel(x.shape[-1]).astype(self.dtype))


def fused_dense(x: Array, denses: list[Dense], dtype: jnp.dtype) -> list[Array]:
    """The outputs of several Dense layers of one input, from one matmul.

    Their kernels [in, out] are stacked into [in, n, out] (a new axis, so a kernel split over a mesh axis along
    `out` stays split the same way) and applied as one wider matmul: one GEMM instead of n narrow ones, and in the
    backward pass one gradient of x instead of n to add up. Parameters and results are those of the separate
    layers, so checkpoints do not change.
    """
    kernel = jnp.stack([dense.kernel(x.shape[-1]) for dense in denses], axis=1).astype(dtype)
    y = jnp.einsum("...i,ino->...no", x.astype(dtype), kernel)
    return [y[..., i, :] for i in range(len(denses))]


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` projects onto it (for tied output layers)."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, tokens: Array) -> Array:
        """tokens: int32[batch, length] -> dtype[batch, length, embed]."""
        # A one-hot matmul would shard better on TPUs; a gather is faster on CPU/GPU and shards fine
        # when `vocab` is split over `model` (XLA turns it into a masked local gather plus all-reduce).
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucketing of key_position - query_position into `num_buckets` ids.

    Half the buckets (per direction when bidirectional) are exact small distances, the rest grow
    logarithmically up to `max_distance`, beyond which everything shares the last bucket.
    """
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # eps guards log(0) for n == 0, whose value `is_small` discards anyway.
    val_if_large = max_exact + (
        jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
    """One learned bias per (head, bucket), shared by every layer of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """query_positions: int32[batch|1, q], key_positions: int32[batch|1, k] -> float[batch|1, heads, q, k]."""
        relative_position = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), ("heads", "relpos_buckets")
            ),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        # A gather from a tiny table: [heads, buckets] indexed by [b, q, k] -> [b, q, k, heads].
        bias = jnp.take(table.T, buckets, axis=0)
        return jnp.transpose(bias, (0, 3, 1, 2)).astype(self.dtype)


def combine_masks(*masks: Array | None) -> Array | None:
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    return functools.reduce(jnp.logical_and, masks)


def attention_mask(query_valid: Array, key_valid: Array) -> Array:
    """bool[batch, q], bool[batch, k] -> bool[batch, 1, q, k]."""
    return (query_valid[:, :, None] & key_valid[:, None, :])[:, None]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """Packed examples attend only within their own segment: int[batch, q], int[batch, k] -> bool[batch, 1, q, k]."""
    return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
    """bool[1, 1, length, length]: query i sees keys j <= i."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def mask_to_bias(mask: Array | None, dtype: jnp.dtype) -> Array | None:
    if mask is None:
        return None
    return jnp.where(mask, 0.0, NEG_INF).astype(dtype)


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d) logit scaling (it is folded into the query initialisation).

    Self-attention in decode mode keeps a cache `cached_key` / `cached_value`: dtype[batch, max_length,
    heads, kv] and a scalar `cache_index`; cross-attention in decode mode caches the projected encoder
    keys and values once, at the call that creates the cache, and reuses them at every step.
    """

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None,
        bias: Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
        cross_attention: bool = False,
    ) -> Array:
        """inputs_q: [batch, q, embed]; inputs_kv: [batch, k, embed] (None to reuse a decode cache);
        bias: float[batch|1, heads|1, q, k] (mask and position bias together) -> [batch, q, embed].

        In self-attention decode steps `bias` covers the whole cache, [batch|1, heads|1, max_length(q),
        max_length(k)], and the row of the current position is taken here.
        """
        joined = self.num_heads * self.head_dim
        query_init = lambda *a: self.kernel_init(*a) / np.sqrt(self.head_dim).astype(np.float32)
        projection = functools.partial(Dense, features=joined, kernel_axes=("embed", "joined_kv"), dtype=self.dtype)

        def split_heads(x):
            x = x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))
            return constrain(x, ("batch", "length", "heads", "kv"))

        if inputs_kv is inputs_q:  # self-attention: the three projections in one matmul
            query, key, value = (split_heads(y) for y in fused_dense(inputs_q, [
                projection(kernel_init=query_init, name="query"),
                projection(kernel_init=self.kernel_init, name="key"),
                projection(kernel_init=self.kernel_init, name="value"),
            ], self.dtype))
        else:
            query = split_heads(projection(kernel_init=query_init, name="query")(inputs_q))
            if decode and cross_attention and self.has_variable("cache", "cached_key"):
                key = self.get_variable("cache", "cached_key")
                value = self.get_variable("cache", "cached_value")
            else:
                key, value = (split_heads(y) for y in fused_dense(inputs_kv, [
                    projection(kernel_init=self.kernel_init, name="key"),
                    projection(kernel_init=self.kernel_init, name="value"),
                ], self.dtype))
                if decode and cross_attention:
                    self.put_variable("cache", "cached_key", key)
                    self.put_variable("cache", "cached_value", value)

        if decode and not cross_attention:
            is_initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
            if is_initialized:
                batch, q_len, heads, head_dim = query.shape
                if q_len != 1:
                    raise ValueError(f"decode steps take one token at a time, got query length {q_len}")
                max_length = cached_key.value.shape[1]
                index = cache_index.value
                key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = index + 1
                # Only the keys written so far are visible to the current position.
                visible = jnp.arange(max_length) <= index
                step_bias = mask_to_bias(visible[None, None, None, :], self.dtype)
                if bias is not None:
                    row = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)
                    step_bias = step_bias + row
                bias = step_bias

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if not deterministic and self.dropout_rate > 0.0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - self.dropout_rate), 0.0).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out = out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))
        return Dense(
            features=inputs_q.shape[-1],
            kernel_axes=("joined_kv", "embed"),
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            name="out",
        )(out)


class GatedMlp(nn.Module):
    """T5.1.1's gated-GELU MLP: wo(gelu(wi_0 x) * wi_1 x)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        """x: [batch, length, embed] -> [batch, length, embed]."""
        dense = functools.partial(Dense, features=self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype)
        gate, linear = fused_dense(x, [dense(name="wi_0"), dense(name="wi_1")], self.dtype)
        hidden = nn.gelu(gate, approximate=True) * linear
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        return Dense(features=x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)
