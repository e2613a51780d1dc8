"""Pre-training tasks: span corruption (T5's objective) and salient span masking.

    c4_v220_span_corruption                 TFDS c4/en:2.2.0, T5's vocabulary (readable where a TFDS data dir has it)
    local_corpus_span_corruption            the local text corpus (settings.corpus_patterns), T5's vocabulary
    local_corpus_span_corruption_bytes      the same, bytes (seqio.ByteVocabulary) with ByT5's mean span of 20
    salient_span_masked_wikipedia           TFDS salient_span_wikipedia/sentences:1.0.0, its labelled spans
    local_corpus_salient_span_masking       the local text corpus, spans from the built-in finder

`register_text_corpus_task` registers the same over any text files. Span corruption needs the targets length that
goes with the inputs length: {'inputs': 512, 'targets': 114} (128: 29, 256: 58, 1024: 229; see
t5x_lite.preprocessors.span_corruption_lengths).
"""
import functools
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf
import tensorflow_text

from t5x_lite import preprocessors
from tasks import settings

# Paragraphs: runs of text between blank lines (lines holding only spaces or tabs count as blank).
_BLANK_LINES = r"\n[ \t\r]*\n[ \t\r\n]*"


def read_documents(filename: tf.Tensor, documents: str) -> tf.data.Dataset:
    """The documents of one text file, {"text": string[]}: the whole file, or each of its paragraphs."""
    text = tf.io.read_file(filename)
    if documents == "file":
        return tf.data.Dataset.from_tensors({"text": text})
    paragraphs = tf.strings.strip(tensorflow_text.regex_split(text[tf.newaxis], _BLANK_LINES).flat_values)
    return tf.data.Dataset.from_tensor_slices({"text": tf.boolean_mask(paragraphs, paragraphs != "")})


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }


def _span_corruption_preprocessors(noise_density: float, mean_noise_span_length: float) -> list:
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        functools.partial(preprocessors.span_corruption, noise_density=noise_density,
                          mean_noise_span_length=mean_noise_span_length),
        seqio.preprocessors.append_eos_after_trim,
    ]


_SSM_PREPROCESSORS = [
    preprocessors.salient_span_masking,
    seqio.preprocessors.tokenize,
    seqio.CacheDatasetPlaceholder(),
    seqio.preprocessors.append_eos_after_trim,
]


def register_text_corpus_task(
    name: str,
    file_pattern: str | Sequence[str] | Mapping[str, str | Sequence[str]],
    *,
    vocabulary: seqio.Vocabulary,
    documents: str = "file",
    objective: str = "span_corruption",
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> seqio.Task:
    """Registers a pre-training task over plain-text files.

    Args:
      name: the task's name.
      file_pattern: glob pattern(s) of the files of the train split, or {split: pattern(s)}.
      vocabulary: e.g. `settings.t5_vocabulary()` or seqio.ByteVocabulary().
      documents: "file" (a document per file) or "paragraph" (a document per blank-line-separated block).
      objective: "span_corruption" or "salient_span_masking" (spans from the built-in finder; use paragraphs, whose
        masked copies fit the inputs length).
      noise_density, mean_noise_span_length: span corruption's settings.
    """
    if documents not in ("file", "paragraph"):
        raise ValueError(f"documents={documents!r}; valid: 'file', 'paragraph'.")
    if objective == "span_corruption":
        task_preprocessors = _span_corruption_preprocessors(noise_density, mean_noise_span_length)
    elif objective == "salient_span_masking":
        task_preprocessors = _SSM_PREPROCESSORS
    else:
        raise ValueError(f"objective={objective!r}; valid: 'span_corruption', 'salient_span_masking'.")
    split_to_pattern = dict(file_pattern) if isinstance(file_pattern, Mapping) else {"train": file_pattern}
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FileDataSource(functools.partial(read_documents, documents=documents), split_to_pattern),
        preprocessors=task_preprocessors,
        output_features=_output_features(vocabulary),
        metric_fns=[],
    )


seqio.TaskRegistry.add(
    "c4_v220_span_corruption",
    source=seqio.TfdsDataSource(tfds_name="c4/en:2.2.0", splits=["train", "validation"]),
    preprocessors=_span_corruption_preprocessors(noise_density=0.15, mean_noise_span_length=3.0),
    output_features=_output_features(settings.t5_vocabulary()),
    metric_fns=[],
)
seqio.TaskRegistry.add(
    "salient_span_masked_wikipedia",
    source=seqio.TfdsDataSource(tfds_name="salient_span_wikipedia/sentences:1.0.0", splits=["train"]),
    preprocessors=_SSM_PREPROCESSORS,
    output_features=_output_features(settings.t5_vocabulary()),
    metric_fns=[],
)
register_text_corpus_task("local_corpus_span_corruption", settings.corpus_patterns(),
                          vocabulary=settings.t5_vocabulary(), documents="paragraph")
register_text_corpus_task("local_corpus_span_corruption_bytes", settings.corpus_patterns(),
                          vocabulary=seqio.ByteVocabulary(), documents="paragraph", mean_noise_span_length=20.0)
register_text_corpus_task("local_corpus_salient_span_masking", settings.corpus_patterns(),
                          vocabulary=settings.t5_vocabulary(), documents="paragraph", objective="salient_span_masking")
