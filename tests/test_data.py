"""Tests of t5x_lite.data on the offline synthetic tasks (8 simulated CPU devices, see conftest.py)."""
import jax
import numpy as np
import pytest
import seqio
from jax.sharding import NamedSharding, PartitionSpec

import tasks  # noqa: F401  (registers synthetic_reverse, synthetic_copy, synthetic_mix)
from t5x_lite import data

LENGTHS = {"inputs": 32, "targets": 32}
UNPACKED_FEATURES = {"encoder_input_tokens", "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"}
PACKED_FEATURES = UNPACKED_FEATURES | {"encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                                       "decoder_positions"}


def _dataset(name="synthetic_reverse", **overrides):
    kwargs = dict(task_feature_lengths=LENGTHS, split="train", global_batch_size=8, shuffle=True, seed=0, pack=True)
    kwargs.update(overrides)
    return data.get_dataset(name, **kwargs)


def _batches(dataset, n):
    iterator = dataset.as_numpy_iterator()
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def _rows(batch, feature="encoder_input_tokens"):
    return {tuple(row) for row in batch[feature]}


def test_packed_features_shapes_and_dtypes():
    dataset = _dataset(task_feature_lengths={"inputs": 64, "targets": 64})
    batches = _batches(dataset, 2)
    for batch in batches:
        assert set(batch) == PACKED_FEATURES
        for name, value in batch.items():
            assert value.shape == (8, 64), name
            assert value.dtype == np.int32, name
        # Loss weights cover exactly the target tokens; segments restart their positions at 0.
        np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_target_tokens"] > 0)
        np.testing.assert_array_equal(batch["encoder_segment_ids"] > 0, batch["encoder_input_tokens"] > 0)
        # Teacher forcing: the decoder input is the target shifted right within each segment (0 at segment starts).
        starts = batch["decoder_positions"] == 0
        shifted = np.pad(batch["decoder_target_tokens"], ((0, 0), (1, 0)))[:, :-1]
        np.testing.assert_array_equal(batch["decoder_input_tokens"], np.where(starts, 0, shifted))
    # Examples are ~25 bytes, so rows of 64 hold two or more of them.
    assert max(batch["encoder_segment_ids"].max() for batch in batches) >= 2


def test_unpacked_features_hold_one_example_per_row():
    batch = _batches(_dataset(pack=False, shuffle=False), 1)[0]
    assert set(batch) == UNPACKED_FEATURES
    for name, value in batch.items():
        assert value.shape == (8, 32) and value.dtype == np.int32, name
    vocabulary = seqio.ByteVocabulary()
    for inputs, targets in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"]):
        assert (inputs == 1).sum() == 1 and (targets == 1).sum() == 1  # one EOS each
        text = vocabulary.decode(inputs.tolist())
        assert text.startswith("reverse: ")
        assert vocabulary.decode(targets.tolist()) == " ".join(text.removeprefix("reverse: ").split()[::-1])


def test_same_seed_same_batches_different_seed_different_batches():
    first = _batches(_dataset(seed=3), 3)
    _assert_batches_equal(first, _batches(_dataset(seed=3), 3))
    other = _batches(_dataset(seed=4), 3)
    assert any(not np.array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
               for a, b in zip(first, other))


def test_validation_split_is_finite_and_drops_the_partial_batch():
    batches = list(_dataset(split="validation", global_batch_size=64, shuffle=False, seed=None, pack=False,
                            repeat=False).as_numpy_iterator())
    assert len(batches) == 500 // 64
    assert all(batch["encoder_input_tokens"].shape == (64, 32) for batch in batches)


def test_shards_split_the_examples_of_the_global_batch():
    # FunctionDataSource has one "file", so seqio shards by example index (shard i reads examples i, i+n, ...):
    # unshuffled, the two half-batches together are exactly the one-shard batch.
    settings = dict(shuffle=False, seed=None, pack=False, global_batch_size=8)
    whole = _batches(_dataset(shard_info=seqio.ShardInfo(0, 1), **settings), 2)
    halves = [_batches(_dataset(shard_info=seqio.ShardInfo(i, 2), **settings), 2) for i in range(2)]
    for step in range(2):
        first, second = halves[0][step], halves[1][step]
        assert first["encoder_input_tokens"].shape == (4, 32)
        assert not _rows(first) & _rows(second)
        assert _rows(first) | _rows(second) == _rows(whole[step])
        np.testing.assert_array_equal(first["encoder_input_tokens"], whole[step]["encoder_input_tokens"][0::2])


def test_shuffled_shards_are_disjoint():
    halves = [_batches(_dataset(shard_info=seqio.ShardInfo(i, 2), pack=False), 4) for i in range(2)]
    rows = [set().union(*map(_rows, batches)) for batches in halves]
    assert all(len(r) == 16 for r in rows)
    assert not rows[0] & rows[1]


def test_mixture_gives_both_tasks():
    batch = _batches(_dataset("synthetic_mix", pack=False, global_batch_size=32), 1)[0]
    vocabulary = seqio.ByteVocabulary()
    prefixes = {vocabulary.decode(row.tolist()).split(":")[0] for row in batch["encoder_input_tokens"]}
    assert prefixes == {"reverse", "copy"}


@pytest.fixture
def batch_sharding():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    return NamedSharding(mesh, PartitionSpec("data"))


def test_global_batch_iterator_builds_sharded_arrays_equal_to_the_local_batch(batch_sharding):
    expected = _batches(_dataset(), 2)
    iterator = data.GlobalBatchIterator(_dataset(), batch_sharding)
    spec = iterator.element_spec
    assert set(spec) == PACKED_FEATURES
    assert all(s.shape == (8, 32) and s.dtype == np.int32 and s.sharding == batch_sharding for s in spec.values())
    assert iterator.shapes["decoder_target_tokens"] == (8, 32)
    actual = [next(iterator) for _ in range(2)]
    for batch in actual:
        for name, array in batch.items():
            assert isinstance(array, jax.Array)
            assert array.sharding == batch_sharding, name
            # Each of the 4 data shards holds 2 rows, replicated over the 2 model devices.
            assert {shard.data.shape for shard in array.addressable_shards} == {(2, 32)}
    _assert_batches_equal(expected, actual)


def test_global_batch_iterator_accepts_a_sharding_per_feature(batch_sharding):
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    dataset = _dataset(pack=False)
    shardings = {name: batch_sharding for name in UNPACKED_FEATURES}
    shardings["decoder_loss_weights"] = replicated
    batch = next(iter(data.GlobalBatchIterator(dataset, shardings)))
    assert batch["decoder_loss_weights"].sharding == replicated
    assert batch["encoder_input_tokens"].sharding == batch_sharding
    del shardings["decoder_loss_weights"]
    with pytest.raises(ValueError, match="decoder_loss_weights"):
        data.GlobalBatchIterator(dataset, shardings)


@pytest.mark.parametrize("name", ["synthetic_reverse", "synthetic_mix"])
def test_restored_iterator_continues_with_the_uninterrupted_batches(tmp_path, batch_sharding, name):
    uninterrupted = data.GlobalBatchIterator(_dataset(name, seed=7), batch_sharding)
    for _ in range(3):
        next(uninterrupted)
    uninterrupted.save(str(tmp_path / "data_iterator"))
    expected = [next(uninterrupted) for _ in range(4)]

    resumed = data.GlobalBatchIterator(_dataset(name, seed=7), batch_sharding)
    resumed.restore(str(tmp_path / "data_iterator"))
    _assert_batches_equal(expected, [next(resumed) for _ in range(4)])


def test_restore_without_a_saved_state_names_the_path(tmp_path, batch_sharding):
    iterator = data.GlobalBatchIterator(_dataset(), batch_sharding)
    with pytest.raises(FileNotFoundError, match="No data iterator state in .*nothing_here"):
        iterator.restore(str(tmp_path / "nothing_here"))


def test_unregistered_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"'synthetic_revers'.*synthetic_reverse"):
        _dataset("synthetic_revers")


def test_batch_size_must_divide_by_the_number_of_shards():
    with pytest.raises(ValueError, match=r"global_batch_size 6 .* 4; e\.g\. 4, 8, 12"):
        _dataset(global_batch_size=6, shard_info=seqio.ShardInfo(0, 4))


def test_unknown_split_lists_the_splits():
    with pytest.raises(ValueError, match=r"'test'.*'train', 'validation'"):
        _dataset(split="test")


def test_exact_match_accuracy():
    from tasks.synthetic import exact_match_accuracy
    assert exact_match_accuracy(["ab cd", "ef"], ["ab cd", "fe"]) == {"accuracy": 50.0}
