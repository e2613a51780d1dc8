"""The T5.1.1 network: parameter counts, scanned == unscanned, packing, remat, bf16."""
import dataclasses
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers, network
from tests.helpers import TINY, random_batch

# The published parameter counts of each family's sizes.
EXPECTED_PARAMETERS = {
    "t5_1_1/small": 76_961_152,
    "t5_1_1/base": 247_577_856,
    "t5_1_1/large": 783_150_080,
    "t5_1_1/xl": 2_849_757_184,
    "t5_1_1/xxl": 11_135_332_352,
    "t5_1_0/small": 60_506_624,
    "t5_1_0/base": 222_903_552,
    "t5_1_0/large": 737_668_096,
    "t5_1_0/3B": 2_851_598_336,
    "t5_1_0/11B": 11_307_321_344,
}


def config_from_gin(model_file):
    gin.clear_config()
    gin.add_config_file_search_path("gin")
    gin.parse_config_files_and_bindings([f"gin/models/{model_file}.gin"], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    gin.clear_config()
    return model.config


def count_parameters(config):
    module = network.Transformer(config)
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("model_file", sorted(EXPECTED_PARAMETERS))
@pytest.mark.parametrize("scan", [False, True])
def test_parameter_counts_from_gin_files(model_file, scan):
    config = dataclasses.replace(config_from_gin(model_file), scan_layers=scan)
    assert config.vocab_size == 32128
    t5_1_0 = model_file.startswith("t5_1_0/")
    assert config.mlp_activations == (("relu",) if t5_1_0 else ("gelu", "linear"))
    assert config.logits_via_embedding == t5_1_0
    assert count_parameters(config) == EXPECTED_PARAMETERS[model_file]


def init_and_apply(config, batch, params=None, **kwargs):
    module = network.Transformer(config)
    if params is None:
        params = nn.unbox(module.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"])["params"])
    logits = module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                          batch["decoder_target_tokens"], **kwargs)
    return params, logits


def test_scanned_and_unscanned_give_the_same_outputs():
    batch = random_batch()
    params, logits = init_and_apply(TINY, batch)
    scanned = network.scan_params(params)
    assert scanned["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32, 64)
    _, scanned_logits = init_and_apply(dataclasses.replace(TINY, scan_layers=True), batch, scanned)
    np.testing.assert_allclose(scanned_logits, logits, atol=1e-5, rtol=1e-5)
    # And back: the round trip is exact.
    back = network.unscan_params(scanned)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_scanned_init_layout_matches_unscanned_layout():
    tokens = jnp.ones((1, 4), jnp.int32)
    scanned = jax.eval_shape(
        lambda: network.Transformer(dataclasses.replace(TINY, scan_layers=True)).init(jax.random.PRNGKey(0), tokens, tokens)
    )["params"]
    unscanned = jax.eval_shape(lambda: network.Transformer(TINY).init(jax.random.PRNGKey(0), tokens, tokens))["params"]
    converted = jax.eval_shape(network.scan_params, nn.unbox(unscanned))
    assert jax.tree.map(lambda x: x.shape, converted) == jax.tree.map(lambda x: x.shape, nn.unbox(scanned))
    # The layer axis is named, so the partitioner and Adafactor see it.
    assert scanned["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("policy", ["minimal", "full"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_change_memory_not_results(policy, scan):
    batch = random_batch()
    base_config = dataclasses.replace(TINY, scan_layers=scan)
    params, _ = init_and_apply(base_config, batch)

    def loss(config, p):
        _, logits = init_and_apply(config, batch, p)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    g_plain = jax.grad(lambda p: loss(base_config, p))(params)
    g_remat = jax.grad(lambda p: loss(dataclasses.replace(base_config, remat_policy=policy), p))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_packed_batch_equals_each_example_alone():
    """Two examples packed into one row give the logits each has alone (masks and positions respected)."""
    a = random_batch(batch_size=1, inputs_length=6, targets_length=4, seed=1, padding=False)
    b = random_batch(batch_size=1, inputs_length=5, targets_length=3, seed=2, padding=False)
    params, logits_a = init_and_apply(TINY, a)
    _, logits_b = init_and_apply(TINY, b, params)
    pad = lambda x, n: np.pad(x, ((0, 0), (0, n)))
    packed = {k: pad(np.concatenate([a[k], b[k]], axis=1), 2) for k in a}
    packed["decoder_input_tokens"][0, 4] = 0  # each packed target segment starts from BOS (0)
    seg = lambda la, lb, n: pad(np.array([[1] * la + [2] * lb]), n)
    pos = lambda la, lb, n: pad(np.array([list(range(la)) + list(range(lb))]), n)
    kwargs = dict(
        encoder_segment_ids=seg(6, 5, 2), decoder_segment_ids=seg(4, 3, 2),
        encoder_positions=pos(6, 5, 2), decoder_positions=pos(4, 3, 2),
    )
    _, packed_logits = init_and_apply(TINY, packed, params, **kwargs)
    np.testing.assert_allclose(packed_logits[:, :4], logits_a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 4:7], logits_b, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_real_positions():
    batch = random_batch(batch_size=1, inputs_length=6, targets_length=4, padding=False)
    params, logits = init_and_apply(TINY, batch)
    padded = {k: np.pad(v, ((0, 0), (0, 3))) for k, v in batch.items()}
    _, padded_logits = init_and_apply(TINY, padded, params)
    np.testing.assert_allclose(padded_logits[:, :4], logits, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    batch = random_batch(batch_size=2, padding=False)
    params, logits = init_and_apply(TINY, batch)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_tokens"][:, 5:] = 7
    _, changed_logits = init_and_apply(TINY, changed, params)
    np.testing.assert_allclose(changed_logits[:, :5], logits[:, :5], atol=1e-5, rtol=1e-5)
    assert not np.allclose(changed_logits[:, 5:], logits[:, 5:])


def test_cached_decoding_steps_equal_the_full_forward_pass():
    """The decode cache layout: feeding the targets one token at a time gives the teacher-forced logits."""
    batch = random_batch(batch_size=2, padding=False)
    params, logits = init_and_apply(TINY, batch)
    module = network.Transformer(TINY)
    encoded = module.apply({"params": params}, batch["encoder_input_tokens"], method=module.encode)
    length = batch["decoder_input_tokens"].shape[1]
    _, cache = module.apply(
        {"params": params}, encoded, batch["encoder_input_tokens"], jnp.zeros((2, length), jnp.int32),
        decode=True, max_decode_length=length, method=module.decode, mutable=["cache"],
    )
    layer_cache = cache["cache"]["decoder"]["layers_0"]
    assert layer_cache["self_attention"]["cached_key"].shape == (2, length, 8, 4)
    assert layer_cache["encoder_decoder_attention"]["cached_key"].shape == (2, 16, 8, 4)
    steps = []
    for i in range(length):
        step_logits, cache = module.apply(
            {"params": params, **cache}, None, batch["encoder_input_tokens"], batch["decoder_input_tokens"][:, i:i + 1],
            decode=True, max_decode_length=length, method=module.decode, mutable=["cache"],
        )
        steps.append(step_logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("logits_via_embedding", [False, True])
def test_bfloat16_activations_keep_float32_parameters_and_logits(logits_via_embedding):
    """As in T5X, the output layer (untied `logits_dense`, or the tied embedding's `attend`) computes in float32
    whatever the activations' dtype: the loss, scores and argmax read float32 logits."""
    config = dataclasses.replace(TINY, logits_via_embedding=logits_via_embedding)
    batch = random_batch()
    params, logits32 = init_and_apply(config, batch)
    _, logits16 = init_and_apply(dataclasses.replace(config, dtype="bfloat16"), batch, params)
    assert logits32.dtype == logits16.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_allclose(logits16, logits32, atol=0.1, rtol=0.05)
    # Not a float32 copy of bfloat16 values: the last matmul's output is not rounded to 8 bits of mantissa.
    assert not np.array_equal(logits16, np.asarray(jnp.asarray(logits16).astype(jnp.bfloat16), np.float32))


def test_t5_1_0_relu_mlp_and_tied_logits():
    """T5 1.0 (T5X's mlp_activations ('relu',), logits_via_embedding): one `wi` kernel through ReLU, no
    `logits_dense`, and logits = decoder output . embedding^T / sqrt(d_model), in float32."""
    config = dataclasses.replace(TINY, mlp_activations=("relu",), logits_via_embedding=True)
    batch = random_batch()
    module = network.Transformer(config)
    params, logits = init_and_apply(config, batch)
    mlp = params["encoder"]["layers_0"]["mlp"]
    assert sorted(mlp) == ["wi", "wo"] and "logits_dense" not in params["decoder"]
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 32))
    out = layers.Mlp(64, ("relu",)).apply({"params": mlp}, x, deterministic=True)
    np.testing.assert_allclose(out, jnp.maximum(x @ mlp["wi"]["kernel"], 0) @ mlp["wo"]["kernel"], rtol=1e-5, atol=1e-6)

    # The decoder's last hidden state, before the output layer.
    _, state = module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                            batch["decoder_target_tokens"], capture_intermediates=lambda m, _: m.name == "decoder_norm",
                            mutable=["intermediates"])
    hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
    expected = hidden @ params["token_embedder"]["embedding"].T / np.sqrt(32)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_mlp_activations_are_checked():
    with pytest.raises(ValueError, match="mlp_activations=\\('gelu',\\)"):
        network.T5Config(mlp_activations=("gelu",))
    assert network.T5Config(mlp_activations=["relu"]).mlp_activations == ("relu",)  # as gin gives a list


def test_relative_position_buckets():
    rel = jnp.arange(-200, 201)[None]
    bi = layers.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    causal = layers.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert int(bi.min()) == 0 and int(bi.max()) == 31
    # Exact buckets for small distances; keys in the future share bucket 0 in the causal case.
    assert [int(causal[0, 200 - d]) for d in range(8)] == list(range(8))
    assert int(causal[0, 250]) == 0
    # Distances beyond max_distance share the last bucket of their direction.
    assert int(causal[0, 0]) == int(causal[0, 200 - 128]) == 15 or int(causal[0, 0]) == 31


def test_config_rejects_unknown_switches():
    with pytest.raises(ValueError, match="remat_policy"):
        network.T5Config(remat_policy="some")
    with pytest.raises(ValueError, match="dtype"):
        network.T5Config(dtype="float16")


def test_fused_projections_equal_separate_layers():
    """fused_dense (one matmul over stacked kernels) gives the separate Dense layers' outputs and gradients, and
    keeps their parameter names (query/key/value, wi_0/wi_1): checkpoints do not change."""

    class Separate(nn.Module):
        @nn.compact
        def __call__(self, x):
            return [layers.Dense(24, ("embed", "mlp"), name=n)(x) for n in ("a", "b", "c")]

    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.fused_dense(x, [layers.Dense(24, ("embed", "mlp"), name=n) for n in ("a", "b", "c")],
                                      jnp.float32)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    params = nn.unbox(Separate().init(jax.random.PRNGKey(0), x))
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(Fused().init(jax.random.PRNGKey(0), x)))
    loss = lambda module: lambda p: sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(module.apply(p, x)))
    for separate, fused in zip(Separate().apply(params, x), Fused().apply(params, x)):
        np.testing.assert_allclose(fused, separate, rtol=1e-5, atol=1e-6)
    separate_grads, fused_grads = jax.grad(loss(Separate()))(params), jax.grad(loss(Fused()))(params)
    jax.tree.map(lambda f, s: np.testing.assert_allclose(f, s, rtol=1e-5, atol=1e-6), fused_grads, separate_grads)
    names = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    module = network.Transformer(TINY)
    tokens = jnp.ones((1, 4), jnp.int32)
    param_names = names(jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), tokens, tokens))))
    assert {"params/encoder/layers_0/attention/query/kernel", "params/encoder/layers_0/mlp/wi_1/kernel",
            "params/decoder/layers_0/encoder_decoder_attention/value/kernel"} <= param_names, sorted(param_names)[:12]


