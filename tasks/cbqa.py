"""Closed-book QA on Natural Questions, WebQuestions and TriviaQA: the tasks of T5's closed-book QA paper, with the
splits of its code (google-research/google-research, t5_closed_book_qa/t5_cbqa/tasks.py), as TFDS split strings:

    task                          inputs                    train              validation         test
    natural_questions_open        "nq question: ..."        train[:79168]      train[79168:]      validation
    natural_questions_open_test                             train              validation
    web_questions_open            "wq question: ..."        train[:3417]       train[3417:]       test
    web_questions_open_test                                 train              test
    trivia_qa_open                "trivia_qa question: ..." train[:78785]      train[78785:]      validation
    trivia_qa_open_test                                     train+validation                      test
    closed_book_qa, closed_book_qa_test    mixtures of the three, examples-proportional

The first 90% of train is the train split of the plain task, the rest its validation (ORQA's numbers); a _test task
trains on all of train (TriviaQA: and its validation) and evaluates on the open-domain test set, in its validation
split (NQ, WebQuestions) or, for TriviaQA, in test: TriviaQA's test answers are withheld (TFDS gives each test
question the answer "<unk>"), so trivia_qa_open_test has no validation split, and evaluating closed_book_qa_test on
validation evaluates NQ and WebQuestions only, as in T5.

The training target is the first answer; evaluation scores a prediction against all of them (TriviaQA: the value
and its aliases): metrics.qa_postprocessor hands them to metrics.squad (NQ, WebQuestions) or metrics.trivia_qa.

Each task reads TFDS (natural_questions_open:1.0.0, web_questions:1.0.0, trivia_qa/unfiltered.nocontext:1.1.0),
or, where the local data folder (tasks.settings) has cbqa/<dataset>/, the public release files there, each file
standing in for the TFDS split of the same examples (the split strings above then slice and join the files):

    folder                    split        file (the first that exists)
    natural_questions_open/   train        NQ-open.train.jsonl
                              validation   NQ-open.dev.jsonl
    web_questions/            train        train.examples.json, train.jsonl
                              test         test.examples.json, test.jsonl
    trivia_qa/                train        unfiltered-web-train.json, train.jsonl
                              validation   unfiltered-web-dev.json, validation*.jsonl
                              test         unfiltered-web-test-without-answers.json, test*.jsonl

in the formats: *.jsonl {question, answer: [..]} (NQ-open's); WebQuestions' original JSON (utterance, targetValue
"(list (description ..))"); TriviaQA's official JSON (Data[].Question, Answer.Value, Answer.Aliases; a test question
without an Answer gets "<unk>", as in TFDS).

A malformed record stops loading with an error naming the file and line, unless skip_bad_records is set
(T5X_LITE_SKIP_BAD_RECORDS=1): then each is skipped, and the count is logged after each file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf
from absl import logging

from t5x_lite import metrics, preprocessors
from tasks import settings


class MalformedRecordError(ValueError):
    """A record of a QA file that cannot be read; the message starts with `file:line:`."""


# ---------------------------------------------------------------------------------------------------------------
# The release formats: each yields (line, JSON value) per record, and maps a record to (question, answers)

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _LineCounter:
    """Line numbers (from 1) of increasing character offsets into a text, counted incrementally."""

    def __init__(self, text: str):
        self._text, self._offset, self._line = text, 0, 1

    def line(self, offset: int) -> int:
        self._line += self._text.count("\n", self._offset, offset)
        self._offset = offset
        return self._line


def _jsonl_records(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """One record per non-blank line; a line that is not JSON is yielded as its JSONDecodeError."""
    del path
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, error


def _expect(text: str, offset: int, characters: str, path: str, lines: _LineCounter) -> int:
    """The offset after the whitespace at `offset`, which must be at one of `characters`."""
    offset = _WHITESPACE.match(text, offset).end()
    if offset >= len(text) or text[offset] not in characters:
        found = repr(text[offset]) if offset < len(text) else "the end of the file"
        raise MalformedRecordError(f"{path}:{lines.line(offset)}: bad JSON: expected one of {characters!r}, "
                                   f"found {found}")
    return offset


def _decode_value(text: str, offset: int, path: str) -> tuple[Any, int]:
    try:
        return json.JSONDecoder().raw_decode(text, _WHITESPACE.match(text, offset).end())
    except json.JSONDecodeError as error:
        # The rest of the file cannot be read either: this stops loading even when skipping bad records.
        raise MalformedRecordError(f"{path}:{error.lineno}: bad JSON: {error.msg}") from error


def _json_array_items(text: str, offset: int, path: str, lines: _LineCounter) -> Iterator[tuple[int, Any]]:
    """The items of the JSON array at `offset`, each with the line it starts on."""
    offset = _expect(text, offset, "[", path, lines) + 1
    if text[_WHITESPACE.match(text, offset).end():].startswith("]"):
        return
    while True:
        start = _WHITESPACE.match(text, offset).end()
        item, offset = _decode_value(text, start, path)
        yield lines.line(start), item
        offset = _expect(text, offset, ",]", path, lines)
        if text[offset] == "]":
            return
        offset += 1


def _web_questions_records(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """WebQuestions' original release: a JSON array of {url, targetValue, utterance}."""
    yield from _json_array_items(text, 0, path, _LineCounter(text))


