"""Partitioning: sharded training equals single-device training; shardings follow the logical-axis rules.

Every mesh of the 8 CPU devices, with 1-D and 2-D parameter partitioning, trains the tiny model to the same
losses and parameters as one device. Adafactor factors every kernel here (min_dim_size_to_factor=16), so its
factored moments, reduced over sharded dims, are part of the comparison.
"""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5x_lite import layers, models, optimizers, partitioning
from t5x_lite import trainer as trainer_lib
from tests.helpers import TINY, random_batch

ADAFACTOR = functools.partial(optimizers.adafactor, min_dim_size_to_factor=16)
NUM_STEPS = 3
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]

# float32 with a different reduction order per mesh (all-reduces of partial sums). Measured over all 8 meshes
# after 3 steps: losses (~5.3) and gradient norms within 2.3e-7 relative; parameters within 2.4e-7 absolute,
# at most 4% of the allowance atol + rtol * |p| below. The sharded init is bitwise equal to the one-device init.
# (Mesh (1, 1) with 2-D partitioning is the same program as 1-D: every mesh axis has size 1.)
LOSS_RTOL = 5e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6


@functools.cache
def make_trainer(mesh_shape, parameter_partitioning_dims, scan_layers=False):
    """One trainer (and so one compilation) per mesh, shared by the tests of this module."""
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    partitioner = partitioning.Partitioner(
        mesh_shape, parameter_partitioning_dims=parameter_partitioning_dims, devices=devices
    )
    model = models.EncoderDecoderModel(dataclasses.replace(TINY, scan_layers=scan_layers))
    return trainer_lib.Trainer(model, partitioner, ADAFACTOR)


def train(trainer, state):
    """NUM_STEPS steps on different batches: ([(loss, grad_norm) of each step], final state)."""
    losses = []
    for step in range(NUM_STEPS):
        state, metrics = trainer.train_step(state, random_batch(seed=step))
        # Adafactor's update is blind to a parameter's gradient scale (e.g. summing where it should average
        # over data shards); the gradient norm is not.
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return losses, state


@pytest.fixture(scope="module")
def single_device_run():
    trainer = make_trainer((1, 1), 1)
    state = trainer.init_state()
    init = jax.device_get(state)  # a host copy: train_step donates the state
    losses, state = train(trainer, state)
    return {"init": init, "losses": losses, "params": jax.device_get(state.params)}


def assert_trees_close(actual, expected, rtol, atol):
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_expected = jax.tree.leaves(expected)
    assert len(flat_actual) == len(flat_expected)
    for (path, a), b in zip(flat_actual, flat_expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def assert_sharded_as(tree, shardings):
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)


@pytest.mark.parametrize("parameter_partitioning_dims", [1, 2], ids=["1d", "2d"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda shape: "mesh{}x{}".format(*shape))
def test_sharded_training_equals_single_device(mesh_shape, parameter_partitioning_dims, single_device_run):
    trainer = make_trainer(mesh_shape, parameter_partitioning_dims)
    # The same initial values as the single-device run, laid out on this mesh (sharded init: the test below).
    state = jax.device_put(single_device_run["init"], trainer.state_shardings)
    losses, state = train(trainer, state)
    np.testing.assert_allclose(losses, single_device_run["losses"], rtol=LOSS_RTOL)
    assert_trees_close(state.params, single_device_run["params"], PARAM_RTOL, PARAM_ATOL)
    # The step keeps the layout: its outputs are sharded like its inputs.
    assert_sharded_as(state, trainer.state_shardings)
    # The run really moved the parameters (by much more than the tolerance).
    moved = jax.tree.map(
        lambda a, b: np.max(np.abs(a - b)), single_device_run["params"], single_device_run["init"].params
    )
    assert min(jax.tree.leaves(moved)) > 100 * PARAM_ATOL


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 4)], ids=lambda shape: "mesh{}x{}".format(*shape))
def test_attention_in_batch_chunks_on_a_mesh_equals_single_device(mesh_shape, single_device_run, monkeypatch):
    """With a chunk budget of one byte the attention runs one example per data shard at a time (a scan over the
    batch, each device taking its own share of every chunk); the sharded run still equals the one-device run,
    which attends to its whole batch at once. The chunks add no collective: the position bias's gradient is summed
    over each device's examples in the loop and over the devices once, after it."""
    compiled = lambda trainer: trainer.lower_train_step(random_batch()).compile().as_text()
    whole = compiled(make_trainer(mesh_shape, 1))
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 1)
    monkeypatch.setattr(layers, "ATTENTION_WHOLE_BYTES", 1)
    trainer = make_trainer.__wrapped__(mesh_shape, 1)
    chunked = compiled(trainer)
    assert " while(" not in whole and " while(" in chunked
    all_reduces = lambda text: len(re.findall(r" all-reduce\(", text))
    assert all_reduces(chunked) == all_reduces(whole) > 0
    state = jax.device_put(single_device_run["init"], trainer.state_shardings)
    losses, state = train(trainer, state)
    np.testing.assert_allclose(losses, single_device_run["losses"], rtol=LOSS_RTOL)
    assert_trees_close(state.params, single_device_run["params"], PARAM_RTOL, PARAM_ATOL)


