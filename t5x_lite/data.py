"""seqio datasets -> per-process shards -> global jax.Arrays.

Data flows one way:

    source -> seqio preprocessors -> feature converter (packing) -> per-process batch   (get_dataset)
           -> global sharded jax.Array -> step                                          (GlobalBatchIterator)

The examples are split into data shards (`seqio.ShardInfo(index, num_shards)`), by default one per process; each
process reads only its own shards, `global_batch_size / num_shards` examples per shard and step.
`GlobalBatchIterator` stitches the shards' batches, in shard order, into global arrays laid out by a sharding, and
checkpoints the tf.data iterators so that a resumed run sees exactly the batches an uninterrupted one would have
seen, even when it runs on another number of processes (as long as the number of data shards stays the same).
"""
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging


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
    # How many data shards the examples are split into (see GlobalBatchIterator.from_config). None: one per slice
    # of the global batch that the processes hold, i.e. one per process (T5X's layout). A fixed number makes the
    # batches independent of the process count: any count that divides it builds the same global batches and
    # resumes exactly from a checkpoint written with another.
    num_shards: int | None = None

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
    """Iterates this process's data shards as dicts of global jax.Arrays laid out by `sharding`.

    The examples are split into `num_shards` data shards; each process reads the consecutive shards that make up
    its slice of the global batch (`from_config` picks them from the sharding) and concatenates their batches in
    shard order, so the global batch is [shard 0's batch, shard 1's batch, ...] however many processes read them.
    One process reading shards 0 and 1 therefore builds the same global batches as two processes reading one each.

    `save` and `restore` checkpoint the tf.data iterators themselves (shuffle buffers, packing state, position in
    the source), one file set per data shard, so a restored iterator continues with exactly the batches the saved
    one would have produced, under any number of processes that divides `num_shards`. A checkpoint written with
    another number of data shards cannot continue exactly: `restore` then restarts the pipeline and skips the
    batches already read, with a warning (see `restore`).
    """

    def __init__(self, dataset: tf.data.Dataset | Sequence[tf.data.Dataset],
                 sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding], *,
                 shards: Sequence[int] | None = None, num_shards: int | None = None, finite: bool = False):
        """
        Args:
          dataset: this process's batches: one dataset, data shard `jax.process_index()` of `jax.process_count()`
            (what `get_dataset` reads by default), or one dataset per data shard in `shards`.
          sharding: the layout of the global arrays: one sharding, or one per feature.
          shards, num_shards: which data shards `dataset` holds (consecutive, in order) of how many; default
            [jax.process_index()] of jax.process_count().
          finite: the datasets end (one pass, e.g. evaluation). With several processes every batch then starts
            with a check that all processes have one, and all stop at the first that any lacks: shards of a
            packed split differ in length, and a process that ran on alone would wait forever in a collective.
        """
        datasets = [dataset] if isinstance(dataset, tf.data.Dataset) else list(dataset)
        if shards is None:
            shards, num_shards = [jax.process_index()], jax.process_count()
        shards = [int(shard) for shard in shards]
        if num_shards is None or len(datasets) != len(shards) or not datasets:
            raise ValueError(f"Give one dataset per data shard and the number of shards: got {len(datasets)} "
                             f"datasets for shards {shards} of {num_shards}.")
        if shards != list(range(shards[0], shards[0] + len(shards))) or not 0 <= shards[0] <= shards[-1] < num_shards:
            raise ValueError(f"A process reads consecutive data shards in 0..{num_shards - 1}; got {shards}.")
        self._datasets = datasets
        self._iterators = [iter(d) for d in datasets]  # tf iterators (not as_numpy_iterator): checkpointable
        self._shards = shards
        self._num_shards = num_shards
        self._finite = finite
        self._exhausted = False
        self._batches_read = 0

        self._local_spec = dict(datasets[0].element_spec)
        for other in datasets[1:]:
            if dict(other.element_spec) != self._local_spec:
                raise ValueError(f"The data shards' batches differ: {other.element_spec} vs {self._local_spec}.")
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

        # Check that this process's slice of the global batch is exactly the rows of the shards it reads.
        shard_rows = next(iter(self._local_spec.values())).shape[0]
        self._global_rows = shard_rows * num_shards
        expected = (shards[0] * shard_rows, (shards[-1] + 1) * shard_rows)
        self._writes_checkpoint = True
        for name, spec in self._local_spec.items():
            start, stop, first_process = _process_rows(self._shardings[name], self._global_shape(spec.shape))
            if (start, stop) != expected:
                raise ValueError(
                    f"Feature {name!r}: this process (index {jax.process_index()} of {jax.process_count()}) holds rows "
                    f"[{start}, {stop}) of the global batch of {self._global_rows} under {self._shardings[name]}, but "
                    f"its data shards {shards} of {num_shards} are rows [{expected[0]}, {expected[1]}). Build the "
                    "iterator with GlobalBatchIterator.from_config, which picks the shards from the sharding.")
            # Processes that hold the same rows (model parallelism across hosts) read the same shards; one writes.
            self._writes_checkpoint &= first_process == jax.process_index()

    @classmethod
    def from_config(cls, config: DatasetConfig, sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding],
                    *, repeat: bool = True) -> "GlobalBatchIterator":
        """The iterator over `config`'s data that this process reads, for batches laid out by `sharding`.

        The processes that hold the same slice of the global batch read the same data shards; with `num_slices`
        slices (usually one per process) and `config.num_shards` shards (default: num_slices), a process reads
        num_shards / num_slices consecutive shards. `repeat=False` reads one pass (evaluation) and stops all
        processes together (see `finite` in the constructor).
        """
        any_sharding = next(iter(sharding.values())) if isinstance(sharding, Mapping) else sharding
        rank = max(2, len(getattr(any_sharding, "spec", ())))  # features are [batch, length]
        start, stop, _ = _process_rows(any_sharding, (config.batch_size,) + (1,) * (rank - 1))
        rows = stop - start
        num_slices, slice_index = config.batch_size // rows, start // rows
        num_shards = config.num_shards or num_slices
        if num_shards % num_slices:
            raise ValueError(
                f"num_shards={num_shards} data shards cannot be split evenly over the {num_slices} slices of the global "
                f"batch that the processes hold; use a multiple of {num_slices}, e.g. {num_slices}, {2 * num_slices}.")
        per_slice = num_shards // num_slices
        shards = list(range(slice_index * per_slice, (slice_index + 1) * per_slice))
        datasets = [config.dataset(repeat=repeat, shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards))
                    for shard in shards]
        return cls(datasets, sharding, shards=shards, num_shards=num_shards, finite=not repeat)

    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global shape, dtype and sharding of each feature: handy for building abstract batches."""
        return {name: jax.ShapeDtypeStruct(self._global_shape(spec.shape), spec.dtype.as_numpy_dtype,
                                           sharding=self._shardings[name])
                for name, spec in self._local_spec.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The global shape of each feature."""
        return {name: spec.shape for name, spec in self.element_spec.items()}

    @property
    def batches_read(self) -> int:
        """How many global batches this iterator (and the runs it was restored from) has produced."""
        return self._batches_read

    def _global_shape(self, local_shape) -> tuple[int, ...]:
        return (self._global_rows, *local_shape[1:])

    def _next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch: its shards' batches, concatenated in shard order."""
        batches = [next(iterator) for iterator in self._iterators]
        return {name: np.concatenate([batch[name].numpy() for batch in batches]) if len(batches) > 1
                else batches[0][name].numpy() for name in self._local_spec}

    def __iter__(self) -> "GlobalBatchIterator":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._exhausted:
            raise StopIteration
        try:
            local_batch = self._next_local()
        except StopIteration:
            local_batch = None
        if self._finite and jax.process_count() > 1:
            from jax.experimental import multihost_utils  # only needed on multi-process runs

            if not np.all(multihost_utils.process_allgather(np.asarray(local_batch is not None))):
                local_batch = None
        if local_batch is None:
            self._exhausted = True
            raise StopIteration
        self._batches_read += 1
        return {name: jax.make_array_from_process_local_data(
                    self._shardings[name], value, self._global_shape(value.shape))
                for name, value in local_batch.items()}

    def _shard_prefix(self, directory: str, shard: int) -> str:
        return os.path.join(directory, f"shard_{shard:05d}-of-{self._num_shards:05d}")

    def save(self, directory: str) -> None:
        """Writes the state of this process's data shards into `directory` (created if missing; local or gs://),
        which all processes share: `shard_<i>-of-<n>.*` (tf.data's checkpoint) and `shard_<i>-of-<n>.json` (the
        number of batches read) per data shard."""
        tf.io.gfile.makedirs(directory)
        if not self._writes_checkpoint:
            return
        for shard, iterator in zip(self._shards, self._iterators):
            prefix = self._shard_prefix(directory, shard)
            tf.train.Checkpoint(iterator=iterator).write(prefix)
            with tf.io.gfile.GFile(prefix + ".json", "w") as f:
                json.dump({"batches_read": self._batches_read, "shard": shard, "num_shards": self._num_shards}, f)

    def restore(self, directory: str) -> None:
        """Continues from the state `save` wrote into `directory`; the datasets must be built with the same arguments.

        Saved with the same number of data shards (by any number of processes): each shard continues exactly where
        it was. Saved with another number (e.g. by 2 processes with the default one shard per process, restored by
        1): the shards' states cannot be mapped onto this run's, so the pipeline restarts and skips as many batches
        as were read, with a warning: from here on this run sees the batches that a run with this number of shards
        would have seen, not those of the saved run, and the skip reads (and discards) every batch before. This
        needs an iterator that has not produced a batch yet (as when resuming).

        Raises:
          FileNotFoundError: `directory` holds no iterator state, or not that of this process's shards.
        """
        entries = sorted(tf.io.gfile.listdir(directory)) if tf.io.gfile.isdir(directory) else []
        saved = sorted(entry for entry in entries if _SHARD_STATE.fullmatch(entry))
        if not saved:
            raise FileNotFoundError(
                f"No data iterator state in {directory!r} (it holds {entries or 'nothing'}): expected the "
                f"shard_<i>-of-<n>.json and tf.data checkpoint files that GlobalBatchIterator.save writes.")
        with tf.io.gfile.GFile(os.path.join(directory, saved[0])) as f:
            saved_info = json.load(f)
        if saved_info["num_shards"] == self._num_shards:
            prefixes = [self._shard_prefix(directory, shard) for shard in self._shards]
            missing = [prefix for prefix in prefixes
                       if not (tf.io.gfile.exists(prefix + ".index") and tf.io.gfile.exists(prefix + ".json"))]
            if missing:
                raise FileNotFoundError(f"No data iterator state for data shards at {missing} (the directory holds "
                                        f"{entries}).")
            for prefix, iterator in zip(prefixes, self._iterators):
                tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
            with tf.io.gfile.GFile(prefixes[0] + ".json") as f:
                self._batches_read = json.load(f)["batches_read"]
            self._exhausted = False
            return
        batches = saved_info["batches_read"]
        if jax.process_index() == 0:
            logging.warning(
                "The data iterator state in %s was saved with %d data shards; this run has %d (%d per process). The "
                "shards' positions cannot be carried over, so the input pipeline restarts and skips the %d batches "
                "already read: from here on the batches are those that a run with %d data shard(s) would see, not "
                "those the saved run would have seen. To resume exactly, keep the number of data shards: set "
                "DatasetConfig.num_shards (e.g. --gin.train/data.DatasetConfig.num_shards=%d) to a multiple of every "
                "process count the run will use.",
                directory, saved_info["num_shards"], self._num_shards, len(self._shards), batches, self._num_shards,
                saved_info["num_shards"])
        if self._batches_read:
            raise ValueError(f"Restoring the iterator state in {directory!r}, saved with {saved_info['num_shards']} "
                             f"data shards, into an iterator with {self._num_shards} needs a fresh iterator; this one "
                             f"has produced {self._batches_read} batches.")
        # Skip on the iterators made in __init__: a second iterator over the same shuffled dataset (tf.data's
        # reshuffle_each_iteration) would see another order than a fresh run's first.
        for _ in range(batches):
            self._next_local()
        self._batches_read = batches