def _trivia_qa_records(text: str, path: str) -> Iterator[tuple[int, Any]]:
    """TriviaQA's official release: a JSON object whose "Data" member lists the questions."""
    lines = _LineCounter(text)
    offset = _expect(text, 0, "{", path, lines) + 1
    while True:
        key, offset = _decode_value(text, offset, path)
        offset = _expect(text, offset, ":", path, lines) + 1
        if key == "Data":
            yield from _json_array_items(text, offset, path, lines)
            return
        _, offset = _decode_value(text, offset, path)
        offset = _expect(text, offset, ",}", path, lines)
        if text[offset] == "}":
            raise MalformedRecordError(f"{path}:{lines.line(offset)}: no 'Data' list of questions")
        offset += 1


def _field(record: Any, *keys: str) -> Any:
    for depth, key in enumerate(keys):
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object at {'.'.join(keys[:depth]) or 'the record'}, "
                             f"got {type(record).__name__}")
        if key not in record:
            raise ValueError(f"missing field {'.'.join(keys[:depth + 1])!r}")
        record = record[key]
    return record


_WQ_LIST = re.compile(r"\(list\s+\(description\s+(.*)\)\)", re.DOTALL)
_WQ_SEPARATOR = re.compile(r"\)\s+\(description\s+")


def parse_web_questions_answers(target_value: str) -> list[str]:
    """The answers of WebQuestions' `targetValue`: '(list (description "Jamaican English") (description Lawyer))'
    -> ['Jamaican English', 'Lawyer']. Quoted descriptions may hold unescaped quotes and parentheses."""
    match = _WQ_LIST.fullmatch(target_value.strip()) if isinstance(target_value, str) else None
    if match is None:
        raise ValueError(f"targetValue is not a '(list (description ...) ...)': {target_value!r}")
    answers = []
    for description in _WQ_SEPARATOR.split(match.group(1)):
        if len(description) >= 2 and description[0] == description[-1] == '"':
            description = description[1:-1]
        answers.append(description)
    return answers


def _qa_jsonl(record: Any) -> tuple[Any, Any]:
    return _field(record, "question"), _field(record, "answer")


def _web_questions_json(record: Any) -> tuple[Any, Any]:
    return _field(record, "utterance"), parse_web_questions_answers(_field(record, "targetValue"))


def _trivia_qa_json(record: Any) -> tuple[Any, Any]:
    aliases = _field(record, "Answer", "Aliases")
    if not isinstance(aliases, list):
        raise ValueError(f"Answer.Aliases is not a list: {aliases!r}")
    return _field(record, "Question"), [_field(record, "Answer", "Value"), *aliases]


TRIVIA_QA_WITHHELD_ANSWER = "<unk>"  # TFDS's answer to a TriviaQA test question


def _trivia_qa_test_json(record: Any) -> tuple[Any, Any]:
    """A question of TriviaQA's test file, whose answers are withheld: "<unk>", as in TFDS (or its answers, where
    the record has them)."""
    if isinstance(record, dict) and "Answer" not in record:
        return _field(record, "Question"), [TRIVIA_QA_WITHHELD_ANSWER]
    return _trivia_qa_json(record)


@dataclasses.dataclass(frozen=True)
class QAFormat:
    """A file format: its records with their lines, and each record's (question, answers)."""

    name: str
    records: Callable[[str, str], Iterator[tuple[int, Any]]]
    question_and_answers: Callable[[Any], tuple[Any, Any]]


