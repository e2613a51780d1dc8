"""T0's prompted tasks: the release-format readers (on small files written here), TFDS conversions, the mixing rate
cap, rank classification on constructed scores, a user's own prompted dataset in one call, and (with the shared data)
the built-in datasets and a tiny model trained on t0_train and evaluated zero-shot on t0_eval_score_eval."""
import json
import os
import statistics

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks  # noqa: F401  (registers the built-in tasks)
from t5x_lite import eval as eval_lib
from t5x_lite import gin_utils, metrics, preprocessors, prompts, train
from tasks import settings, t0
from tasks.cbqa import MalformedRecordError

ScoredChoice = metrics.ScoredChoice


def write(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def has_t0_data() -> bool:
    local = settings.data_dir()
    return bool(local) and os.path.isdir(os.path.join(local, "t0"))


needs_t0_data = pytest.mark.skipif(not has_t0_data(), reason="the T0 data files (../shared/data/t0) are not here")


# ---- the release formats ----------------------------------------------------------------------------------------


def test_readers_of_the_release_formats(tmp_path):
    assert t0.read_sst2(write(tmp_path / "stsa.binary.train", "1 a gorgeous film .\n\n0 a dull mess .\n")) == [
        {"sentence": "a gorgeous film .", "label": 1, "idx": 0}, {"sentence": "a dull mess .", "label": 0, "idx": 1}]

    ag_news = write(tmp_path / "test.csv", 'Class Index,Title,Description\n3,Fears for pension,"Unions say, at last:\n'
                                           'they are disappointed."\n4,Space race,A second team.\n')
    assert t0.read_ag_news(ag_news) == [
        {"text": "Fears for pension Unions say, at last:\nthey are disappointed.", "title": "Fears for pension",
         "description": "Unions say, at last:\nthey are disappointed.", "label": 2},
        {"text": "Space race A second team.", "title": "Space race", "description": "A second team.", "label": 3}]

    # The original release is not UTF-8: its one stray byte becomes a space, as in TFDS.
    trec = write(tmp_path / "train.txt", b"LOC:city Which city has a sister\xf0city ?\nHUM:ind Who was Galileo ?", "wb")
    assert t0.read_trec(trec) == [
        {"text": "Which city has a sister city ?", "coarse_label": 4, "fine_label": 32},
        {"text": "Who was Galileo ?", "coarse_label": 3, "fine_label": 29}]

    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for byte_order_mark in ("\ufeff", "\ufeff".encode().decode("latin-1")):  # a real one, and one encoded twice
        mrpc = write(tmp_path / "msr_paraphrase_train.txt", f"{byte_order_mark}{header}1\t70\t71\tA said .\tA told .\n")
        assert t0.read_mrpc(mrpc) == [{"sentence1": "A said .", "sentence2": "A told .", "label": 1, "idx": 0}]

    cb = write(tmp_path / "cb.jsonl", '{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 7}\n')
    assert t0.CB.read(cb) == [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 7}]
    copa = write(tmp_path / "copa.jsonl", json.dumps({"premise": "p", "choice1": "a", "choice2": "b",
                                                      "question": "cause", "label": 1, "idx": 0}) + "\n")
    assert t0.COPA.read(copa)[0]["label"] == 1


