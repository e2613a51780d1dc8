"""The built-in knowledge base: fictional people, their biographies, and questions about them.

Deterministic for a seed: the same seed gives the same people, the same renderings and the same split.
Every person has a unique name and six attributes (birth date, birth city, university, field of study,
employer, and the employer's city). A biography renders each attribute with one of several paraphrased
sentence templates, in shuffled sentence order; each person gets several different renderings, and each
rendering records the character span of every attribute value (for salient span masking).

People are split into set A (question/answer pairs seen in fine-tuning) and set B (questions only at
evaluation); everyone's biographies are in pretraining.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
from typing import Iterator

import numpy as np
import sentencepiece as spm
import seqio
import tensorflow as tf

from t5x_lite import metrics, preprocessors

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "employer_city")

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# Syllables of invented names: 30 x 30 first names and 36 x 36 last names give 810,000 distinct full names.
_FIRST_START = ("A", "Be", "Ca", "Da", "E", "Fa", "Ga", "Ha", "I", "Ja", "Ka", "La", "Ma", "Na", "O",
                "Pa", "Ra", "Sa", "Ta", "U", "Va", "Wi", "Ya", "Za", "Ce", "De", "Fe", "Le", "Mi", "No")
_FIRST_END = ("lan", "ris", "mon", "dra", "vin", "lia", "ren", "sa", "tor", "na", "bel", "dor", "mi", "ra",
              "lo", "ven", "ka", "nis", "rin", "tha", "del", "ron", "phe", "lis", "mar", "sel", "vo", "nel",
              "gan", "ria")
_LAST_START = ("Var", "Bel", "Cor", "Dun", "Es", "Fal", "Gor", "Hal", "Ith", "Jor", "Kel", "Lor", "Mor",
               "Nor", "Oth", "Pel", "Quil", "Ros", "Sal", "Tor", "Ul", "Vel", "Wes", "Yar", "Zan", "Ash",
               "Brim", "Cal", "Dal", "Em", "Fen", "Gal", "Hart", "Ives", "Kest", "Lind")
_LAST_END = ("row", "ton", "wick", "ley", "mere", "dale", "ford", "ham", "ridge", "wood", "stone", "field",
             "more", "by", "well", "worth", "son", "den", "holt", "cott", "shaw", "brook", "vane", "gate",
             "lin", "sworth", "mont", "croft", "thorpe", "wyn", "bury", "ner", "ick", "al", "ett", "ine")

_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Denver", "Krakow", "Porto", "Dublin", "Quito",
    "Seville", "Tallinn", "Perth", "Leeds", "Hanoi", "Bergen", "Accra", "Turin", "Graz", "Cork",
    "Malmo", "Tunis", "Kyoto", "Dakar", "Genoa", "Riga", "Omaha", "Boise", "Tampa", "Split",
)
_UNIVERSITIES = (
    "Harlow University", "Westbrook College", "the University of Calder", "Northgate Institute",
    "Ashford University", "the Elm Institute of Technology", "Brightwater College", "Ravensworth University",
    "the University of Maren", "Kingsbridge College", "Stonehill University", "the Orrin Institute",
    "Fairhaven University", "Larkspur College", "the University of Tessel", "Holloway Institute",
)
_FIELDS = (
    "astronomy", "botany", "chemistry", "economics", "geology", "history", "linguistics", "mathematics",
    "medicine", "philosophy", "physics", "psychology", "sociology", "architecture", "music", "law",
)
_EMPLOYERS = (
    "Norwell Systems", "Brightline Labs", "Corvane Foods", "Delmar Shipping", "Everpeak Energy",
    "Fenwick Textiles", "Granite Bank", "Halcyon Press", "Ironleaf Motors", "Juniper Health",
    "Kestrel Airlines", "Lumen Optics", "Meridian Steel", "Northstar Insurance", "Oakridge Pharma",
    "Pinecrest Media", "Quarry Robotics", "Redwood Telecom", "Silverline Rail", "Tidewater Chemicals",
)

# Sentence templates per attribute; {name} and {value}. Several paraphrases of each fact.
BIOGRAPHY_TEMPLATES = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The birthday of {name} is {value}.",
        "{name} celebrates a birthday on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent early childhood in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} grew up in {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} attended {value}.",
    ),
    "field": (
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "The field of study of {name} was {value}.",
        "{name} focused on {value} at university.",
    ),
    "employer": (
        "{name} worked for {value}.",
        "{name} was employed by {value}.",
        "{name} had a career at {value}.",
        "{name} took a job at {value}.",
    ),
    "employer_city": (
        "{name} worked in {value}.",
        "{name} had an office in {value}.",
        "The workplace of {name} was in {value}.",
        "{name} commuted to work in {value}.",
    ),
}

QUESTION_TEMPLATES = {
    "birth_date": "When was {name} born?",
    "birth_city": "Where was {name} born?",
    "university": "Which university did {name} attend?",
    "field": "What did {name} study?",
    "employer": "Which company did {name} work for?",
    "employer_city": "Where did {name} work?",
}


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    field: str
    employer: str
    employer_city: str
    in_set_a: bool

    def attribute(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclasses.dataclass(frozen=True)
class Biography:
    """One rendering of a person's biography; spans[attribute] = (start, limit) character offsets of its value."""

    person: str
    text: str
    spans: dict[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class QuestionAnswer:
    person: str
    attribute: str
    question: str
    answer: str


def _unique_names(num_people: int, rng: np.random.Generator) -> list[str]:
    first = [a + b for a, b in itertools.product(_FIRST_START, _FIRST_END)]
    last = [a + b for a, b in itertools.product(_LAST_START, _LAST_END)]
    if num_people > len(first) * len(last):
        raise ValueError(f"num_people={num_people}: at most {len(first) * len(last)} distinct names can be made")
    picks = rng.choice(len(first) * len(last), size=num_people, replace=False)
    return [f"{first[i // len(last)]} {last[i % len(last)]}" for i in picks]


def _random_date(rng: np.random.Generator) -> str:
    month = int(rng.integers(12))
    day = int(rng.integers(1, _DAYS_IN_MONTH[month] + 1))
    year = int(rng.integers(1900, 2000))
    return f"{_MONTHS[month]} {day}, {year}"


def generate_people(num_people: int, seed: int = 0, fraction_in_a: float = 0.5) -> list[Person]:
    """N fictional people with unique names and random attributes; the first round(N * fraction_in_a)
    (in generation order, which is random) form set A."""
    if num_people < 2:
        raise ValueError(f"num_people={num_people}: need at least 2 (one in each of sets A and B)")
    rng = np.random.default_rng(seed)
    names = _unique_names(num_people, rng)
    num_a = int(round(num_people * fraction_in_a))
    pick = lambda options: options[int(rng.integers(len(options)))]
    return [
        Person(
            name=name,
            birth_date=_random_date(rng),
            birth_city=pick(_CITIES),
            university=pick(_UNIVERSITIES),
            field=pick(_FIELDS),
            employer=pick(_EMPLOYERS),
            employer_city=pick(_CITIES),
            in_set_a=i < num_a,
        )
        for i, name in enumerate(names)
    ]


def render_biographies(person: Person, num_renderings: int, rng: np.random.Generator) -> list[Biography]:
    """`num_renderings` biographies of one person: a random paraphrase per attribute, sentences shuffled."""
    out = []
    for _ in range(num_renderings):
        order = rng.permutation(len(ATTRIBUTES))
        text, spans = "", {}
        for index in order:
            attribute = ATTRIBUTES[index]
            templates = BIOGRAPHY_TEMPLATES[attribute]
            template = templates[int(rng.integers(len(templates)))]
            value = person.attribute(attribute)
            before, after = template.split("{value}")
            text = (text + " " if text else "") + before.format(name=person.name)
            spans[attribute] = (len(text), len(text) + len(value))
            text += value + after.format(name=person.name)
        out.append(Biography(person.name, text, spans))
    return out


def questions(person: Person) -> list[QuestionAnswer]:
    return [
        QuestionAnswer(person.name, a, QUESTION_TEMPLATES[a].format(name=person.name), person.attribute(a))
        for a in ATTRIBUTES
    ]


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
    people: list[Person]
    biographies: list[Biography]

    @property
    def set_a(self) -> list[Person]:
        return [p for p in self.people if p.in_set_a]

    @property
    def set_b(self) -> list[Person]:
        return [p for p in self.people if not p.in_set_a]

    def qa_pairs(self, people: list[Person]) -> list[QuestionAnswer]:
        return [qa for p in people for qa in questions(p)]

    def corpus(self) -> Iterator[str]:
        yield from (b.text for b in self.biographies)


def build(num_people: int, seed: int = 0, num_renderings: int = 5) -> KnowledgeBase:
    """The whole knowledge base: people and `num_renderings` biographies each (in a shuffled order)."""
    people = generate_people(num_people, seed)
    rng = np.random.default_rng([seed, 1])
    biographies = [b for p in people for b in render_biographies(p, num_renderings, rng)]
    order = rng.permutation(len(biographies))
    return KnowledgeBase(people, [biographies[i] for i in order])


def train_vocabulary(kb: KnowledgeBase, path: str, vocab_size: int = 1000) -> str:
    """Trains a SentencePiece model (at most `vocab_size` pieces) on the biographies and QA pairs, with T5's
    ids (pad 0, EOS 1, UNK 2, no BOS), and writes it to `path` unless a model is already there; returns
    `path`. Deterministic: one thread, the sentences in a fixed order."""
    if os.path.exists(path):
        return path
    sentences = list(kb.corpus()) + [f"{QA_PREFIX}{qa.question} {qa.answer}" for qa in kb.qa_pairs(kb.people)]
    sentences.append(f"{SSM_PREFIX}{SSM_MASK}")  # the task prompts must tokenize without unknown pieces
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        hard_vocab_limit=False,  # a small knowledge base may not support vocab_size pieces
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(model.getvalue())
    os.replace(temporary, path)  # atomic: a concurrent reader sees no half-written model
    return path


# ------------------------------------------------------------------------------------------------------------
# seqio tasks over the knowledge base.

DEFAULT_NUM_PEOPLE = 500
DEFAULT_SEED = 0
DEFAULT_NUM_RENDERINGS = 10  # 10 renderings rather than 5: set-B EM 56 rather than 42 at the same 600 steps
DEFAULT_VOCAB_SIZE = 1000
QA_PREFIX = "question: "
SSM_PREFIX, SSM_MASK = "nem: ", "_X_"  # T5's closed-book QA conventions for salient span masking


def cache_dir() -> str:
    """Where trained vocabularies are kept: $T5X_LITE_CACHE_DIR, default ~/.cache/t5x_lite."""
    return os.environ.get("T5X_LITE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "t5x_lite")


class KnowledgeBaseVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePiece vocabulary (with 100 extra ids) trained on the knowledge base the first time it is used,
    then read from its cached file."""

    def __init__(self, path: str, kb_args: tuple[int, int, int], vocab_size: int):
        super().__init__(path, extra_ids=100)
        self._kb_args = kb_args
        self._vocab_size_wanted = vocab_size

    def _model_context(self):
        if not self._model:
            train_vocabulary(build(*self._kb_args), self._sentencepiece_model_file, self._vocab_size_wanted)
        return super()._model_context()


def register_bios_tasks(
    num_people: int = DEFAULT_NUM_PEOPLE,
    seed: int = DEFAULT_SEED,
    num_renderings: int = DEFAULT_NUM_RENDERINGS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    prefix: str = "bios",
) -> None:
    """Registers, over one knowledge base:

        {prefix}_span_corruption   T5's span corruption of every biography (needs inputs/targets lengths that
                                   go together, e.g. 128/29)
        {prefix}_ssm               salient span masking: one example per biography with all its attribute values
                                   masked (targets "_X_ value _X_ value ..."; ~45 tokens, so targets length 64)
        {prefix}_cbqa              "question: <q>" -> the answer; splits "train" (set A), "validation" (set B)
                                   and "validation_a" (set A, to see that fine-tuning was learnt)
        {prefix}_pretrain_ssm_qa   a mixture: SSM over everyone plus set A's QA pairs (1 in 4 examples)
        {prefix}_pretrain_span_corruption_qa   the same with span corruption in place of SSM
    """
    kb_args = (num_people, seed, num_renderings)
    vocab_path = os.path.join(
        cache_dir(), "bios", f"bios-n{num_people}-s{seed}-r{num_renderings}-v{vocab_size}.spiece.model"
    )
    vocabulary = KnowledgeBaseVocabulary(vocab_path, kb_args, vocab_size)
    features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }

    def biographies(split, shuffle_files, seed=None):
        del shuffle_files, seed
        kb = build(*kb_args)
        texts = np.array([b.text.encode() for b in kb.biographies])
        starts = tf.ragged.constant([[b.spans[a][0] for a in ATTRIBUTES] for b in kb.biographies], dtype=tf.int32)
        limits = tf.ragged.constant([[b.spans[a][1] for a in ATTRIBUTES] for b in kb.biographies], dtype=tf.int32)
        return tf.data.Dataset.from_tensor_slices({"text": texts, "spans": {"start": starts, "limit": limits}})

    def qa_pairs(split, shuffle_files, seed=None):
        del shuffle_files, seed
        kb = build(*kb_args)
        people = kb.set_a if split in ("train", "validation_a") else kb.set_b
        pairs = kb.qa_pairs(people)
        return tf.data.Dataset.from_tensor_slices({
            "question": np.array([qa.question.encode() for qa in pairs]),
            "answers": np.array([[qa.answer.encode()] for qa in pairs]),
        })

    num_bios = num_people * num_renderings
    seqio.TaskRegistry.add(
        f"{prefix}_span_corruption",
        source=seqio.FunctionDataSource(biographies, splits=["train"], num_input_examples={"train": num_bios}),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            preprocessors.span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        metric_fns=[],
    )
    seqio.TaskRegistry.add(
        f"{prefix}_ssm",
        source=seqio.FunctionDataSource(biographies, splits=["train"], num_input_examples={"train": num_bios}),
        preprocessors=[
            functools.partial(preprocessors.salient_span_masking, prefix=SSM_PREFIX, mask=SSM_MASK,
                              offsets_unit="UTF8_CHAR", mask_all=True),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        metric_fns=[],
    )
    num_a = len([p for p in generate_people(num_people, seed) if p.in_set_a])
    qa_counts = {"train": 6 * num_a, "validation_a": 6 * num_a, "validation": 6 * (num_people - num_a)}
    seqio.TaskRegistry.add(
        f"{prefix}_cbqa",
        source=seqio.FunctionDataSource(qa_pairs, splits=list(qa_counts), num_input_examples=qa_counts),
        preprocessors=[
            functools.partial(preprocessors.closed_book_qa, prefix=QA_PREFIX),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        postprocess_fn=metrics.qa_postprocessor,
        metric_fns=[metrics.squad],
    )
    seqio.MixtureRegistry.add(f"{prefix}_pretrain_ssm_qa", [(f"{prefix}_ssm", 3.0), (f"{prefix}_cbqa", 1.0)])
    seqio.MixtureRegistry.add(
        f"{prefix}_pretrain_span_corruption_qa", [(f"{prefix}_span_corruption", 3.0), (f"{prefix}_cbqa", 1.0)]
    )


register_bios_tasks()
