"""Flax building blocks of T5 (T5.1.1 and T5 1.0).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `joined_kv`, `vocab`,
`relpos_buckets`, and `layers` when scanned) and key activations are constrained with logical names
(`batch`, `length`, `embed`, `mlp`, `joined_kv`, `heads`, `kv`, `vocab`). The rules in
`partitioning.py` map them onto a mesh; nothing here names a mesh axis. Attention alone asks, through the same
logical names and rules (as a logical constraint does), how many ways `batch` and `heads` are split, to size its
per-device batch chunks.
"""
from __future__ import annotations

import functools
import math
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


def _transposed_specs(spec: str) -> tuple[str, str]:
    """The einsums of the two input gradients of `spec` ("a,b->c"): "c,b->a" and "a,c->b"."""
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_float32_accumulation(spec: str, x: Array, kernel: Array, dtype: jnp.dtype) -> Array:
    return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def _einsum_fwd(spec, x, kernel, dtype):
    return _einsum_float32_accumulation(spec, x, kernel, dtype), (x, kernel)


def _einsum_bwd(spec, dtype, residuals, g):
    x, kernel = residuals
    x_spec, kernel_spec = _transposed_specs(spec)
    g = g.astype(dtype)
    d_x = jnp.einsum(x_spec, g, kernel.astype(dtype), preferred_element_type=jnp.float32)
    if dtype == jnp.float32:
        # The kernel's gradient contracts the leading ("...") axes of x and g. With them flattened into one token
        # axis first, XLA:CPU reads g as it lies; from the einsum over [batch, length] it wrote a transposed copy
        # of g (as large as the layer's output) first. In bfloat16 the flattened form has no fast kernel.
        leading = x.ndim - len(kernel_spec.split(",")[0].replace("...", ""))
        tokens = lambda a: a.reshape((-1,) + a.shape[leading:])
        d_kernel = jnp.einsum(kernel_spec.replace("...", "t"), tokens(x.astype(dtype)), tokens(g))
    else:
        d_kernel = jnp.einsum(kernel_spec, x.astype(dtype), g, preferred_element_type=jnp.float32)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_einsum_float32_accumulation.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, x: Array, kernel: Array, dtype: jnp.dtype) -> Array:
    """jnp.einsum(spec, x, kernel) computed in `dtype`; below float32, accumulated in float32.

    In bfloat16 the matmuls (forward and both gradients) read bfloat16 operands and accumulate and write float32
    before rounding, as TPU and GPU matmul units do. On a CPU with AVX512_BF16 that is also the fast path: XLA
    then runs bfloat16 dot-product instructions, about twice the float32 rate, where a dot that rounds its
    output into bfloat16 runs slower than float32. The kernel's gradient is returned in its own dtype (float32
    parameters get float32 gradients, not rounded ones). In float32 the kernel's gradient is taken over the
    tokens flattened into one axis (see `_einsum_bwd`). `x` and the output start with the same "..." axes (the
    tokens), and every other index of `x` appears in `kernel` (true of projections).
    """
    return _einsum_float32_accumulation(spec, x, kernel, jnp.dtype(dtype))


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
        return einsum("...i,io->...o", x, self.kernel(x.shape[-1]), self.dtype)


def stacked_dense(x: Array, denses: list[Dense], dtype: jnp.dtype) -> Array:
    """The outputs of several Dense layers of one input, from one matmul, stacked: [..., n, out].

    Their kernels [in, out] are stacked into [in, n, out] (a new axis, so a kernel split over a mesh axis along
    `out` stays split the same way) and applied as one wider matmul: one GEMM instead of n narrow ones, and in the
    backward pass one gradient of x instead of n to add up. Parameters and results are those of the separate
    layers, so checkpoints do not change.
    """
    kernel = jnp.stack([dense.kernel(x.shape[-1]) for dense in denses], axis=1)
    return einsum("...i,ino->...no", x, kernel, dtype)


