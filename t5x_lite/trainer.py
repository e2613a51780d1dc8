"""The jitted train and eval steps: sharded initialisation, microbatching, metrics.

Nothing here reads files or gin. `Trainer` takes a model, a partitioner and an optax optimizer; its steps
take and return device values only, so the step loop never waits on the host (metrics are fetched at the
logging cadence by the caller).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5x_lite import models, optimizers, partitioning

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed form (plain dict of pytrees)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}


class Trainer:
    """Sharded init, train step (with gradient accumulation) and eval step of a model on a mesh.

    Args:
      model: the model (loss, parameters' logical axes).
      partitioner: the mesh and logical-axis rules.
      optimizer: an optax GradientTransformation, or a callable building one (given `logical_axes` when it
        takes them, see `optimizers.build`).
      num_microbatches: the batch is split into this many microbatches whose gradients are summed; the
        update equals the full batch's.
      learning_rate_fn: the schedule, only to log the learning rate.
      seed: initialisation and dropout seed.
    """

    def __init__(
        self,
        model: models.EncoderDecoderModel,
        partitioner: partitioning.Partitioner,
        optimizer: optax.GradientTransformation | Callable[..., optax.GradientTransformation],
        *,
        num_microbatches: int = 1,
        learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.partitioner = partitioner
        self.num_microbatches = int(num_microbatches)
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self.learning_rate_fn = learning_rate_fn
        self.seed = seed

        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(seed))
        self.params_logical_axes = partitioning.logical_axes(boxed)
        self.abstract_params = nn.unbox(boxed)
        partitioner.check_divisible(self.abstract_params, self.params_logical_axes)
        if isinstance(optimizer, optax.GradientTransformation):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizers.build(optimizer, self.params_logical_axes)
        abstract_opt_state = jax.eval_shape(self.optimizer.init, self.abstract_params)
        self.opt_state_logical_axes = optimizers.state_logical_axes(
            abstract_opt_state, self.abstract_params, self.params_logical_axes
        )
        self.state_shardings = TrainState(
            step=partitioner.replicated,
            params=partitioner.shardings(self.params_logical_axes),
            opt_state=partitioner.shardings(self.opt_state_logical_axes),
        )
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.abstract_params, abstract_opt_state),
            self.state_shardings,
        )
        self.dropout_rng = jax.random.PRNGKey(seed + 1)

        batch_sharding = partitioner.batch_sharding
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self.state_shardings, batch_sharding, partitioner.replicated),
            out_shardings=(self.state_shardings, partitioner.replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self.state_shardings.params, batch_sharding),
            out_shardings=partitioner.replicated,
        )

    # ---- public API -------------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """A freshly initialised, sharded train state (no parameter is ever whole on one device)."""
        with self.partitioner.activation_context():
            return self._init(jax.random.PRNGKey(self.seed))

    def state_from_params(self, params: Any) -> TrainState:
        """A step-0 train state around given (e.g. pre-trained) parameters, with a fresh optimizer state."""
        init = jax.jit(
            lambda p: TrainState(step=jnp.zeros([], jnp.int32), params=p, opt_state=self.optimizer.init(p)),
            in_shardings=(self.state_shardings.params,),
            out_shardings=self.state_shardings,
        )
        return init(params)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update. `state` is donated. Metrics are device scalars: loss and z_loss per target
        token, accuracy, the optimised loss (`model.objective_name`, e.g. `loss/NUM_REAL_TARGET_TOKENS`),
        learning_rate, grad_norm, and the weight summed."""
        with self.partitioner.activation_context():
            return self._train_step(state, batch, self.dropout_rng)

    def lower_train_step(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
        """The train step lowered for batches like `batch_spec`; `.compile()` it and call the result with
        (state, batch, trainer.dropout_rng) to time compilation and steps separately."""
        with self.partitioner.activation_context():
            return self._train_step.lower(self.abstract_state, batch_spec, self.dropout_rng)

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Teacher-forced sums over the batch: loss, z_loss, weight, correct (aggregate with `summarize`)."""
        with self.partitioner.activation_context():
            return self._eval_step(params, batch)

    def parameter_table(self) -> tuple[list[tuple[str, tuple[int, ...], tuple, str]], int]:
        """Every parameter's (path, shape, logical axes, mesh sharding) and the total parameter count."""
        rows = []
        flat = jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]
        axes = jax.tree.leaves(self.params_logical_axes, is_leaf=partitioning.is_logical_axes)
        for (path, leaf), logical in zip(flat, axes):
            name = "/".join(partitioning.path_names(path))
            rows.append((name, tuple(leaf.shape), logical, str(self.partitioner.mesh_axes(logical))))
        total = sum(math.prod(r[1]) for r in rows)
        return rows, total

    # ---- jitted bodies ----------------------------------------------------------------------------------

    def _init_state(self, rng):
        params = nn.unbox(self.model.init(rng))
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=self.optimizer.init(params))

    def _grads(self, params, batch, dropout_rng):
        """Gradient of (summed loss / whole-batch denominator), accumulated over microbatches."""
        denominator = self.model.loss_denominator(batch)

        def loss_fn(p, microbatch, rng):
            sums = self.model.loss_sums(p, microbatch, dropout_rng=rng)
            return sums["objective"] / denominator, sums

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if self.num_microbatches == 1:
            return grad_fn(params, batch, dropout_rng)

        m = self.num_microbatches
        batch_size = next(iter(batch.values())).shape[0]
        if batch_size % m:
            raise ValueError(f"batch size {batch_size} does not divide into num_microbatches={m}")

        # Microbatch i takes examples i, i+m, i+2m, ...: when each data shard's part of the batch is a
        # multiple of m, every shard holds its slice of each microbatch and splitting moves no data.
        def split(x):
            x = x.reshape((batch_size // m, m) + x.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(x, (None, "batch") + ("length",) * (x.ndim - 2))

        microbatches = jax.tree.map(split, dict(batch))

        def body(carry, inputs):
            grads_acc, sums_acc = carry
            index, microbatch = inputs
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            grads, sums = grad_fn(params, microbatch, rng)
            return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

        zeros_grads = jax.tree.map(jnp.zeros_like, params)
        sums_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], microbatches), dropout_rng))[1]
        zeros_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape)
        (grads, sums), _ = jax.lax.scan(body, (zeros_grads, zeros_sums), (jnp.arange(m), microbatches))
        return grads, sums

    def _train_step_impl(self, state: TrainState, batch: Batch, dropout_rng):
        use_dropout = self.model.config.dropout_rate > 0.0
        rng = jax.random.fold_in(dropout_rng, state.step) if use_dropout else None
        grads, sums = self._grads(state.params, batch, rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = summarize(sums)
        metrics[self.model.objective_name] = sums["objective"] / self.model.loss_denominator(batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if self.learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(self.learning_rate_fn(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def _eval_step_impl(self, params, batch):
        return self.model.loss_sums(params, batch)


def summarize(sums: Mapping[str, Any]) -> dict[str, Any]:
    """Per-target-token loss, z-loss and accuracy from summed values (device or host)."""
    weight = jnp.maximum(sums["weight"], 1e-8)
    return {
        "loss": sums["loss"] / weight,
        "z_loss": sums["z_loss"] / weight,
        "accuracy": sums["correct"] / weight,
        "weight": sums["weight"],
    }


def accumulate(metric_dicts: list[Mapping[str, Any]]) -> dict[str, float]:
    """Host-side: sum several eval-step outputs and summarise them."""
    fetched = jax.device_get(metric_dicts)
    total = {k: float(np.sum([m[k] for m in fetched])) for k in ("loss", "z_loss", "weight", "correct")}
    return {k: float(v) for k, v in summarize(total).items()}
