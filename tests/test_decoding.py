"""Decoding: cached == uncached greedy, beam search (1 beam == greedy, finds the better sequence, scores), sampling
filters, early stopping, and the sharded predict / score steps (8 simulated CPU devices, see conftest.py).

Decoders are jitted once per configuration (module-scoped caches) since each compile takes a second or two.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import decoding, models, partitioning
from t5x_lite import predictor as predictor_lib
from tests.helpers import TINY, random_batch

EOS = 1
# Different input lengths per row (trailing padding), unpacked; 10 target positions = the decode length.
BATCH = random_batch(batch_size=8, inputs_length=16, targets_length=10, seed=3)
# float32 scores after different summation orders (cached steps vs a full pass, sharded vs not).
SCORE_ATOL = 1e-4


@functools.cache
def model_and_params(scan: bool):
    """The tiny model, with the same parameters in the scanned and unscanned layouts."""
    from t5x_lite import network

    model = models.EncoderDecoderModel(dataclasses.replace(TINY, scan_layers=scan))
    params = nn.unbox(models.EncoderDecoderModel(TINY).init(jax.random.PRNGKey(0)))
    return model, network.scan_params(params) if scan else params


@functools.cache
def jitted_predict(scan: bool, **kwargs):
    model, _ = model_and_params(scan)
    return jax.jit(lambda params, batch, rng: model.predict_batch(params, batch, rng=rng, return_scores=True, **kwargs))


def predict(scan=False, batch=BATCH, rng=None, **kwargs):
    model, params = model_and_params(scan)
    tokens, scores = jitted_predict(scan, **kwargs)(params, batch, jax.random.PRNGKey(0) if rng is None else rng)
    return np.asarray(tokens), np.asarray(scores)


def uncached_greedy(batch, max_length):
    """Greedy decoding by a full forward pass over the whole prefix at every step (no cache)."""
    model, params = model_and_params(False)
    forward = jax.jit(lambda p, enc, dec: model.module.apply({"params": p}, enc, dec))
    rows = batch["encoder_input_tokens"].shape[0]
    decoder_inputs = np.zeros((rows, max_length), np.int32)
    tokens = np.zeros((rows, max_length), np.int32)
    ended = np.zeros(rows, bool)
    for i in range(max_length):
        logits = np.asarray(forward(params, batch["encoder_input_tokens"], decoder_inputs))
        next_token = np.where(ended, 0, logits[:, i].argmax(-1))
        tokens[:, i] = next_token
        ended |= next_token == EOS
        if i + 1 < max_length:
            decoder_inputs[:, i + 1] = next_token
    return tokens


@functools.cache
def jitted_score():
    model, _ = model_and_params(False)
    return jax.jit(model.score_batch)


def decoded_lengths(sequences):
    """Tokens up to and including the first EOS (all of them without one): int[rows]."""
    return np.array([list(row).index(EOS) + 1 if EOS in row else len(row) for row in sequences])


def teacher_forced_scores(encoder_tokens, sequences):
    """Summed log-likelihood of each decoded sequence, EOS included, the padding after it not: float[rows].
    (A sampled sequence may hold id 0 before its EOS, so the weights come from the length, not from ids > 0.)"""
    _, params = model_and_params(False)
    decoder_inputs = np.concatenate([np.zeros_like(sequences[:, :1]), sequences[:, :-1]], axis=1)
    weights = (np.arange(sequences.shape[1]) < decoded_lengths(sequences)[:, None]).astype(np.float32)
    batch = {"encoder_input_tokens": encoder_tokens, "decoder_input_tokens": decoder_inputs,
             "decoder_target_tokens": sequences, "decoder_loss_weights": weights}
    return np.asarray(jitted_score()(params, batch))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_uncached_greedy(scan):
    tokens, scores = predict(scan)
    assert tokens.shape == (8, 10)
    np.testing.assert_array_equal(tokens, uncached_greedy(BATCH, 10))
    np.testing.assert_allclose(scores, teacher_forced_scores(BATCH["encoder_input_tokens"], tokens), atol=SCORE_ATOL)


def test_cached_greedy_equals_uncached_greedy_at_another_length():
    """Longer inputs, more padding per row, and a decode length other than the targets' length."""
    batch = random_batch(batch_size=8, inputs_length=24, targets_length=4, seed=7)
    tokens, _ = predict(False, batch=batch, max_decode_length=12)
    assert tokens.shape == (8, 12)
    np.testing.assert_array_equal(tokens, uncached_greedy(batch, 12))


