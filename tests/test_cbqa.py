"""Closed-book QA tasks: the release-file readers (and their errors), TFDS or local source selection, the splits
(t5_closed_book_qa's, over TFDS and over release files of TFDS's sizes), the registered tasks on the shared data with
gold answers scoring 100, and the mixtures' rates."""
import json
import logging
import os

import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the tasks)
from tasks import cbqa, settings

LENGTHS = {"inputs": 64, "targets": 32}


def shared_cbqa_dir():
    data_dir = settings.data_dir()
    if data_dir is None or not os.path.isdir(os.path.join(data_dir, "cbqa")):
        pytest.skip(f"no local closed-book QA data (T5X_LITE_DATA_DIR, or {settings.DEFAULT_DATA_DIR}, with cbqa/)")
    return os.path.join(data_dir, "cbqa")


@pytest.mark.parametrize("task_name, split, count, answers_that_normalise_to_nothing", [
    ("natural_questions_open", "test", 3610, 3),  # '---', ')' and 'A+' (SQuAD: '+' goes, then the article 'a')
    ("web_questions_open", "test", 2032, 0),
    ("web_questions_open", "train", 3417, 0),
    ("web_questions_open", "validation", 3778 - 3417, 0),
    ("trivia_qa_open", "test", 3000, 1),  # '(a'
    ("natural_questions_open_test", "validation", 3610, 3),
    ("web_questions_open_test", "validation", 2032, 0),
])
def test_shared_files_load_and_gold_answers_score_100(task_name, split, count, answers_that_normalise_to_nothing):
    """The first answer as the prediction: EM 100, and F1 100 but for answers that normalise to nothing (F1 0, as
    in t5's metrics)."""
    shared_cbqa_dir()
    task = seqio.get_mixture_or_task(task_name)
    assert isinstance(task.source, cbqa.QAFileSource), "a local data folder is configured: the task reads it"
    examples = list(task.get_dataset(LENGTHS, split=split, shuffle=False).as_numpy_iterator())
    assert len(examples) == task.num_input_examples(split) == count
    prefix = {"natural": b"nq question: ", "web": b"wq question: ", "trivia": b"trivia_qa question: "}
    assert all(ex["inputs_pretokenized"].startswith(prefix[task_name.split("_")[0]]) for ex in examples)
    assert all(ex["targets_pretokenized"] == ex["answers"][0] for ex in examples)
    targets = [task.postprocess_fn(ex["targets_pretokenized"].decode(), example=ex, is_target=True) for ex in examples]
    predictions = [task.postprocess_fn(answers[0], example=ex) for answers, ex in zip(targets, examples)]
    scores = {}
    for metric_fn in task.metric_fns:
        scores.update(metric_fn(targets, predictions))
    assert scores == {"em": 100.0, "f1": pytest.approx(100 * (1 - answers_that_normalise_to_nothing / count))}


def test_shared_files_first_records():
    shared = shared_cbqa_dir()
    nq = cbqa.load_qa_file(os.path.join(shared, "natural_questions_open", "NQ-open.dev.jsonl"), cbqa.QA_JSONL)
    assert nq[0] == ("when was the last time anyone was on the moon", ("14 December 1972 UTC", "December 1972"))
    wq = cbqa.load_qa_file(os.path.join(shared, "web_questions", "test.examples.json"), cbqa.WEB_QUESTIONS_JSON)
    assert wq[0] == ("what does jamaican people speak?", ("Jamaican Creole English Language", "Jamaican English"))
    assert wq[1] == ("what did james k polk do before he was president?", ("Lawyer",))


def test_the_mixtures_mix_the_three_tasks():
    for name, variant in [("closed_book_qa", ""), ("closed_book_qa_test", "_test")]:
        mixture = seqio.get_mixture_or_task(name)
        assert sorted(task.name for task in mixture.tasks) == sorted(
            f"{dataset.task_name}{variant}" for dataset in cbqa.DATASETS)


@pytest.mark.parametrize("target_value, answers", [
    ('(list (description "Jamaican English") (description Lawyer))', ["Jamaican English", "Lawyer"]),
    ("(list (description Yaotsu))", ["Yaotsu"]),
    ('(list (description "All Around The World (featuring Ludacris)") (description Baby))',
     ["All Around The World (featuring Ludacris)", "Baby"]),
    ('(list (description "Temperance "Tempie" Fitzgerald") (description ""Ye will say I am no Christian""))',
     ['Temperance "Tempie" Fitzgerald', '"Ye will say I am no Christian"']),
])
def test_web_questions_target_values(target_value, answers):
    assert cbqa.parse_web_questions_answers(target_value) == answers


