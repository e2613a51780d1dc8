"""Masks hold with dropout on, in every configuration users train with.

Each test feeds two batches of the same shapes that differ only where the model must not look (the decoder's
future, another packed segment, a padded tail) through the network with dropout on and one fixed dropout rng, so
the dropout patterns are the same in both runs. What the model may see must then give identical logits, encoder
outputs and gradients of a loss over those positions: the masked positions contribute exact zeros. The
configurations are the ones training runs use: unrolled and scanned layers, remat policies, bfloat16 activations,
and attention run one example at a time (the hand-written gradient's batch chunks).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers, network
from tests.helpers import TINY, random_batch

DROPOUT = dataclasses.replace(TINY, dropout_rate=0.3)

# Each configuration compiles one step (every test feeds batches of one shape): the whole batch's attention at
# once, one example at a time, scanned layers with full remat, and bfloat16 with the minimal remat policy.
CONFIGS = {
    "unrolled": DROPOUT,
    "attention_one_example_at_a_time": DROPOUT,
    "scanned_remat_full": dataclasses.replace(DROPOUT, scan_layers=True, remat_policy="full"),
    "bfloat16_remat_minimal": dataclasses.replace(DROPOUT, dtype="bfloat16", remat_policy="minimal"),
}
BATCH, INPUTS_LENGTH, TARGETS_LENGTH = 2, 16, 12
PACKING = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


@functools.cache
def initial_params():
    """The unscanned parameters every configuration starts from (the scanned ones stacked from them)."""
    tokens = jnp.ones((1, 4), jnp.int32)
    init = jax.jit(lambda rng: network.Transformer(DROPOUT).init(rng, tokens, tokens)["params"])
    return nn.unbox(init(jax.random.PRNGKey(0)))


@functools.cache
def runner(name):
    """apply(batch, loss_weights) -> (encoder outputs, logits, gradients of the weighted loss), with dropout on;
    one jitted function per configuration, compiled once per batch shape."""
    config = CONFIGS[name]
    module = network.Transformer(config)
    params = network.scan_params(initial_params()) if config.scan_layers else initial_params()
    rngs = {"dropout": jax.random.PRNGKey(42)}

    def forward(params, batch):
        packing = {k: batch.get(k) for k in PACKING}
        encoded = module.apply({"params": params}, batch["encoder_input_tokens"], packing["encoder_segment_ids"],
                               packing["encoder_positions"], enable_dropout=True, rngs=rngs, method=module.encode)
        logits = module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                              batch["decoder_target_tokens"], enable_dropout=True, rngs=rngs, **packing)
        return encoded, logits

    def loss(params, batch, loss_weights):
        encoded, logits = forward(params, batch)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        target = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        return -jnp.sum(target * loss_weights), (encoded, logits)

    grad = jax.jit(jax.grad(loss, has_aux=True))

    def apply(batch, loss_weights):
        grads, (encoded, logits) = grad(params, batch, loss_weights)
        return np.asarray(encoded, np.float32), np.asarray(logits, np.float32), jax.tree.map(np.asarray, grads)

    return apply


@pytest.fixture(params=sorted(CONFIGS))
def run(request, monkeypatch):
    if request.param == "attention_one_example_at_a_time":  # read when the step is traced, at its first call
        monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 1)
        monkeypatch.setattr(layers, "ATTENTION_WHOLE_BYTES", 1)
    return runner(request.param)


def unpacked(batch):
    """An unpacked batch in the packed batches' form (one segment a row), so that every test runs one compiled
    step."""
    del batch["decoder_loss_weights"]
    for side, length in (("encoder", INPUTS_LENGTH), ("decoder", TARGETS_LENGTH)):
        batch[f"{side}_segment_ids"] = np.ones((BATCH, length), np.int32)
        batch[f"{side}_positions"] = np.tile(np.arange(length, dtype=np.int32), (BATCH, 1))
    return batch


def assert_same(got, want, what):
    np.testing.assert_array_equal(got, want, err_msg=what)


def assert_same_gradients(got, want):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_decoder_does_not_see_the_future(run):
    """Changing the decoder's tokens after position t leaves the logits at positions <= t, and the gradient of the
    loss over them, unchanged."""
    t = 4
    batch = unpacked(random_batch(BATCH, INPUTS_LENGTH, TARGETS_LENGTH, padding=False))
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_tokens"][:, t + 1:] = np.random.default_rng(5).integers(2, 128, (BATCH, TARGETS_LENGTH - t - 1))
    weights = np.zeros((BATCH, TARGETS_LENGTH), np.float32)
    weights[:, :t + 1] = 1.0
    _, logits, grads = run(batch, weights)
    _, changed_logits, changed_grads = run(changed, weights)
    assert_same(changed_logits[:, :t + 1], logits[:, :t + 1], "logits up to position t")
    assert_same_gradients(changed_grads, grads)
    assert not np.allclose(changed_logits[:, t + 1:], logits[:, t + 1:]), "the change must reach the future"


def packed_rows():
    """Two rows, each packing two examples: encoder [6 | 5 | 5 padding], decoder [5 | 4 | 3 padding], with each
    segment's positions."""
    rng = np.random.default_rng(7)
    encoder_segments = np.array([[1] * 6 + [2] * 5 + [0] * 5] * BATCH, np.int32)
    decoder_segments = np.array([[1] * 5 + [2] * 4 + [0] * 3] * BATCH, np.int32)
    targets = np.where(decoder_segments > 0, rng.integers(2, 128, (BATCH, TARGETS_LENGTH)), 0).astype(np.int32)
    decoder_inputs = np.where(decoder_segments > 0, np.pad(targets[:, :-1], ((0, 0), (1, 0))), 0)
    decoder_inputs[:, 5] = 0  # each segment's targets start from BOS (0)
    positions = lambda segments: np.concatenate([np.arange((segments[0] == s).sum()) for s in (1, 2, 0)])
    batch = {
        "encoder_input_tokens": np.where(encoder_segments > 0, rng.integers(2, 128, (BATCH, INPUTS_LENGTH)), 0),
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "encoder_segment_ids": encoder_segments,
        "decoder_segment_ids": decoder_segments,
        "encoder_positions": np.tile(positions(encoder_segments), (BATCH, 1)),
        "decoder_positions": np.tile(positions(decoder_segments), (BATCH, 1)),
    }
    return {k: v.astype(np.int32) for k, v in batch.items()}