def fused_dense(x: Array, denses: list[Dense], dtype: jnp.dtype) -> list[Array]:
    """stacked_dense's outputs as a list, one per layer."""
    y = stacked_dense(x, denses, dtype)
    # lax.split, not indexing: its gradient is one concatenate, where n slices' would be n pads added up.
    return [part.squeeze(-2) for part in jax.lax.split(y, (1,) * len(denses), axis=y.ndim - 2)]


_GELU_C = float(np.sqrt(2.0 / np.pi))


def _gelu_parts(gate):
    """tanh-approximated GELU of float32 `gate` and its derivative."""
    inner = _GELU_C * (gate + 0.044715 * gate**3)
    t = jnp.tanh(inner)
    gelu = 0.5 * gate * (1.0 + t)
    d_gelu = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * gate * gate)
    return gelu, d_gelu


@jax.custom_vjp
def gated_gelu(y: Array) -> Array:
    """gelu(y[..., 0, :]) * y[..., 1, :] (GELU's tanh approximation), for y = stacked_dense(x, [wi_0, wi_1]).

    The gradient is written out and returned stacked, [..., 2, mlp], from one elementwise pass over y, where
    autodiff of the two slices would build it from two results and a concatenation.
    """
    y32 = y.astype(jnp.float32)
    return (_gelu_parts(y32[..., 0, :])[0] * y32[..., 1, :]).astype(y.dtype)


def _gated_gelu_fwd(y):
    return gated_gelu(y), y


def _gated_gelu_bwd(y, g):
    y32, g32 = y.astype(jnp.float32), g.astype(jnp.float32)
    gelu, d_gelu = _gelu_parts(y32[..., 0, :])
    return (jnp.stack([g32 * y32[..., 1, :] * d_gelu, g32 * gelu], axis=-2).astype(y.dtype),)


gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


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
        """x: [..., embed] -> float32[..., vocab]: x projected onto the table (tied output logits), in float32 as
        T5X's `attend_dtype`."""
        return einsum("...e,ve->...v", x, self.embedding, jnp.float32)


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


# Attention's [batch, heads, q, k] float32 logits on one device: a batch whose logits fit in ATTENTION_WHOLE_BYTES
# runs whole, a larger one in chunks of at most ATTENTION_CHUNK_BYTES (where one example allows it). Measured in
# T5.1.1-small's train step at batch 8 on a 2-core Zen 4 (32 MiB L3): the encoder self-attention (6 MiB an
# example, 48 MiB a batch) ran fastest one example at a time, 5% faster a step than in chunks of two; the
# cross-attention (11 MiB a batch) ran whole 2.5% faster than in two chunks.
ATTENTION_CHUNK_BYTES = 8 * 2**20
ATTENTION_WHOLE_BYTES = 16 * 2**20