_SHARD_STATE = re.compile(r"shard_\d{5}-of-\d{5}\.json")


def _process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(start, stop, first_process): the rows [start, stop) of a global batch of `global_shape` that this process's
    devices hold under `sharding`, and the lowest process index holding the same rows."""
    rows = global_shape[0]
    try:
        indices = sharding.devices_indices_map(tuple(global_shape))
    except ValueError as error:
        spec = getattr(sharding, "spec", None)
        names = spec[0] if spec else None
        names = (names,) if isinstance(names, str) else names or ()
        ways = int(np.prod([sharding.mesh.shape[n] for n in names])) if names else None
        below = ways * max(1, rows // ways) if ways else 0
        hint = f"; use a multiple of {ways}, e.g. {below} or {below + ways}" if ways else ""
        raise ValueError(f"The global batch size {rows} does not split evenly over the batch sharding {sharding}"
                         f"{hint}.") from error

    def span(index) -> tuple[int, int]:
        return index[0].indices(rows)[:2] if index else (0, rows)

    spans_by_process: dict[int, set[tuple[int, int]]] = {}
    for device, index in indices.items():
        spans_by_process.setdefault(device.process_index, set()).add(span(index))
    local = sorted(spans_by_process[jax.process_index()])
    if any(a[1] != b[0] for a, b in zip(local, local[1:])):
        raise ValueError(f"This process's devices hold the non-contiguous rows {local} of the global batch under "
                         f"{sharding}; each process must hold one contiguous slice of the batch.")

    def extent(spans) -> tuple[int, int]:
        return min(s[0] for s in spans), max(s[1] for s in spans)

    start, stop = extent(local)
    first_process = min(p for p, spans in spans_by_process.items() if extent(spans) == (start, stop))
    return start, stop, first_process
