"""Span corruption (length arithmetic, noise mask, sentinels, the chain in a seqio Task), salient span masking and
closed-book QA formatting."""
import functools
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
from hypothesis import example, given, settings, strategies as st

from t5x_lite import preprocessors

# seqio's own test SentencePiece model (in the installed package): extra ids without the shared data.
TEST_SPM = os.path.join(os.path.dirname(seqio.__file__), "test_data", "sentencepiece", "sentencepiece.model")


def counts_reference(length, noise_density, mean_noise_span_length):
    """noise_span_counts written out with Python's round (half to even) for the comparison."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)


@pytest.mark.parametrize("inputs_length, raw_tokens, targets_length",
                         [(512, 568, 114), (128, 141, 29), (256, 284, 58), (1024, 1137, 229)])
def test_t5_lengths(inputs_length, raw_tokens, targets_length):
    lengths = preprocessors.span_corruption_lengths(inputs_length)
    assert (lengths.raw_tokens, lengths.inputs, lengths.targets) == (raw_tokens, inputs_length, targets_length)


@settings(max_examples=300, deadline=None)
@given(inputs_length=st.integers(3, 5000), noise_density=st.sampled_from([0.15, 0.1, 0.3, 0.5]),
       mean_noise_span_length=st.sampled_from([1.0, 3.0, 8.0, 20.0]))
def test_length_arithmetic(inputs_length, noise_density, mean_noise_span_length):
    lengths = preprocessors.span_corruption_lengths(inputs_length, noise_density, mean_noise_span_length)
    num_noise, num_spans = counts_reference(lengths.raw_tokens, noise_density, mean_noise_span_length)
    assert (lengths.noise_tokens, lengths.noise_spans) == (num_noise, num_spans)
    assert lengths.inputs == lengths.raw_tokens - num_noise + num_spans + 1
    assert lengths.targets == num_noise + num_spans + 1
    assert inputs_length - 1 <= lengths.inputs <= inputs_length  # fills L, or L - 1 when a step jumps by 2
    longer = preprocessors.corrupted_lengths(lengths.raw_tokens + 1, noise_density, mean_noise_span_length)
    assert longer.inputs > inputs_length  # the largest T that fits


def test_round_half_to_even():
    assert preprocessors.noise_span_counts(30, 0.15, 3.0) == (4, 1)  # N = round(4.5) = 4
    assert preprocessors.noise_span_counts(50, 0.15, 3.0) == (8, 3)  # N = round(7.5) = 8
    assert preprocessors.noise_span_counts(20, 0.25, 2.0) == (5, 2)  # S = round(2.5) = 2


def runs(mask):
    """[(value, length)] of the runs of a boolean sequence."""
    out = []
    for value in mask:
        if out and out[-1][0] == value:
            out[-1][1] += 1
        else:
            out.append([value, 1])
    return [tuple(run) for run in out]


@settings(max_examples=150, deadline=None)
@given(length=st.integers(2, 3000), noise_density=st.sampled_from([0.15, 0.05, 0.3, 0.5]),
       mean_noise_span_length=st.sampled_from([1.0, 3.0, 20.0]), seed=st.integers(0, 2**31 - 1))
def test_noise_mask(length, noise_density, mean_noise_span_length, seed):
    mask = preprocessors.random_spans_noise_mask(
        tf.constant(length), [(seed, 1), (seed, 2)], noise_density, mean_noise_span_length).numpy()
    num_noise, num_spans = counts_reference(length, noise_density, mean_noise_span_length)
    assert mask.shape == (length,) and mask.sum() == num_noise
    mask_runs = runs(mask.tolist())
    assert mask_runs[0][0] is False and mask_runs[-1][0] is True  # kept, noise, ..., kept, noise
    assert sum(value for value, _ in mask_runs) == num_spans
    assert len(mask_runs) == 2 * num_spans


def test_noise_span_lengths_are_uniform_compositions():
    """3 noise tokens in 2 spans: compositions (1, 2) and (2, 1), equally likely."""
    first_lengths = []
    for seed in range(400):
        mask = preprocessors.random_spans_noise_mask(tf.constant(20), [(seed, 0), (seed, 1)], 0.15, 1.5).numpy()
        first_lengths.append([length for value, length in runs(mask.tolist()) if value][0])
    assert set(first_lengths) == {1, 2}
    assert 150 < first_lengths.count(1) < 250


def reconstruct(inputs, targets, first_sentinel, num_sentinels=100):
    """The original tokens from corrupted inputs and targets (each sentinel of the inputs is followed, in the
    targets, by the tokens it replaced)."""
    replaced, current = {}, None
    for token in targets:
        if first_sentinel - num_sentinels < token <= first_sentinel:
            current = token
            replaced[current] = []
        else:
            replaced[current].append(token)
    out = []
    for token in inputs:
        out.extend(replaced[token] if token in replaced else [token])
    return out


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 600), seed=st.integers(0, 2**31 - 1))
def test_sentinels(length, seed):
    tokens = tf.range(3, 3 + length)
    noise = preprocessors.random_spans_noise_mask(tf.constant(length), [(seed, 0), (seed, 1)])
    inputs = preprocessors.replace_spans_with_sentinels(tokens, noise, 999, 100).numpy().tolist()
    targets = preprocessors.replace_spans_with_sentinels(tokens, tf.logical_not(noise), 999, 100).numpy().tolist()
    num_noise, num_spans = counts_reference(length, 0.15, 3.0)
    sentinels = list(range(999, 999 - num_spans, -1))
    assert [t for t in inputs if t >= 900] == sentinels and [t for t in targets if t >= 900] == sentinels
    assert targets[0] == 999 and inputs[-1] == 999 - num_spans + 1  # targets start, inputs end with a sentinel
    assert (len(inputs), len(targets)) == (length - num_noise + num_spans, num_noise + num_spans)
    assert reconstruct(inputs, targets, 999) == list(range(3, 3 + length))


def test_more_spans_than_sentinels_raise_in_graph():
    mask = tf.constant([True, False, True, False, True])
    with pytest.raises(tf.errors.InvalidArgumentError, match="more spans than the vocabulary's 2 sentinels"):
        preprocessors.replace_spans_with_sentinels(tf.range(5), mask, 99, 2)


def text_task(texts, vocabulary, **span_corruption_kwargs):
    """An unregistered seqio Task running the span corruption chain over in-memory texts."""
    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"text": list(texts)})

    return seqio.Task(
        "span_corruption_under_test",
        source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            functools.partial(preprocessors.span_corruption, **span_corruption_kwargs),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={"inputs": seqio.Feature(vocabulary, required=False), "targets": seqio.Feature(vocabulary)},
    )


def examples(task, lengths, seed=0, num_epochs=1):
    dataset = task.get_dataset(lengths, shuffle=False, seed=seed, num_epochs=num_epochs)
    return [(ex["inputs"].tolist(), ex["targets"].tolist()) for ex in dataset.as_numpy_iterator()]


@pytest.fixture(scope="module")
def words():
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(vocabulary, size=rng.integers(5, 400))) for _ in range(60)]


@settings(max_examples=6, deadline=None)
@given(inputs_length=st.integers(8, 700))
@example(inputs_length=16)
@example(inputs_length=512)
def test_chain_fills_the_lengths_with_sentinels_and_eos(words, inputs_length):
    vocabulary = seqio.SentencePieceVocabulary(TEST_SPM, extra_ids=100)
    lengths = preprocessors.span_corruption_lengths(inputs_length)
    task = text_task(words, vocabulary)
    corrupted = examples(task, {"inputs": inputs_length, "targets": lengths.targets})
    first_sentinel = vocabulary.vocab_size - 1
    full = corrupted[:-1]  # the last segment of the (only) group is shorter
    assert full and all(len(i) == lengths.inputs and len(t) == lengths.targets for i, t in full)
    for inputs, targets in corrupted:
        assert inputs[-1] == targets[-1] == vocabulary.eos_id
        assert targets[0] == first_sentinel
        spans = [t for t in inputs if t > first_sentinel - 100]
        assert spans == list(range(first_sentinel, first_sentinel - len(spans), -1))
    # Every token of the tokenized texts comes back, in order, from the segments.
    original = [t for text in words for t in vocabulary.encode(text)]
    rebuilt = [t for i, tg in corrupted for t in reconstruct(i[:-1], tg[:-1], first_sentinel)]
    assert rebuilt == original


def test_deterministic_for_a_seed_different_each_epoch():
    vocabulary = seqio.ByteVocabulary()
    raw = preprocessors.span_corruption_lengths(64).raw_tokens
    # One document of exactly one segment, so each epoch's example corrupts the same tokens.
    task = text_task(["".join(chr(ord("a") + i % 26) for i in range(raw))], vocabulary)
    lengths = {"inputs": 64, "targets": 16}
    first = examples(task, lengths, seed=7, num_epochs=6)
    assert len(first) == 6
    assert first == examples(task, lengths, seed=7, num_epochs=6)
    assert first != examples(task, lengths, seed=8, num_epochs=6)
    assert len({tuple(inputs) for inputs, _ in first}) > 1, "every epoch draws new noise"


def test_byte_vocabulary_sentinels_count_down_from_258():
    task = text_task(["hello span corruption with bytes " * 20], seqio.ByteVocabulary(), mean_noise_span_length=20.0)
    inputs, targets = examples(task, {"inputs": 128, "targets": 64})[0]
    assert targets[0] == 258 and inputs[-1] == 1
    assert [t for t in inputs if t >= 248] == list(range(258, 258 - len([t for t in inputs if t >= 248]), -1))


def test_errors():
    vocabulary = seqio.ByteVocabulary()
    task = text_task(["some text"], vocabulary)
    with pytest.raises(ValueError, match="inputs length 512 .* needs targets length 114; got 100"):
        task.get_dataset({"inputs": 512, "targets": 100}, shuffle=False)
    # bytes at mean span 3: 28 noise spans per 568-token segment, but only 11 safe sentinels
    with pytest.raises(ValueError, match="28 noise spans per segment, more than the 11 sentinels"):
        task.get_dataset({"inputs": 512, "targets": 114}, shuffle=False)
    with pytest.raises(ValueError, match="has no extra ids"):
        preprocessors.sentinel_ids(seqio.PassThroughVocabulary(size=100))


def test_salient_spans_from_the_data():
    dataset = tf.data.Dataset.from_tensors(
        {"text": "Héllo Wörld in Paris", "spans": {"start": [6, 15], "limit": [11, 20]}})
    got = list(preprocessors.salient_span_masking(dataset, offsets_unit="UTF8_CHAR").as_numpy_iterator())
    assert got == [{"inputs": "nem: Héllo _X_ in Paris".encode(), "targets": "Wörld".encode()},
                   {"inputs": b"nem: H\xc3\xa9llo W\xc3\xb6rld in _X_", "targets": b"Paris"}]


def test_salient_span_masking_all_spans_at_once():
    # spans given out of text order, offsets in characters of a non-ASCII text
    dataset = tf.data.Dataset.from_tensor_slices({
        "text": ["Héllo Wörld in Paris.", "no spans"],
        "spans": {"start": tf.ragged.constant([[15, 6], []]), "limit": tf.ragged.constant([[20, 11], []])},
    })
    got = list(preprocessors.salient_span_masking(dataset, offsets_unit="UTF8_CHAR", mask_all=True).as_numpy_iterator())
    assert got == [{"inputs": "nem: Héllo _X_ in _X_.".encode(), "targets": "_X_ Wörld _X_ Paris".encode()}]
    found = list(preprocessors.salient_span_masking(
        tf.data.Dataset.from_tensor_slices({"text": ["Ann met Bob Smith in 1990 at Oxford", "nothing here."]}),
        mask_all=True, mask="_M_").as_numpy_iterator())
    # the finder's spans here: "Bob Smith" and "1990"
    assert found == [{"inputs": b"nem: Ann met _M_ in _M_ at Oxford", "targets": b"_M_ Bob Smith _M_ 1990"}]


def test_salient_span_finder():
    text = ("On February 3, 1959, Buddy Holly and The Big Bopper died near Clear Lake; 3 people and 1,000 fans. "
            "In the 1990s Mary-Kate Olsen visited the Bank of England on 2001-09-11, and on 4th of July 1776.")
    starts, limits = preprocessors.find_salient_spans(tf.constant(text))
    encoded = text.encode()
    found = [encoded[s:l].decode() for s, l in zip(starts.numpy(), limits.numpy())]
    assert found == ["February 3, 1959", "Buddy Holly", "Big Bopper", "Clear Lake", "3", "1,000", "1990s",
                     "Mary-Kate Olsen", "Bank of England", "2001-09-11", "4th of July 1776"]
    masked = list(preprocessors.salient_span_masking(tf.data.Dataset.from_tensors({"text": text})))
    assert len(masked) == len(found)
    assert masked[1]["inputs"].numpy().decode().startswith("nem: On February 3, 1959, _X_ and The Big Bopper")
    assert masked[1]["targets"].numpy() == b"Buddy Holly"
    assert not list(preprocessors.salient_span_masking(tf.data.Dataset.from_tensors({"text": "nothing here."})))


def test_closed_book_qa_format():
    dataset = tf.data.Dataset.from_tensors({"question": "who?", "answers": ["Ann", "Anne"]})
    (example,) = preprocessors.closed_book_qa(dataset, prefix="nq question: ").as_numpy_iterator()
    assert example["inputs"] == b"nq question: who?" and example["targets"] == b"Ann"
    assert example["answers"].tolist() == [b"Ann", b"Anne"]