@pytest.mark.parametrize("scan", [False, True])
def test_beam_search_with_one_beam_equals_greedy(scan):
    # With alpha 0, a finished beam is final at once (no longer sequence can score better): exactly greedy.
    tokens, _ = predict(scan, decoder="beam_search", num_beams=1, alpha=0.0)
    np.testing.assert_array_equal(tokens, predict(scan)[0])


def test_beam_scores_are_length_penalised_log_likelihoods_in_both_cache_layouts():
    """Every returned beam's score is its teacher-forced log-likelihood / ((5 + length) / 6) ** alpha, best beam
    first; this holds only if the cache rows were gathered with their beams. Scanned caches ([layers, batch, ...])
    give the same beams as unscanned ones."""
    kwargs = dict(decoder="beam_search", num_beams=4, alpha=0.6, return_all_decodes=True)
    tokens, scores = predict(False, **kwargs)
    scanned_tokens, scanned_scores = predict(True, **kwargs)
    assert tokens.shape == (8, 4, 10) and scores.shape == (8, 4)
    np.testing.assert_array_equal(scanned_tokens, tokens)
    np.testing.assert_allclose(scanned_scores, scores, atol=SCORE_ATOL)

    flat = tokens.reshape(32, 10)
    log_likelihood = teacher_forced_scores(np.repeat(BATCH["encoder_input_tokens"], 4, axis=0), flat)
    np.testing.assert_allclose(scores.reshape(-1), log_likelihood / decoding.length_penalty(0.6, decoded_lengths(flat)),
                               atol=SCORE_ATOL)
    finished = (tokens == EOS).any(-1)
    for row in range(8):  # finished beams first, each group best first
        done = scores[row][finished[row]]
        live = scores[row][~finished[row]]
        assert np.all(np.diff(done) <= 1e-6) and np.all(np.diff(live) <= 1e-6)
        assert list(finished[row]) == sorted(finished[row], reverse=True)
    # The best beam is at least as good as greedy's sequence under the same score.
    greedy_tokens, _ = predict(False)
    greedy_scores = teacher_forced_scores(BATCH["encoder_input_tokens"], greedy_tokens)
    greedy_finished = (greedy_tokens == EOS).any(-1)
    better = scores[:, 0] >= greedy_scores / decoding.length_penalty(0.6, decoded_lengths(greedy_tokens)) - SCORE_ATOL
    assert np.all(better | (~finished[:, 0] & greedy_finished))


# ---- a constructed model whose greedy path is not the most likely sequence --------------------------------

# A Markov chain over ids 0 (start/pad), 1 (EOS), 2, 3, 4: the next-token distribution depends on the previous token.
TRANSITIONS = {
    0: {2: 0.55, 3: 0.45},  # greedy takes 2 ...
    2: {2: 0.40, 4: 0.35, EOS: 0.25},  # ... and then 2 forever: 0.55 * 0.4^(n-1)
    3: {EOS: 0.90, 2: 0.05, 4: 0.05},  # "3 EOS" has probability 0.405, the most likely sequence
    4: {EOS: 0.50, 2: 0.25, 4: 0.25},
    EOS: {2: 0.5, 4: 0.5},
}
MARKOV_LOGITS = np.log(np.array([[TRANSITIONS[p].get(t, 0.0) + 1e-9 for t in range(5)] for p in range(5)], np.float32))


def markov_tokens_to_logits(tokens, cache, calls=None):
    if calls is not None:
        jax.debug.callback(lambda: calls.append(1))
    return jnp.asarray(MARKOV_LOGITS)[tokens[:, 0]], {"steps": cache["steps"] + 1, "cache_index": cache["cache_index"]}