def test_web_questions_bad_target_value():
    with pytest.raises(ValueError, match="not a"):
        cbqa.parse_web_questions_answers("(set Lawyer)")


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


TRIVIA_QA_OFFICIAL = {
    "Domain": "Web", "Version": 1.0, "VerifiedEval": False, "Split": "dev",
    "Data": [
        {"Question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
         "QuestionId": "tc_33", "QuestionSource": "http://www.triviacountry.com/",
         "Answer": {"Value": "Sunset Boulevard", "Aliases": ["Sunset Blvd", "West Sunset Boulevard"],
                    "NormalizedValue": "sunset boulevard", "NormalizedAliases": ["sunset blvd"],
                    "Type": "WikipediaEntity"},
         "EntityPages": [], "SearchResults": []},
        {"Question": "Who was the man behind The Chipmunks?", "QuestionId": "tc_40",
         "Answer": {"Value": "David Seville", "Aliases": ["David Seville"], "Type": "WikipediaEntity"}},
    ],
    "Trailer": {"after": "Data"},
}


def test_trivia_qa_official_json(tmp_path):
    path = write(tmp_path / "unfiltered-web-dev.json", json.dumps(TRIVIA_QA_OFFICIAL, indent=2))
    assert cbqa.load_qa_file(path, cbqa.TRIVIA_QA_JSON) == [
        ("Which Lloyd Webber musical premiered in the US on 10th December 1993?",
         ("Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard")),
        ("Who was the man behind The Chipmunks?", ("David Seville", "David Seville")),
    ]


def test_trivia_qa_json_without_data(tmp_path):
    path = write(tmp_path / "t.json", '{"Version": 1.0,\n "Split": "dev"}')
    with pytest.raises(cbqa.MalformedRecordError, match=r"t\.json:2: no 'Data' list"):
        cbqa.load_qa_file(path, cbqa.TRIVIA_QA_JSON)


BAD_JSONL = b"\n".join([
    b'{"question": "good one", "answer": ["yes"]}',
    b'{"question": "broken", "answer": ["yes"]',
    b'{"answer": ["no question"]}',
    b'{"question": "no answers", "answer": []}',
    b'{"question": "bad bytes \xff", "answer": ["x"]}',
    b'["not an object"]',
    b'{"question": "answers not a list", "answer": "x"}',
    b'',
    b'{"question": "good two", "answer": ["a", "b"]}',
])


@pytest.mark.parametrize("line, problem", [
    (2, "bad JSON"), (3, "missing field 'question'"), (4, "no answers"), (5, "not valid UTF-8"),
    (6, "expected a JSON object"), (7, "not a list")])
def test_each_malformed_record_is_named_by_file_and_line(tmp_path, line, problem):
    # The bad record alone, after blank lines (which the reader skips) to keep its line number.
    path = write(tmp_path / "qa.jsonl", b"\n" * (line - 1) + BAD_JSONL.split(b"\n")[line - 1])
    with pytest.raises(cbqa.MalformedRecordError, match=rf"qa\.jsonl:{line}: .*{problem}"):
        cbqa.load_qa_file(path, cbqa.QA_JSONL)


def test_skipped_records_are_counted_and_logged(tmp_path, caplog):
    path = write(tmp_path / "qa.jsonl", BAD_JSONL)
    with caplog.at_level(logging.WARNING):
        records = cbqa.load_qa_file(path, cbqa.QA_JSONL, skip_bad_records=True)
    assert records == [("good one", ("yes",)), ("good two", ("a", "b"))]
    (message,) = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
    assert f"Skipped 6 malformed record(s) of {path}, keeping 2" in message and "qa.jsonl:2: bad JSON" in message