QA_JSONL = QAFormat("jsonl {question, answer: [...]}", _jsonl_records, _qa_jsonl)
WEB_QUESTIONS_JSON = QAFormat("WebQuestions JSON", _web_questions_records, _web_questions_json)
TRIVIA_QA_JSON = QAFormat("TriviaQA JSON", _trivia_qa_records, _trivia_qa_json)
TRIVIA_QA_TEST_JSON = QAFormat("TriviaQA test JSON", _trivia_qa_records, _trivia_qa_test_json)


def _checked_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string: {value!r}")
    try:
        value.encode("utf-8")  # the file was decoded with surrogateescape: invalid bytes fail here
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not valid UTF-8") from error
    return value


def _checked_record(question: Any, answers: Any) -> tuple[str, tuple[str, ...]]:
    question = _checked_text(question, "the question")
    if not question.strip():
        raise ValueError("the question is empty")
    if not isinstance(answers, list):
        raise ValueError(f"the answers are not a list: {answers!r}")
    if not answers:
        raise ValueError("no answers")
    return question, tuple(_checked_text(answer, "an answer") for answer in answers)


def load_qa_file(path: str, qa_format: QAFormat, skip_bad_records: bool = False) -> list[tuple[str, tuple[str, ...]]]:
    """The (question, answers) records of one file.

    A malformed record (bad JSON, a missing field, no answers, invalid UTF-8) raises MalformedRecordError naming
    the file and line; with skip_bad_records it is skipped instead, and the number skipped is logged at the end.
    A file whose JSON structure breaks off (a whole-file JSON format) cannot be read past that point and always
    raises.
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    records, skipped = [], []
    for line, record in qa_format.records(text, path):
        try:
            if isinstance(record, json.JSONDecodeError):
                raise ValueError(f"bad JSON: {record.msg} (column {record.colno})")
            records.append(_checked_record(*qa_format.question_and_answers(record)))
        except ValueError as error:
            problem = f"{path}:{line}: {error}"
            if not skip_bad_records:
                raise MalformedRecordError(f"{problem} (a {qa_format.name} record; set skip_bad_records, or "
                                           "T5X_LITE_SKIP_BAD_RECORDS=1, to skip and count such records)") from error
            skipped.append(problem)
    if skipped:
        logging.warning("Skipped %d malformed record(s) of %s, keeping %d; the first: %s",
                        len(skipped), path, len(records), "; ".join(skipped[:5]))
    return records


# ---------------------------------------------------------------------------------------------------------------
# The local data source

_SPLIT = re.compile(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?")


def parse_split(split: str) -> list[tuple[str, slice]]:
    """A TFDS-style split string -> its parts, (source split, slice) each: 'train' -> [('train', slice(None))],
    'train[:79168]' -> [('train', slice(None, 79168))], 'train+validation' -> [('train', ...), ('validation', ...)].
    """
    parts = []
    for part in split.replace(" ", "").split("+"):
        match = _SPLIT.fullmatch(part)
        if match is None:
            raise ValueError(f"Unsupported split {split!r}; valid forms: 'name', 'name[start:stop]' (record counts), "
                             "and such parts joined by '+'.")
        name, start, stop = match.groups()
        parts.append((name, slice(int(start) if start else None, int(stop) if stop else None)))
    return parts


class QAFileSource(seqio.DataSource):
    """Closed-book QA records {"question": string[], "answers": string[answers]} from release files on disk.

    Args:
      directory: the dataset's folder.
      files: for each source split (TFDS's split names), the candidate (glob pattern, format)s in order of
        preference: the first pattern that matches any file gives the split's files (in name order).
      splits: the task's splits as TFDS split strings over the source splits, e.g. {"validation": "train[79168:]",
        "train": "train+validation"}.
      skip_bad_records: skip (and count) malformed records instead of stopping at the first.
    """

    def __init__(self, directory: str, files: Mapping[str, Sequence[tuple[str, QAFormat]]],
                 splits: Mapping[str, str], skip_bad_records: bool = False):
        for task_split, split_string in splits.items():
            for source_split, _ in parse_split(split_string):
                if source_split not in files:
                    raise ValueError(f"Split {task_split!r} reads {split_string!r}, but the local files have only the "
                                     f"splits {sorted(files)}.")
        super().__init__(splits=splits.keys())
        self.directory = directory
        self._files = dict(files)
        self._split_strings = dict(splits)
        self._skip_bad_records = skip_bad_records
        self._loaded: dict[str, list[tuple[str, tuple[str, ...]]]] = {}

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"QAFileSource(directory={self.directory!r}, splits={self._split_strings})"

    def _source_files(self, source_split: str) -> tuple[list[str], QAFormat]:
        candidates = self._files[source_split]
        for pattern, qa_format in candidates:
            found = sorted(tf.io.gfile.glob(os.path.join(self.directory, pattern)))
            if found:
                return found, qa_format
        raise FileNotFoundError(
            f"No {source_split!r} file in {self.directory}: looked for {[pattern for pattern, _ in candidates]}.")

    def list_shards(self, split: str) -> Sequence[str]:
        return [path for source_split, _ in parse_split(self._split_strings[split])
                for path in self._source_files(source_split)[0]]

    def _source_records(self, source_split: str) -> list[tuple[str, tuple[str, ...]]]:
        if source_split not in self._loaded:
            paths, qa_format = self._source_files(source_split)
            self._loaded[source_split] = [
                record for path in paths for record in load_qa_file(path, qa_format, self._skip_bad_records)]
        return self._loaded[source_split]

    def records(self, split: str) -> list[tuple[str, tuple[str, ...]]]:
        """The split's (question, answers) records, in file order (the parts of 'a+b' one after the other)."""
        parts = parse_split(self._split_strings[split])
        selected = [record for source_split, part in parts for record in self._source_records(source_split)[part]]
        if not selected:
            sizes = {source_split: len(self._source_records(source_split)) for source_split, _ in parts}
            raise ValueError(f"Split {split!r} = {self._split_strings[split]!r} of {self.directory} is empty: the "
                             f"source splits have {sizes} records.")
        return selected

    def num_input_examples(self, split: str) -> int:
        return len(self.records(split))

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # unused: part of seqio's DataSource interface
        records = self.records(split)
        questions = tf.constant([question for question, _ in records])
        answers = tf.RaggedTensor.from_row_lengths(
            tf.constant([answer for _, record_answers in records for answer in record_answers], tf.string),
            [len(record_answers) for _, record_answers in records])
        # Shuffle indices rather than records: a checkpoint of the pipeline then stores 8 bytes per record.
        indices = tf.data.Dataset.range(len(records))
        if shard_info:
            indices = indices.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            indices = indices.shuffle(len(records), seed=seed)
        return indices.map(lambda i: {"question": tf.gather(questions, i), "answers": answers[i]})