def markov_cache(batch=2):
    return {"steps": jnp.zeros((batch,), jnp.int32), "cache_index": jnp.array(0, jnp.int32)}


def test_beam_search_finds_a_better_sequence_than_greedy():
    greedy, greedy_log_prob = decoding.greedy(markov_cache(), markov_tokens_to_logits, max_decode_length=6, eos_id=EOS)
    np.testing.assert_array_equal(greedy, [[2, 2, 2, 2, 2, 2]] * 2)
    np.testing.assert_allclose(greedy_log_prob, [np.log(0.55 * 0.4 ** 5)] * 2, rtol=1e-5)

    beams, scores = jax.jit(functools.partial(
        decoding.beam_search, tokens_to_logits=markov_tokens_to_logits, beam_size=4, max_decode_length=6, eos_id=EOS,
        alpha=0.6,
    ))(markov_cache())
    assert beams.shape == (2, 4, 6)
    np.testing.assert_array_equal(beams[:, 0], [[3, EOS, 0, 0, 0, 0]] * 2)
    np.testing.assert_allclose(scores[:, 0], np.log(0.45 * 0.9) / decoding.length_penalty(0.6, 2), rtol=1e-5)
    # The runner-up: "2 EOS" (0.1375 over a length of 2) beats "2 4 EOS" (0.09625 over 3).
    np.testing.assert_array_equal(beams[:, 1], [[2, EOS, 0, 0, 0, 0]] * 2)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # One beam (alpha 0) follows greedy.
    one_beam, _ = decoding.beam_search(markov_cache(), markov_tokens_to_logits, beam_size=1, max_decode_length=6,
                                       eos_id=EOS, alpha=0.0)
    np.testing.assert_array_equal(one_beam[:, 0], greedy)


def test_decoding_stops_once_every_sequence_has_ended():
    calls = []
    step = functools.partial(markov_tokens_to_logits, calls=calls)
    # Beam search stops once no live beam can beat the finished ones, even at the largest length penalty: here
    # after ~8 steps ("3 EOS" and "2 EOS" finish at step 2; the live beams lose a factor 0.4 or less per step).
    decoding.beam_search(markov_cache(), step, beam_size=2, max_decode_length=50, eos_id=EOS, alpha=0.6)
    assert 2 <= len(calls) < 10, f"beam search ran {len(calls)} of 50 steps"
    calls.clear()
    sequences, _ = decoding.temperature_sample(markov_cache(), step, max_decode_length=50, eos_id=EOS,
                                               rng=jax.random.PRNGKey(1), temperature=1.0, topk=1)
    assert len(calls) == 50 and (sequences == 2).all()  # top-1 follows greedy's 2 2 2 ... to the end
    calls.clear()
    sequences, _ = decoding.temperature_sample(markov_cache(8), step, max_decode_length=50, eos_id=EOS,
                                               rng=jax.random.PRNGKey(1), temperature=1.0)
    ends = [list(row).index(EOS) + 1 for row in np.asarray(sequences)[:, 0]]
    assert len(calls) == max(ends) < 50
    assert all((np.asarray(sequences)[i, 0, end:] == 0).all() for i, end in enumerate(ends))


def test_top_k_and_top_p_sample_only_from_the_allowed_tokens():
    def first_tokens(**kwargs):
        sequences, _ = decoding.temperature_sample(markov_cache(1), markov_tokens_to_logits, max_decode_length=2,
                                                   eos_id=EOS, rng=jax.random.PRNGKey(2), num_decodes=200, **kwargs)
        return np.asarray(sequences)[0]

    assert set(first_tokens(topk=1)[:, 0]) == {2}
    assert set(first_tokens(topk=2)[:, 0]) == {2, 3}
    assert set(first_tokens(topp=0.5)[:, 0]) == {2}  # 2 alone (0.55) reaches p
    assert set(first_tokens(topp=0.6)[:, 0]) == {2, 3}
    after_two = first_tokens(topk=2)
    assert set(after_two[after_two[:, 0] == 2, 1]) == {2, 4}  # EOS (0.25) is third after 2
    assert set(first_tokens(temperature=0.0).reshape(-1)) == {2}