def test_web_questions_json_records_have_their_lines(tmp_path):
    content = ('[\n  {"url": "u", "targetValue": "(list (description A))", "utterance": "q1"},\n'
               '  {"url": "u", "targetValue": "(list (description B))"},\n'
               '  {"url": "u",\n   "targetValue": "(set)", "utterance": "q3"}\n]\n')
    path = write(tmp_path / "test.examples.json", content)
    with pytest.raises(cbqa.MalformedRecordError, match=r"test\.examples\.json:3: missing field 'utterance'"):
        cbqa.load_qa_file(path, cbqa.WEB_QUESTIONS_JSON)
    assert cbqa.load_qa_file(path, cbqa.WEB_QUESTIONS_JSON, skip_bad_records=True) == [("q1", ("A",))]
    # Broken JSON structure: the rest of the file cannot be read, so this stops loading even when skipping.
    unclosed = write(tmp_path / "unclosed.json", content.replace('"q3"}', '"q3"'))
    with pytest.raises(cbqa.MalformedRecordError, match=r"unclosed\.json:6: bad JSON: Expecting ',' delimiter"):
        cbqa.load_qa_file(unclosed, cbqa.WEB_QUESTIONS_JSON, skip_bad_records=True)
    no_comma = write(tmp_path / "no_comma.json", content.replace('B))"},', 'B))"}'))
    with pytest.raises(cbqa.MalformedRecordError, match=r"no_comma\.json:4: bad JSON: expected one of ',]', found '{'"):
        cbqa.load_qa_file(no_comma, cbqa.WEB_QUESTIONS_JSON, skip_bad_records=True)


def small_release(root, sizes=(5, 4, 3)):
    """A local data folder with cbqa/ files of every format: NQ jsonl, WebQuestions JSON, TriviaQA JSON."""
    nq, wq, tqa = sizes
    for split in ("train", "dev"):
        write(root / "cbqa/natural_questions_open" / f"NQ-open.{split}.jsonl",
              "\n".join(json.dumps({"question": f"nq {split} {i}", "answer": [f"a{i}", "b"]}) for i in range(nq)))
    for split in ("train", "test"):
        write(root / "cbqa/web_questions" / f"{split}.examples.json", json.dumps(
            [{"url": "u", "targetValue": f'(list (description "w {i}") (description x))', "utterance": f"wq {i}"}
             for i in range(wq)]))
    for split in ("train", "dev"):
        data = [{"Question": f"tq {i}", "Answer": {"Value": f"v{i}", "Aliases": [f"al{i}"]}} for i in range(tqa)]
        write(root / "cbqa/trivia_qa" / f"unfiltered-web-{split}.json", json.dumps({"Data": data}))
    return str(root)


# google-research/google-research t5_closed_book_qa/t5_cbqa/tasks.py (the seqio version): each task's TFDS splits.
# natural_questions_open_test names none there, so it has TFDS's own: train and validation.
REFERENCE_SPLITS = {
    "natural_questions_open": {"train": "train[:79168]", "validation": "train[79168:]", "test": "validation"},
    "natural_questions_open_test": {"train": "train", "validation": "validation"},
    "web_questions_open": {"train": "train[:3417]", "validation": "train[3417:]", "test": "test"},
    "web_questions_open_test": {"train": "train", "validation": "test"},
    "trivia_qa_open": {"train": "train[:78785]", "validation": "train[78785:]", "test": "validation"},
    "trivia_qa_open_test": {"train": "train+validation", "test": "test"},
}
TFDS_NAMES = {"natural_questions": "natural_questions_open:1.0.0", "web_questions": "web_questions:1.0.0",
              "trivia_qa": "trivia_qa/unfiltered.nocontext:1.1.0"}


def test_tfds_tasks_read_the_reference_splits():
    cbqa.register_cbqa_tasks(None, seqio.ByteVocabulary(), suffix="_tfds_splits")
    for name, splits in REFERENCE_SPLITS.items():
        source = seqio.get_mixture_or_task(f"{name}_tfds_splits").source
        assert isinstance(source, seqio.TfdsDataSource)
        assert source.tfds_dataset.name == TFDS_NAMES[name.rsplit("_open", 1)[0]]
        # What TFDS is asked for (seqio's own split mapping), without loading anything.
        assert {split: source.tfds_dataset._map_split(split) for split in source.splits} == splits, name


def test_source_selection(tmp_path):
    local_dir = small_release(tmp_path)
    for dataset in cbqa.DATASETS:
        for splits in (dataset.splits, dataset.test_splits):
            assert isinstance(cbqa.qa_source(dataset, splits, data_dir=local_dir), cbqa.QAFileSource)
            assert isinstance(cbqa.qa_source(dataset, splits, data_dir=str(tmp_path / "none")), seqio.TfdsDataSource)
            assert isinstance(cbqa.qa_source(dataset, splits, data_dir=None), seqio.TfdsDataSource)


