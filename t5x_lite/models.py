"""EncoderDecoderModel: the T5 network plus its loss, scoring and decoding.

The model is plain Python over a Flax module: it owns no optimizer, mesh or files. Batches are dicts of
int32[batch, length] arrays with seqio's EncDecFeatureConverter names: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`, and for packed batches
`encoder_segment_ids`, `decoder_segment_ids`, `encoder_positions`, `decoder_positions`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from t5x_lite import decoding, losses, network

Batch = Mapping[str, jax.Array]

PACKING_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


class EncoderDecoderModel:
    """T5 encoder-decoder with T5X's loss (cross entropy + z-loss, optional label smoothing).

    Args:
      config: the network's shapes and switches.
      z_loss: weight of the log(Z)^2 term.
      label_smoothing: target mass spread over the other tokens.
      loss_normalizing_factor: T5X's: what the batch's summed loss is divided by for the gradient: None (the
        sum), a positive number, or a `losses.SpecialLossNormalizingFactor` (or its name); by default
        NUM_REAL_TARGET_TOKENS, the mean loss per target token.
    """

    def __init__(
        self,
        config: network.T5Config,
        *,
        z_loss: float = 1e-4,
        label_smoothing: float = 0.0,
        loss_normalizing_factor: losses.LossNormalizingFactor = "NUM_REAL_TARGET_TOKENS",
    ):
        self.config = config
        self.module = network.Transformer(config)
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.loss_normalizing_factor = losses.parse_loss_normalizing_factor(loss_normalizing_factor)

    @property
    def objective_name(self) -> str:
        """The optimised loss's metric name: `loss/<normalization>`, e.g. `loss/NUM_REAL_TARGET_TOKENS`."""
        return "loss/" + losses.loss_normalizing_factor_name(self.loss_normalizing_factor)

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
        """float32[batch, length]: `decoder_loss_weights`, else 1 for every non-padding target token."""
        if "decoder_loss_weights" in batch:
            return batch["decoder_loss_weights"].astype(jnp.float32)
        return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)

    def objective_weights(self, batch: Batch) -> jax.Array:
        """The weights the optimised loss is summed with: the loss weights, or for AVERAGE_PER_SEQUENCE those
        divided by each sequence's (packed: segment's) total."""
        weights = self.loss_weights(batch)
        if self.loss_normalizing_factor is losses.SpecialLossNormalizingFactor.AVERAGE_PER_SEQUENCE:
            return losses.per_sequence_weights(weights, batch.get("decoder_segment_ids"))
        return weights

    def loss_sums(self, params: Any, batch: Batch, *, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Batch sums (float32 scalars): `loss` (z-loss included), `z_loss`, `weight` (the loss weights),
        `correct` (the target tokens predicted: their logit is the largest, untied), all over the loss weights,
        and `objective`, the loss summed with `objective_weights` (divide it by `loss_denominator`)."""
        logits = self.logits(params, batch, dropout_rng=dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = self.loss_weights(batch)
        loss, z_loss = losses.cross_entropy_with_z_loss(
            logits, targets, label_smoothing=self.label_smoothing, z_loss=self.z_loss
        )
        correct = losses.predicts_target(logits, targets).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * weights),
            "z_loss": jnp.sum(z_loss * weights),
            "weight": jnp.sum(weights),
            "correct": jnp.sum(correct * weights),
            "objective": jnp.sum(loss * self.objective_weights(batch)),
        }

    def loss_denominator(self, batch: Batch) -> jax.Array:
        """What the `objective` sum of this (whole) batch is divided by for the gradient."""
        return losses.loss_denominator(
            self.loss_normalizing_factor, self.objective_weights(batch), batch["decoder_target_tokens"]
        )

    def score(self, params: Any, batch: Batch) -> jax.Array:
        """Summed log-likelihood of each example's targets (loss weights applied): float32[batch].

        `params` may be an ensemble (a list or tuple of several models' parameters): the members' summed
        log-likelihoods are averaged, as rank classification compares them."""
        members = _members(params)
        return sum(self._score_one(member, batch) for member in members) / len(members)

    def _score_one(self, params: Any, batch: Batch) -> jax.Array:
        logits = self.logits(params, batch).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_log_probs = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        return jnp.sum(token_log_probs * self.loss_weights(batch), axis=-1)

    def score_batch(self, params: Any, batch: Batch) -> jax.Array:
        """T5X's name for `score`: summed log-likelihood of each example's targets, float32[batch]."""
        return self.score(params, batch)

    def predict_batch(
        self,
        params: Any,
        batch: Batch,
        *,
        rng: jax.Array | None = None,
        eos_id: int = 1,
        return_scores: bool = False,
        return_all_decodes: bool = False,
        **decoding_kwargs,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Decodes the targets of a batch: encode once, then one cached decoder step per token.

        Args:
          params: the parameters (unboxed), or an ensemble: a list or tuple of several models' parameters (of this
            config), whose next-token log-probabilities are averaged at every step of every decoder.
          batch: needs `encoder_input_tokens` int32[batch, input_length], and `decoder_target_tokens` (or
            `decoder_input_tokens`) int32[batch, targets_length] unless max_decode_length is given.
          rng: PRNG key for sampling.
          eos_id: the vocabulary's end-of-sequence id.
          return_scores: also return the scores (log-likelihood; divided by the length penalty for beams).
          return_all_decodes: return every sample / beam (best beam first) rather than the first / best.
          **decoding_kwargs: the fields of `decoding.DecodingConfig`: decoder ('greedy', 'sample',
            'beam_search'), max_decode_length, num_beams, alpha, temperature, topk, topp, num_decodes.

        Returns:
          tokens int32[batch, max_decode_length] (or [batch, decodes, max_decode_length] with
          return_all_decodes), 0 after EOS; with return_scores also scores float32[batch] (or [batch, decodes]).
        """
        config = decoding.DecodingConfig(**decoding_kwargs)
        encoder_tokens = batch["encoder_input_tokens"]
        max_length = config.max_decode_length
        if max_length is None:
            targets = batch.get("decoder_target_tokens", batch.get("decoder_input_tokens"))
            if targets is None:
                raise ValueError("predict_batch needs max_decode_length, or decoder_target_tokens in the batch to "
                                 f"take it from; the batch has {sorted(batch)}")
            max_length = targets.shape[1]

        # Remat only matters for gradients; the cache is the same with or without it.
        module = network.Transformer(dataclasses.replace(self.config, remat_policy="none"))
        batch_axis = 1 if self.config.scan_layers else 0
        members = [_DecodingMember(module, member, encoder_tokens, max_length, config.num_outputs, batch_axis)
                   for member in _members(params)]

        def tokens_to_logits(tokens, caches):
            steps = [member.step(tokens, cache) for member, cache in zip(members, caches)]
            caches = tuple(cache for _, cache in steps)
            if len(members) == 1:
                return steps[0][0], caches
            # An ensemble's next-token distribution: the members' log-probabilities averaged (the decoders
            # normalise what they are given again).
            return sum(jax.nn.log_softmax(logits.astype(jnp.float32)) for logits, _ in steps) / len(steps), caches

        loop_cache = tuple(member.loop_cache for member in members)
        common = dict(max_decode_length=max_length, eos_id=eos_id, cache_batch_axis=batch_axis)
        if config.decoder == "beam_search":
            tokens, scores = decoding.beam_search(
                loop_cache, tokens_to_logits, beam_size=config.num_beams, alpha=config.alpha, **common
            )
        else:
            tokens, scores = decoding.temperature_sample(
                loop_cache, tokens_to_logits, rng=rng,
                temperature=0.0 if config.decoder == "greedy" else config.temperature,
                topk=config.topk, topp=config.topp,
                num_decodes=config.num_decodes if config.decoder == "sample" else 1, **common,
            )
        if not return_all_decodes:
            tokens, scores = tokens[:, 0], scores[:, 0]
        return (tokens, scores) if return_scores else tokens


def _members(params: Any) -> list[Any]:
    """The parameters of each model: `params` is one model's, or a list or tuple of several (an ensemble)."""
    members = list(params) if isinstance(params, (list, tuple)) else [params]
    if not members:
        raise ValueError("an ensemble needs at least one member's parameters")
    return members


class _DecodingMember:
    """One model's part in decoding: its encoder output and decode cache, and one cached decoder step.

    The encoder runs once; the prefill call creates the self-attention caches (zeros, index 0) and projects the
    encoder keys/values for the cross-attention (its logits are unused, so under jit XLA drops the rest of that
    pass). The cross-attention keys/values never change while decoding and are the same for every sample or beam
    of an example, so they are kept (repeated once for the rows) out of the loop's state: beam search neither
    copies nor reorders them at each step. The loop carries only `loop_cache`, the self-attention caches.
    """

    def __init__(self, module, params, encoder_tokens, max_length: int, rows: int, batch_axis: int):
        self.module, self.params, self.max_length = module, params, max_length
        encoded = module.apply({"params": params}, encoder_tokens, method=module.encode)
        _, variables = module.apply(
            {"params": params}, encoded, encoder_tokens, jnp.zeros((encoder_tokens.shape[0], max_length), jnp.int32),
            decode=True, max_decode_length=max_length, method=module.decode, mutable=["cache"],
        )
        flat_cache = flax.traverse_util.flatten_dict(variables["cache"])
        self.constant = {path: jnp.repeat(value, rows, axis=batch_axis) for path, value in flat_cache.items()
                         if "encoder_decoder_attention" in path}
        self.loop_cache = flax.traverse_util.unflatten_dict(
            {p: v for p, v in flat_cache.items() if p not in self.constant})
        self.encoder_tokens_rows = jnp.repeat(encoder_tokens, rows, axis=0)  # for the cross-attention mask

    def step(self, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """tokens: int32[rows, 1] -> (next-token logits float32[rows, vocab], the updated loop cache)."""
        cache = flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(cache), **self.constant})
        logits, updated = self.module.apply(
            {"params": self.params, "cache": cache}, None, self.encoder_tokens_rows, tokens,
            decode=True, max_decode_length=self.max_length, method=self.module.decode, mutable=["cache"],
        )
        updated = flax.traverse_util.flatten_dict(updated["cache"])
        return logits[:, 0], flax.traverse_util.unflatten_dict(
            {p: v for p, v in updated.items() if p not in self.constant})
