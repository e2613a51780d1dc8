"""The `infer` entry point: JSONL chunks, resuming after a stop half way (every example exactly once), score mode,
settings checks, and the command line."""
import json
from pathlib import Path

import gin
import pytest
import seqio

import tasks  # noqa: F401  (registers synthetic_reverse)
from t5x_lite import gin_utils, infer, partitioning
from t5x_lite import predictor as predictor_lib
from tests.test_eval import dataset_cfg, tiny_model, write_checkpoints

REPO = Path(__file__).resolve().parent.parent
LENGTHS = {"inputs": 32, "targets": 32}
NUM_EXAMPLES = 500  # synthetic_reverse's validation split: 15 full batches of 32 and one of 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("infer") / "checkpoints", tiny_model(384), [10])


@pytest.fixture(scope="module")
def validation_inputs():
    dataset = seqio.get_mixture_or_task("synthetic_reverse").get_dataset(LENGTHS, split="validation", shuffle=False)
    return [example["inputs_pretokenized"].decode() for example in dataset.as_numpy_iterator()]


def run_infer(checkpoint, output_dir, **kwargs):
    kwargs = {"chunk_size": 2, **kwargs}
    return infer.infer(
        model=tiny_model(384), dataset_cfg=dataset_cfg("synthetic_reverse", batch_size=32, lengths=LENGTHS),
        partitioner=partitioning.Partitioner((8, 1)), checkpoint_path=str(checkpoint), output_dir=str(output_dir),
        **kwargs,
    )


def chunk_records(output_dir):
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted(output_dir.glob("synthetic_reverse-validation-*.jsonl"))}


def test_infer_resumes_after_stopping_half_way(checkpoint, tmp_path, validation_inputs, monkeypatch):
    output_dir = tmp_path / "infer"
    assert run_infer(checkpoint, output_dir, max_chunks=4) is False  # 4 of the 8 chunks of 2 batches
    first = chunk_records(output_dir)
    assert sorted(first) == [f"synthetic_reverse-validation-{chunk:05d}.jsonl" for chunk in range(4)]
    assert not (output_dir / "synthetic_reverse-validation.COMPLETED").exists()

    # Resuming with other settings would mix chunks of different batches: refused, naming the difference.
    with pytest.raises(ValueError, match=r"other settings.*'chunk_size': \(2, 3\)"):
        run_infer(checkpoint, output_dir, chunk_size=3)
    # A chunk being written when the run stopped exists only under its temporary name: it is redone.
    (output_dir / "synthetic_reverse-validation-00004.jsonl.tmp").write_text('{"index": 2')

    assert run_infer(checkpoint, output_dir) is True
    records = chunk_records(output_dir)
    assert len(records) == 8
    assert all(records[name] == first[name] for name in first)  # finished chunks are kept as they were
    lines = [record for chunk in records.values() for record in chunk]
    assert sorted(record["index"] for record in lines) == list(range(NUM_EXAMPLES))
    assert all(record["inputs"] == validation_inputs[record["index"]] for record in lines)
    assert all(isinstance(record["prediction"], str) for record in lines)
    assert json.loads((output_dir / "synthetic_reverse-validation.COMPLETED").read_text()) == {"chunks": 8}
    assert not list(output_dir.glob("*.tmp"))

    # A complete run is not redone.
    monkeypatch.setattr(predictor_lib.Predictor, "predict", lambda *a, **k: pytest.fail("decoded again"))
    assert run_infer(checkpoint, output_dir) is True


def test_infer_scores_the_targets(checkpoint, tmp_path, validation_inputs):
    output_dir = tmp_path / "scores"
    assert run_infer(checkpoint, output_dir, mode="score", chunk_size=100) is True
    (name, records), = chunk_records(output_dir).items()
    assert name == "synthetic_reverse-validation-00000.jsonl"
    assert sorted(record["index"] for record in records) == list(range(NUM_EXAMPLES))
    assert all(set(record) == {"index", "inputs", "score"} and record["score"] < 0 for record in records)


def test_infer_names_bad_settings(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="mode='generate'; valid: 'predict', 'score'"):
        run_infer(checkpoint, tmp_path, mode="generate")
    with pytest.raises(ValueError, match="'synthetic_reverse' has no split 'test'"):
        infer.infer(model=tiny_model(384), dataset_cfg=dataset_cfg("synthetic_reverse", split="test", lengths=LENGTHS),
                    partitioner=partitioning.Partitioner((8, 1)), checkpoint_path=str(checkpoint),
                    output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_infer(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="batch size 12 does not divide over the mesh's data axis of size 8"):
        infer.infer(model=tiny_model(384), dataset_cfg=dataset_cfg("synthetic_reverse", batch_size=12, lengths=LENGTHS),
                    partitioner=partitioning.Partitioner((8, 1)), checkpoint_path=str(checkpoint),
                    output_dir=str(tmp_path))


def test_infer_gin_file(checkpoint, tmp_path):
    """gin/runs/infer.gin, parsed as the command line does (test_eval runs `python -m t5x_lite.eval`, whose flag
    handling `infer` shares): the newest step of a checkpoint directory, greedy, chunks of 4 batches of 64."""
    output_dir = tmp_path / "out"
    gin.clear_config()
    try:
        gin_utils.parse(["gin/models/t5_1_1/tiny.gin", "gin/runs/infer.gin"], [
            f"CHECKPOINT_PATH = '{checkpoint}'", f"INFER_OUTPUT_DIR = '{output_dir}'",
            "MIXTURE_OR_TASK_NAME = 'synthetic_reverse'", "network.T5Config.vocab_size = 384", "BATCH_SIZE = 64",
            f"TASK_FEATURE_LENGTHS = {LENGTHS}", "infer.infer.chunk_size = 4",
        ])
        gin_utils.check_required_macros(infer.REQUIRED_MACROS)
        assert gin.get_configurable(infer.infer)() is True
    finally:
        gin.clear_config()
    records = chunk_records(output_dir)
    assert sorted(records) == ["synthetic_reverse-validation-00000.jsonl", "synthetic_reverse-validation-00001.jsonl"]
    assert sum(len(chunk) for chunk in records.values()) == NUM_EXAMPLES
    assert (output_dir / "synthetic_reverse-validation.COMPLETED").exists()
