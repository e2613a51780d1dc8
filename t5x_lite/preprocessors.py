"""Preprocessors for pre-training, closed-book QA and rank classification: stateless TensorFlow ops that run inside
seqio pipelines.

Span corruption (T5's objective), a chain of four steps over tokenized documents {"targets": int32[tokens]}:

    select_random_chunk     a random chunk of each document, at most 65,536 tokens
    concatenate_documents   documents concatenated in groups of 128 ...
    split_into_segments     ... and cut into segments of T raw tokens (T from the inputs length:
                            `span_corruption_lengths`)
    corrupt_spans           a random noise mask per segment; inputs keep the non-noise tokens with one sentinel per
                            noise span, targets the noise tokens with one sentinel per non-noise span

The random steps draw their seeds from seqio's `map_over_dataset(num_seeds=...)`: seqio zips the examples with a
`tf.data.Dataset.random` stream seeded by the `seed` given to `get_dataset`, and runs these preprocessors after
it repeats the source (they follow the CacheDatasetPlaceholder), so the same seed gives the same examples, and the
stream, which runs on across epochs, gives every epoch new chunks and new noise.

Salient span masking (`salient_span_masking`) and closed-book QA formatting (`closed_book_qa`) are plain maps;
`rank_classification` turns an example with answer choices into one example per choice.
"""
from __future__ import annotations

import dataclasses

import seqio
import tensorflow as tf
import tensorflow_text

# ByteVocabulary has no extra ids; like ByT5, span corruption then takes sentinels from its top ids downward.
# The top 11 (bytes 0xF5-0xFF) never occur in UTF-8 text, so sentinels cannot be confused with text.
BYTE_SENTINELS = 11


# ---------------------------------------------------------------------------------------------------------------
# Span corruption: the length arithmetic


def noise_span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens N, noise spans S) of the noise mask of a `length`-token segment (length >= 2).

    N = round(length * noise_density), S = round(N / mean_noise_span_length), both rounded half to even in
    float64, with 1 <= N <= length - 1 and 1 <= S <= length - N (so the spans of kept tokens, S of them, are not
    empty). `random_spans_noise_mask` computes the same numbers in TensorFlow.
    """
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)
    return num_noise, num_spans


@dataclasses.dataclass(frozen=True)
class SpanCorruptionLengths:
    """The sizes of one full segment's span corruption; inputs and targets count their EOS."""

    raw_tokens: int  # T: tokens per segment before corruption
    noise_tokens: int  # N
    noise_spans: int  # S
    inputs: int  # T - N + S + 1
    targets: int  # N + S + 1