def test_init_is_sharded_and_equals_the_single_device_init(single_device_run):
    trainer = make_trainer((4, 2), 2)
    state = trainer.init_state()
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(trainer.state_shardings)
    ):
        assert leaf.sharding == sharding, jax.tree_util.keystr(path)
    # Each device holds only its block: wi_0 [embed 32, mlp 64] over (data 4, model 2).
    wi_0 = state.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert {shard.data.shape for shard in wi_0.addressable_shards} == {(8, 32)}
    # Sharded random initialisation draws the same numbers as on one device.
    assert_trees_close(state, single_device_run["init"], rtol=0, atol=0)


def padded_spec(sharding, ndim):
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def specs(tree_of_shardings, abstract_tree, *path):
    """The partition spec (padded to the rank) at `path` of a tree of shardings."""
    sharding, leaf = tree_of_shardings, abstract_tree
    for key in path:
        sharding, leaf = sharding[key], leaf[key]
    return padded_spec(sharding, len(leaf.shape))


@pytest.mark.parametrize("parameter_partitioning_dims", [1, 2])
def test_parameter_and_optimizer_state_shardings_follow_the_rules(parameter_partitioning_dims):
    trainer = make_trainer((4, 2), parameter_partitioning_dims)
    embed = "data" if parameter_partitioning_dims == 2 else None
    shardings = trainer.state_shardings
    abstract = trainer.abstract_state
    param = functools.partial(specs, shardings.params, abstract.params)
    layer = ("decoder", "layers_0")
    assert param(*layer, "mlp", "wi_0", "kernel") == (embed, "model")
    assert param(*layer, "mlp", "wo", "kernel") == ("model", embed)
    assert param(*layer, "self_attention", "query", "kernel") == (embed, "model")
    assert param(*layer, "encoder_decoder_attention", "out", "kernel") == ("model", embed)
    assert param("token_embedder", "embedding") == ("model", embed)  # vocab over model
    assert param("decoder", "logits_dense", "kernel") == (embed, "model")
    assert param("encoder", "relpos_bias", "rel_embedding") == ("model", None)  # heads over model
    assert param(*layer, "pre_mlp_layer_norm", "scale") == (embed,)
    assert param("encoder", "encoder_norm", "scale") == (embed,)
    if parameter_partitioning_dims == 1:
        assert shardings.params["decoder"]["decoder_norm"]["scale"].is_fully_replicated
    # Adafactor's factored moments: the parameter's sharding less the reduced dim.
    opt = shardings.opt_state
    v_row = functools.partial(specs, opt.v_row, abstract.opt_state.v_row)
    v_col = functools.partial(specs, opt.v_col, abstract.opt_state.v_col)
    v = functools.partial(specs, opt.v, abstract.opt_state.v)
    assert v_row(*layer, "mlp", "wi_0", "kernel") == (embed,)
    assert v_col(*layer, "mlp", "wi_0", "kernel") == ("model",)
    assert v_row(*layer, "mlp", "wo", "kernel") == (embed,)
    assert v_col(*layer, "mlp", "wo", "kernel") == ("model",)
    # Square [embed 32, joined_kv 32]: v_row keeps embed, v_col keeps joined_kv.
    assert v_row(*layer, "self_attention", "query", "kernel") == (embed,)
    assert v_col(*layer, "self_attention", "query", "kernel") == ("model",)
    # [vocab 128, embed 32]: the rows are the smaller dim (embed), the columns the larger (vocab).
    assert v_row("token_embedder", "embedding") == (embed,)
    assert v_col("token_embedder", "embedding") == ("model",)
    # Unfactored: the full second moment of a norm and of the [heads 8, buckets 32] table.
    assert v(*layer, "pre_mlp_layer_norm", "scale") == (embed,)
    assert v("encoder", "relpos_bias", "rel_embedding") == ("model", None)
    assert opt.count.is_fully_replicated and shardings.step.is_fully_replicated


def test_scanned_parameters_have_a_replicated_layers_dim():
    trainer = make_trainer((4, 2), 2, scan_layers=True)  # constructing it compiles nothing
    shardings, abstract = trainer.state_shardings, trainer.abstract_state
    param = functools.partial(specs, shardings.params, abstract.params)
    stack = ("decoder", "layers")
    assert abstract.params["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 32, 64)
    assert param(*stack, "mlp", "wi_0", "kernel") == (None, "data", "model")
    assert param(*stack, "mlp", "wo", "kernel") == (None, "model", "data")
    assert param(*stack, "self_attention", "query", "kernel") == (None, "data", "model")
    assert param(*stack, "pre_mlp_layer_norm", "scale") == (None, "data")
    opt = shardings.opt_state
    assert specs(opt.v_row, abstract.opt_state.v_row, *stack, "mlp", "wi_0", "kernel") == (None, "data")
    assert specs(opt.v_col, abstract.opt_state.v_col, *stack, "mlp", "wi_0", "kernel") == (None, "model")
    assert specs(opt.v_row, abstract.opt_state.v_row, *stack, "self_attention", "query", "kernel") == (None, "data")
    assert specs(opt.v_col, abstract.opt_state.v_col, *stack, "self_attention", "query", "kernel") == (None, "model")
    # The parameter table reports the same.
    rows, total = trainer.parameter_table()
    table = {name: (shape, axes) for name, shape, axes, _ in rows}
    assert table["decoder/layers/mlp/wi_0/kernel"] == ((2, 32, 64), ("layers", "embed", "mlp"))
    assert total == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_params))


