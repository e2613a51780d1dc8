"""EncoderDecoderModel: the T5 network plus its loss, scoring and (later) decoding.

The model is plain Python over a Flax module: it owns no optimizer, mesh or files. Batches are dicts of
int32[batch, length] arrays with seqio's EncDecFeatureConverter names: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`, and for packed batches
`encoder_segment_ids`, `decoder_segment_ids`, `encoder_positions`, `decoder_positions`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from t5x_lite import losses, network

Batch = Mapping[str, jax.Array]

PACKING_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


class EncoderDecoderModel:
    """T5 encoder-decoder with T5X's loss (cross entropy + z-loss, optional label smoothing).

    Args:
      config: the network's shapes and switches.
      z_loss: weight of the log(Z)^2 term.
      label_smoothing: target mass spread over the other tokens.
      loss_normalizer: see `losses.LossNormalizer`; per target token by default.
      loss_normalizing_constant: the divisor for the `constant` normalizer.
    """

    def __init__(
        self,
        config: network.T5Config,
        *,
        z_loss: float = 1e-4,
        label_smoothing: float = 0.0,
        loss_normalizer: losses.LossNormalizer | str = losses.LossNormalizer.PER_TOKEN,
        loss_normalizing_constant: float | None = None,
    ):
        self.config = config
        self.module = network.Transformer(config)
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.loss_normalizer = losses.LossNormalizer(loss_normalizer)
        self.loss_normalizing_constant = loss_normalizing_constant
        if self.loss_normalizer is losses.LossNormalizer.CONSTANT and not loss_normalizing_constant:
            raise ValueError("loss_normalizer='constant' needs loss_normalizing_constant > 0")

    def init(self, rng: jax.Array, encoder_length: int = 1, decoder_length: int = 1) -> Any:
        """Parameters wrapped in flax LogicallyPartitioned boxes (their logical axis names)."""
        encoder_tokens = jnp.ones((1, encoder_length), jnp.int32)
        decoder_tokens = jnp.ones((1, decoder_length), jnp.int32)
        return self.module.init({"params": rng}, encoder_tokens, decoder_tokens, decoder_tokens)["params"]

    def logits(self, params: Any, batch: Batch, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits float[batch, target_length, vocab]."""
        packing = {k: batch.get(k) for k in PACKING_FEATURES}
        return self.module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            enable_dropout=dropout_rng is not None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng},
            **packing,
        )

    def loss_weights(self, batch: Batch) -> jax.Array:
        if "decoder_loss_weights" in batch:
            return batch["decoder_loss_weights"].astype(jnp.float32)
        return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)

    def loss_sums(self, params: Any, batch: Batch, *, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Batch sums (float32 scalars): `loss` (z-loss included), `z_loss`, `weight` (target tokens counted)
        and `correct` (argmax hits among them)."""
        logits = self.logits(params, batch, dropout_rng=dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = self.loss_weights(batch)
        loss, z_loss = losses.cross_entropy_with_z_loss(
            logits, targets, label_smoothing=self.label_smoothing, z_loss=self.z_loss
        )
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * weights),
            "z_loss": jnp.sum(z_loss * weights),
            "weight": jnp.sum(weights),
            "correct": jnp.sum(correct * weights),
        }

    def loss_denominator(self, batch: Batch) -> jax.Array:
        """What the summed loss of this (whole) batch is divided by for the gradient."""
        return losses.loss_denominator(
            self.loss_weights(batch),
            batch["decoder_target_tokens"],
            self.loss_normalizer,
            self.loss_normalizing_constant,
        )

    def score(self, params: Any, batch: Batch) -> jax.Array:
        """Summed log-likelihood of each example's targets (loss weights applied): float32[batch]."""
        logits = self.logits(params, batch).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * self.loss_weights(batch), axis=-1)