def _mesh_ways(logical_axis: str) -> int:
    """How many ways the current mesh and logical-axis rules split `logical_axis` (1 outside a mesh context)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    names = nn.logical_to_mesh_axes((logical_axis,))[0]
    if names is None:
        return 1
    return math.prod(mesh.shape[n] for n in (names if isinstance(names, tuple) else (names,)))


def _attention_chunking(query_shape, key_length: int, chunk_bytes: int, whole_bytes: int) -> tuple[int, int]:
    """(steps, shards): the batch is processed in `steps` sequential chunks of `batch // steps` examples, each
    chunk spread over the `shards` devices that split the batch. Per device, a batch whose logits fit in
    whole_bytes is one chunk; otherwise a chunk's logits stay within chunk_bytes where one example allows it."""
    batch, q_length, heads = query_shape[:3]
    shards = _mesh_ways("batch")
    if batch % shards:
        shards = 1
    head_ways = _mesh_ways("heads")
    local_heads = heads // head_ways if heads % head_ways == 0 else heads
    per_example = local_heads * q_length * key_length * 4
    local_batch = batch // shards
    fits = local_batch if per_example * local_batch <= whole_bytes else max(1, chunk_bytes // per_example)
    chunk = max(c for c in range(1, local_batch + 1) if local_batch % c == 0 and c <= fits)
    return local_batch // chunk, shards


def _split_batch(x: Array | None, steps: int, shards: int) -> Array | None:
    """[batch, ...] -> [steps, batch // steps, ...], step i holding examples i*c..i*c+c-1 of every shard's block;
    batch-broadcast (size 1) and absent arrays are left whole."""
    if x is None or x.shape[0] == 1:
        return x
    rest = x.shape[1:]
    x = x.reshape((shards, steps, x.shape[0] // (shards * steps)) + rest)
    return jnp.moveaxis(x, 1, 0).reshape((steps, -1) + rest)


def _merge_batch(x: Array, steps: int, shards: int) -> Array:
    rest = x.shape[2:]
    x = x.reshape((steps, shards, x.shape[1] // shards) + rest)
    return jnp.moveaxis(x, 0, 1).reshape((-1,) + rest)


def _over_batch_chunks(body, carry, inputs: tuple, steps: int, shards: int):
    """carry, ys = body(carry, chunk_inputs) over the batch chunks: inputs with a batch axis are split, the others
    (batch-broadcast or None) are given whole to every chunk; ys come back merged along the batch axis."""
    if steps == 1:
        return body(carry, inputs)
    split = [_split_batch(x, steps, shards) for x in inputs]
    chunked = [x is not None and x.shape[0] != 1 for x in inputs]

    def scan_body(carry, xs):
        it = iter(xs)
        return body(carry, tuple(next(it) if c else x for x, c in zip(split, chunked)))

    carry, ys = jax.lax.scan(scan_body, carry, tuple(x for x, c in zip(split, chunked) if c))
    return carry, jax.tree.map(lambda y: _merge_batch(y, steps, shards), ys)


def _attention_logits(query, key, bias, mask):
    """float32 [b, h, q, k]: q k^T + bias, NEG_INF where mask is False."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    return logits


def _attention_chunk_forward(query, key, value, bias, mask, keep):
    """The normalised output [b, q, h, d] and, per row, the logits' max and the reciprocal of exp's sum
    (float32 [b, h, q, 1] each)."""
    logits = _attention_logits(query, key, bias, mask)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - row_max)
    inv_sum = 1.0 / jnp.sum(unnormalized, axis=-1, keepdims=True)
    weights = unnormalized.astype(value.dtype)
    if keep is not None:
        weights = weights * keep
    out = jnp.einsum("bhqk,bkhd->bhqd", weights, value, preferred_element_type=jnp.float32) * inv_sum
    return jnp.transpose(out, (0, 2, 1, 3)).astype(value.dtype), row_max, inv_sum


def _attention_forward(query, key, value, bias, mask, keep, steps, shards):
    _, (out, row_max, inv_sum) = _over_batch_chunks(
        lambda carry, xs: (carry, _attention_chunk_forward(*xs)), None,
        (query, key, value, bias, mask, keep), steps, shards)
    return out, row_max, inv_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(query, key, value, bias, mask, keep, steps, shards):
    return _attention_forward(query, key, value, bias, mask, keep, steps, shards)[0]


def _attention_fwd(query, key, value, bias, mask, keep, steps, shards):
    out, row_max, inv_sum = _attention_forward(query, key, value, bias, mask, keep, steps, shards)
    return out, (query, key, value, bias, mask, keep, out, row_max, inv_sum)


def _attention_bwd(steps, shards, residuals, g):
    query, key, value, bias, mask, keep, out, row_max, inv_sum = residuals
    shared_bias = bias is not None and bias.shape[0] == 1 and query.shape[0] != 1

    def chunk_grads(d_bias_sum, xs):
        query, key, value, bias_chunk, mask, keep, out, row_max, inv_sum, g = xs
        dtype = value.dtype
        # The weights are recomputed from the logits, and with the 1/sum folded into G, exp(logits - max)
        # stands in for P below.
        unnormalized = jnp.exp(_attention_logits(query, key, bias_chunk, mask) - row_max)
        g = (g.astype(jnp.float32) * jnp.transpose(inv_sum, (0, 2, 1, 3))).astype(dtype)
        weights = unnormalized.astype(dtype)
        if keep is not None:
            weights = weights * keep
        d_value = jnp.einsum("bhqk,bqhd->bkhd", weights, g, preferred_element_type=jnp.float32).astype(dtype)
        d_weights = jnp.einsum("bqhd,bkhd->bhqk", g, value, preferred_element_type=jnp.float32)
        if keep is not None:
            d_weights = d_weights * keep.astype(jnp.float32)
        row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        d_logits = unnormalized * (d_weights - jnp.transpose(row, (0, 2, 1))[..., None])
        if mask is not None:  # only a fully masked row has weight there, and its logits are constants
            d_logits = jnp.where(mask, d_logits, 0.0)
        d_bias = None
        if bias is not None:
            broadcast = tuple(i for i in range(1, 4) if bias.shape[i] == 1 and d_logits.shape[i] != 1)
            d_bias = jnp.sum(d_logits, axis=broadcast, keepdims=True)
            if shared_bias:
                # Summed over each device's own examples only: the sum over devices, an all-reduce, is taken
                # once after the last chunk rather than in every one.
                per_shard = d_bias.reshape((shards, -1) + d_bias.shape[1:]).sum(axis=1)
                d_bias_sum, d_bias = d_bias_sum + per_shard, None
        d_logits = d_logits.astype(query.dtype)
        # dQ as the [b, h, q, d] product dS K, reading dS as it lies: with jnp.einsum XLA computed dQ^T = K^T dS^T
        # and wrote a transposed copy of dS, the costliest elementwise op of the backward pass.
        d_query = jax.lax.dot_general(d_logits, jnp.transpose(key, (0, 2, 1, 3)), (((3,), (2,)), ((0, 1), (0, 1))),
                                      preferred_element_type=jnp.float32)
        d_query = jnp.transpose(d_query, (0, 2, 1, 3))
        d_key = jnp.einsum("bhqk,bqhd->bkhd", d_logits, query, preferred_element_type=jnp.float32)
        return d_bias_sum, (d_query.astype(query.dtype), d_key.astype(key.dtype), d_value, d_bias)

    d_bias_sum = None
    if shared_bias:
        d_bias_sum = constrain(jnp.zeros((shards,) + bias.shape[1:], jnp.float32), ("batch", None, None, None))
    d_bias_sum, (d_query, d_key, d_value, d_bias) = _over_batch_chunks(
        chunk_grads, d_bias_sum, (query, key, value, bias, mask, keep, out, row_max, inv_sum, g), steps, shards)
    if bias is not None:
        d_bias = (jnp.sum(d_bias_sum, axis=0, keepdims=True) if shared_bias else d_bias).astype(bias.dtype)
    return d_query, d_key, d_value, d_bias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    keep: Array | None = None,
    *,
    chunk_bytes: int | None = None,
) -> Array:
    """softmax(query key^T + bias, masked) value, the softmax in float32 and taken over the keys.

    query: [batch, q, heads, d]; key, value: [batch, k, heads, d]; bias: float[batch|1, heads|1, q, k] or None;
    mask: bool[batch|1, heads|1, q|1, k] (True: attend) or None; keep: the dropout multiplier of the weights
    (0 or 1 / (1 - rate)), [batch, heads, q|1, k] in value's dtype, or None. Returns [batch, q, heads, d] in value's
    dtype. A fully masked row attends evenly to every key.

    Memory traffic, not arithmetic, bounds attention on a CPU: one pass over T5-small's [8, 6, 512, 512] float32
    logits costs about as much as the QK^T matmul. So the batch is processed in chunks whose logits stay in cache
    (`chunk_bytes` per device; by default a batch within ATTENTION_WHOLE_BYTES runs whole, a larger one in
    chunks within ATTENTION_CHUNK_BYTES), and nothing [b, h, q, k]-sized is kept for the backward pass: it
    recomputes the logits from q and k and the saved row max and sum. A batch-broadcast bias's gradient is summed
    over the chunks as they go. On a mesh, every device takes its own share of each chunk.

    The division by the softmax's row sums is applied to the output ([.., d] wide) rather than to the weights
    ([.., k] wide), and the gradient is written out: with P the weights, O the output and G its cotangent,
    dlogits = P * (G V^T - rowsum(G * O)), where rowsum(G * O) equals rowsum(P * G V^T) and costs a pass over
    [.., d] instead of [.., k].
    """
    budgets = (ATTENTION_CHUNK_BYTES, ATTENTION_WHOLE_BYTES) if chunk_bytes is None else (chunk_bytes, chunk_bytes)
    steps, shards = _attention_chunking(query.shape, key.shape[1], *budgets)
    return _attention(query, key, value, bias, mask, keep, steps, shards)


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
        mask: Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
        cross_attention: bool = False,
    ) -> Array:
        """inputs_q: [batch, q, embed]; inputs_kv: [batch, k, embed] (None to reuse a decode cache);
        bias: float[batch|1, heads|1, q, k] (the position bias) or None; mask: bool[batch|1, 1, q, k] or None
        -> [batch, q, embed].

        In self-attention decode steps `bias` and `mask` cover the whole cache, [batch|1, heads|1, max_length(q),
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
                current_row = lambda x: x if x is None or x.shape[2] == 1 else jax.lax.dynamic_slice_in_dim(
                    x, index, 1, axis=2)
                bias = current_row(bias)
                mask = combine_masks(visible[None, None, None, :], current_row(mask))

        keep = None
        if not deterministic and self.dropout_rate > 0.0:
            # T5X's attention dropout: one keep-pattern per (example, head, key), shared by every query. It scales
            # the weights after the softmax and is applied on top of the mask, never in its place.
            batch, _, heads, _ = query.shape
            kept = jax.random.bernoulli(
                self.make_rng("dropout"), 1.0 - self.dropout_rate, (batch, heads, 1, key.shape[1])
            )
            keep = jnp.where(kept, 1.0 / (1.0 - self.dropout_rate), 0.0).astype(self.dtype)
        out = dot_product_attention(query, key, value, bias, mask, keep)
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out = out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))
        return Dense(
            features=inputs_q.shape[-1],
            kernel_axes=("joined_kv", "embed"),
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            name="out",
        )(out)


# T5X's `mlp_activations`: T5.1.1's gated GELU (the product of two projections, one through GELU) and T5 1.0's ReLU.
MLP_ACTIVATIONS = (("gelu", "linear"), ("relu",))


class Mlp(nn.Module):
    """T5's MLP: wo(gelu(wi_0 x) * wi_1 x) (T5.1.1, activations ('gelu', 'linear')) or wo(relu(wi x)) (T5 1.0,
    ('relu',)), with dropout on the hidden units."""

    mlp_dim: int
    activations: tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        """x: [batch, length, embed] -> [batch, length, embed]."""
        dense = functools.partial(Dense, features=self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype)
        if self.activations == ("gelu", "linear"):
            hidden = gated_gelu(stacked_dense(x, [dense(name="wi_0"), dense(name="wi_1")], self.dtype))
        elif self.activations == ("relu",):
            hidden = jax.nn.relu(dense(name="wi")(x))
        else:
            raise ValueError(f"mlp activations {self.activations!r}; valid: {MLP_ACTIVATIONS}")
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        return Dense(features=x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)
