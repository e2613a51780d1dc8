"""Cross entropy with z-loss and label smoothing against a numpy reference of T5X's formula; loss denominators."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import losses, models
from tests.helpers import TINY

# float32 log-softmax against a float64 reference, on per-token losses of 1.3..20. Measured: within 2.5e-7
# relative (1.4e-6 absolute); the smoothed loss of the smoothed target is 0 within 3e-7.
RTOL, ATOL = 1e-5, 1e-5


def reference_cross_entropy(logits, targets, label_smoothing, z_loss):
    """T5X's `compute_weighted_cross_entropy` per token (before weights), in float64:
    soft targets (1 - s on the target, s / (V - 1) elsewhere), loss = -sum(soft * log_softmax) - the entropy of
    the soft targets (so that predicting them exactly scores 0) + z_loss * logZ^2."""
    logits = np.asarray(logits, np.float64)
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    normalizing_constant = -(
        confidence * np.log(confidence) + (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20)
    )
    soft_targets = np.full(logits.shape, low_confidence)
    np.put_along_axis(soft_targets, targets[..., None], confidence, axis=-1)
    max_logit = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.sum(np.exp(logits - max_logit), axis=-1)) + max_logit[..., 0]
    log_softmax = logits - log_z[..., None]
    z = z_loss * log_z**2
    return -np.sum(soft_targets * log_softmax, axis=-1) - normalizing_constant + z, z


def random_logits_and_targets(seed=0, shape=(3, 5), vocab_size=11, scale=3.0):
    rng = np.random.default_rng(seed)
    # An offset makes log Z far from 0, so that the z-loss term is not negligible.
    logits = (scale * rng.standard_normal(shape + (vocab_size,)) + 2.0).astype(np.float32)
    targets = rng.integers(0, vocab_size, shape).astype(np.int32)
    return logits, targets


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.1])
def test_cross_entropy_with_z_loss_matches_the_reference(label_smoothing, z_loss):
    logits, targets = random_logits_and_targets()
    loss, z = losses.cross_entropy_with_z_loss(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    expected_loss, expected_z = reference_cross_entropy(logits, targets, label_smoothing, z_loss)
    assert loss.shape == z.shape == targets.shape and loss.dtype == np.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(z, expected_z, rtol=RTOL, atol=1e-7)
    if z_loss == 0.1:
        # The z-loss is really in the loss: log Z is ~4 here, so it adds ~1.6 per token.
        plain, _ = losses.cross_entropy_with_z_loss(logits, targets, label_smoothing=label_smoothing, z_loss=0.0)
        np.testing.assert_allclose(np.asarray(loss) - np.asarray(plain), expected_z, rtol=1e-4, atol=1e-5)
        assert np.min(expected_z) > 0.5


def test_plain_cross_entropy_is_minus_the_target_log_probability():
    logits, targets = random_logits_and_targets(seed=1)
    loss, _ = losses.cross_entropy_with_z_loss(logits, targets, z_loss=0.0)
    log_probs = logits.astype(np.float64) - np.log(np.sum(np.exp(logits.astype(np.float64)), -1, keepdims=True))
    target_log_probs = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -target_log_probs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_smoothed_loss_of_the_smoothed_target_is_zero(label_smoothing):
    """logits = log(soft targets): the softmax is exactly the smoothed target and logZ = 0, so after the
    normalising constant (the target's entropy) the loss is 0 -- and any other prediction scores more."""
    vocab_size = 11
    targets = np.array([[0, 3, 10], [7, 7, 1]], np.int32)
    soft = np.full(targets.shape + (vocab_size,), label_smoothing / (vocab_size - 1))
    np.put_along_axis(soft, targets[..., None], 1.0 - label_smoothing, axis=-1)
    perfect = np.log(soft).astype(np.float32)
    loss, z = losses.cross_entropy_with_z_loss(perfect, targets, label_smoothing=label_smoothing, z_loss=1e-4)
    np.testing.assert_allclose(loss, 0.0, atol=2e-6)
    np.testing.assert_allclose(z, 0.0, atol=1e-10)
    # A sharper (one-hot-like) prediction of the right token is worse than the smoothed one under smoothing.
    sharp = np.log(np.where(soft > 0.5, 1 - 1e-6, 1e-6 / (vocab_size - 1))).astype(np.float32)
    sharp_loss, _ = losses.cross_entropy_with_z_loss(sharp, targets, label_smoothing=label_smoothing, z_loss=0.0)
    assert np.all(np.asarray(sharp_loss) > 0.1)
    expected_sharp, _ = reference_cross_entropy(sharp, targets, label_smoothing, 0.0)
    np.testing.assert_allclose(sharp_loss, expected_sharp, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_gradient_equals_autodiff_of_the_log_softmax_gather(label_smoothing):
    """The target logit is a masked sum (no scatter in the backward pass); its gradient is autodiff's of the
    textbook form, a gather from log_softmax."""
    logits, targets = random_logits_and_targets(seed=2)
    weights = np.random.default_rng(3).random(targets.shape).astype(np.float32)

    def textbook(logits):
        log_probs = jax.nn.log_softmax(logits)
        target = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        low = label_smoothing / (logits.shape[-1] - 1)
        loss = -(1.0 - label_smoothing - low) * target - low * jnp.sum(log_probs, -1)
        return jnp.sum((loss + 1e-4 * jnp.square(jax.nn.logsumexp(logits, -1))) * weights)

    ours = lambda logits: jnp.sum(losses.cross_entropy_with_z_loss(
        logits, targets, label_smoothing=label_smoothing, z_loss=1e-4)[0] * weights)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(textbook)(logits), rtol=1e-5, atol=1e-6)


def test_predicts_target_is_an_untied_argmax():
    logits, targets = random_logits_and_targets(seed=4, shape=(4, 6))
    targets[0] = logits[0].argmax(-1)  # a row of hits
    logits[1, 0, :] = 1.0  # all tied: no prediction
    targets[1, 0] = 0
    logits[1, 1, targets[1, 1]] = logits[1, 1].max()  # tied with another token: no prediction either
    got = np.asarray(losses.predicts_target(logits, targets))
    top = np.sort(logits, -1)
    untied = top[..., -1] > top[..., -2]
    np.testing.assert_array_equal(got, (logits.argmax(-1) == targets) & untied)
    assert got[0].all() and not got[1, 0] and not got[1, 1] and 0 < got.sum() < got.size


def test_loss_denominator_for_each_normalizing_factor():
    """T5X's loss_normalizing_factor: None sums, a number divides, NUM_REAL_TARGET_TOKENS is the sum of the loss
    weights (not the count of non-padding tokens when the weights differ), NUM_TOTAL_TARGET_TOKENS counts padding
    too, AVERAGE_PER_SEQUENCE counts the sequences (its weights sum to 1 per sequence)."""
    targets = np.array([[5, 6, 0, 0], [7, 0, 0, 0], [3, 4, 5, 6]], np.int32)
    # Weights that differ from (targets > 0), as a packed or weighted batch may give.
    weights = np.array([[1.0, 0.5, 0, 0], [1.0, 0, 0, 0], [0.25, 1.0, 1.0, 0]], np.float32)
    denominator = lambda factor, w=weights: float(losses.loss_denominator(factor, w, targets))
    assert denominator(None) == 1.0
    assert denominator(233472) == 233472.0
    assert denominator("NUM_REAL_TARGET_TOKENS") == 4.75
    assert denominator("num_real_target_tokens") == 4.75  # any case, as T5X's gin strings
    assert denominator(losses.SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS) == 12.0
    sequence_weights = losses.per_sequence_weights(weights)
    np.testing.assert_allclose(sequence_weights[0], [1 / 1.5, 0.5 / 1.5, 0, 0], rtol=1e-6)
    assert denominator("AVERAGE_PER_SEQUENCE", sequence_weights) == pytest.approx(3.0)
    # An empty batch is not a division by zero.
    empty = np.zeros_like(targets)
    assert float(losses.loss_denominator("NUM_REAL_TARGET_TOKENS", empty.astype(np.float32), empty)) > 0


def test_per_sequence_weights_of_a_packed_row():
    """Packed: each segment's weights sum to 1 (T5X's AVERAGE_PER_SEQUENCE), padding and weightless segments
    stay 0."""
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0]], np.int32)
    weights = np.array([[1, 1, 0.5, 1, 1, 0, 0, 0]], np.float32)
    got = np.asarray(losses.per_sequence_weights(weights, segments))
    np.testing.assert_allclose(got, [[0.4, 0.4, 0.2, 0.5, 0.5, 0, 0, 0]], rtol=1e-6)


@pytest.mark.parametrize("factor", [0.0, -3.0, True, "per_tokens", "constant"])
def test_unknown_or_non_positive_factor_is_rejected(factor):
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        losses.parse_loss_normalizing_factor(factor)
    with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
        models.EncoderDecoderModel(TINY, loss_normalizing_factor=factor)


def test_objective_names_its_normalization():
    assert models.EncoderDecoderModel(TINY).objective_name == "loss/NUM_REAL_TARGET_TOKENS"
    assert models.EncoderDecoderModel(TINY, loss_normalizing_factor=None).objective_name == "loss/sum"
    assert models.EncoderDecoderModel(TINY, loss_normalizing_factor=233472).objective_name == "loss/divided_by_233472"