def reference_attention(query, key, value, bias, mask, keep):
    """softmax(q k^T + bias, masked) v by autodiff through jax.nn.softmax: what layers.dot_product_attention must
    equal."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, layers.NEG_INF)
    weights = jax.nn.softmax(logits).astype(value.dtype)
    if keep is not None:
        weights = weights * keep
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 5, 7), (4, 1, 5, 7), (4, 3, 5, 7)])
@pytest.mark.parametrize("mask_shape", [None, (4, 1, 5, 7), (1, 1, 5, 7)])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("chunk_bytes", [layers.ATTENTION_CHUNK_BYTES, 2 * 3 * 5 * 7 * 4, 1])
def test_attention_core_equals_softmax_reference(bias_shape, mask_shape, dropout, chunk_bytes):
    """The hand-written gradient (row sums folded into the output, rowsum(G * O) for the softmax term, the logits
    recomputed) gives the outputs and the gradients of q, k, v and of a bias of any broadcast shape that autodiff
    gives; in one batch chunk, in chunks of two examples, and one example at a time. The mask hides one key from
    every query and every key from one query."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 5, 3, 4), (4, 7, 3, 4), (4, 7, 3, 4)])
    bias = None if bias_shape is None else jnp.asarray(3 * rng.normal(size=bias_shape), jnp.float32)
    mask = None
    if mask_shape is not None:
        mask = np.ones(mask_shape, bool)
        mask[..., 2] = False
        mask[0, :, 1, :] = False
        mask = jnp.asarray(mask)
    keep = jnp.asarray((rng.random((4, 3, 5, 7)) > 0.3) / 0.7, jnp.float32) if dropout else None
    weights = jnp.asarray(rng.normal(size=(4, 5, 3, 4)), jnp.float32)
    attention = functools.partial(layers.dot_product_attention, chunk_bytes=chunk_bytes)
    loss = lambda fn: lambda q, k, v, bias: jnp.sum(jnp.sin(fn(q, k, v, bias, mask, keep) * weights))
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    np.testing.assert_allclose(attention(q, k, v, bias, mask, keep),
                               reference_attention(q, k, v, bias, mask, keep), rtol=1e-5, atol=1e-6)
    grads = jax.jit(jax.grad(loss(attention), argnums))(q, k, v, bias)
    expected = jax.grad(loss(reference_attention), argnums)(q, k, v, bias)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes, whole_bytes, steps", [
    (1, 4 * 420, 1),  # the whole batch's logits (4 examples of 3 x 5 x 7 float32: 420 bytes) fit
    (2 * 420, 2 * 420, 2),
    (3 * 420, 3 * 420, 2),  # the largest chunk that fits and divides the batch
    (1, 1, 4),  # one example, whatever its size
])
def test_attention_chunking_takes_the_largest_chunk_that_fits(chunk_bytes, whole_bytes, steps):
    assert layers._attention_chunking((4, 5, 3, 4), 7, chunk_bytes, whole_bytes) == (steps, 1)


