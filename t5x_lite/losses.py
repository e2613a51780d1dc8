"""Cross entropy with z-loss and label smoothing, and how the summed loss is normalised.

The functions return sums over the batch so that gradient accumulation over microbatches is exact: the
trainer divides by the denominator of the whole batch (`loss_denominator`). The normalisation has T5X's names
(`loss_normalizing_factor`: None, a number, or a `SpecialLossNormalizingFactor`); the logged `loss` is always the
loss per target token, and the optimised one is logged beside it under `loss/<normalization>`.
"""
from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp


class SpecialLossNormalizingFactor(enum.Enum):
    """T5X's `loss_normalizing_factor` values that depend on the batch (the others: None, the summed loss, and a
    positive number, a fixed divisor, e.g. the 233472 T5X suggests to fine-tune T5's Mesh TensorFlow checkpoints).

    NUM_REAL_TARGET_TOKENS: the batch's summed loss weights (`decoder_loss_weights`, else the non-padding target
      tokens): the mean loss per target token. t5x_lite's default.
    NUM_TOTAL_TARGET_TOKENS: batch size x targets length, padding included.
    AVERAGE_PER_SEQUENCE: each sequence's (packed: each segment's) mean loss per token, averaged over the
      sequences, so that every example weighs the same whatever its length.
    """

    NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
    NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
    AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"


LossNormalizingFactor = float | int | str | SpecialLossNormalizingFactor | None


def parse_loss_normalizing_factor(factor: LossNormalizingFactor) -> float | SpecialLossNormalizingFactor | None:
    """None, a positive number, or a SpecialLossNormalizingFactor (also by name, in any case, as gin gives it)."""
    if factor is None or isinstance(factor, SpecialLossNormalizingFactor):
        return factor
    if isinstance(factor, str):
        try:
            return SpecialLossNormalizingFactor[factor.upper()]
        except KeyError:
            raise ValueError(f"loss_normalizing_factor={factor!r}; valid: None (sum), a positive number, or one of "
                             f"{[f.name for f in SpecialLossNormalizingFactor]}") from None
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0:
        return float(factor)
    raise ValueError(f"loss_normalizing_factor={factor!r}; valid: None (sum), a positive number, or one of "
                     f"{[f.name for f in SpecialLossNormalizingFactor]}")


def loss_normalizing_factor_name(factor: LossNormalizingFactor) -> str:
    """How the optimised loss is normalised, for metric names: 'sum', 'divided_by_<number>' or the factor's name."""
    factor = parse_loss_normalizing_factor(factor)
    if factor is None:
        return "sum"
    if isinstance(factor, SpecialLossNormalizingFactor):
        return factor.name
    return f"divided_by_{factor:g}"


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


def per_sequence_weights(weights: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """AVERAGE_PER_SEQUENCE's weights: each token's weight divided by its sequence's total weight (in a packed
    row, its segment's), so that each sequence's weights sum to 1 (0 for a sequence without weight).

    weights: float[batch, length]; segment_ids: int[batch, length] (0 for padding) or None -> float32[batch, length].
    """
    weights = weights.astype(jnp.float32)
    if segment_ids is None:
        totals = jnp.sum(weights, axis=-1, keepdims=True)
    else:
        num_segments = segment_ids.shape[-1] + 1
        per_segment = jax.vmap(lambda w, s: jax.ops.segment_sum(w, s, num_segments))(weights, segment_ids)
        totals = jnp.take_along_axis(per_segment, segment_ids, axis=-1)
    return jnp.where(totals > 0, weights / jnp.where(totals > 0, totals, 1.0), 0.0)


def loss_denominator(
    factor: LossNormalizingFactor, weights: jax.Array, target_tokens: jax.Array
) -> jax.Array:
    """What the summed loss of a whole batch is divided by: a float32 scalar.

    weights: the loss weights the loss is summed with (for AVERAGE_PER_SEQUENCE, `per_sequence_weights`'s), and
    target_tokens: int[batch, length]. A batch without weight is divided by a tiny number, not by zero.
    """
    factor = parse_loss_normalizing_factor(factor)
    if factor is None:
        return jnp.ones([], jnp.float32)
    if factor is SpecialLossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
        return jnp.asarray(target_tokens.size, jnp.float32)
    if isinstance(factor, SpecialLossNormalizingFactor):  # the real tokens, or the sequences
        return jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1e-8)
    return jnp.asarray(factor, jnp.float32)
