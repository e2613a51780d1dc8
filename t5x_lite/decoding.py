"""Autoregressive decoding over a cache: greedy, temperature / top-k / top-p sampling, and beam search.

Each decoder is one `lax.while_loop` (jit it, or call it inside a jitted function) that stops as soon as every
sequence has emitted EOS, or at `max_decode_length`. The model is reached only through

    tokens_to_logits(tokens: int32[n, 1], cache) -> (logits: float[n, vocab], new_cache)

which runs one decoder step for the previous token of each of the n rows and returns the next-token logits.
`cache` is any pytree: for T5 it holds each layer's self-attention keys/values and `cache_index`, and the
cross-attention keys/values projected once from the encoder output. A leaf with more than `cache_batch_axis`
dimensions has the batch at axis `cache_batch_axis` (0, or 1 when scanned layers stack a leading `layers` axis);
smaller leaves (the `cache_index` scalars) are shared by all rows. The decoders take the cache of `batch` rows,
repeat each row for its samples or beams (example-major: row b * n + k), and gather rows as beams are reordered.

Decoding starts from token 0 (T5's BOS, the padding id), and once a sequence has emitted EOS it is padded with 0.
Only jax is imported here: no seqio, no tensorflow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
TokensToLogits = Callable[[Array, Any], tuple[Array, Any]]

# Log-probability of impossible candidates; finite so that sums and differences stay NaN-free.
NEG_INF = -1.0e7
DECODER_START_ID = 0
DECODERS = ("greedy", "sample", "beam_search")


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """How to decode (the keyword arguments of `EncoderDecoderModel.predict_batch`; gin binds these).

    Attributes:
      decoder: 'greedy', 'sample' (temperature / top-k / top-p) or 'beam_search'.
      max_decode_length: tokens to decode at most; None: the batch's targets length.
      num_beams: beam width (beam_search).
      alpha: GNMT length penalty exponent, score = log p / ((5 + length) / 6) ** alpha (beam_search).
      temperature: logits are divided by it before sampling; 0 is greedy (sample).
      topk: sample among the k most likely tokens only; 0 disables (sample).
      topp: sample among the smallest set of most likely tokens whose probability reaches p; 0 disables (sample).
      num_decodes: independent samples per example (sample).
    """

    decoder: str = "greedy"
    max_decode_length: int | None = None
    num_beams: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    topk: int = 0
    topp: float = 0.0
    num_decodes: int = 1

    def __post_init__(self):
        problems = []
        if self.decoder not in DECODERS:
            problems.append(f"decoder={self.decoder!r}; valid: {', '.join(map(repr, DECODERS))}")
        if self.max_decode_length is not None and self.max_decode_length < 1:
            problems.append(f"max_decode_length={self.max_decode_length}; valid: None or >= 1")
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams}; valid: >= 1")
        if self.alpha < 0:
            problems.append(f"alpha={self.alpha}; valid: >= 0 (0 disables the length penalty)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature}; valid: >= 0 (0 is greedy)")
        if self.topk < 0:
            problems.append(f"topk={self.topk}; valid: >= 0 (0 disables it)")
        if not 0.0 <= self.topp <= 1.0:
            problems.append(f"topp={self.topp}; valid: 0 (disabled) to 1")
        if self.topk and self.topp:
            problems.append(f"topk={self.topk} and topp={self.topp}; give at most one of them")
        if self.num_decodes < 1:
            problems.append(f"num_decodes={self.num_decodes}; valid: >= 1")
        if problems:
            raise ValueError("Invalid decoding arguments: " + "; ".join(problems))

    @property
    def num_outputs(self) -> int:
        """Decodes per example: num_beams for beam search, num_decodes for sampling, 1 for greedy."""
        return {"greedy": 1, "sample": self.num_decodes, "beam_search": self.num_beams}[self.decoder]


# ---- the cache: repeat rows for samples / beams, gather rows by beam --------------------------------------


def _batch_leaves(cache, cache_batch_axis: int):
    return [x for x in jax.tree.leaves(cache) if x.ndim > cache_batch_axis]


def cache_batch_size(cache, cache_batch_axis: int = 0) -> int:
    """The number of rows of a decode cache (the size of its batch axis)."""
    leaves = _batch_leaves(cache, cache_batch_axis)
    if not leaves:
        raise ValueError(f"The cache has no leaf with a batch axis at {cache_batch_axis}; leaves: "
                         f"{[x.shape for x in jax.tree.leaves(cache)]}")
    return leaves[0].shape[cache_batch_axis]


def expand_cache(cache, repeats: int, cache_batch_axis: int = 0):
    """Repeats each row `repeats` times, example-major: [batch, ...] -> [batch * repeats, ...] at the batch axis."""
    if repeats == 1:
        return cache
    return jax.tree.map(
        lambda x: jnp.repeat(x, repeats, axis=cache_batch_axis) if x.ndim > cache_batch_axis else x, cache
    )


def gather_beams(x: Array, beam_indices: Array) -> Array:
    """x: [batch, beams, ...], beam_indices: int32[batch, new_beams] -> [batch, new_beams, ...]."""
    return jax.vmap(lambda row, indices: row[indices])(x, beam_indices)


def gather_cache_beams(cache, beam_indices: Array, cache_batch_axis: int = 0):
    """Reorders the rows of a flattened cache [..., batch * beams, ...] by beam_indices int32[batch, beams]."""
    batch, beams = beam_indices.shape

    def gather(x):
        if x.ndim <= cache_batch_axis:
            return x  # shared by every row (cache_index)
        rows = jnp.moveaxis(x, cache_batch_axis, 0)
        rows = rows.reshape((batch, beams) + rows.shape[1:])
        rows = gather_beams(rows, beam_indices).reshape((batch * beams,) + rows.shape[2:])
        return jnp.moveaxis(rows, 0, cache_batch_axis)

    return jax.tree.map(gather, cache)


# ---- greedy and sampling ----------------------------------------------------------------------------------


def _filter_logits(logits: Array, topk: int, topp: float) -> Array:
    """Sets logits outside the top-k, or outside the top-p nucleus, to NEG_INF. logits: float32[n, vocab]."""
    if topk:
        kth_largest = jax.lax.top_k(logits, topk)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    if topp:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token while the probability of the more likely tokens before it is still below p: the most
        # likely token is always kept, and so is the one that crosses p.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < topp
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def temperature_sample(
    cache,
    tokens_to_logits: TokensToLogits,
    *,
    max_decode_length: int,
    eos_id: int,
    rng: Array | None = None,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    num_decodes: int = 1,
    cache_batch_axis: int = 0,
) -> tuple[Array, Array]:
    """Samples num_decodes sequences per example (temperature 0: greedy, the argmax at every step).

    Args:
      cache: the decode cache of `batch` rows, after the prefill call.
      tokens_to_logits: one decoder step, see the module docstring.
      max_decode_length: tokens decoded at most.
      eos_id: a sequence ends when it emits this id; later positions are 0.
      rng: PRNG key (unused when temperature is 0).
      temperature, topk, topp: see `DecodingConfig`.
      num_decodes: samples per example.
      cache_batch_axis: where the cache leaves have their batch axis.

    Returns:
      sequences int32[batch, num_decodes, max_decode_length] and their log-likelihoods under the model
      (temperature 1, unfiltered) float32[batch, num_decodes], EOS included, padding after it excluded.
    """
    batch = cache_batch_size(cache, cache_batch_axis)
    rows = batch * num_decodes
    cache = expand_cache(cache, num_decodes, cache_batch_axis)
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def not_done(state):
        step, _, _, _, ended, _, _ = state
        return (step < max_decode_length) & ~jnp.all(ended)

    def decode_step(state):
        step, token, sequences, log_probs, ended, cache, rng = state
        logits, cache = tokens_to_logits(token[:, None], cache)
        logits = logits.astype(jnp.float32)
        if temperature == 0.0:
            next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            rng, step_rng = jax.random.split(rng)
            filtered = _filter_logits(logits / temperature, topk, topp)
            next_token = jax.random.categorical(step_rng, filtered, axis=-1).astype(jnp.int32)
        next_token = jnp.where(ended, 0, next_token)
        token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), next_token[:, None], axis=-1)[:, 0]
        log_probs = log_probs + jnp.where(ended, 0.0, token_log_prob)
        sequences = jax.lax.dynamic_update_slice(sequences, next_token[:, None], (0, step))
        ended = ended | (next_token == eos_id)
        return step + 1, next_token, sequences, log_probs, ended, cache, rng

    initial = (
        jnp.array(0, jnp.int32),
        jnp.full((rows,), DECODER_START_ID, jnp.int32),
        jnp.zeros((rows, max_decode_length), jnp.int32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), bool),
        cache,
        rng,
    )
    _, _, sequences, log_probs, _, _, _ = jax.lax.while_loop(not_done, decode_step, initial)
    return (
        sequences.reshape(batch, num_decodes, max_decode_length),
        log_probs.reshape(batch, num_decodes),
    )


def greedy(cache, tokens_to_logits: TokensToLogits, *, max_decode_length: int, eos_id: int,
           cache_batch_axis: int = 0) -> tuple[Array, Array]:
    """The most likely token at every step: sequences int32[batch, max_decode_length], log-likelihoods float32[batch]."""
    sequences, log_probs = temperature_sample(
        cache, tokens_to_logits, max_decode_length=max_decode_length, eos_id=eos_id, temperature=0.0,
        cache_batch_axis=cache_batch_axis,
    )
    return sequences[:, 0], log_probs[:, 0]


# ---- beam search ------------------------------------------------------------------------------------------


def length_penalty(alpha: float, length) -> Array:
    """GNMT's length penalty ((5 + length) / 6) ** alpha; scores are log-likelihoods divided by it."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(
    cache,
    tokens_to_logits: TokensToLogits,
    *,
    beam_size: int,
    max_decode_length: int,
    eos_id: int,
    alpha: float = 0.6,
    cache_batch_axis: int = 0,
) -> tuple[Array, Array]:
    """Beam search with the GNMT length penalty, as T5X's: `beam_size` live beams and the `beam_size` best
    finished sequences are kept; at each step the 2 * beam_size best extensions of the live beams are split into
    newly finished ones (ending in EOS) and the new live beams. The search ends at max_decode_length, or once no
    live beam can still beat the worst finished one (even at the largest length penalty).

    Args: as `temperature_sample`, with the beam width `beam_size` and the length penalty exponent `alpha`.

    Returns:
      sequences int32[batch, beam_size, max_decode_length], best first, and their scores float32[batch, beam_size]
      (log-likelihood / length penalty). Finished sequences rank before unfinished ones (those cut off at
      max_decode_length), which fill the remaining places.
    """
    batch = cache_batch_size(cache, cache_batch_axis)
    cache = expand_cache(cache, beam_size, cache_batch_axis)
    max_penalty = length_penalty(alpha, max_decode_length)

    def not_done(state):
        step, live_seqs, live_log_probs, finished_seqs, finished_scores, finished, cache = state
        # The best any live beam can still reach: log-likelihoods only fall as tokens are added, and with
        # alpha >= 0 the mildest division of a negative log-likelihood is by the largest penalty.
        best_live = live_log_probs[:, 0] / max_penalty
        worst_finished = jnp.min(jnp.where(finished, finished_scores, NEG_INF), axis=1)
        settled = jnp.all(worst_finished > best_live)
        return (step < max_decode_length) & ~settled

    def decode_step(state):
        step, live_seqs, live_log_probs, finished_seqs, finished_scores, finished, cache = state
        previous = jax.lax.dynamic_index_in_dim(live_seqs, jnp.maximum(step - 1, 0), axis=2, keepdims=False)
        previous = jnp.where(step == 0, DECODER_START_ID, previous)
        logits, cache = tokens_to_logits(previous.reshape(batch * beam_size, 1), cache)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beam_size, vocab)
        log_probs = log_probs + live_log_probs[:, :, None]

        # The 2k best extensions: enough that k of them are live even if k end in EOS.
        candidates = 2 * beam_size
        top_log_probs, top_indices = jax.lax.top_k(log_probs.reshape(batch, beam_size * vocab), candidates)
        top_beams, top_tokens = top_indices // vocab, (top_indices % vocab).astype(jnp.int32)
        top_seqs = gather_beams(live_seqs, top_beams)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, top_tokens[:, :, None], (0, 0, step))
        # Extensions of the empty beams of the first step (log-likelihood ~NEG_INF) are not real candidates.
        ends = (top_tokens == eos_id) & (top_log_probs > NEG_INF / 2)

        live_candidates = jnp.where(ends, NEG_INF, top_log_probs)
        live_log_probs, keep = jax.lax.top_k(live_candidates, beam_size)
        live_seqs = gather_beams(top_seqs, keep)
        cache = gather_cache_beams(cache, gather_beams(top_beams, keep), cache_batch_axis)

        new_scores = jnp.where(ends, top_log_probs / length_penalty(alpha, step + 1), NEG_INF)
        pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
        finished_scores, keep = jax.lax.top_k(pool_scores, beam_size)
        finished_seqs = gather_beams(jnp.concatenate([finished_seqs, top_seqs], axis=1), keep)
        finished = gather_beams(jnp.concatenate([finished, ends], axis=1), keep)
        return step + 1, live_seqs, live_log_probs, finished_seqs, finished_scores, finished, cache

    # Only the first beam is live at the start, so the first step does not pick the same extension k times.
    initial_log_probs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32), (batch, 1))
    initial = (
        jnp.array(0, jnp.int32),
        jnp.zeros((batch, beam_size, max_decode_length), jnp.int32),
        initial_log_probs,
        jnp.zeros((batch, beam_size, max_decode_length), jnp.int32),
        jnp.full((batch, beam_size), NEG_INF, jnp.float32),
        jnp.zeros((batch, beam_size), bool),
        cache,
    )
    step, live_seqs, live_log_probs, finished_seqs, finished_scores, finished, _ = jax.lax.while_loop(
        not_done, decode_step, initial
    )

    # The finished sequences first, then the live ones (cut off at the current length). Both lists are already
    # sorted best first (top_k), and the finished ones precede the empty places of their list.
    live_scores = live_log_probs / length_penalty(alpha, step)
    num_finished = jnp.sum(finished, axis=1, keepdims=True)
    place = jnp.arange(beam_size)[None, :]
    order = jnp.where(place < num_finished, place, beam_size + place - num_finished)
    sequences = gather_beams(jnp.concatenate([finished_seqs, live_seqs], axis=1), order)
    scores = gather_beams(jnp.concatenate([finished_scores, live_scores], axis=1), order)
    return sequences, scores
