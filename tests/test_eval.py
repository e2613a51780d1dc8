"""The `eval` entry point and evaluation during training: metrics JSON, TensorBoard events and predictions per
task and step, waiting for new checkpoints, and bad input named before anything compiles."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # noqa: F401  (registers the synthetic and closed-book QA tasks)
from t5x_lite import checkpoints, data, models, network, partitioning, train
from t5x_lite import eval as eval_lib
from t5x_lite import predictor as predictor_lib
from tasks import settings
from tests.helpers import TINY

REPO = Path(__file__).resolve().parent.parent
CBQA = "closed_book_qa_test"
# Its tasks with a validation split: trivia_qa_open_test has none (TriviaQA's test answers are withheld), as in T5.
CBQA_TASKS = ["natural_questions_open_test", "web_questions_open_test"]


def tiny_model(vocab_size: int) -> models.EncoderDecoderModel:
    """gin/models/t5_1_1/tiny.gin's shapes with the given vocabulary size."""
    return models.EncoderDecoderModel(network.T5Config(
        vocab_size=vocab_size, emb_dim=64, num_heads=8, head_dim=8, mlp_dim=128, num_encoder_layers=2,
        num_decoder_layers=2,
    ))


def write_checkpoints(directory, model, steps, mesh_shape=(4, 2)):
    """Random parameters saved as the given steps, written from a (4, 2) mesh (evaluation restores them onto
    another). Drawn with numpy: compiling the model's initialiser would take longer than these tests."""
    predictor = predictor_lib.Predictor(model, partitioning.Partitioner(mesh_shape))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda leaf: jax.device_put(rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype), leaf.sharding),
        predictor.abstract_params,
    )
    with checkpoints.Checkpointer(str(directory), save_interval_steps=1, async_save=False) as checkpointer:
        for step in steps:
            checkpointer.save(step, {"step": jnp.array(step, jnp.int32), "params": params})
    return directory


def dataset_cfg(name, batch_size=8, split="validation", lengths=None):
    return data.DatasetConfig(name, lengths, split=split, batch_size=batch_size, shuffle=False, seed=42, pack=False)


@pytest.fixture(scope="module")
def byte_checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("byte") / "checkpoints", tiny_model(384), [10])


def has_cbqa_data() -> bool:
    local = settings.data_dir()
    return CBQA in seqio.MixtureRegistry.names() and bool(local) and os.path.isdir(os.path.join(local, "cbqa"))