@pytest.mark.parametrize("reader, text, error", [
    (t0.read_sst2, "1 fine .\n2 what ?\n", r"stsa:2: expected '<0\|1> sentence', got '2 what \?'"),
    (t0.read_ag_news, "Class Index,Title,Description\n1,a,b\n5,c,d\n", r"stsa:3: expected 'class \(1-4\),title,"),
    (t0.read_ag_news, "1,a,b\n2,only two\n", r"stsa:2: expected 'class \(1-4\),title,description', got \['2'"),
    (t0.read_trec, "LOC:city Where ?\nLOC:planet Where else ?\n", r"stsa:2: expected 'COARSE:fine question'"),
    (t0.read_trec, b"NUM:date When ?\nNUM:date \xff ?\n", r"stsa:2: not UTF-8 text"),
    (t0.read_mrpc, "Quality\tA\n", r"stsa:1: expected the header row"),
    (t0.read_mrpc, "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t2\t3\tonly one\n", r"stsa:2: expected 5 tab"),
    (t0.RTE.read, '{"premise": "p", "hypothesis": "h", "label": "entailment"}\n{"premise": "p", "hypothesis": "h", '
                  '"label": "contradiction"}\n', r"stsa:2: label 'contradiction' is not one of \['entailment', "
                                                 r"'not_entailment'\]"),
    (t0.RTE.read, '{"premise": "p", "label": "entailment"}\n', r"stsa:1: no field 'hypothesis'"),
    (t0.COPA.read, '{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}\n',
     r"stsa:1: 'question' must be one of \['cause', 'effect'\], got 'why'"),
    (t0.COPA.read, '{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": true}\n',
     r"stsa:1: label True is not one of \[0, 1\]"),
    (t0.read_jsonl, '{"a": 1}\n{"a": 2\n', r"stsa:2: bad JSON: Expecting ',' delimiter"),
    (t0.read_jsonl, '[1, 2]\n', r"stsa:1: expected a JSON object, got \[1, 2\]"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, reader, text, error):
    path = write(tmp_path / "stsa", text, "wb" if isinstance(text, bytes) else "w")
    with pytest.raises(MalformedRecordError, match=error):
        reader(path)


def test_the_release_files_or_else_tfds(tmp_path):
    write(tmp_path / "t0" / "ag_news" / "test.csv", "".join(f"{1 + i % 4},title {i},text {i}\n" for i in range(7010)))
    read, where = t0.t0_reader(t0.AG_NEWS, str(tmp_path))
    assert where == str(tmp_path / "t0" / "ag_news")
    train_split, validation = read("train"), read("validation")
    assert len(train_split) == 7000 and [e["title"] for e in validation] == [f"title {i}" for i in range(7000, 7010)]
    _, where = t0.t0_reader(t0.RTE, str(tmp_path))
    assert where.startswith("TFDS super_glue/rte:1.0.2")


def test_tfds_examples_take_the_same_fields_and_labels():
    """TFDS's features (random examples made from the builders' own feature specs) map onto the release readers'
    fields; TFDS's class labels are renumbered by name."""
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        for dataset, fields in ((t0.SST2, {"sentence", "label", "idx"}),
                                (t0.AG_NEWS, {"text", "title", "description", "label"}),
                                (t0.MRPC, {"sentence1", "sentence2", "label", "idx"}),
                                (t0.RTE, {"premise", "hypothesis", "label", "idx"}),
                                (t0.CB, {"premise", "hypothesis", "label", "idx"}),
                                (t0.COPA, {"premise", "choice1", "choice2", "question", "label", "idx"})):
            examples = t0.read_tfds(dataset.tfds_name, dataset.tfds_splits["train"], dataset.from_tfds)
            assert len(examples) == 2 and all(set(e) == fields for e in examples), dataset.name
            assert all(isinstance(e["label"], int) for e in examples)
        cb_label = tfds.builder(t0.CB.tfds_name).info.features["label"]
        assert t0.CB.from_tfds({"label": cb_label.str2int("neutral")}, tfds.builder(t0.CB.tfds_name).info) == {
            "label": t0.CB_LABELS.index("neutral")}

        trec_info = tfds.builder(t0.TREC.tfds_name).info
        example = {"text": "Where is Lima ?", "label-coarse": trec_info.features["label-coarse"].str2int("LOC"),
                   "label-fine": trec_info.features["label-fine"].str2int("city")}
        assert t0.TREC.from_tfds(example, trec_info) == {"text": "Where is Lima ?", "coarse_label": 4,
                                                         "fine_label": 32}
        with pytest.raises(ValueError, match="has the label 'NUM:animal', not one of TREC's 50"):
            t0.TREC.from_tfds({**example, "label-coarse": trec_info.features["label-coarse"].str2int("NUM"),
                               "label-fine": trec_info.features["label-fine"].str2int("animal")}, trec_info)


# ---- mixing rates ------------------------------------------------------------------------------------------------


def test_t0_mixing_rate_caps_large_datasets():
    assert t0.t0_mixing_rate(6920, num_templates=4) == 6920
    assert t0.t0_mixing_rate(500_000, num_templates=4) == 500_000  # at the cap: not capped
    assert t0.t0_mixing_rate(500_001, num_templates=4) == 125_000
    assert t0.t0_mixing_rate(3_000_000, num_templates=10) == 50_000
    with pytest.raises(ValueError, match="num_templates 0 >= 1"):
        t0.t0_mixing_rate(10, num_templates=0)


# ---- rank classification -----------------------------------------------------------------------------------------


def test_rank_classification_expands_an_example_into_its_choices():
    dataset = tf.data.Dataset.from_tensor_slices({
        "inputs": ["Q1", "Q2"], "targets": ["b", "z"],
        "answer_choices": tf.ragged.constant([["a", "b"], ["x", "y", "z"]]), "idx": tf.constant([4, 9], tf.int64)})
    rows = list(preprocessors.rank_classification(dataset).as_numpy_iterator())
    assert [(r["inputs"], r["targets"], r["idx"].tolist(), r["num_choices"], r["is_correct"]) for r in rows] == [
        (b"Q1", b"a", [4, 0], 2, False), (b"Q1", b"b", [4, 1], 2, True),
        (b"Q2", b"x", [9, 0], 3, False), (b"Q2", b"y", [9, 1], 3, False), (b"Q2", b"z", [9, 2], 3, True)]


def test_rank_classification_accuracy_on_constructed_scores():
    rows = [  # (example, choice, choices, correct), score
        (ScoredChoice(0, 0, 2, False), -3.0), (ScoredChoice(0, 1, 2, True), -1.0),  # best is correct
        (ScoredChoice(1, 0, 3, True), -2.0), (ScoredChoice(1, 1, 3, False), -1.0),  # best is wrong
        (ScoredChoice(1, 2, 3, False), -5.0),
        (ScoredChoice(2, 0, 2, True), -1.5), (ScoredChoice(2, 1, 2, False), -1.5),  # a tie: the first choice wins
    ]
    targets, scores = zip(*rows)
    assert metrics.rank_classification(targets, scores) == {"accuracy": pytest.approx(200 / 3)}
    order = [6, 2, 0, 5, 3, 1, 4]  # rows in any order
    assert metrics.rank_classification([targets[i] for i in order], [scores[i] for i in order]) == {
        "accuracy": pytest.approx(200 / 3)}
    assert metrics.rank_classification(targets[:2], [-1.0, -3.0]) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match=r"Example 1 has the choices \[0, 1\] scored, but it has 3"):
        metrics.rank_classification(targets[:4], scores[:4])
    with pytest.raises(ValueError, match="Example 0 has no correct choice among its 2"):
        metrics.rank_classification([ScoredChoice(0, 0, 2, False), ScoredChoice(0, 1, 2, False)], [-1.0, -2.0])
    example = {"idx": np.array([3, 1], np.int32), "num_choices": np.int32(2), "is_correct": np.bool_(True)}
    assert metrics.rank_classification_postprocessor("b", example, is_target=True) == ScoredChoice(3, 1, 2, True)
    assert metrics.rank_classification_postprocessor("b", example, is_target=False) == "b"


def test_median_accuracy_by_dataset():
    results = {"super_glue_rte_GPT_3_style_score_eval": {"accuracy": 50.0},
               "super_glue_rte_must_be_true_score_eval": {"accuracy": 70.0},
               "super_glue_rte_does_it_follow_that_score_eval": {"accuracy": 60.0},
               "super_glue_cb_GPT_3_style_score_eval": {"accuracy": 30.0},
               "super_glue_cb_should_assume_score_eval": {"accuracy": 40.0},
               "glue_sst2_great_or_terrible": {"accuracy": 99.0}}  # decoded, not ranked: not in T0's report
    assert t0.median_accuracy_by_dataset(results) == {
        "super_glue_cb": {"median_accuracy": 35.0, "accuracy": {"GPT-3 style": 30.0, "should assume": 40.0}},
        "super_glue_rte": {"median_accuracy": 60.0, "accuracy": {"GPT-3 style": 50.0, "does it follow that": 60.0,
                                                                "must be true": 70.0}}}


# T0's task names (bigscience-workshop/t-zero, t0/seqio_tasks/utils.py: get_task_name(dataset, subset, template)),
# of the promptsource datasets T0 used: glue/sst2, ag_news, trec, glue/mrpc, super_glue/{rte,cb,copa}.
T0_NAMES = {
    "glue_sst2": ["glue_sst2_positive_or_negative", "glue_sst2_did_the_reviewer_like_it", "glue_sst2_great_or_terrible",
                  "glue_sst2_write_a_review"],
    "ag_news": ["ag_news_classify_with_options", "ag_news_newspaper_section", "ag_news_recommend_to",
                "ag_news_write_a_headline"],
    "trec": ["trec_which_category_best_describes", "trec_expected_answer_type", "trec_is_the_answer_a_person",
             "trec_kind_of_place"],
    "glue_mrpc": ["glue_mrpc_paraphrase", "glue_mrpc_same_meaning", "glue_mrpc_replace",
                  "glue_mrpc_generate_a_paraphrase"],
    "super_glue_rte": ["super_glue_rte_does_it_follow_that", "super_glue_rte_GPT_3_style",
                       "super_glue_rte_must_be_true", "super_glue_rte_justified_in_saying"],
    "super_glue_cb": ["super_glue_cb_always_sometimes_never", "super_glue_cb_GPT_3_style",
                      "super_glue_cb_guaranteed_possible_impossible", "super_glue_cb_should_assume"],
    "super_glue_copa": ["super_glue_copa_cause_or_effect", "super_glue_copa_best_option",
                        "super_glue_copa_because_or_so", "super_glue_copa_more_likely"],
}


def test_the_built_in_tasks_have_t0s_names():
    for dataset in (*t0.TRAIN_DATASETS, *t0.EVAL_DATASETS):
        templates = t0.read_templates(os.path.join(t0.TEMPLATES_DIR, f"{dataset.folder}.yaml"))
        # T0's <dataset>_<subset>: the promptsource dataset and subset its template file names.
        assert dataset.name == "_".join(filter(None, (templates.dataset, templates.subset)))
        assert sorted(task.name for task in seqio.get_mixture_or_task(dataset.name).tasks) == sorted(
            T0_NAMES[dataset.name])
    assert sorted(task.name for task in seqio.get_mixture_or_task("t0_train").tasks) == sorted(
        name for dataset in ("glue_sst2", "ag_news", "trec", "glue_mrpc") for name in T0_NAMES[dataset])
    assert sorted(task.name for task in seqio.get_mixture_or_task("super_glue_rte_score_eval").tasks) == [
        "super_glue_rte_GPT_3_style_score_eval", "super_glue_rte_does_it_follow_that_score_eval",
        "super_glue_rte_justified_in_saying_score_eval", "super_glue_rte_must_be_true_score_eval"]
    assert {task.source.dataset.name for task in seqio.get_mixture_or_task("t0_eval_score_eval").tasks} == {
        "super_glue_rte", "super_glue_cb", "super_glue_copa"}


def test_the_built_in_tasks_feed_inputs_without_eos_as_t0_did():
    """T0's output features (t0/seqio_tasks/tasks.py): inputs add_eos=False, targets add_eos=True."""
    for name in ("glue_sst2_great_or_terrible", "super_glue_rte_GPT_3_style_score_eval"):
        features = seqio.get_mixture_or_task(name).output_features
        assert (features["inputs"].add_eos, features["targets"].add_eos) == (False, True), name


# ---- your own dataset ----------------------------------------------------------------------------------------------

REVIEW_TEMPLATES = """\
dataset: reviews
templates:
  r1: !Template
    id: r1
    name: good or bad
    jinja: '{{ text }} Good or bad? ||| {{ label }}'
    answer_choices: good ||| bad
    metadata: !TemplateMetadata
      original_task: true
      metrics: [Accuracy]
  r2: !Template
    id: r2
    name: liked it
    jinja: 'Review: {{ text }} Did they like it? ||| {{ answer_choices[0 if label == "good" else 1] }}'
    answer_choices: Yes ||| No
    metadata: !TemplateMetadata
      original_task: false
      metrics: [Accuracy]
  r3: !Template
    id: r3
    name: write one
    jinja: '{% if label == "good" %}Write a good review. ||| {{ text }}{% endif %}'
"""


@pytest.fixture
def review_files(tmp_path):
    reviews = [("Loved it.", "good"), ("Awful.", "bad"), ("Great fun.", "good"), ("Dull.", "bad"),
               ("Superb.", "good"), ("Too long.", "bad")]
    write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in reviews))
    write(tmp_path / "dev.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in reviews[:3]))
    write(tmp_path / "templates.yaml", REVIEW_TEMPLATES)
    return tmp_path


@pytest.fixture
def registered():
    """Registers through `register`, and removes what it registered afterwards."""
    done = []

    def register(*args, **kwargs):
        done.append(t0.register_prompted_dataset(*args, vocabulary=seqio.ByteVocabulary(), **kwargs))
        return done[-1]

    yield register
    for prompted in done:
        for name in prompted.mixtures:
            seqio.MixtureRegistry.remove(name)
        for name in (*prompted.tasks, *prompted.score_eval_tasks):
            seqio.TaskRegistry.remove(name)


def examples(task_name, split="validation"):
    dataset = seqio.get_mixture_or_task(task_name).get_dataset(None, split=split, shuffle=False)
    return list(dataset.as_numpy_iterator())


def test_your_own_prompted_dataset_in_one_call(review_files, registered):
    prompted = registered("reviews", {"train": str(review_files / "train.jsonl"),
                                      "validation": str(review_files / "dev.jsonl")},
                          templates=str(review_files / "templates.yaml"))
    assert prompted == t0.PromptedTasks(  # <name>_<template name> cleaned as T0 cleans it
        "reviews", ("reviews_good_or_bad", "reviews_liked_it", "reviews_write_one"),
        ("reviews_good_or_bad_score_eval", "reviews_liked_it_score_eval"), ("reviews_good_or_bad_score_eval",),
        ("reviews", "reviews_score_eval"))
    rows = examples("reviews_liked_it")
    assert [(r["inputs_pretokenized"], r["targets_pretokenized"]) for r in rows] == [
        (b"Review: Loved it. Did they like it?", b"Yes"), (b"Review: Awful. Did they like it?", b"No"),
        (b"Review: Great fun. Did they like it?", b"Yes")]
    # As T0 fed them: inputs without EOS, targets ending with it (ByteVocabulary: byte + 3; EOS is 1).
    assert rows[0]["inputs"].tolist() == [b + 3 for b in b"Review: Loved it. Did they like it?"]
    assert rows[0]["targets"].tolist() == [ord(c) + 3 for c in "Yes"] + [1]
    assert [r["targets_pretokenized"] for r in examples("reviews_write_one", "train")] == [
        b"Loved it.", b"Great fun.", b"Superb."]  # the bad reviews render empty: skipped
    scored = examples("reviews_good_or_bad_score_eval")
    assert [(r["targets_pretokenized"], r["idx"].tolist(), r["is_correct"]) for r in scored] == [
        (b"good", [0, 0], True), (b"bad", [0, 1], False), (b"good", [1, 0], False), (b"bad", [1, 1], True),
        (b"good", [2, 0], True), (b"bad", [2, 1], False)]
    assert all(r["inputs_pretokenized"] == b"Loved it. Good or bad?" for r in scored[:2])
    assert [(r["inputs"][-1], r["targets"][-1]) for r in scored[:2]] == [(ord("?") + 3, 1)] * 2  # no EOS, EOS

    mixture = seqio.get_mixture_or_task("reviews")
    assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == {name: 6.0 for name in prompted.tasks}
    assert [task.name for task in seqio.get_mixture_or_task("reviews_score_eval").tasks] == [
        "reviews_good_or_bad_score_eval"]
    templates = str(review_files / "templates.yaml")
    with pytest.raises(ValueError, match="A seqio task or mixture named 'reviews_good_or_bad' is already registered"):
        registered("reviews", {"train": str(review_files / "train.jsonl")}, templates=templates)
    with pytest.raises(FileNotFoundError, match=r"Dataset 'more': no file matches the 'train' patterns \["):
        registered("more", {"train": str(review_files / "nothing*.jsonl")}, templates=templates)
    with pytest.raises(ValueError, match=r"Dataset name 'my reviews' .* letters, digits, '_' and '\.'.*'my_reviews'"):
        registered("my reviews", {"train": str(review_files / "train.jsonl")}, templates=templates)


def test_templates_whose_task_names_clash_register_nothing(review_files, registered):
    clashing = REVIEW_TEMPLATES.replace("name: liked it", "name: good-or-bad")
    write(review_files / "clashing.yaml", clashing)
    with pytest.raises(ValueError, match=r"give the same task names \['clash_good_or_bad', "
                                         r"'clash_good_or_bad_score_eval'\]; rename them"):
        registered("clash", {"train": str(review_files / "train.jsonl")}, templates=str(review_files / "clashing.yaml"))
    assert not [name for name in seqio.TaskRegistry.names() if name.startswith("clash")]
    assert "clash" not in seqio.MixtureRegistry.names()


def test_bad_examples_of_your_dataset_are_named(review_files, registered):
    write(review_files / "dev.jsonl", '{"text": "Fine.", "label": "good"}\n{"text": "Hmm.", "label": "meh"}\n'
                                      '{"label": "bad"}\n')
    write(review_files / "bad.jsonl", '{"text": "Fine.", "label": "good"}\n{"text": "Hmm.",\n')
    registered("quirky", {"validation": str(review_files / "dev.jsonl"), "test": str(review_files / "bad.jsonl")},
               templates=str(review_files / "templates.yaml"))
    with pytest.raises(prompts.TemplateRenderError, match=r"Dataset 'quirky' \(.*\), split 'validation': .*templates"
                                                          r"\.yaml:3: template 'good or bad' \(id r1\): on example 1 "
                                                          r"the target 'meh' is not one of the answer choices"):
        examples("quirky_good_or_bad")
    with pytest.raises(prompts.TemplateRenderError, match=r"split 'validation': .*template 'liked it' \(id r2\) failed "
                                                          r"on example 2: UndefinedError: 'text' is undefined"):
        examples("quirky_liked_it")
    with pytest.raises(MalformedRecordError, match=r"bad.jsonl:2: bad JSON"):
        examples("quirky_liked_it", split="test")


# ---- the built-in datasets and the end-to-end run (need the shared data) -------------------------------------------


@needs_t0_data
def test_the_built_in_datasets_have_the_documented_splits_and_render_everywhere():
    sizes = {"glue_sst2": (6920, 872), "ag_news": (7000, 600), "trec": (5452, 500), "glue_mrpc": (4076, 1725),
             "super_glue_rte": (2490, 277), "super_glue_cb": (250, 56), "super_glue_copa": (32, 100)}
    for name, (train_size, validation_size) in sizes.items():
        sources = [task.source for task in seqio.get_mixture_or_task(name).tasks]
        assert [sources[0].num_input_examples(split) for split in ("train", "validation")] == [train_size,
                                                                                              validation_size]
        for source in sources:  # every template renders every example (or skips it), and its label is a choice
            for split in ("train", "validation"):
                assert source.dataset.rendered(source.template, split)
    train_mixture = seqio.get_mixture_or_task("t0_train")
    assert {task.source.dataset.name: train_mixture.get_rate(task) for task in train_mixture.tasks} == {
        "glue_sst2": 6920, "ag_news": 7000, "trec": 5452, "glue_mrpc": 4076}
    assert len(seqio.get_mixture_or_task("t0_eval_score_eval").tasks) == 12


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@needs_t0_data
def test_tiny_model_trained_on_t0_train_and_evaluated_zero_shot(tmp_path, clean_gin):
    """`train` on t0_train (2 steps, a checkpoint after each), then `eval` of both with gin/runs/t0_eval.gin:
    rank-classification accuracy per template, and per dataset the median over its templates, a line per step."""
    model_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    gin_utils.parse(["models/t5_1_1/tiny.gin", "runs/pretrain.gin"],
                    [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 8",
                     "MIXTURE_OR_TASK_NAME = 't0_train'", "TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 16}",
                     "train.train.log_every_steps = 2", "train.train.checkpoint_period = 1"])
    gin.get_configurable(train.train)()
    gin.clear_config()
    gin_utils.parse(["models/t5_1_1/tiny.gin", "runs/t0_eval.gin"],
                    [f"CHECKPOINT_PATH = '{model_dir / 'checkpoints'}'", f"EVAL_OUTPUT_DIR = '{eval_dir}'",
                     "BATCH_SIZE = 8", "eval.evaluate.num_examples = 12"])  # whole examples: 2 or 3 choices each
    results = gin.get_configurable(eval_lib.evaluate)()

    evaluated = {task.name for task in seqio.get_mixture_or_task("t0_eval_score_eval").tasks}
    assert sorted(results) == [1, 2] and set(results[2]) == evaluated
    for task in evaluated:
        lines = [json.loads(line) for line in (eval_dir / f"{task}-metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [1, 2] and all(0 <= line["accuracy"] <= 100 for line in lines)
        assert len((eval_dir / f"{task}-000002.jsonl").read_text().splitlines()) == 12
    summaries = [json.loads(line) for line in (eval_dir / "t0_eval_score_eval-summary.jsonl").read_text().splitlines()]
    assert [summary["step"] for summary in summaries] == [1, 2]
    summary = summaries[-1]
    assert set(summary) == {"step", "super_glue_rte", "super_glue_cb", "super_glue_copa"}
    for dataset in ("super_glue_rte", "super_glue_cb", "super_glue_copa"):
        accuracies = summary[dataset]["accuracy"]
        assert len(accuracies) == 4
        assert summary[dataset]["median_accuracy"] == statistics.median(accuracies.values())
        for template, accuracy in accuracies.items():
            task = f"{prompts.clean_task_name(f'{dataset}_{template}')}_score_eval"
            assert accuracy == pytest.approx(results[2][task]["accuracy"])
