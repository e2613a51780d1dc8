"""T0: multitask prompted training, and zero-shot evaluation of held-out tasks by rank classification, with T0's
task names and features (bigscience-workshop/t-zero, t0/seqio_tasks/tasks.py and utils.py).

Each dataset's templates (templates/<folder>.yaml, see t5x_lite.prompts) turn its examples into prompts. A dataset's
name is T0's: the promptsource dataset and subset its templates are written for, `<dataset>_<subset>` (glue_sst2,
super_glue_rte) or `<dataset>` (ag_news, trec). Per (dataset, template) one seqio task `<dataset>_<template name>`,
cleaned as T0 cleans it (prompts.clean_task_name: `super_glue_rte_GPT_3_style`), with `inputs` and `targets`,
decoded and scored by its metadata's metrics (`Accuracy`: exact match; `Squad`: EM/F1); for a template with answer
choices also `<task>_score_eval`: one example per choice (the same inputs, the choice as targets, an `is_correct`
flag), scored by the summed log-likelihood of the targets and evaluated by rank classification accuracy. As in T0,
inputs are fed without an EOS token and targets end with one (appended after trimming to the feature length, so that
a target cut to length still ends with EOS; T0 appended it before). Per dataset the mixtures `<dataset>` (its
template tasks, for training) and `<dataset>_score_eval` (the `_score_eval` tasks of its `original_task` templates),
and:

    t0_train              the training clusters: sentiment (glue_sst2), topic (ag_news, trec), paraphrase (glue_mrpc);
                          a template task's rate is its dataset's number of training examples (T0's cap: a dataset
                          of more than 500,000 counts as 500,000 / its number of templates; see t0_mixing_rate)
    t0_eval_score_eval    the held-out NLI (super_glue_rte, super_glue_cb) and sentence-completion (super_glue_copa)
                          sets, their original_task templates, by rank classification; `median_accuracy_by_dataset`
                          reports, as the T0 paper does, each template's accuracy and the median over a dataset's
                          templates

The datasets are read from their original release files under <data dir>/t0/<folder>/ (tasks.settings), else from
TFDS (TFDS_DATA_DIR, as TFDS always does), with these splits (TFDS's in brackets):

    glue_sst2        sst2/stsa.binary.{train,dev}: train 6,920 / validation 872 (glue/sst2:2.0.0 train /
                     validation); the labelled stsa.binary.test is not read
    ag_news          ag_news/test.csv, the only file: train its first 7,000 rows / validation the last 600
                     (ag_news_subset:1.0.0 train / test)
    trec             trec/{train,test}.txt: train 5,452 / validation 500 (trec:1.0.0 train / test)
    glue_mrpc        mrpc/msr_paraphrase_{train,test}.txt: train 4,076 / validation 1,725 (glue/mrpc:2.0.0 train /
                     validation)
    super_glue_rte,  rte/, cb/ {train,val}.jsonl: train / validation (super_glue/rte:1.0.2, super_glue/cb:1.0.2 train /
    super_glue_cb    validation)
    super_glue_copa  copa/fewglue_train32.jsonl / val.jsonl: train 32 / validation 100 (super_glue/copa:1.0.2 train /
                     validation)

Examples take the field names and label ids of the HuggingFace datasets that promptsource's templates are written
for (glue/sst2, ag_news, trec, glue/mrpc, super_glue/*), so those templates apply unchanged. A malformed line of a
data file stops loading with `file:line: what is wrong`; a label outside the dataset's labels is such an error.

Your own dataset, in one call (jsonl of JSON objects by default; templates as above):

    t0.register_prompted_dataset("reviews", {"train": "reviews/train.jsonl", "validation": "reviews/dev.jsonl"},
                                 templates="reviews/templates.yaml")

registers `reviews_<template name>` (cleaned as above), `reviews_<template name>_score_eval` and the mixtures
`reviews` and `reviews_score_eval`; for T0's names of a promptsource dataset, name it as T0 does
(e.g. "super_glue_wic").

Examples are rendered in Python when a task's split is first read (and kept): a template that fails on an example
names the template, the dataset, the split and the example's index; examples it renders empty (promptsource's way
of skipping one) are counted and logged.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import json
import os
import re
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf
from absl import logging

from t5x_lite import metrics, preprocessors, prompts
from tasks import settings
from tasks.cbqa import MalformedRecordError

Example = dict[str, Any]
TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
T0_MAX_EXAMPLES = 500_000

# promptsource's metric names -> the metric functions that implement them.
METRICS = {"Accuracy": metrics.accuracy, "Squad": metrics.squad}


# ---------------------------------------------------------------------------------------------------------------
# The original release formats: each reader maps one file to its examples


# A UTF-8 byte order mark that was decoded as Latin-1 and encoded again (as some copies of MRPC begin).
_MANGLED_BYTE_ORDER_MARK = "\ufeff".encode("utf-8").decode("latin-1")


def _read_text(path: str, stray_bytes: bytes = b"") -> str:
    """A UTF-8 file's text, without a byte order mark. When it is not UTF-8, each of `stray_bytes` becomes a
    space and it is decoded again; a byte that still does not decode is an error naming its line."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        for stray in stray_bytes:
            data = data.replace(bytes([stray]), b" ")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            line = data.count(b"\n", 0, error.start) + 1
            raise MalformedRecordError(f"{path}:{line}: not UTF-8 text ({error.reason})") from error
    return text.removeprefix(_MANGLED_BYTE_ORDER_MARK)


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of the lines that are not blank."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def read_sst2(path: str) -> list[Example]:
    """SST-2 as stsa.binary.*: `<0|1> sentence` a line -> {sentence, label (0 negative, 1 positive), idx}."""
    examples = []
    for line, text in _lines(_read_text(path)):
        label, _, sentence = text.partition(" ")
        if label not in ("0", "1") or not sentence.strip():
            raise MalformedRecordError(f"{path}:{line}: expected '<0|1> sentence', got {_shown(text)}")
        examples.append({"sentence": sentence.strip(), "label": int(label), "idx": len(examples)})
    return examples


