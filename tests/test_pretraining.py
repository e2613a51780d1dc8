"""Pre-training tasks: registrations, the local text corpus (span corruption and salient span masking), a
resumable pipeline, and a short tiny-model run of `python -m t5x_lite.train` whose loss falls."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the tasks)
from tasks import pretraining, settings

REPO = Path(__file__).resolve().parent.parent


def shared_corpus_and_vocab():
    if settings.data_dir() is None:  # the vocabulary would then be T5's copy on GCS: no network in tests
        pytest.skip(f"no local data folder (T5X_LITE_DATA_DIR unset and {settings.DEFAULT_DATA_DIR} absent)")
    missing = [p for p in [settings.t5_spm_path()] + settings.corpus_patterns() if not tf.io.gfile.glob(p)]
    if missing:
        pytest.skip(f"the shared corpus or T5 vocabulary is absent (T5X_LITE_DATA_DIR / {settings.DEFAULT_DATA_DIR}): "
                    f"nothing at {missing}")


def test_registrations():
    c4 = seqio.get_mixture_or_task("c4_v220_span_corruption")
    assert c4.source.tfds_dataset.name == "c4/en:2.2.0" and list(c4.splits) == ["train", "validation"]
    ssm = seqio.get_mixture_or_task("salient_span_masked_wikipedia")
    assert ssm.source.tfds_dataset.name == "salient_span_wikipedia/sentences:1.0.0"
    for name in ["local_corpus_span_corruption", "local_corpus_span_corruption_bytes",
                 "local_corpus_salient_span_masking"]:
        assert seqio.get_mixture_or_task(name).source._split_to_filepattern == {"train": settings.corpus_patterns()}
    def vocabulary(name):
        return seqio.get_mixture_or_task(name).output_features["targets"].vocabulary

    for name in ["c4_v220_span_corruption", "local_corpus_span_corruption", "natural_questions_open"]:
        t5 = vocabulary(name)
        assert (t5.sentencepiece_model_file, t5.extra_ids) == (settings.t5_spm_path(), 100)
    assert isinstance(vocabulary("local_corpus_span_corruption_bytes"), seqio.ByteVocabulary)


def test_registration_needs_no_files():
    """Importing `tasks` without any data folder or vocabulary file registers every task; the closed-book QA
    tasks then read TFDS."""
    env = dict(os.environ, T5X_LITE_DATA_DIR="", T5X_LITE_SPM_PATH="/nonexistent/spiece.model")
    script = ("import seqio, tasks\n"
              "get = seqio.get_mixture_or_task\n"
              "print(type(get('natural_questions_open').source).__name__,\n"
              "      get('local_corpus_span_corruption').source._split_to_filepattern['train'][0])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    source, corpus = result.stdout.split()
    assert source == "TfdsDataSource" and corpus == str(settings.DEFAULT_DATA_DIR / settings.CORPUS_FILES[0])


def test_shared_corpus_at_inputs_length_512():
    shared_corpus_and_vocab()
    task = seqio.get_mixture_or_task("local_corpus_span_corruption")
    dataset = task.get_dataset({"inputs": 512, "targets": 114}, shuffle=True, seed=0, num_epochs=None)
    for example in dataset.take(20).as_numpy_iterator():
        inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
        assert (len(inputs), len(targets)) == (512, 114)
        assert targets[0] == 32099 and inputs[-1] == targets[-1] == 1
        assert [t for t in inputs if t >= 32000] == list(range(32099, 32099 - 28, -1))


def test_shared_corpus_salient_span_masking():
    shared_corpus_and_vocab()
    task = seqio.get_mixture_or_task("local_corpus_salient_span_masking")
    dataset = task.get_dataset({"inputs": 512, "targets": 32}, shuffle=False)
    vocabulary = task.output_features["targets"].vocabulary
    for example in dataset.take(5).as_numpy_iterator():
        inputs, span = vocabulary.decode(example["inputs"].tolist()), vocabulary.decode(example["targets"].tolist())
        assert inputs.startswith("nem: ") and "_X_" in inputs and span


def test_documents_per_file_or_per_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph,\ntwo lines.\n\n \t\nSecond.\n\n\n\nThird.\n")
    whole = [ex["text"] for ex in pretraining.read_documents(str(path), "file").as_numpy_iterator()]
    paragraphs = [ex["text"] for ex in pretraining.read_documents(str(path), "paragraph").as_numpy_iterator()]
    assert whole == [path.read_bytes()]
    assert paragraphs == [b"First paragraph,\ntwo lines.", b"Second.", b"Third."]
    with pytest.raises(ValueError, match="documents='line'"):
        pretraining.register_text_corpus_task("bad", str(path), vocabulary=seqio.ByteVocabulary(), documents="line")


def test_own_corpus_task_resumes_from_a_checkpoint(tmp_path):
    """The train loop checkpoints the tf.data iterator: a restored pipeline continues with the same examples."""
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"Document {i}. " * (40 + 30 * i))
    task = pretraining.register_text_corpus_task("own_corpus_under_test", str(tmp_path / "*.txt"),
                                                 vocabulary=seqio.ByteVocabulary())
    lengths = {"inputs": 64, "targets": 16}

    def make_iterator():
        return iter(task.get_dataset(lengths, shuffle=True, seed=5, num_epochs=None))

    iterator = make_iterator()
    for _ in range(7):
        next(iterator)
    prefix = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt" / "data"))
    expected = [next(iterator)["inputs"].numpy().tolist() for _ in range(40)]
    restored = make_iterator()
    tf.train.Checkpoint(iterator=restored).read(prefix).assert_consumed()
    assert [next(restored)["inputs"].numpy().tolist() for _ in range(40)] == expected


def test_tiny_model_pretrains_on_the_local_corpus(tmp_path):
    shared_corpus_and_vocab()
    model_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "t5x_lite.train", "--gin_file=gin/models/t5_1_1/tiny.gin",
        "--gin_file=gin/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=20",
        "--gin.MIXTURE_OR_TASK_NAME='local_corpus_span_corruption'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "--gin.BATCH_SIZE=16",
        "--gin.train.train.log_every_steps=1", "--gin.train.train.checkpoint_period=1000",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (model_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert losses[-1] < losses[0] - 1.0, f"the loss falls: {losses}"