# ---------------------------------------------------------------------------------------------------------------
# The datasets and their tasks


def _from_tfds_question_answer(dataset: tf.data.Dataset, answers_key: str) -> tf.data.Dataset:
    return dataset.map(lambda ex: {"question": ex["question"], "answers": ex[answers_key]},
                       num_parallel_calls=tf.data.AUTOTUNE)


def _from_tfds_trivia_qa(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(
        lambda ex: {"question": ex["question"],
                    "answers": tf.concat([[ex["answer"]["value"]], ex["answer"]["aliases"]], axis=0)},
        num_parallel_calls=tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class QADataset:
    """One closed-book QA dataset: where it lives (TFDS and local files), its tasks' splits, prefix and metric."""

    task_name: str
    tfds_name: str
    local_folder: str  # under <data dir>/cbqa/
    local_files: Mapping[str, Sequence[tuple[str, QAFormat]]]  # TFDS split -> (pattern, format) candidates
    splits: Mapping[str, str]  # the task's split -> TFDS split string (t5_closed_book_qa's)
    test_splits: Mapping[str, str]  # the same of the _test task
    prefix: str
    from_tfds: Callable[[tf.data.Dataset], tf.data.Dataset]  # TFDS features -> {question, answers}
    metric_fn: Callable[[Sequence, Sequence], dict[str, float]]


NATURAL_QUESTIONS = QADataset(
    task_name="natural_questions_open", tfds_name="natural_questions_open:1.0.0",
    local_folder="natural_questions_open",
    local_files={"train": [("NQ-open.train.jsonl", QA_JSONL)], "validation": [("NQ-open.dev.jsonl", QA_JSONL)]},
    splits={"train": "train[:79168]", "validation": "train[79168:]", "test": "validation"},
    # The reference names no splits here: TFDS's own, train and validation.
    test_splits={"train": "train", "validation": "validation"},
    prefix="nq question: ",
    from_tfds=functools.partial(_from_tfds_question_answer, answers_key="answer"), metric_fn=metrics.squad,
)
WEB_QUESTIONS = QADataset(
    task_name="web_questions_open", tfds_name="web_questions:1.0.0", local_folder="web_questions",
    local_files={
        "train": [("train.examples.json", WEB_QUESTIONS_JSON), ("train.jsonl", QA_JSONL)],
        "test": [("test.examples.json", WEB_QUESTIONS_JSON), ("test.jsonl", QA_JSONL)],
    },
    splits={"train": "train[:3417]", "validation": "train[3417:]", "test": "test"},
    test_splits={"train": "train", "validation": "test"},
    prefix="wq question: ",
    from_tfds=functools.partial(_from_tfds_question_answer, answers_key="answers"), metric_fn=metrics.squad,
)
TRIVIA_QA = QADataset(
    task_name="trivia_qa_open", tfds_name="trivia_qa/unfiltered.nocontext:1.1.0", local_folder="trivia_qa",
    local_files={
        "train": [("unfiltered-web-train.json", TRIVIA_QA_JSON), ("train.jsonl", QA_JSONL)],
        "validation": [("unfiltered-web-dev.json", TRIVIA_QA_JSON), ("validation*.jsonl", QA_JSONL)],
        "test": [("unfiltered-web-test-without-answers.json", TRIVIA_QA_TEST_JSON), ("test*.jsonl", QA_JSONL)],
    },
    splits={"train": "train[:78785]", "validation": "train[78785:]", "test": "validation"},
    # Trains on train and validation; its test answers are withheld (TFDS: "<unk>"), for the leaderboard.
    test_splits={"train": "train+validation", "test": "test"},
    prefix="trivia_qa question: ",
    from_tfds=_from_tfds_trivia_qa, metric_fn=metrics.trivia_qa,
)
DATASETS = (NATURAL_QUESTIONS, WEB_QUESTIONS, TRIVIA_QA)


def qa_source(dataset: QADataset, splits: Mapping[str, str], data_dir: str | None,
              skip_bad_records: bool = False) -> seqio.DataSource:
    """The local release files when data_dir has cbqa/<dataset.local_folder>/, else TFDS."""
    if data_dir is not None:
        directory = os.path.join(data_dir, "cbqa", dataset.local_folder)
        if tf.io.gfile.isdir(directory):
            return QAFileSource(directory, dataset.local_files, splits, skip_bad_records)
    return seqio.TfdsDataSource(tfds_name=dataset.tfds_name, splits=dict(splits))


def register_cbqa_tasks(data_dir: str | None, vocabulary: seqio.Vocabulary, skip_bad_records: bool = False,
                        suffix: str = "") -> None:
    """Registers <task>{suffix} and <task>_test{suffix} for the three datasets, and the mixtures
    closed_book_qa{suffix} and closed_book_qa_test{suffix}."""
    output_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    for variant, splits_of in (("", lambda d: d.splits), ("_test", lambda d: d.test_splits)):
        for dataset in DATASETS:
            source = qa_source(dataset, splits_of(dataset), data_dir, skip_bad_records)
            from_source = [] if isinstance(source, QAFileSource) else [dataset.from_tfds]
            seqio.TaskRegistry.add(
                f"{dataset.task_name}{variant}{suffix}",
                source=source,
                preprocessors=[
                    *from_source,
                    functools.partial(preprocessors.closed_book_qa, prefix=dataset.prefix),
                    seqio.preprocessors.tokenize,
                    seqio.CacheDatasetPlaceholder(),
                    seqio.preprocessors.append_eos_after_trim,
                ],
                output_features=output_features,
                postprocess_fn=metrics.qa_postprocessor,
                metric_fns=[dataset.metric_fn],
            )
        seqio.MixtureRegistry.add(
            f"closed_book_qa{variant}{suffix}",
            [f"{dataset.task_name}{variant}{suffix}" for dataset in DATASETS],
            default_rate=seqio.mixing_rate_num_examples,
        )


register_cbqa_tasks(settings.data_dir(), settings.t5_vocabulary(), settings.skip_bad_records())