AG_NEWS_HEADER = ["Class Index", "Title", "Description"]


def read_ag_news(path: str) -> list[Example]:
    """AG News' CSV `class (1-4),title,description` (with or without the header row) -> {text (title and
    description), title, description, label (0 World, 1 Sports, 2 Business, 3 Sci/Tech)}."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    examples, next_line = [], 1
    while True:
        line = next_line
        try:
            row = next(reader, None)
        except csv.Error as error:
            raise MalformedRecordError(f"{path}:{line}: bad CSV: {error}") from error
        if row is None:
            return examples
        next_line = reader.line_num + 1
        if not row or (line == 1 and row == AG_NEWS_HEADER):
            continue
        if len(row) != 3 or row[0].strip() not in ("1", "2", "3", "4"):
            raise MalformedRecordError(f"{path}:{line}: expected 'class (1-4),title,description', got {_shown(row)}")
        title, description = row[1].strip(), row[2].strip()
        examples.append({"text": f"{title} {description}", "title": title, "description": description,
                         "label": int(row[0]) - 1})


TREC_COARSE = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")  # the trec dataset's label order
TREC_FINE = (
    "ABBR:abb", "ABBR:exp", "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed",
    "ENTY:event", "ENTY:food", "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other", "ENTY:plant", "ENTY:product",
    "ENTY:religion", "ENTY:sport", "ENTY:substance", "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq", "ENTY:veh",
    "ENTY:word", "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason", "HUM:gr", "HUM:ind", "HUM:title", "HUM:desc",
    "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state", "NUM:code", "NUM:count", "NUM:date",
    "NUM:dist", "NUM:money", "NUM:ord", "NUM:other", "NUM:period", "NUM:perc", "NUM:speed", "NUM:temp",
    "NUM:volsize", "NUM:weight",
)


def read_trec(path: str) -> list[Example]:
    """TREC's `COARSE:fine question` a line -> {text, coarse_label, fine_label} (ids in the orders above). The
    original release's one byte that is not UTF-8 ("sister\\xf0city") becomes a space, as in TFDS."""
    examples = []
    for line, text in _lines(_read_text(path, stray_bytes=b"\xf0")):
        label, _, question = text.partition(" ")
        if label not in TREC_FINE or not question.strip():
            raise MalformedRecordError(f"{path}:{line}: expected 'COARSE:fine question' with one of TREC's 50 "
                                       f"labels (e.g. 'LOC:city'), got {_shown(text)}")
        examples.append({"text": question.strip(), "coarse_label": TREC_COARSE.index(label.split(":")[0]),
                         "fine_label": TREC_FINE.index(label)})
    return examples


MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def read_mrpc(path: str) -> list[Example]:
    """MRPC's msr_paraphrase_*.txt: tab-separated, with a header row -> {sentence1, sentence2, label
    (0 not equivalent, 1 equivalent), idx}."""
    rows = list(_lines(_read_text(path)))
    if not rows or rows[0][1].split("\t") != MRPC_HEADER:
        raise MalformedRecordError(f"{path}:{rows[0][0] if rows else 1}: expected the header row "
                                   f"{chr(9).join(MRPC_HEADER)!r}")
    examples = []
    for line, text in rows[1:]:
        fields = text.split("\t")
        if len(fields) != 5 or fields[0] not in ("0", "1") or not fields[3].strip() or not fields[4].strip():
            raise MalformedRecordError(f"{path}:{line}: expected 5 tab-separated fields 'quality (0|1), id, id, "
                                       f"sentence, sentence', got {_shown(text)}")
        examples.append({"sentence1": fields[3].strip(), "sentence2": fields[4].strip(), "label": int(fields[0]),
                         "idx": len(examples)})
    return examples


def _json_objects(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, text in _lines(_read_text(path)):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise MalformedRecordError(f"{path}:{line}: bad JSON: {error.msg} (column {error.colno})") from error
        if not isinstance(record, dict):
            raise MalformedRecordError(f"{path}:{line}: expected a JSON object, got {_shown(record)}")
        yield line, record


def read_jsonl(path: str) -> list[Example]:
    """JSON lines, one object (an example's fields) a line."""
    return [record for _, record in _json_objects(path)]


def read_super_glue(path: str, text_fields: Sequence[str], labels: Sequence[Any],
                    allowed: Mapping[str, Sequence[str]] | None = None) -> list[Example]:
    """SuperGLUE's jsonl -> {text fields..., label (its index in `labels`), idx}; `allowed` restricts text fields
    to some values (COPA's question: cause or effect)."""
    allowed = allowed or {}
    examples = []
    for line, record in _json_objects(path):
        for field in (*text_fields, "label"):
            if field not in record:
                raise MalformedRecordError(f"{path}:{line}: no field {field!r}")
        for field in text_fields:
            if not isinstance(record[field], str) or field in allowed and record[field] not in allowed[field]:
                valid = f"one of {list(allowed[field])}" if field in allowed else "a string"
                raise MalformedRecordError(f"{path}:{line}: {field!r} must be {valid}, got {_shown(record[field])}")
        label = record["label"]
        matches = [i for i, name in enumerate(labels) if type(name) is type(label) and name == label]
        if not matches:
            raise MalformedRecordError(f"{path}:{line}: label {_shown(label)} is not one of {list(labels)}")
        examples.append({**{field: record[field] for field in text_fields}, "label": matches[0],
                         "idx": record.get("idx", len(examples))})
    return examples


# ---------------------------------------------------------------------------------------------------------------
# TFDS: its examples, in the same fields and label ids


def _python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if hasattr(value, "item") else value


def _from_tfds_trec(example: Example, info) -> Example:
    coarse = info.features["label-coarse"].int2str(example["label-coarse"])
    label = f"{coarse}:{info.features['label-fine'].int2str(example['label-fine'])}"
    if label not in TREC_FINE:
        raise ValueError(f"TFDS trec example {_shown(example)} has the label {label!r}, not one of TREC's 50.")
    return {"text": example["text"], "coarse_label": TREC_COARSE.index(coarse), "fine_label": TREC_FINE.index(label)}


def _from_tfds_ag_news(example: Example, info) -> Example:
    return {"text": f"{example['title']} {example['description']}", "title": example["title"],
            "description": example["description"], "label": example["label"]}


def _from_tfds_labelled(example: Example, info, labels: Sequence[str]) -> Example:
    """The example with its TFDS class label replaced by the label's index in `labels`."""
    return {**example, "label": list(labels).index(info.features["label"].int2str(example["label"]))}


def read_tfds(name: str, split: str, from_tfds: Callable[[Example, Any], Example]) -> list[Example]:
    """A TFDS split's examples (from the TFDS data dir; nothing is downloaded), converted by `from_tfds`.

    Raises:
      FileNotFoundError: the TFDS data dir does not hold the dataset.
    """
    import tensorflow_datasets as tfds

    try:
        dataset, info = tfds.load(name, split=split, with_info=True, download=False)
    except AssertionError as error:  # how TFDS says that the data dir does not hold the dataset
        raise FileNotFoundError(f"TFDS {name!r} is not prepared in the TFDS data dir (TFDS_DATA_DIR="
                                f"{os.environ.get('TFDS_DATA_DIR', '<unset>')}): {error}") from error
    return [from_tfds({key: _python(value) for key, value in example.items()}, info)
            for example in tfds.as_numpy(dataset)]


# ---------------------------------------------------------------------------------------------------------------
# The datasets


@dataclasses.dataclass(frozen=True)
class T0Dataset:
    """One built-in dataset: its release files and reader, and its TFDS name and conversion."""

    name: str  # T0's: <promptsource dataset>_<subset> (the header of its template file), or <dataset>
    folder: str  # its release files' folder under <data dir>/t0/, and its template file templates/<folder>.yaml
    read: Callable[[str], list[Example]]  # one release file -> its examples
    files: Mapping[str, str]  # split -> "file" or "file[start:stop]"
    tfds_name: str
    tfds_splits: Mapping[str, str]  # split -> TFDS split
    from_tfds: Callable[[Example, Any], Example]


_SUPER_GLUE_NLI = ("premise", "hypothesis")
_TRAIN_VALIDATION = {"train": "train", "validation": "validation"}

SST2 = T0Dataset("glue_sst2", "sst2", read_sst2, {"train": "stsa.binary.train", "validation": "stsa.binary.dev"},
                 "glue/sst2:2.0.0", _TRAIN_VALIDATION, lambda example, info: example)
AG_NEWS = T0Dataset("ag_news", "ag_news", read_ag_news, {"train": "test.csv[:7000]", "validation": "test.csv[7000:]"},
                    "ag_news_subset:1.0.0", {"train": "train", "validation": "test"}, _from_tfds_ag_news)
TREC = T0Dataset("trec", "trec", read_trec, {"train": "train.txt", "validation": "test.txt"},
                 "trec:1.0.0", {"train": "train", "validation": "test"}, _from_tfds_trec)
MRPC = T0Dataset("glue_mrpc", "mrpc", read_mrpc,
                 {"train": "msr_paraphrase_train.txt", "validation": "msr_paraphrase_test.txt"},
                 "glue/mrpc:2.0.0", _TRAIN_VALIDATION, lambda example, info: example)
RTE_LABELS = ("entailment", "not_entailment")
RTE = T0Dataset("super_glue_rte", "rte",
                functools.partial(read_super_glue, text_fields=_SUPER_GLUE_NLI, labels=RTE_LABELS),
                {"train": "train.jsonl", "validation": "val.jsonl"}, "super_glue/rte:1.0.2", _TRAIN_VALIDATION,
                functools.partial(_from_tfds_labelled, labels=RTE_LABELS))
CB_LABELS = ("entailment", "contradiction", "neutral")
CB = T0Dataset("super_glue_cb", "cb",
               functools.partial(read_super_glue, text_fields=_SUPER_GLUE_NLI, labels=CB_LABELS),
               {"train": "train.jsonl", "validation": "val.jsonl"}, "super_glue/cb:1.0.2", _TRAIN_VALIDATION,
               functools.partial(_from_tfds_labelled, labels=CB_LABELS))
COPA = T0Dataset("super_glue_copa", "copa",
                 functools.partial(read_super_glue, text_fields=("premise", "choice1", "choice2", "question"),
                                   labels=(0, 1), allowed={"question": ("cause", "effect")}),
                 {"train": "fewglue_train32.jsonl", "validation": "val.jsonl"}, "super_glue/copa:1.0.2",
                 _TRAIN_VALIDATION, lambda example, info: example)
TRAIN_DATASETS = (SST2, AG_NEWS, TREC, MRPC)  # T0's training clusters: sentiment, topic, paraphrase
EVAL_DATASETS = (RTE, CB, COPA)  # held out: natural language inference, sentence completion

_FILE_AND_SLICE = re.compile(r"(.+?)(?:\[(-?\d*):(-?\d*)\])?")


def _read_release_split(dataset: T0Dataset, directory: str, split: str) -> list[Example]:
    file, start, stop = _FILE_AND_SLICE.fullmatch(dataset.files[split]).groups()
    examples = dataset.read(os.path.join(directory, file))
    return examples[slice(int(start) if start else None, int(stop) if stop else None)]


def _read_tfds_split(dataset: T0Dataset, split: str) -> list[Example]:
    return read_tfds(dataset.tfds_name, dataset.tfds_splits[split], dataset.from_tfds)


def t0_reader(dataset: T0Dataset, data_dir: str | None) -> tuple[Callable[[str], list[Example]], str]:
    """(split -> examples, where they come from): the release files when data_dir has t0/<folder>/, else TFDS."""
    if data_dir is not None:
        directory = os.path.join(data_dir, "t0", dataset.folder)
        if tf.io.gfile.isdir(directory):
            return functools.partial(_read_release_split, dataset, directory), directory
    where = f"TFDS {dataset.tfds_name} (the data dir {data_dir} has no t0/{dataset.folder})"
    return functools.partial(_read_tfds_split, dataset), where


# ---------------------------------------------------------------------------------------------------------------
# Prompted examples as a seqio data source


class PromptedDataset:
    """A dataset's templates and examples: each split is read once and each (template, split) rendered once,
    shared by the dataset's tasks.

    Args:
      name: the dataset's name, the prefix of its task names.
      templates: its templates.
      read: split -> the split's examples (mappings of field -> value).
      splits: the split names.
      where: where the examples come from (for messages).
    """

    def __init__(self, name: str, templates: prompts.TemplateCollection, read: Callable[[str], list[Example]],
                 splits: Sequence[str], where: str):
        self.name, self.templates, self.splits, self.where = name, templates, tuple(splits), where
        self._read = read
        self._examples: dict[str, list[Example]] = {}
        self._rendered: dict[tuple[str, str], list[tuple[int, prompts.Prompted]]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in self._examples:
            examples = self._read(split)
            if not examples:
                raise ValueError(f"Dataset {self.name!r}: split {split!r} of {self.where} has no examples.")
            self._examples[split] = examples
        return self._examples[split]

    def rendered(self, template: prompts.Template, split: str) -> list[tuple[int, prompts.Prompted]]:
        """(example index, rendering) of the examples that the template does not skip."""
        key = (template.id, split)
        if key not in self._rendered:
            examples, rendered = self.examples(split), []
            for index, example in enumerate(examples):
                try:
                    prompted = template.render(example, index)
                except prompts.TemplateError as error:
                    raise type(error)(f"Dataset {self.name!r} ({self.where}), split {split!r}: {error}") from error
                if prompted is not None:
                    rendered.append((index, prompted))
            if not rendered:
                raise ValueError(f"Dataset {self.name!r}, split {split!r}: template {template.name!r} renders "
                                 f"every one of the {len(examples)} examples empty.")
            if len(rendered) < len(examples):
                logging.info("Dataset %r, split %r: template %r skips %d of %d examples (renders them empty).",
                             self.name, split, template.name, len(examples) - len(rendered), len(examples))
            self._rendered[key] = rendered
        return self._rendered[key]


class PromptedSource(seqio.DataSource):
    """One template's renderings of a dataset: {"inputs", "targets"} strings, and with rank_classification also
    "answer_choices" (string[choices]) and "idx" (the example's index in its split, int64).

    Shuffling permutes the whole split (every epoch anew), so a task needs no shuffle buffer of its own.
    """

    def __init__(self, dataset: PromptedDataset, template: prompts.Template, rank_classification: bool = False):
        if rank_classification and template.answer_choices is None:
            raise ValueError(f"Template {template.name!r} of {dataset.name!r} has no answer choices to rank.")
        super().__init__(splits=dataset.splits, performs_internal_shuffling=True)
        self.dataset, self.template, self.rank_classification = dataset, template, rank_classification

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (f"PromptedSource(dataset={self.dataset.name!r}, template={self.template.name!r}, "
                f"rank_classification={self.rank_classification})")

    def list_shards(self, split: str) -> Sequence[str]:
        return [f"{self.dataset.where} ({split})"]

    def num_input_examples(self, split: str) -> int:
        return len(self.dataset.examples(split))

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # unused: part of seqio's DataSource interface
        rendered = self.dataset.rendered(self.template, split)
        features = {"inputs": tf.constant([p.inputs for _, p in rendered], tf.string),
                    "targets": tf.constant([p.targets for _, p in rendered], tf.string)}
        if self.rank_classification:
            features["answer_choices"] = tf.RaggedTensor.from_row_lengths(
                tf.constant([choice for _, p in rendered for choice in p.answer_choices], tf.string),
                [len(p.answer_choices) for _, p in rendered])
            features["idx"] = tf.constant([index for index, _ in rendered], tf.int64)
        indices = tf.data.Dataset.range(len(rendered))
        if shard_info:
            indices = indices.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            indices = indices.shuffle(len(rendered), seed=seed)
        return indices.map(lambda i: {name: values[i] for name, values in features.items()})


# ---------------------------------------------------------------------------------------------------------------
# Tasks and mixtures


def t0_mixing_rate(num_examples: int, num_templates: int, maximum: int = T0_MAX_EXAMPLES) -> float:
    """T0's mixing rate of one template task: its dataset's number of training examples, except that a dataset of
    more than `maximum` examples counts as maximum / num_templates (T0's code and paper, after T5's cap)."""
    if num_templates < 1 or num_examples < 0:
        raise ValueError(f"num_examples {num_examples} must be >= 0 and num_templates {num_templates} >= 1.")
    return maximum / num_templates if num_examples > maximum else float(num_examples)


def _template_task_rate(task: seqio.Task, num_templates: int) -> float:
    return t0_mixing_rate(task.source.num_input_examples("train"), num_templates)


@dataclasses.dataclass(frozen=True)
class PromptedTasks:
    """What `register_prompted_tasks` registered for one dataset."""

    dataset: str
    tasks: tuple[str, ...]  # one per template
    score_eval_tasks: tuple[str, ...]  # <task>_score_eval, one per template with answer choices
    original_task_score_eval_tasks: tuple[str, ...]  # of those, the original_task templates'
    mixtures: tuple[str, ...]


def _check_unregistered(name: str) -> None:
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        raise ValueError(f"A seqio task or mixture named {name!r} is already registered.")


def _predict_metric_fns(dataset: PromptedDataset, template: prompts.Template) -> list[Callable]:
    unsupported = [name for name in template.metadata.metrics if name not in METRICS]
    if unsupported:
        logging.info("Dataset %r, template %r: no metric implements %s (available: %s); its task is not decoded "
                     "and scored by them.", dataset.name, template.name, unsupported, sorted(METRICS))
    return [METRICS[name] for name in template.metadata.metrics if name in METRICS]


def register_prompted_tasks(dataset: PromptedDataset, vocabulary: seqio.Vocabulary) -> PromptedTasks:
    """Registers the tasks of each of the dataset's templates (see the module's docstring), and the mixtures
    `<dataset>` (when it has a train split; T0's rates) and `<dataset>_score_eval` (when it has original_task
    templates with answer choices).

    Raises:
      ValueError: the dataset's name has characters other than letters, digits, '_' and '.', or a name is taken
        (two templates whose names clean to one, or an earlier registration).
    """
    if prompts.clean_task_name(dataset.name) != dataset.name:
        raise ValueError(f"Dataset name {dataset.name!r} has characters a task name cannot have; valid: letters, "
                         f"digits, '_' and '.' (e.g. {prompts.clean_task_name(dataset.name)!r}).")
    names = {template.id: prompts.clean_task_name(f"{dataset.name}_{template.name}")
             for template in dataset.templates.templates}
    with_choices = [t for t in dataset.templates.templates if t.answer_choices is not None]
    original = tuple(f"{names[t.id]}_score_eval" for t in with_choices if t.metadata.original_task)
    mixtures = ((dataset.name,) if "train" in dataset.splits else ()) + (
        (f"{dataset.name}_score_eval",) if original else ())
    prompted = PromptedTasks(dataset.name, tuple(names.values()),
                             tuple(f"{names[t.id]}_score_eval" for t in with_choices), original, mixtures)
    # Every name is checked before anything is registered, so that a clash leaves the registries as they were.
    all_names = [*prompted.tasks, *prompted.score_eval_tasks, *prompted.mixtures]
    for name in all_names:
        _check_unregistered(name)
    if len(set(all_names)) < len(all_names):
        clashes = sorted({name for name in all_names if all_names.count(name) > 1})
        raise ValueError(f"Templates of {dataset.templates.path} give the same task names {clashes}; rename them.")

    output_features = {"inputs": seqio.Feature(vocabulary, add_eos=False),  # T0's: inputs without EOS
                       "targets": seqio.Feature(vocabulary, add_eos=True)}
    tokenize = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim]
    for template in dataset.templates.templates:
        seqio.TaskRegistry.add(names[template.id], source=PromptedSource(dataset, template), preprocessors=tokenize,
                               output_features=output_features, metric_fns=_predict_metric_fns(dataset, template),
                               shuffle_buffer_size=None)
    for template in with_choices:
        # Shuffled (if ever) with seqio's buffer too: an example's choices are consecutive rows.
        seqio.TaskRegistry.add(
            f"{names[template.id]}_score_eval", source=PromptedSource(dataset, template, rank_classification=True),
            preprocessors=[preprocessors.rank_classification, *tokenize], output_features=output_features,
            postprocess_fn=metrics.rank_classification_postprocessor, metric_fns=[metrics.rank_classification])
    if "train" in dataset.splits:
        rate = functools.partial(_template_task_rate, num_templates=len(prompted.tasks))
        seqio.MixtureRegistry.add(dataset.name, [(task, rate) for task in prompted.tasks])
    if prompted.original_task_score_eval_tasks:
        seqio.MixtureRegistry.add(f"{dataset.name}_score_eval", prompted.original_task_score_eval_tasks,
                                  default_rate=1.0)
    return prompted


def read_templates(path: str) -> prompts.TemplateCollection:
    """A template file (local or any filesystem TensorFlow reads, e.g. gs://)."""
    with tf.io.gfile.GFile(path, "r") as f:
        return prompts.parse_templates(f.read(), path)


def register_prompted_dataset(name: str, splits: Mapping[str, str | Sequence[str]], templates: str, *,
                              read: Callable[[str], list[Example]] = read_jsonl,
                              vocabulary: seqio.Vocabulary | None = None) -> PromptedTasks:
    """Registers prompted tasks of your own dataset, in one call (see `register_prompted_tasks` for what).

    Args:
      name: the dataset's name, the prefix of its tasks' and mixtures' names (letters, digits, '_' and '.'); T0
        names a promptsource dataset `<dataset>_<subset>`, e.g. "super_glue_wic".
      splits: split -> a file pattern (or several), e.g. {"train": "data/train.jsonl", "validation": "data/dev-*"};
        a split's files are read in name order.
      templates: the YAML template file.
      read: one file -> its examples; by default JSON lines (`read_jsonl`), or e.g. `read_super_glue`.
      vocabulary: the tasks' vocabulary (default T5's, tasks.settings.t5_vocabulary()).

    Raises:
      FileNotFoundError: a split's patterns match no file.
      prompts.TemplateError: the template file is bad.
      ValueError: the name is not a valid task name, or a name is taken.
    """
    files = {}
    for split, patterns in splits.items():
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files[split] = [path for pattern in patterns for path in sorted(tf.io.gfile.glob(pattern))]
        if not files[split]:
            raise FileNotFoundError(f"Dataset {name!r}: no file matches the {split!r} patterns {patterns}.")

    def read_split(split: str) -> list[Example]:
        return [example for path in files[split] for example in read(path)]

    where = ", ".join(f"{split}: {paths}" for split, paths in files.items())
    dataset = PromptedDataset(name, read_templates(templates), read_split, list(splits), where)
    return register_prompted_tasks(dataset, vocabulary or settings.t5_vocabulary())


def register_t0(data_dir: str | None, vocabulary: seqio.Vocabulary) -> dict[str, PromptedTasks]:
    """Registers the built-in datasets' tasks and mixtures, and the mixtures t0_train and t0_eval_score_eval."""
    registered = {}
    for dataset in (*TRAIN_DATASETS, *EVAL_DATASETS):
        read, where = t0_reader(dataset, data_dir)
        templates = read_templates(os.path.join(TEMPLATES_DIR, f"{dataset.folder}.yaml"))
        registered[dataset.name] = register_prompted_tasks(
            PromptedDataset(dataset.name, templates, read, list(dataset.files), where), vocabulary)
    seqio.MixtureRegistry.add("t0_train", [
        (task, functools.partial(_template_task_rate, num_templates=len(registered[dataset.name].tasks)))
        for dataset in TRAIN_DATASETS for task in registered[dataset.name].tasks])
    seqio.MixtureRegistry.add(
        "t0_eval_score_eval",
        [task for dataset in EVAL_DATASETS for task in registered[dataset.name].original_task_score_eval_tasks],
        default_rate=1.0)
    return registered


def median_accuracy_by_dataset(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """T0's report of a rank-classification evaluation: per dataset, each template's accuracy and their median.

    Args:
      results: an evaluation's {task: {metric: value}} (eval.InferenceEvaluator.evaluate); only the prompted
        `_score_eval` tasks among them are reported.

    Returns:
      {dataset: {"median_accuracy": float, "accuracy": {template name: float}}}.
    """
    by_dataset = collections.defaultdict(dict)
    for task_name, task_metrics in results.items():
        source = seqio.get_mixture_or_task(task_name).source
        if isinstance(source, PromptedSource) and source.rank_classification:
            by_dataset[source.dataset.name][source.template.name] = float(task_metrics["accuracy"])
    return {dataset: {"median_accuracy": float(statistics.median(accuracies.values())),
                      "accuracy": dict(sorted(accuracies.items()))}
            for dataset, accuracies in sorted(by_dataset.items())}


register_t0(settings.data_dir(), settings.t5_vocabulary())