def test_split_strings():
    assert cbqa.parse_split("train") == [("train", slice(None, None))]
    assert cbqa.parse_split("train[79168:]") == [("train", slice(79168, None))]
    assert cbqa.parse_split("train[:-5] + validation[2:4]") == [("train", slice(None, -5)), ("validation", slice(2, 4))]
    with pytest.raises(ValueError, match=r"Unsupported split 'train\[10%:\]'; valid forms: 'name', "):
        cbqa.parse_split("train[10%:]")
    with pytest.raises(ValueError, match=r"Unsupported split 'train\+'"):
        cbqa.parse_split("train+")


# TFDS's split sizes (natural_questions_open:1.0.0, web_questions:1.0.0, trivia_qa/unfiltered.nocontext:1.1.0), and
# what each task's splits then hold: the README's table.
RELEASE_SIZES = {"natural_questions": {"train": 87925, "validation": 3610},
                 "web_questions": {"train": 3778, "test": 2032},
                 "trivia_qa": {"train": 87622, "validation": 11313, "test": 10832}}
TASK_SPLIT_SIZES = {
    "natural_questions_open": {"train": 79168, "validation": 8757, "test": 3610},
    "natural_questions_open_test": {"train": 87925, "validation": 3610},
    "web_questions_open": {"train": 3417, "validation": 361, "test": 2032},
    "web_questions_open_test": {"train": 3778, "validation": 2032},
    "trivia_qa_open": {"train": 78785, "validation": 8837, "test": 11313},
    "trivia_qa_open_test": {"train": 87622 + 11313, "test": 10832},
}


def release_of_tfds_sizes(root):
    """Release files with TFDS's numbers of records, in every dataset's original format; question i of a split is
    "<split> <i>", so that a task split's first and last questions say which records it holds."""
    sizes = RELEASE_SIZES
    for split, file in (("train", "train"), ("validation", "dev")):
        lines = [json.dumps({"question": f"{split} {i}", "answer": ["a"]}) for i in range(sizes["natural_questions"][split])]
        write(root / "cbqa/natural_questions_open" / f"NQ-open.{file}.jsonl", "\n".join(lines))
    for split in ("train", "test"):
        write(root / "cbqa/web_questions" / f"{split}.examples.json", json.dumps(
            [{"url": "u", "targetValue": "(list (description a))", "utterance": f"{split} {i}"}
             for i in range(sizes["web_questions"][split])]))
    for split, file in (("train", "train"), ("validation", "dev")):
        data = [{"Question": f"{split} {i}", "Answer": {"Value": "v", "Aliases": ["a"]}}
                for i in range(sizes["trivia_qa"][split])]
        write(root / "cbqa/trivia_qa" / f"unfiltered-web-{file}.json", json.dumps({"Data": data}))
    data = [{"Question": f"test {i}", "QuestionId": f"t{i}"} for i in range(sizes["trivia_qa"]["test"])]
    write(root / "cbqa/trivia_qa/unfiltered-web-test-without-answers.json", json.dumps({"Data": data}))
    return str(root)


def test_release_files_give_each_split_the_reference_examples(tmp_path):
    cbqa.register_cbqa_tasks(release_of_tfds_sizes(tmp_path), seqio.ByteVocabulary(), suffix="_release_sizes")
    for name, sizes in TASK_SPLIT_SIZES.items():
        task = seqio.get_mixture_or_task(f"{name}_release_sizes")
        assert isinstance(task.source, cbqa.QAFileSource)
        assert {split: task.num_input_examples(split) for split in task.splits} == sizes, name

    def first_and_last(name, split):
        records = seqio.get_mixture_or_task(f"{name}_release_sizes").source.records(split)
        return records[0][0], records[-1][0]

    assert first_and_last("natural_questions_open", "validation") == ("train 79168", "train 87924")
    assert first_and_last("natural_questions_open", "test") == ("validation 0", "validation 3609")
    assert first_and_last("web_questions_open_test", "validation") == ("test 0", "test 2031")
    assert first_and_last("trivia_qa_open", "train") == ("train 0", "train 78784")
    assert first_and_last("trivia_qa_open_test", "train") == ("train 0", "validation 11312")
    test_task = seqio.get_mixture_or_task("trivia_qa_open_test_release_sizes")
    assert test_task.source.records("test")[0] == ("test 0", ("<unk>",))  # withheld answers, as TFDS gives them
    mixture = seqio.get_mixture_or_task("closed_book_qa_test_release_sizes")  # the reference's own rates
    assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == {
        "natural_questions_open_test_release_sizes": 87925, "web_questions_open_test_release_sizes": 3778,
        "trivia_qa_open_test_release_sizes": 98935}