@pytest.mark.parametrize("kwargs", [
    dict(decoder="sample", temperature=0.0),
    dict(decoder="sample", temperature=1.0, topk=1),
    dict(decoder="sample", temperature=0.7, topp=1e-6),
])
def test_temperature_zero_and_top_k_one_equal_greedy(kwargs):
    tokens, scores = predict(False, rng=jax.random.PRNGKey(5), **kwargs)
    greedy_tokens, greedy_scores = predict(False)
    np.testing.assert_array_equal(tokens, greedy_tokens)
    np.testing.assert_allclose(scores, greedy_scores, atol=SCORE_ATOL)


def test_sampling_draws_several_decodes_per_example():
    tokens, scores = predict(False, decoder="sample", temperature=1.0, num_decodes=3, return_all_decodes=True)
    assert tokens.shape == (8, 3, 10) and scores.shape == (8, 3)
    assert len({tuple(row) for row in tokens.reshape(24, 10)}) > 8  # the samples differ
    flat = tokens.reshape(24, 10)
    log_likelihood = teacher_forced_scores(np.repeat(BATCH["encoder_input_tokens"], 3, axis=0), flat)
    # The teacher-forced pass treats a target id 0 as padding (masked out of attention), so compare the rows in
    # which the random model did not sample id 0 before the end.
    clean = np.array([0 not in row[:length] for row, length in zip(flat, decoded_lengths(flat))])
    assert clean.sum() >= 20
    np.testing.assert_allclose(scores.reshape(-1)[clean], log_likelihood[clean], atol=SCORE_ATOL)


# ---- the sharded predict and score steps ------------------------------------------------------------------


def test_sharded_predict_and_score_equal_single_device():
    """Batch over `data`, heads / mlp / vocab over `model` on a (4, 2) mesh: the same beams (cache rows gathered
    across shards) and scores as on one device."""
    model, params = model_and_params(False)
    config = decoding.DecodingConfig(decoder="beam_search", num_beams=3)
    predictor = predictor_lib.Predictor(model, partitioning.Partitioner((4, 2)), decoding_config=config)
    sharded_params = jax.device_put(params, predictor.params_shardings)
    tokens, scores = predictor.predict(sharded_params, BATCH)
    assert tokens.sharding.is_fully_replicated
    want_tokens, want_scores = predict(False, **dataclasses.asdict(config))
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=SCORE_ATOL)
    np.testing.assert_allclose(np.asarray(predictor.score(sharded_params, BATCH)),
                               np.asarray(jitted_score()(params, BATCH)), atol=SCORE_ATOL)


def test_predictor_rejects_a_batch_that_does_not_divide_the_data_axis():
    model, _ = model_and_params(False)
    predictor = predictor_lib.Predictor(model, partitioning.Partitioner((4, 2)))
    with pytest.raises(ValueError, match="batch size 6 does not divide over the mesh's data axis of size 4"):
        predictor.check_batch_size(6)


def test_decoding_config_names_bad_arguments():
    with pytest.raises(ValueError, match="decoder='beam'"):
        decoding.DecodingConfig(decoder="beam")
    with pytest.raises(ValueError, match="topp=1.5"):
        decoding.DecodingConfig(decoder="sample", topp=1.5)
    with pytest.raises(ValueError, match="num_beams=0"):
        decoding.DecodingConfig(decoder="beam_search", num_beams=0)
    model, params = model_and_params(False)
    with pytest.raises(ValueError, match="needs max_decode_length"):
        model.predict_batch(params, {"encoder_input_tokens": BATCH["encoder_input_tokens"]})
    assert decoding.DecodingConfig(decoder="beam_search", num_beams=5).num_outputs == 5


# ---- ensembles ----------------------------------------------------------------------------------------------

@functools.cache
def ensemble_params():
    """Two different models' parameters (the tiny model at two seeds)."""
    init = jax.jit(models.EncoderDecoderModel(TINY).init)
    return tuple(nn.unbox(init(jax.random.PRNGKey(seed))) for seed in (0, 1))