def test_attention_core_bfloat16_is_close_to_float32():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32) for _ in range(3))
    out32 = layers.dot_product_attention(q, k, v)
    out16 = layers.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("spec,x_shape,kernel_shape", [
    ("...i,io->...o", (2, 5, 16), (16, 24)),
    ("...i,ino->...no", (2, 5, 16), (16, 3, 24)),
    ("...e,ve->...v", (2, 5, 16), (40, 16)),
])
def test_bfloat16_einsum_accumulates_in_float32(spec, x_shape, kernel_shape):
    """layers.einsum in bfloat16: the output is a float32 sum of bfloat16 products, rounded once to bfloat16; the
    gradients are float32 sums too, returned in x's and the kernel's dtypes (float32 here: not rounded at all)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    to16 = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # the values the bfloat16 matmuls see
    exact = lambda x, kernel: jnp.einsum(spec, to16(x), to16(kernel), precision="highest")
    out, vjp = jax.vjp(lambda x, kernel: layers.einsum(spec, x, kernel, jnp.bfloat16), x, kernel)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), to16(exact(x, kernel)), rtol=1e-2, atol=1e-2)
    g = jnp.asarray(rng.normal(size=out.shape), jnp.bfloat16)
    d_x, d_kernel = vjp(g)
    assert d_x.dtype == jnp.float32 and d_kernel.dtype == jnp.float32
    g32 = g.astype(jnp.float32)
    (want_x,) = jax.vjp(lambda x: jnp.einsum(spec, x, to16(kernel), precision="highest"), x)[1](g32)
    (want_kernel,) = jax.vjp(lambda kernel: jnp.einsum(spec, to16(x), kernel, precision="highest"), kernel)[1](g32)
    np.testing.assert_allclose(d_x, want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_kernel, want_kernel, rtol=1e-5, atol=1e-5)
    # In float32, outputs and gradients (the kernel's over flattened tokens) are those of plain jnp.einsum.
    out32, vjp32 = jax.vjp(lambda x, kernel: layers.einsum(spec, x, kernel, jnp.float32), x, kernel)
    want32, want_vjp32 = jax.vjp(lambda x, kernel: jnp.einsum(spec, x, kernel, precision="highest"), x, kernel)
    np.testing.assert_allclose(out32, want32, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp32(g32), want_vjp32(g32)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gated_gelu_equals_autodiff(dtype, tolerance):
    """The MLP's activation on the stacked wi_0/wi_1 output, and its written-out gradient, equal autodiff of
    gelu(gate) * linear (GELU's tanh approximation, as transformers' gelu_new)."""
    rng = np.random.default_rng(3)
    y = jnp.asarray(3 * rng.normal(size=(2, 5, 2, 16)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    reference = lambda y: (nn.gelu(y[..., 0, :].astype(jnp.float32), approximate=True)
                           * y[..., 1, :].astype(jnp.float32))
    out = layers.gated_gelu(y)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(y), rtol=tolerance, atol=tolerance)
    grad = jax.grad(lambda y: jnp.sum(layers.gated_gelu(y).astype(jnp.float32) * w))(y)
    want = jax.grad(lambda y: jnp.sum(reference(y) * w))(y)
    assert grad.shape == y.shape and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want, np.float32), rtol=tolerance,
                               atol=tolerance)