def test_tfds_features_become_question_and_answers():
    nq = tf.data.Dataset.from_tensors({"question": "q", "answer": ["a", "b"]})
    wq = tf.data.Dataset.from_tensors({"question": "q", "answers": ["a"], "url": "u"})
    tqa = tf.data.Dataset.from_tensors({"question": "q", "question_id": "id", "answer": {
        "value": "v", "aliases": ["a1", "a2"], "normalized_value": "v", "normalized_aliases": ["a1", "a2"]}})
    for dataset, tfds_examples, answers in [(cbqa.NATURAL_QUESTIONS, nq, [b"a", b"b"]),
                                            (cbqa.WEB_QUESTIONS, wq, [b"a"]),
                                            (cbqa.TRIVIA_QA, tqa, [b"v", b"a1", b"a2"])]:
        (example,) = dataset.from_tfds(tfds_examples).as_numpy_iterator()
        assert example["question"] == b"q" and example["answers"].tolist() == answers


@pytest.fixture(scope="module")
def small_release_tasks(tmp_path_factory):
    """The tasks and mixtures registered over a small_release, with the suffix _small_release."""
    root = small_release(tmp_path_factory.mktemp("small_release"), sizes=(5, 4, 3))
    cbqa.register_cbqa_tasks(root, seqio.ByteVocabulary(), suffix="_small_release")  # bytes: decoding is lossless


def test_local_tasks_splits_shards_and_mixture_rates(small_release_tasks):
    for dataset, sizes in [(cbqa.NATURAL_QUESTIONS, (5, 0, 5)), (cbqa.WEB_QUESTIONS, (4, 0, 4)),
                           (cbqa.TRIVIA_QA, (3, 0, 3))]:
        task = seqio.get_mixture_or_task(f"{dataset.task_name}_small_release")
        assert task.num_input_examples("train") == sizes[0]  # fewer than train_size: all of train
        with pytest.raises(ValueError, match=r"Split 'validation' = 'train\[\d+:\]' .* is empty"):
            task.num_input_examples("validation")
        test_task = seqio.get_mixture_or_task(f"{dataset.task_name}_test_small_release")
        assert test_task.num_input_examples("train") == sizes[0] * (2 if dataset is cbqa.TRIVIA_QA else 1)
    mixture = seqio.get_mixture_or_task("closed_book_qa_small_release")
    assert {task.name: mixture.get_rate(task) for task in mixture.tasks} == {
        "natural_questions_open_small_release": 5.0, "web_questions_open_small_release": 4.0,
        "trivia_qa_open_small_release": 3.0}
    nq = seqio.get_mixture_or_task("natural_questions_open_test_small_release").source
    questions = lambda **kwargs: [ex["question"] for ex in nq.get_dataset("train", **kwargs).as_numpy_iterator()]
    assert questions(shuffle=False) == [f"nq train {i}".encode() for i in range(5)]
    assert questions(shuffle=True, seed=3) == questions(shuffle=True, seed=3) != questions(shuffle=False)
    halves = [questions(shuffle=False, shard_info=seqio.ShardInfo(index, 2)) for index in (0, 1)]
    assert sorted(halves[0] + halves[1]) == questions(shuffle=False) and len(halves[0]) == 3


def test_local_source_errors(tmp_path):
    with pytest.raises(ValueError, match="local files have only the splits \\['train', 'validation'\\]"):
        cbqa.QAFileSource(str(tmp_path), cbqa.NATURAL_QUESTIONS.local_files, {"test": "test"})
    source = cbqa.QAFileSource(str(tmp_path), cbqa.NATURAL_QUESTIONS.local_files, cbqa.NATURAL_QUESTIONS.splits)
    with pytest.raises(FileNotFoundError, match=r"No 'train' file in .*: looked for \['NQ-open.train.jsonl'\]"):
        source.num_input_examples("train")


def test_seqio_evaluator_scores_gold_answers_100(small_release_tasks):
    """Through seqio's own evaluation: targets become all answers (qa_postprocessor), predictions are decoded."""
    evaluator = seqio.Evaluator("web_questions_open_test_small_release", seqio.EncDecFeatureConverter(pack=False),
                                eval_split="validation", sequence_length=LENGTHS, async_compute_metrics=False)

    def predict_first_answer(dataset):  # the target tokens: the first answer
        return [(index, example["decoder_target_tokens"]) for index, example in dataset.as_numpy_iterator()]

    results, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_first_answer)
    assert results.result() == {"web_questions_open_test_small_release": {"em": 100.0, "f1": 100.0}}