@functools.cache
def jitted_ensemble_predict(**kwargs):
    model, _ = model_and_params(False)
    return jax.jit(lambda members, batch, rng: model.predict_batch(members, batch, rng=rng, return_scores=True,
                                                                   **kwargs))


ENSEMBLE_DECODERS = [dict(decoder="greedy"), dict(decoder="sample", temperature=0.8, topk=20),
                     dict(decoder="beam_search", num_beams=3)]


@pytest.mark.parametrize("decoding_kwargs", ENSEMBLE_DECODERS, ids=["greedy", "sample", "beam_search"])
def test_ensemble_of_one_or_of_identical_members_decodes_as_one_model(decoding_kwargs):
    """A one-member ensemble is the model itself (the same tokens and scores, bit for bit: checked for greedy, the
    decoders share the step); two identical members average to the same log-probabilities, so the same tokens, and
    scores within float32 rounding (the average is normalised once more)."""
    _, params = model_and_params(False)
    rng = jax.random.PRNGKey(5)
    single = [np.asarray(x) for x in predict(rng=rng, **decoding_kwargs)]
    if decoding_kwargs["decoder"] == "greedy":
        one = [np.asarray(x) for x in jitted_ensemble_predict(**decoding_kwargs)((params,), BATCH, rng)]
        for got, want in zip(one, single):
            np.testing.assert_array_equal(got, want)
    two = [np.asarray(x) for x in jitted_ensemble_predict(**decoding_kwargs)((params, params), BATCH, rng)]
    np.testing.assert_array_equal(two[0], single[0])
    np.testing.assert_allclose(two[1], single[1], atol=1e-5, rtol=1e-6)


def brute_force_ensemble_greedy(members, batch, max_length):
    """Greedy decoding of an ensemble by full forward passes over the whole prefix (no cache): at every step the
    members' log-softmaxes are averaged and the best token taken; the score sums the renormalised average."""
    model, _ = model_and_params(False)
    forward = jax.jit(lambda p, enc, dec: model.module.apply({"params": p}, enc, dec))
    rows = batch["encoder_input_tokens"].shape[0]
    decoder_inputs = np.zeros((rows, max_length), np.int32)
    tokens, scores = np.zeros((rows, max_length), np.int32), np.zeros(rows)
    ended = np.zeros(rows, bool)
    for i in range(max_length):
        log_probs = np.mean([jax.nn.log_softmax(forward(p, batch["encoder_input_tokens"], decoder_inputs)[:, i])
                             for p in members], axis=0)
        log_probs = np.asarray(jax.nn.log_softmax(log_probs))
        next_token = log_probs.argmax(-1)
        scores += np.where(ended, 0.0, log_probs[np.arange(rows), next_token])
        next_token = np.where(ended, 0, next_token)
        tokens[:, i] = next_token
        ended |= next_token == EOS
        if i + 1 < max_length:
            decoder_inputs[:, i + 1] = next_token
    return tokens, scores


def test_ensemble_greedy_equals_a_brute_force_reference():
    members = ensemble_params()
    tokens, scores = jitted_ensemble_predict(decoder="greedy")(members, BATCH, jax.random.PRNGKey(0))
    want_tokens, want_scores = brute_force_ensemble_greedy(members, BATCH, BATCH["decoder_target_tokens"].shape[1])
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=SCORE_ATOL)
    # The ensemble decodes something neither member does on its own.
    alone = [np.asarray(jitted_ensemble_predict(decoder="greedy")((m,), BATCH, jax.random.PRNGKey(0))[0])
             for m in members]
    assert all(not np.array_equal(np.asarray(tokens), a) for a in alone)


def test_ensemble_score_averages_the_members_log_likelihoods():
    model, _ = model_and_params(False)
    members = ensemble_params()
    score = jax.jit(model.score)
    each = [np.asarray(score(m, BATCH)) for m in members]
    np.testing.assert_allclose(np.asarray(score(members, BATCH)), np.mean(each, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(score((members[0],), BATCH)), each[0])