def event_tags(directory) -> set[str]:
    tags = set()
    for path in tf.io.gfile.glob(os.path.join(str(directory), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


@pytest.mark.skipif(not has_cbqa_data(), reason="the closed-book QA files (../shared/data/cbqa) are not here")
def test_eval_of_every_checkpoint_on_closed_book_qa(tmp_path):
    """A checkpoint directory with step 10, and a step 20 that appears while eval waits for new ones: each step
    is evaluated on each task of the mixture (EM / F1 through seqio.Evaluator), and each task gets a metrics line
    per step, a predictions file per step and TensorBoard events."""
    model = tiny_model(32128)  # T5's vocabulary: 32,100 ids
    checkpoint_dir = write_checkpoints(tmp_path / "checkpoints", model, [10])
    output_dir = tmp_path / "eval"

    def add_step_20_once_step_10_is_evaluated():
        while not (output_dir / f"{CBQA_TASKS[-1]}-000010.jsonl").exists():
            if finished.wait(0.05):
                return
        shutil.copytree(checkpoint_dir / "10", checkpoint_dir / "20.copying")
        os.rename(checkpoint_dir / "20.copying", checkpoint_dir / "20")

    finished = threading.Event()
    writer = threading.Thread(target=add_step_20_once_step_10_is_evaluated)
    writer.start()
    try:
        results = eval_lib.evaluate(
            model=model, dataset_cfg=dataset_cfg(CBQA), partitioner=partitioning.Partitioner((8, 1)),
            checkpoint_path=str(checkpoint_dir), output_dir=str(output_dir), num_examples=12,
            wait_for_new_checkpoints_secs=3.0, poll_interval_secs=0.1,
        )
    finally:
        finished.set()
        writer.join()

    assert sorted(results) == [10, 20] and sorted(results[20]) == CBQA_TASKS
    for task in CBQA_TASKS:
        assert set(results[20][task]) == {"em", "f1"}
        lines = [json.loads(line) for line in (output_dir / f"{task}-metrics.jsonl").read_text().splitlines()]
        assert [line["step"] for line in lines] == [10, 20]
        assert all(0.0 <= line["em"] <= 100.0 for line in lines)
        for step in (10, 20):
            predictions = [json.loads(line) for line in (output_dir / f"{task}-{step:06d}.jsonl").read_text().splitlines()]
            assert len(predictions) == 12  # the 8 + 4 rows of a padded last batch, each once
            assert all(isinstance(p["prediction"], str) and p["target"] and "question" in p["input"]["inputs_pretokenized"]
                       for p in predictions)
        assert {"eval/em", "eval/f1"} <= event_tags(output_dir / task)


def mean_log_likelihood(targets, scores):
    return {"mean_log_likelihood": float(np.mean(scores)), "scored": len(scores)}


def decoded_score_count(targets, predictions, aux_values):
    return {"predictions_with_scores": sum(s < 0 for s in aux_values["scores"]) + 0 * len(predictions)}


def register_scored_task():
    """synthetic_reverse's examples with a score metric and a predict_with_aux metric as well."""
    name = "synthetic_reverse_scored_for_test"
    if name not in seqio.TaskRegistry.names():
        reverse = seqio.get_mixture_or_task("synthetic_reverse")
        seqio.TaskRegistry.add(name, source=reverse.source, output_features=reverse.output_features,
                               preprocessors=reverse.preprocessors,
                               metric_fns=[*reverse.metric_fns, mean_log_likelihood, decoded_score_count])
    return name


def test_inference_evaluator_runs_predict_score_and_aux_metrics(byte_checkpoints, tmp_path):
    """Every kind of seqio metric gets its model outputs, in example order: the score metric's mean equals the
    model's own scores of those examples."""
    model = tiny_model(384)
    name = register_scored_task()
    evaluator = eval_lib.InferenceEvaluator(dataset_cfg(name, lengths={"inputs": 32, "targets": 32}), model,
                                            partitioning.Partitioner((8, 1)), str(tmp_path), num_examples=20)
    params = evaluator.predictor.restore_params(str(byte_checkpoints))
    metrics = evaluator.evaluate(params, step=10)[name]
    evaluator.close()
    assert metrics["scored"] == 20 and metrics["predictions_with_scores"] == 20 and "accuracy" in metrics
    examples = seqio.get_mixture_or_task(name).get_dataset({"inputs": 32, "targets": 32}, split="validation",
                                                         shuffle=False).take(20)
    converted = seqio.EncDecFeatureConverter(pack=False)(examples, {"inputs": 32, "targets": 32})
    batch = next(converted.batch(20).as_numpy_iterator())
    expected = np.asarray(jax.jit(model.score_batch)(jax.device_get(params), batch))
    np.testing.assert_allclose(metrics["mean_log_likelihood"], expected.mean(), rtol=1e-5)
    predictions = [json.loads(line) for line in (tmp_path / f"{name}-000010.jsonl").read_text().splitlines()]
    assert len(predictions) == 20 and all("score" in p and "prediction" in p for p in predictions)


def test_bad_input_is_named_before_any_compile(byte_checkpoints, tmp_path, monkeypatch):
    def compiled(*args, **kwargs):
        raise AssertionError("a predict or score step ran")

    monkeypatch.setattr(predictor_lib.Predictor, "predict", compiled)
    monkeypatch.setattr(predictor_lib.Predictor, "score", compiled)

    def run(model=tiny_model(384), name="synthetic_reverse", split="validation", path=byte_checkpoints):
        eval_lib.evaluate(model=model, dataset_cfg=dataset_cfg(name, split=split),
                          partitioner=partitioning.Partitioner((8, 1)), checkpoint_path=str(path),
                          output_dir=str(tmp_path / "out"))

    with pytest.raises(FileNotFoundError, match=r"CHECKPOINT_PATH .*/no_such_dir does not exist"):
        run(path=tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"CHECKPOINT_PATH .*/empty holds no checkpoint"):
        run(path=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"'synthetic_reverse' has no split 'test'.*\['train', 'validation'\]"):
        run(split="test")
    with pytest.raises(ValueError, match="No seqio Task or Mixture is registered as 'synthetic_revers'"):
        run(name="synthetic_revers")
    # The byte vocabulary (259 ids) does not fit a 128-row embedding.
    with pytest.raises(ValueError, match=r"'inputs' vocabulary has 259 ids, but the model's embedding has 128 rows"):
        run(model=models.EncoderDecoderModel(TINY))
    # A model whose embedding differs from the checkpoint's (512 vs 384 rows).
    with pytest.raises(checkpoints.TreeMismatchError, match=r"does not fit the model.*checkpoint \(384, 64\) vs requested \(512, 64\)"):
        run(model=tiny_model(512))
    assert not (tmp_path / "out").exists()


def test_eval_command_line(byte_checkpoints, tmp_path):
    """`python -m t5x_lite.eval` with gin/runs/eval.gin: one step directory, beam search, 16 examples."""
    output_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "t5x_lite.eval", "--gin_file=gin/models/t5_1_1/tiny.gin",
         "--gin_file=gin/runs/eval.gin", f"--gin.CHECKPOINT_PATH='{byte_checkpoints / '10'}'",
         f"--gin.EVAL_OUTPUT_DIR='{output_dir}'", "--gin.MIXTURE_OR_TASK_NAME='synthetic_reverse'",
         "--gin.network.T5Config.vocab_size=384", "--gin.BATCH_SIZE=8", "--gin.eval.evaluate.num_examples=16",
         "--gin.decoding.DecodingConfig.decoder='beam_search'", "--gin.decoding.DecodingConfig.num_beams=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = [json.loads(line) for line in (output_dir / "synthetic_reverse-metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10] and "accuracy" in metrics[0]
    assert len((output_dir / "synthetic_reverse-000010.jsonl").read_text().splitlines()) == 16
    assert "eval/accuracy" in event_tags(output_dir / "synthetic_reverse")


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_training_evaluates_the_named_task_every_eval_period(tmp_path, clean_gin):
    """gin/runs/infer_eval.gin: T5X's infer_eval, here on synthetic_reverse every 2 of 4 steps."""
    from t5x_lite import gin_utils

    model_dir = tmp_path / "run"
    gin_utils.parse(
        ["gin/models/t5_1_1/tiny.gin", "gin/runs/pretrain.gin", "gin/runs/infer_eval.gin"],
        [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 4", "EVAL_PERIOD = 2", "BATCH_SIZE = 16",
         "MIXTURE_OR_TASK_NAME = 'synthetic_reverse'", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}",
         "network.T5Config.vocab_size = 384", "eval.InferenceEvaluator.num_examples = 16",
         "train.train.log_every_steps = 2", "train.train.checkpoint_period = 4"],
    )
    gin.get_configurable(train.train)()
    output_dir = model_dir / "inference_eval"
    metrics = [json.loads(line) for line in (output_dir / "synthetic_reverse-metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert (output_dir / "synthetic_reverse-000004.jsonl").exists()
    assert "eval/accuracy" in event_tags(output_dir / "synthetic_reverse")


def test_checkpoint_steps_accepts_step_checkpoint_and_model_directories(byte_checkpoints):
    model_dir = byte_checkpoints.parent
    expected = [(10, str(byte_checkpoints / "10"))]
    assert eval_lib.checkpoint_steps(str(byte_checkpoints)) == expected
    assert eval_lib.checkpoint_steps(str(model_dir)) == expected
    assert eval_lib.checkpoint_steps(str(byte_checkpoints / "10")) == expected