@pytest.mark.parametrize("changed_segment", [1, 2])
def test_packed_segments_do_not_see_each_other(run, changed_segment):
    """Changing one packed example's encoder and decoder tokens leaves the other's encoder outputs, logits and
    loss gradient unchanged (segment 1 precedes segment 2, so causality alone would not hide it)."""
    batch = packed_rows()
    other = 3 - changed_segment
    changed = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(changed_segment)
    for tokens, segments in [("encoder_input_tokens", "encoder_segment_ids"),
                             ("decoder_input_tokens", "decoder_segment_ids")]:
        where = batch[segments] == changed_segment
        where[:, 0] = where[:, 5] = False  # keep each decoder segment's BOS (and two encoder tokens)
        changed[tokens][where] = rng.integers(2, 128, where.sum())
    weights = (batch["decoder_segment_ids"] == other).astype(np.float32)
    encoded, logits, grads = run(batch, weights)
    changed_encoded, changed_logits, changed_grads = run(changed, weights)
    encoder_keep, decoder_keep = batch["encoder_segment_ids"] == other, batch["decoder_segment_ids"] == other
    assert_same(changed_encoded[encoder_keep], encoded[encoder_keep], f"encoder outputs of segment {other}")
    assert_same(changed_logits[decoder_keep], logits[decoder_keep], f"logits of segment {other}")
    assert_same_gradients(changed_grads, grads)
    changed_here = batch["decoder_segment_ids"] == changed_segment
    assert not np.allclose(changed_logits[changed_here], logits[changed_here])


def test_padded_tail_is_invisible(run):
    """Whatever sits in a packed row's padded tail (segment id 0), on the encoder and on the decoder side, the
    real examples' encoder outputs, logits and loss gradient stay the same."""
    batch = packed_rows()
    changed = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(11)
    for name, segments in [("encoder_input_tokens", "encoder_segment_ids"),
                           ("decoder_input_tokens", "decoder_segment_ids"),
                           ("decoder_target_tokens", "decoder_segment_ids")]:
        tail = batch[segments] == 0
        changed[name][tail] = rng.integers(2, 128, tail.sum())
    weights = (batch["decoder_segment_ids"] > 0).astype(np.float32)
    encoded, logits, grads = run(batch, weights)
    changed_encoded, changed_logits, changed_grads = run(changed, weights)
    real_encoder, real_decoder = batch["encoder_segment_ids"] > 0, batch["decoder_segment_ids"] > 0
    assert_same(changed_encoded[real_encoder], encoded[real_encoder], "encoder outputs of the examples")
    assert_same(changed_logits[real_decoder], logits[real_decoder], "logits of the examples")
    assert_same_gradients(changed_grads, grads)


def test_attention_dropout_pattern_is_shared_by_every_query():
    """T5X's attention dropout draws one keep-pattern per (example, head, key) and broadcasts it over the queries:
    with equal logits everywhere (a zero query kernel), every query's output is the same, and differs from the
    output without dropout."""
    attention = layers.MultiHeadAttention(num_heads=2, head_dim=4, dropout_rate=0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 8))
    params = nn.unbox(attention.init(jax.random.PRNGKey(0), x, x, None, None, deterministic=True))
    params["params"]["query"]["kernel"] = jnp.zeros_like(params["params"]["query"]["kernel"])
    out = attention.apply(params, x, x, None, None, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    without = attention.apply(params, x, x, None, None, deterministic=True)
    np.testing.assert_allclose(out, jnp.broadcast_to(out[:, :1], out.shape), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, without)
