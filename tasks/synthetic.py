"""Offline synthetic tasks for tests and smoke runs: no internet, no files.

    synthetic_reverse   "reverse: ab cde fg" -> "fg cde ab"   (the word order reversed)
    synthetic_copy      "copy: ab cde fg"    -> "ab cde fg"
    synthetic_mix       both tasks, sampled equally

Each split is a fixed set of examples generated from a seeded numpy generator (train 20,000, validation 500),
so every run, process and machine sees the same data. Texts are at most 28 bytes, so with the byte vocabulary
(ids: 0 pad, 1 eos, 2 unk, then byte + 3) inputs and targets of length 32 hold every example and its EOS untrimmed.
"""
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

NUM_EXAMPLES = {"train": 20_000, "validation": 500}
# A different generator seed per split, so validation is not a prefix of train.
_SPLIT_SEEDS = {"train": 0, "validation": 1}


def random_word_sequences(num_examples: int, seed: int, *, min_words: int = 2, max_words: int = 4,
                          min_letters: int = 2, max_letters: int = 4) -> np.ndarray:
    """Random lowercase words, the same for the same arguments: uint8[num_examples, max_words, max_letters]
    of ASCII letters, 0 after each word's end; words past an example's word count are all 0 (empty)."""
    rng = np.random.default_rng(seed)
    num_words = rng.integers(min_words, max_words + 1, size=(num_examples, 1))
    word_lengths = rng.integers(min_letters, max_letters + 1, size=(num_examples, max_words))
    word_lengths = np.where(np.arange(max_words) < num_words, word_lengths, 0)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(num_examples, max_words, max_letters), dtype=np.uint8)
    return np.where(np.arange(max_letters) < word_lengths[..., None], letters, np.uint8(0))


def join_words(words: np.ndarray) -> np.ndarray:
    """The non-empty words of each row of uint8[examples, words, letters], joined by single spaces: bytes[examples]."""
    num_examples, max_words, _ = words.shape
    space_after = np.where(words[..., :1] > 0, np.uint8(ord(" ")), np.uint8(0))
    text = np.concatenate([words, space_after], axis=-1).reshape(num_examples, -1)
    # A stable sort on "is padding" moves every 0 to the end of its row and keeps the characters in order.
    text = np.take_along_axis(text, np.argsort(text == 0, axis=1, kind="stable"), axis=1)
    as_bytes = np.ascontiguousarray(text).view(f"S{text.shape[1]}")[:, 0]  # numpy drops trailing zero bytes
    return np.char.rstrip(as_bytes, b" ")


def _text_pairs_dataset(split: str, prefix: str, reverse: bool) -> tf.data.Dataset:
    if split not in NUM_EXAMPLES:
        raise ValueError(f"Unknown split {split!r}; the synthetic tasks have {sorted(NUM_EXAMPLES)}.")
    words = random_word_sequences(NUM_EXAMPLES[split], seed=_SPLIT_SEEDS[split])
    inputs = np.char.add(f"{prefix}: ".encode(), join_words(words))
    targets = join_words(words[:, ::-1] if reverse else words)
    # from_tensor_slices (not from_generator) keeps the pipeline's iterator checkpointable.
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})


def reverse_dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    """The examples of synthetic_reverse. One in-memory "file": shuffling is left to the Task's buffer."""
    del shuffle_files, seed
    return _text_pairs_dataset(split, prefix="reverse", reverse=True)


def copy_dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    """The examples of synthetic_copy."""
    del shuffle_files, seed
    return _text_pairs_dataset(split, prefix="copy", reverse=False)


def exact_match_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target string."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        return {"accuracy": 0.0}
    matches = sum(t == p for t, p in zip(targets, predictions))
    return {"accuracy": 100.0 * matches / len(targets)}


def _register_task(name: str, dataset_fn) -> None:
    vocabulary = seqio.ByteVocabulary()
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=list(NUM_EXAMPLES), num_input_examples=NUM_EXAMPLES),
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=True),
            "targets": seqio.Feature(vocabulary, add_eos=True),
        },
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=[exact_match_accuracy],
    )


_register_task("synthetic_reverse", reverse_dataset_fn)
_register_task("synthetic_copy", copy_dataset_fn)
seqio.MixtureRegistry.add("synthetic_mix", ["synthetic_reverse", "synthetic_copy"], default_rate=1.0)