def corrupted_lengths(raw_tokens: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> SpanCorruptionLengths:
    """The lengths span corruption gives a segment of `raw_tokens` tokens."""
    num_noise, num_spans = noise_span_counts(raw_tokens, noise_density, mean_noise_span_length)
    return SpanCorruptionLengths(raw_tokens, num_noise, num_spans,
                                 inputs=raw_tokens - num_noise + num_spans + 1, targets=num_noise + num_spans + 1)


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> SpanCorruptionLengths:
    """The longest segment whose corrupted inputs (with EOS) fit `inputs_length`, and its targets length.

    The corrupted inputs grow by 0, 1 or 2 tokens per raw token, so they fill `inputs_length` exactly or leave
    one token free. E.g. 512 -> T 568, targets 114; 128 -> 141, 29; 256 -> 284, 58; 1024 -> 1137, 229.
    """
    if inputs_length < 3:
        raise ValueError(f"Span corruption needs inputs length >= 3 (a token, a sentinel, EOS); got {inputs_length}.")
    raw_tokens = inputs_length - 1  # its inputs fit: S <= N
    while corrupted_lengths(raw_tokens + 1, noise_density, mean_noise_span_length).inputs <= inputs_length:
        raw_tokens += 1
    return corrupted_lengths(raw_tokens, noise_density, mean_noise_span_length)


def sentinel_ids(vocabulary: seqio.Vocabulary) -> tuple[int, int]:
    """(first sentinel id, number of sentinels): sentinels count down from vocab_size - 1.

    A vocabulary with extra ids has one sentinel per extra id (`<extra_id_0>` = 32099 for T5's 32,000 pieces and
    100 extra ids); seqio.ByteVocabulary without extra ids has BYTE_SENTINELS, from 258 down.
    """
    if vocabulary.extra_ids:
        return vocabulary.vocab_size - 1, vocabulary.extra_ids
    if isinstance(vocabulary, seqio.ByteVocabulary):
        return vocabulary.vocab_size - 1, BYTE_SENTINELS
    raise ValueError(f"{vocabulary!r} has no extra ids to use as sentinels; build it with extra_ids=100 "
                     "(or use seqio.ByteVocabulary).")


# ---------------------------------------------------------------------------------------------------------------
# Span corruption: the TensorFlow ops


def _random_composition(num_items: tf.Tensor, num_parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A uniformly random composition of num_items into num_parts positive parts: int32[num_parts].

    The parts start at item 0 and at num_parts - 1 distinct cut points drawn uniformly from the num_items - 1 gaps
    between items: the gaps with the smallest of num_items - 1 random keys.
    """
    keys = tf.random.stateless_uniform([num_items - 1], seed=seed)
    _, cut_gaps = tf.math.top_k(-keys, k=num_parts - 1)
    boundaries = tf.concat([[0], tf.sort(cut_gaps) + 1, [num_items]], axis=0)
    return boundaries[1:] - boundaries[:-1]


def random_spans_noise_mask(length: tf.Tensor, seeds, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
    """T5's noise mask: bool[length], True at noise tokens.

    Exactly N noise tokens in S spans (`noise_span_counts`), the lengths of the noise spans and of the S kept spans
    each a uniformly random composition, alternating kept, noise, kept, ..., noise: the mask starts with kept
    tokens. A 1-token segment gets the mask of a 2-token one, cut to its first token (as in T5).

    Args:
      length: int32 scalar, the segment's length.
      seeds: two stateless seeds (each int32/int64[2]): one for the noise spans, one for the kept spans.
    """
    padded_length = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(padded_length, tf.float64) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, padded_length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length), tf.int32)
    num_spans = tf.clip_by_value(num_spans, 1, padded_length - num_noise)
    noise_lengths = _random_composition(num_noise, num_spans, seeds[0])
    kept_lengths = _random_composition(padded_length - num_noise, num_spans, seeds[1])
    span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
    span_index = tf.repeat(tf.range(2 * num_spans), span_lengths)
    return tf.equal(span_index % 2, 1)[:length]


def replace_spans_with_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor, first_sentinel: int,
                                 num_sentinels: int) -> tf.Tensor:
    """Each run of True in span_mask becomes one sentinel: first_sentinel, first_sentinel - 1, ...

    Args:
      tokens: int32[length].
      span_mask: bool[length].
    Returns:
      int32[length - masked tokens + spans]. Raises (InvalidArgumentError) on more spans than num_sentinels.
    """
    continues_span = tf.logical_and(span_mask, tf.pad(span_mask[:-1], [[1, 0]]))
    starts_span = tf.logical_and(span_mask, tf.logical_not(continues_span))
    span_number = tf.cumsum(tf.cast(starts_span, tokens.dtype))  # 1 at the first span
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(tf.concat([span_number, [0]], axis=0)), tf.cast(num_sentinels, tokens.dtype),
        message=f"more spans than the vocabulary's {num_sentinels} sentinels")
    with tf.control_dependencies([check]):
        tokens = tf.where(starts_span, first_sentinel + 1 - span_number, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(continues_span))


def select_random_chunk(dataset: tf.data.Dataset, max_length: int = 65536,
                        feature_key: str = "targets") -> tf.data.Dataset:
    """{feature_key: int32[tokens]} -> one random chunk of it: int32[<= max_length]. Empty documents are dropped.

    The chunk is one of the ceil(tokens / max_length) consecutive max_length-token pieces, chosen uniformly (T5's
    choice), so a document of at most max_length tokens is kept whole. Other features are dropped.
    """
    def choose(example, seed):
        tokens = example[feature_key]
        num_chunks = (tf.size(tokens) + max_length - 1) // max_length
        start = max_length * tf.random.stateless_uniform([], seed=seed, maxval=num_chunks, dtype=tf.int32)
        return {feature_key: tokens[start:start + max_length]}

    dataset = dataset.filter(lambda example: tf.size(example[feature_key]) > 0)
    return seqio.map_over_dataset(choose, num_seeds=1)(dataset)


def concatenate_documents(dataset: tf.data.Dataset, documents_per_group: int = 128,
                          feature_key: str = "targets") -> tf.data.Dataset:
    """Concatenates the documents {feature_key: int32[tokens]} in consecutive groups of documents_per_group."""
    groups = dataset.map(lambda example: example[feature_key]).ragged_batch(documents_per_group)
    return groups.map(lambda group: {feature_key: group.flat_values})


def split_into_segments(dataset: tf.data.Dataset, segment_length: int,
                        feature_key: str = "targets") -> tf.data.Dataset:
    """Cuts each {feature_key: int32[tokens]} into segments of segment_length tokens (the last may be shorter)."""
    def split(example):
        tokens = example[feature_key]
        starts = tf.range(0, tf.size(tokens), segment_length)
        row_lengths = tf.minimum(segment_length, tf.size(tokens) - starts)
        return {feature_key: tf.RaggedTensor.from_row_lengths(tokens, row_lengths)}

    return dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def corrupt_spans(dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary, noise_density: float = 0.15,
                  mean_noise_span_length: float = 3.0, feature_key: str = "targets") -> tf.data.Dataset:
    """{feature_key: int32[T]} -> {"inputs": int32[T - N + S], "targets": int32[N + S]} (no EOS yet).

    Inputs are the tokens with each noise span replaced by a sentinel; targets each noise span after the sentinel
    that replaced it, i.e. the tokens with each kept span replaced by a sentinel.
    """
    first_sentinel, num_sentinels = sentinel_ids(vocabulary)

    def corrupt(example, seeds):
        tokens = example[feature_key]
        noise = random_spans_noise_mask(tf.size(tokens), seeds, noise_density, mean_noise_span_length)
        return {
            "inputs": replace_spans_with_sentinels(tokens, noise, first_sentinel, num_sentinels),
            "targets": replace_spans_with_sentinels(tokens, tf.logical_not(noise), first_sentinel, num_sentinels),
        }

    return seqio.map_over_dataset(corrupt, num_seeds=2)(dataset)


def span_corruption(dataset: tf.data.Dataset, sequence_length: dict[str, int] | None,
                    output_features: dict[str, seqio.Feature], noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, max_chunk_length: int = 65536,
                    documents_per_group: int = 128) -> tf.data.Dataset:
    """T5's span corruption of tokenized documents {"targets": int32[tokens]} -> {"inputs", "targets"}.

    A seqio preprocessor for after the CacheDatasetPlaceholder, followed by seqio.preprocessors.append_eos_after_trim:
    with T5's settings (noise density 0.15, mean span 3) inputs of 512 tokens hold segments of 568 raw tokens, and
    their targets 114 tokens. ByT5 used mean_noise_span_length=20 with seqio.ByteVocabulary.

    Raises:
      ValueError: the targets length is shorter than the corruption needs (the message says the length needed), or
        a segment would have more noise spans than the vocabulary has sentinels.
    """
    if not sequence_length or "inputs" not in sequence_length or "targets" not in sequence_length:
        raise ValueError(f"Span corruption needs the 'inputs' and 'targets' lengths; got {sequence_length}.")
    if not 0 < noise_density < 1 or mean_noise_span_length < 1:
        raise ValueError(f"noise_density must be in (0, 1) and mean_noise_span_length >= 1; got {noise_density} "
                         f"and {mean_noise_span_length}.")
    lengths = span_corruption_lengths(sequence_length["inputs"], noise_density, mean_noise_span_length)
    if sequence_length["targets"] < lengths.targets:
        raise ValueError(
            f"Span corruption with inputs length {sequence_length['inputs']} (segments of {lengths.raw_tokens} "
            f"tokens) needs targets length {lengths.targets}; got {sequence_length['targets']}.")
    vocabulary = output_features["targets"].vocabulary
    _, num_sentinels = sentinel_ids(vocabulary)
    if lengths.noise_spans > num_sentinels:
        raise ValueError(
            f"Span corruption with inputs length {sequence_length['inputs']} makes {lengths.noise_spans} noise spans "
            f"per segment, more than the {num_sentinels} sentinels of {vocabulary!r}; use a vocabulary with more "
            "extra ids, a longer mean_noise_span_length or a shorter inputs length.")
    dataset = select_random_chunk(dataset, max_chunk_length)
    dataset = concatenate_documents(dataset, documents_per_group)
    dataset = split_into_segments(dataset, lengths.raw_tokens)
    return corrupt_spans(dataset, vocabulary, noise_density, mean_noise_span_length)


# ---------------------------------------------------------------------------------------------------------------
# Salient span masking

_MONTH = "(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = "|".join([
    rf"{_DAY} (?:of )?{_MONTH}(?:,? \d{{3,4}})?",  # 4 July 1776, 4th of July
    rf"{_MONTH} {_DAY}\b(?:,? \d{{3,4}})?",  # July 4, 1776
    rf"{_MONTH},? \d{{4}}",  # July 1776
    r"\d{4}-\d{2}-\d{2}",  # 1776-07-04
])
_YEAR = r"\b[12]\d{3}s?\b"  # 1776, 1990s
_NUMBER = r"\b\d+(?:,\d{3})*(?:\.\d+)?\b"  # 3, 1,000, 3.14
_NAME_WORD = r"\p{Lu}\p{Ll}+(?:['’-]\p{Lu}?\p{Ll}+)*"  # Holly, O'Brien, Mary-Kate
_NAME = rf"{_NAME_WORD}(?: (?:(?:of|the|de|da|di|del|der|van|von|la|le|du|al) )*{_NAME_WORD})+"  # Bank of England
# Capitalised function words at a sentence start are matched first, as non-salient pieces, so that they neither
# start a name ("On February 3, 1959" is not the name "On February") nor hide the date after them.
_CAPITALISED_FUNCTION_WORD = (r"(?:The|A|An|In|On|At|Of|For|From|By|With|After|Before|During|Since|When|While|If|"
                              r"But|And|Or|As|To|It|He|She|They|We|I|This|That|These|Those|His|Her|Their|Its|There|"
                              r"Then|Here|What|Who|Which|Where|Why|How)\b")
_SALIENT = f"{_DATE}|{_YEAR}|{_NUMBER}|{_NAME}"
_SALIENT_OR_FUNCTION_WORD = f"{_CAPITALISED_FUNCTION_WORD}|{_SALIENT}"


def find_salient_spans(text: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Dates, years, numbers and capitalised multi-word names in text, a heuristic for text without entity labels.

    Args:
      text: string scalar.
    Returns:
      (starts, limits): int32[spans] byte offsets of the spans, in order, not overlapping.
    """
    pieces, starts, limits = tensorflow_text.regex_split_with_offsets(
        text[tf.newaxis], _SALIENT_OR_FUNCTION_WORD, _SALIENT_OR_FUNCTION_WORD)
    pieces, starts, limits = pieces.flat_values, starts.flat_values, limits.flat_values
    salient = tf.logical_and(tf.strings.regex_full_match(pieces, _SALIENT),
                             tf.logical_not(tf.strings.regex_full_match(pieces, _CAPITALISED_FUNCTION_WORD)))
    return tf.cast(tf.boolean_mask(starts, salient), tf.int32), tf.cast(tf.boolean_mask(limits, salient), tf.int32)


def salient_span_masking(dataset: tf.data.Dataset, prefix: str = "nem: ", mask: str = "_X_",
                         offsets_unit: str = "BYTE", text_key: str = "text",
                         spans_key: str = "spans", mask_all: bool = False) -> tf.data.Dataset:
    """One example per salient span: inputs = prefix + the text with that span replaced by `mask`, targets = the span.

    With `mask_all`, one example per text instead, every span masked at once: inputs = prefix + the text with each
    span replaced by `mask`, targets = "<mask> span_1 <mask> span_2 ..." in text order (as T5's span corruption
    puts a sentinel before each span). Then no other unmasked value of the text can point to the answer; only
    what the text says of its subject (a name, say) can.

    The spans come from the data when its examples have them, {spans_key: {"start": int[spans], "limit":
    int[spans]}} (as TFDS salient_span_wikipedia gives; offsets in `offsets_unit`, "BYTE" or "UTF8_CHAR"), else
    from `find_salient_spans`. The defaults prefix "nem: " and mask "_X_" are those of T5's closed-book QA.

    Args:
      dataset: examples {text_key: string[]} (and optionally the spans).
    Returns:
      {"inputs": string[], "targets": string[]}; a text without salient spans gives no example.
    """
    spans_given = spans_key in dataset.element_spec

    def mask_each_span(example):
        text = example[text_key]
        if spans_given:
            starts = tf.cast(example[spans_key]["start"], tf.int32)
            limits = tf.cast(example[spans_key]["limit"], tf.int32)
            unit = offsets_unit
        else:
            (starts, limits), unit = find_salient_spans(text), "BYTE"
        texts = tf.fill(tf.shape(starts), text)
        span = tf.strings.substr(texts, starts, limits - starts, unit=unit)
        if mask_all:
            order = tf.argsort(starts)
            starts, limits, span = (tf.gather(x, order) for x in (starts, limits, span))
            gap_starts = tf.concat([[0], limits], axis=0)[:-1]
            gaps = tf.strings.substr(texts, gap_starts, starts - gap_starts, unit=unit)
            tail_start = tf.reduce_max(tf.concat([[0], limits], axis=0))
            tail = tf.strings.substr(text, tail_start, tf.strings.length(text, unit=unit) - tail_start, unit=unit)
            inputs = tf.strings.join([prefix, tf.strings.reduce_join(gaps + mask), tail])
            targets = tf.strings.reduce_join(tf.strings.join([mask, span], separator=" "), separator=" ")
            copies = tf.minimum(tf.size(starts), 1)  # a text without spans gives no example
            return {"inputs": tf.repeat(inputs[tf.newaxis], copies), "targets": tf.repeat(targets[tf.newaxis], copies)}
        before = tf.strings.substr(texts, tf.zeros_like(starts), starts, unit=unit)
        after = tf.strings.substr(texts, limits, tf.strings.length(texts, unit=unit) - limits, unit=unit)
        return {"inputs": tf.strings.join([prefix, before, mask, after]), "targets": span}

    return dataset.map(mask_each_span, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# ---------------------------------------------------------------------------------------------------------------
# Closed-book QA


def closed_book_qa(dataset: tf.data.Dataset, prefix: str) -> tf.data.Dataset:
    """{"question": string[], "answers": string[answers]} -> {"inputs": prefix + question, "targets": the first
    answer, "answers": all of them} (for evaluation: see metrics.qa_postprocessor)."""
    def format_example(example):
        return {
            "inputs": tf.strings.join([prefix, example["question"]]),
            "targets": example["answers"][0],
            "answers": example["answers"],
        }

    return dataset.map(format_example, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------------------------
# Rank classification


def rank_classification(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """One example per answer choice, to be scored by the log-likelihood of its targets (T0's evaluation).

    {"inputs": string[], "targets": string[], "answer_choices": string[choices], "idx": int[]} ->
    per choice {"inputs": the same, "targets": the choice, "idx": int32[2] (the example's idx, the choice's index),
    "num_choices": int32[], "is_correct": bool[] (the choice equals the targets)}; metrics.rank_classification
    then counts an example correct when its best-scored choice is a correct one.
    """
    def per_choice(example):
        choices = example["answer_choices"]
        count = tf.size(choices)
        return {
            "inputs": tf.fill([count], example["inputs"]),
            "targets": choices,
            "idx": tf.stack([tf.fill([count], tf.cast(example["idx"], tf.int32)), tf.range(count)], axis=1),
            "num_choices": tf.fill([count], count),
            "is_correct": tf.equal(choices, example["targets"]),
        }

    return dataset.map(per_choice, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
