"""Cross entropy with z-loss and label smoothing, and how the summed loss is normalised.

The functions return sums over the batch so that gradient accumulation over microbatches is exact: the
trainer divides by the denominator of the whole batch (`loss_denominator`). What is logged is always the
loss per target token, whatever the normalisation used for the gradient.
"""
from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp


class LossNormalizer(enum.Enum):
    """What the summed loss is divided by before differentiation.

    PER_TOKEN: the batch's total loss weight (the mean loss per target token); the default.
    NUM_REAL_TARGET_TOKENS: the number of non-padding target tokens (T5X's option of that name).
    CONSTANT: a fixed number (T5X's `loss_normalizing_factor`, e.g. batch 128 x 114 targets x 16 = 233472),
      which keeps the gradient's scale independent of how full the batch is.
    """

    PER_TOKEN = "per_token"
    NUM_REAL_TARGET_TOKENS = "num_real_target_tokens"
    CONSTANT = "constant"


def cross_entropy_with_z_loss(
    logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
    """Per-token loss and z-loss (both included in the loss), in float32.

    logits: float[batch, length, vocab]; targets: int32[batch, length] -> (loss, z_loss): float32[batch, length].
    z-loss (z_loss * log(Z)^2) keeps the softmax normaliser near 1; label smoothing spreads `label_smoothing`
    of the target mass over the other tokens, and the loss is offset by the smoothed target's entropy so that
    a perfect prediction scores 0.
    """
    logits = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    target = target_logits(logits, targets)
    # logsumexp's shift, the row max, from the largest other logit (which accuracy takes too) and the target's:
    # one pass over the logits fewer than jax.nn.logsumexp's own max.
    row_max = jax.lax.stop_gradient(jnp.maximum(largest_other_logits(logits, targets), target))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    log_z = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1))
    target_log_prob = target - log_z
    if label_smoothing > 0.0:
        confidence = 1.0 - label_smoothing
        low_confidence = label_smoothing / (vocab_size - 1)
        # The minimum achievable loss, so that a perfect prediction of the smoothed target scores 0.
        normalizing_constant = -(
            confidence * jnp.log(confidence) + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
        )
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab_size * log_z
        cross_entropy = -(
            (confidence - low_confidence) * target_log_prob + low_confidence * sum_log_probs
        ) - normalizing_constant
    else:
        cross_entropy = -target_log_prob
    z = z_loss * jnp.square(log_z)
    return cross_entropy + z, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _target_logits(vocab_size: int, logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _target_logits_fwd(vocab_size, logits, targets):
    return _target_logits(vocab_size, logits, targets), targets


def _is_target(vocab_size: int, targets: jax.Array) -> jax.Array:
    """bool[batch, length, vocab]: True at each target's index."""
    return jnp.arange(vocab_size, dtype=targets.dtype) == targets[..., None]


def _target_logits_bwd(vocab_size, targets, g):
    return jnp.where(_is_target(vocab_size, targets), g[..., None], 0.0), None


_target_logits.defvjp(_target_logits_fwd, _target_logits_bwd)


def target_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits[..., targets]: float[batch, length, vocab], int[batch, length] -> float[batch, length].

    A gather, whose gradient is written as a select (g where the vocabulary index is the target, else 0) that
    XLA fuses into the softmax gradient; autodiff's would zero a [batch, length, vocab] array and scatter into
    it.
    """
    return _target_logits(logits.shape[-1], logits, targets)


def largest_other_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The largest logit other than the target's: float[batch, length]."""
    return jnp.max(jnp.where(_is_target(logits.shape[-1], targets), -jnp.inf, logits), axis=-1)


def predicts_target(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """bool[batch, length]: the target's logit is larger than every other one (the argmax is the target, and
    not tied with another token).

    A comparison with the largest other logit, which the loss computes too; jnp.argmax is a reduction over
    (value, index) pairs, which on a CPU took longer than the whole loss.
    """
    return target_logits(logits, targets) > largest_other_logits(logits, targets)


def loss_denominator(
    weights: jax.Array,
    target_tokens: jax.Array,
    normalizer: LossNormalizer | str = LossNormalizer.PER_TOKEN,
    constant: float | None = None,
) -> jax.Array:
    """The number the summed loss of a whole batch is divided by; weights, target_tokens: [batch, length]."""
    normalizer = LossNormalizer(normalizer)
    if normalizer is LossNormalizer.PER_TOKEN:
        return jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1e-8)
    if normalizer is LossNormalizer.NUM_REAL_TARGET_TOKENS:
        return jnp.maximum(jnp.sum(target_tokens > 0).astype(jnp.float32), 1.0)
    if constant is None or constant <= 0:
        raise ValueError(f"loss normalizer 'constant' needs a positive loss_normalizing_constant, got {constant}")
    return jnp.asarray(constant, jnp.float32)
