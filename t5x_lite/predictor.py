"""The jitted predict and score steps of a model on a mesh: the inference counterpart of `trainer.Trainer`.

Parameters are laid out by the partitioner's rules (as in training, so a train state's params are used as they
are) and batches [batch, length] are split over `data`; outputs come back replicated, so every process holds
every row. Nothing here reads files, seqio or gin: `restore_params` goes through `checkpoints`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from t5x_lite import checkpoints, decoding, models, partitioning

Batch = Mapping[str, Any]


class Predictor:
    """Sharded `predict_batch` and `score_batch` of a model, compiled once per batch shape.

    Args:
      model: the model.
      partitioner: the mesh and logical-axis rules.
      decoding_config: how `predict` decodes (greedy by default).
      eos_id: the vocabulary's end-of-sequence id.
      return_all_decodes: `predict` returns every sample / beam, [batch, decodes, length], best beam first.
    """

    def __init__(
        self,
        model: models.EncoderDecoderModel,
        partitioner: partitioning.Partitioner,
        *,
        decoding_config: decoding.DecodingConfig | None = None,
        eos_id: int = 1,
        return_all_decodes: bool = False,
    ):
        self.model = model
        self.partitioner = partitioner
        self.decoding_config = decoding_config or decoding.DecodingConfig()
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        self.params_logical_axes = partitioning.logical_axes(boxed)
        abstract = nn.unbox(boxed)
        partitioner.check_divisible(abstract, self.params_logical_axes)
        self.params_shardings = partitioner.shardings(self.params_logical_axes)
        self.abstract_params = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.params_shardings
        )
        predict = functools.partial(
            model.predict_batch,
            eos_id=eos_id,
            return_scores=True,
            return_all_decodes=return_all_decodes,
            **dataclasses.asdict(self.decoding_config),
        )
        batch_sharding, replicated = partitioner.batch_sharding, partitioner.replicated
        self._predict = jax.jit(
            lambda params, batch, rng: predict(params, batch, rng=rng),
            in_shardings=(self.params_shardings, batch_sharding, replicated),
            out_shardings=replicated,
        )
        self._score = jax.jit(
            model.score_batch, in_shardings=(self.params_shardings, batch_sharding), out_shardings=replicated
        )

    def restore_params(self, path: str) -> Any:
        """The 'params' of a checkpoint (a step directory, or a checkpoint directory's newest step), restored
        onto this mesh whatever mesh wrote it."""
        return checkpoints.restore_params(path, self.abstract_params)

    def init_params(self, seed: int = 0) -> Any:
        """Randomly initialised parameters, laid out on the mesh (benchmarks, tests)."""
        init = jax.jit(lambda rng: nn.unbox(self.model.init(rng)), out_shardings=self.params_shardings)
        with self.partitioner.activation_context():
            return init(jax.random.PRNGKey(seed))

    def predict(self, params: Any, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (tokens int32[batch, length] (or [batch, decodes, length]), scores float32[batch] (or [batch, decodes]))."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        with self.partitioner.activation_context():
            return self._predict(params, self.to_global(batch), rng)

    def score(self, params: Any, batch: Batch) -> jax.Array:
        """Summed log-likelihood of each example's targets: float32[batch]."""
        with self.partitioner.activation_context():
            return self._score(params, self.to_global(batch))

    def to_global(self, batch: Batch) -> dict[str, jax.Array]:
        """A batch whose every process holds all rows (numpy) -> global arrays split over `data`."""
        sharding = self.partitioner.batch_sharding

        def place(x):
            if isinstance(x, jax.Array):
                return x
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return {name: place(value) for name, value in batch.items()}

    def check_batch_size(self, batch_size: int) -> None:
        """Batches are split over the `data` axis of the mesh, so their size must be a multiple of it."""
        ways = self.partitioner.mesh.shape["data"]
        if batch_size % ways:
            raise ValueError(
                f"batch size {batch_size} does not divide over the mesh's data axis of size {ways} "
                f"(mesh {dict(self.partitioner.mesh.shape)}); use a multiple of {ways}, e.g. {ways * max(1, batch_size // ways)}"
            )