def test_activation_constraints_take_effect_under_the_partitioner():
    """Inside `activation_context` the model's logical constraints become mesh shardings in the lowered
    program; outside it they are no-ops. (That the constrained (2, 4) 2-D step computes the right numbers is
    `test_sharded_training_equals_single_device`.)"""
    trainer = make_trainer((2, 4), 2)
    model = trainer.model
    batch = random_batch()
    logits = jax.jit(model.logits)
    outside = logits.lower(trainer.abstract_params, batch).as_text()
    with trainer.partitioner.activation_context():
        inside = logits.lower(trainer.abstract_params, batch).as_text()
    constraints = lambda text: re.findall(r"sharding_constraint .*", text)
    assert constraints(outside) == []
    inside_constraints = constraints(inside)
    # Embedding outputs and layer outputs [batch, length, embed]: batch over data, embed whole.
    assert any('[{"data"}, {}, {}]> : tensor<8x16x32xf32>' in c for c in inside_constraints)
    # The MLP hidden [batch, length, mlp]: mlp over model.
    assert any('[{"data"}, {}, {"model"}]> : tensor<8x16x64xf32>' in c for c in inside_constraints)
    # Attention heads [batch, length, heads, kv] and the logits [batch, length, vocab].
    assert any('[{"data"}, {}, {"model"}, {}]> : tensor<8x16x8x4xf32>' in c for c in inside_constraints)
    assert any('[{"data"}, {}, {"model"}]> : tensor<8x8x128xf32>' in c for c in inside_constraints)


def test_mesh_that_does_not_fit_the_devices_is_rejected():
    with pytest.raises(ValueError, match=r"mesh shape \(3, 3\).*8 devices"):
        partitioning.Partitioner((3, 3))
    with pytest.raises(ValueError, match=r"mesh shape \(8,\).*8 devices"):
        partitioning.Partitioner((8,))
    with pytest.raises(ValueError, match=r"mesh shape \(2, 4\).*4 devices"):
        partitioning.Partitioner((2, 4), devices=jax.devices()[:4])


def test_num_partitions_must_divide_the_devices():
    with pytest.raises(ValueError, match=r"num_partitions=3 .*8 devices.*\[1, 2, 4, 8\]"):
        partitioning.Partitioner(num_partitions=3)
    assert dict(partitioning.Partitioner(num_partitions=2).mesh.shape) == {"data": 4, "model": 2}
    assert dict(partitioning.Partitioner().mesh.shape) == {"data": 8, "model": 1}


def test_parameter_partitioning_dims_must_be_1_or_2():
    with pytest.raises(ValueError, match="parameter_partitioning_dims=3"):
        partitioning.Partitioner((8, 1), parameter_partitioning_dims=3)


def test_parameter_dimension_that_does_not_divide_its_mesh_axis_is_named():
    two_heads = models.EncoderDecoderModel(dataclasses.replace(TINY, num_heads=2))
    with pytest.raises(
        ValueError,
        match=r"\['decoder'\]\['relpos_bias'\]\['rel_embedding'\] of shape \(2, 32\): dimension 0 "
        r"\('heads', size 2\) does not divide mesh axis 'model' of size 4",
    ):
        trainer_lib.Trainer(two_heads, partitioning.Partitioner((2, 4)), ADAFACTOR)
    odd_vocab = models.EncoderDecoderModel(dataclasses.replace(TINY, vocab_size=100))
    with pytest.raises(ValueError, match=r"logits_dense'\]\['kernel'\].*dimension 1 \('vocab', size 100\)"):
        trainer_lib.Trainer(odd_vocab, partitioning.Partitioner((1, 8)), ADAFACTOR)
    # 2-D partitioning also splits embed (32) over data, which 3 data shards do not divide.
    with pytest.raises(ValueError, match=r"\('embed', size 32\) does not divide mesh axis 'data' of size 3"):
        trainer_lib.Trainer(
            models.EncoderDecoderModel(TINY),
            partitioning.Partitioner((3, 2), parameter_partitioning_dims=2, devices=jax.devices()[:6]),
            ADAFACTOR,
        )


def test_batch_sharding_splits_the_batch_over_data():
    partitioner = partitioning.Partitioner((4, 2))
    assert padded_spec(partitioner.batch_sharding, 2) == ("data", None)
    batch = jax.device_put(random_batch()["encoder_input_tokens"], partitioner.batch_sharding)
    assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 16)}
    assert "mesh" in repr(partitioner) and "model" in repr(partitioner)
    assert partitioning.logical_axes({"w": nn.LogicallyPartitioned(np.zeros(2), ("embed",)), "b": np.zeros(1)}) == {
        "w": ("embed",),
        "b": None,
    }
