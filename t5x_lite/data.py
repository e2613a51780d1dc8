"""seqio datasets -> per-process shards -> global jax.Arrays.

Data flows one way:

    source -> seqio preprocessors -> feature converter (packing) -> per-process batch   (get_dataset)
           -> global sharded jax.Array -> step                                          (GlobalBatchIterator)

Each process reads its own shard of the examples (`seqio.ShardInfo(process_index, process_count)`) and batches
`global_batch_size / process_count` of them; `GlobalBatchIterator` stitches the processes' batches into global
arrays laid out by a sharding, and checkpoints the tf.data iterator so that a resumed run sees exactly the batches
an uninterrupted one would have seen.
"""
import dataclasses
import difflib
import os
from collections.abc import Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to read: the arguments of `get_dataset` that an experiment chooses (gin binds these)."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 0
    pack: bool = True
    use_cached: bool = False

    def dataset(self, *, repeat: bool = True, shard_info: seqio.ShardInfo | None = None) -> tf.data.Dataset:
        return get_dataset(
            self.mixture_or_task_name,
            task_feature_lengths=self.task_feature_lengths,
            split=self.split,
            global_batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            pack=self.pack,
            repeat=repeat,
            shard_info=shard_info,
            use_cached=self.use_cached,
        )


def keep_tensorflow_off_accelerators() -> None:
    """Hides GPUs from TensorFlow: the input pipeline runs on the CPU, and TF would otherwise reserve most of the
    GPU memory that JAX needs. Takes effect only before TF first initialises its devices."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF's devices are already initialised: whoever did so chose them, leave that choice alone.


def _get_provider(mixture_or_task_name: str) -> seqio.Task | seqio.Mixture:
    registered = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    if mixture_or_task_name not in registered:
        close = difflib.get_close_matches(mixture_or_task_name, registered, n=5, cutoff=0.5)
        suggestion = f"Close matches: {close}. " if close else ""
        listed = registered[:10]
        raise ValueError(
            f"No seqio Task or Mixture is registered as {mixture_or_task_name!r}. {suggestion}"
            f"{len(registered)} are registered{', e.g. ' + str(listed) if listed else ''}. "
            "Is the module that registers it (e.g. `tasks`) imported?"
        )
    return seqio.get_mixture_or_task(mixture_or_task_name)


def per_process_batch_size(global_batch_size: int, num_shards: int) -> int:
    """The batch each of `num_shards` data shards reads: global_batch_size / num_shards, which must be whole."""
    if global_batch_size <= 0 or global_batch_size % num_shards:
        below = global_batch_size // num_shards * num_shards
        options = [size for size in (below, below + num_shards, below + 2 * num_shards) if size > 0]
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the number of data shards "
            f"(processes) {num_shards}; e.g. {', '.join(map(str, options))} would work."
        )
    return global_batch_size // num_shards


def get_dataset(
    mixture_or_task_name: str,
    *,
    task_feature_lengths: Mapping[str, int],
    split: str,
    global_batch_size: int,
    shuffle: bool,
    seed: int | None,
    pack: bool,
    repeat: bool = True,
    shard_info: seqio.ShardInfo | None = None,
    feature_converter_cls: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter,
    use_cached: bool = False,
) -> tf.data.Dataset:
    """This process's batches of a registered seqio Task or Mixture, converted to model features.

    Args:
      mixture_or_task_name: a name in seqio's Task or Mixture registry.
      task_feature_lengths: maximum length of each task feature, e.g. {"inputs": 512, "targets": 114}.
      split: the split to read, e.g. "train" or "validation".
      global_batch_size: examples per step over all processes; each shard reads
        global_batch_size / shard_info.num_shards of them.
      shuffle, seed: shuffle the examples (and the files, for file sources); the same seed gives the same order.
      pack: pack several examples into each row (adds *_segment_ids and *_positions features).
      repeat: repeat the split forever (training); else one pass, for evaluation.
      shard_info: which shard of the examples this process reads; defaults to
        ShardInfo(jax.process_index(), jax.process_count()).
      feature_converter_cls: the seqio FeatureConverter class, built with `pack=pack`.
      use_cached: read the task's offline cache (seqio_cache_tasks) rather than preprocessing on the fly.

    Returns:
      A dataset of dicts of int32[global_batch_size / num_shards, length] tensors, e.g. for EncDecFeatureConverter
      encoder_input_tokens, decoder_target_tokens, decoder_input_tokens, decoder_loss_weights and, when packed,
      encoder_segment_ids, encoder_positions, decoder_segment_ids, decoder_positions. The last partial batch is
      dropped, so every batch has the same static shape (an evaluation pass over a finite split skips fewer than
      one batch of examples per shard).
    """
    keep_tensorflow_off_accelerators()
    provider = _get_provider(mixture_or_task_name)
    if split not in provider.splits:
        raise ValueError(f"{mixture_or_task_name!r} has no split {split!r}; its splits are {list(provider.splits)}.")
    if shard_info is None:
        shard_info = seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
    batch_size = per_process_batch_size(global_batch_size, shard_info.num_shards)

    dataset = seqio.get_dataset(
        provider,
        task_feature_lengths=dict(task_feature_lengths),
        feature_converter=feature_converter_cls(pack=pack),
        dataset_split=split,
        use_cached=use_cached,
        shuffle=shuffle,
        num_epochs=None if repeat else 1,
        shard_info=shard_info,
        seed=seed,
        batch_size=batch_size,  # seqio batches with drop_remainder=True
        verbose=False,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


class GlobalBatchIterator:
    """Iterates a dataset of per-process batches as dicts of global jax.Arrays laid out by `sharding`.

    Every process builds its own iterator over its own shard (see `get_dataset`); the batch dimension of the
    global arrays is the concatenation of the processes' batches: [per-process batch * process_count, ...].
    `save` and `restore` checkpoint the tf.data iterator itself (shuffle buffers, packing state, position in the
    source), so a restored iterator continues with exactly the batches the saved one would have produced.
    """

    def __init__(self, dataset: tf.data.Dataset,
                 sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]):
        self._dataset = dataset
        self._iterator = iter(dataset)  # a tf iterator (not as_numpy_iterator) so that it can be checkpointed
        self._local_spec = dict(dataset.element_spec)
        for name, spec in self._local_spec.items():
            if not spec.shape.is_fully_defined():
                raise ValueError(f"Feature {name!r} has shape {spec.shape}; batches need a static shape "
                                 "(batch with drop_remainder=True and pad to fixed lengths).")
        if isinstance(sharding, Mapping):
            missing = sorted(set(self._local_spec) - set(sharding))
            if missing:
                raise ValueError(f"No sharding for features {missing}; shardings were given for {sorted(sharding)}.")
            self._shardings = {name: sharding[name] for name in self._local_spec}
        else:
            self._shardings = {name: sharding for name in self._local_spec}

    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global shape, dtype and sharding of each feature: handy for building abstract batches."""
        return {name: jax.ShapeDtypeStruct(self._global_shape(spec.shape.as_list()), spec.dtype.as_numpy_dtype,
                                           sharding=self._shardings[name])
                for name, spec in self._local_spec.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The global shape of each feature."""
        return {name: spec.shape for name, spec in self.element_spec.items()}

    @staticmethod
    def _global_shape(local_shape) -> tuple[int, ...]:
        return (local_shape[0] * jax.process_count(), *local_shape[1:])

    def __iter__(self) -> "GlobalBatchIterator":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local_batch = {name: value.numpy() for name, value in next(self._iterator).items()}
        return {name: jax.make_array_from_process_local_data(
                    self._shardings[name], np.asarray(value),
                    self._global_shape(value.shape) if jax.process_count() > 1 else None)
                for name, value in local_batch.items()}

    def _checkpoint_prefix(self, path: str) -> str:
        return os.path.join(path, f"process_{jax.process_index()}-of-{jax.process_count()}")

    def save(self, path: str) -> None:
        """Writes this process's iterator state under the directory `path` (created if missing; local or gs://)."""
        tf.io.gfile.makedirs(path)
        tf.train.Checkpoint(iterator=self._iterator).write(self._checkpoint_prefix(path))

    def restore(self, path: str) -> None:
        """Continues from the state `save` wrote under `path`; the dataset must be built with the same arguments."""
        prefix = self._checkpoint_prefix(path)
        if not tf.io.gfile.exists(prefix + ".index"):
            found = sorted(tf.io.gfile.listdir(path)) if tf.io.gfile.isdir(path) else "no such directory"
            raise FileNotFoundError(f"No data iterator state for this process at {prefix!r} (found: {found}); "
                                    "it must be saved by a run with the same number of processes.")
        tf.train.Checkpoint(iterator=self._iterator).read(prefix).assert_consumed()
