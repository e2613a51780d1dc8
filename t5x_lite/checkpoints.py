"""Orbax save / restore / resume of a train state and the data iterator's position, onto any mesh.

The checkpointer knows nothing of the model: it saves any pytree of `jax.Array`s (typically
`{'step': ..., 'params': ..., 'opt_state': ...}`) and restores it onto the shardings of an abstract pytree
(`jax.ShapeDtypeStruct`s carrying shardings of the *current* mesh), so a checkpoint written on a (4, 2) mesh
restores onto a (2, 4) mesh, onto one device, or onto another number of hosts.

Layout of a checkpoint directory::

    <directory>/
      1000/                        a finalized step: Orbax writes 1000.orbax-checkpoint-tmp-<time>/ and renames
        state/                     it on commit, so a half-written step is never mistaken for a finished one
        data_iterator/             the train state (OCDBT + zarr) and the iterator's files (per data shard)
        _CHECKPOINT_METADATA
      2000/
      3000.corrupt/                a step that failed to restore, moved aside by `restore_latest_good`

Only jax, flax, optax and orbax are imported here (no tensorflow, no seqio): the data iterator is reached
through a two-method protocol (`save(path)`, `restore(path)`), whatever library implements it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t5x_lite.partitioning import path_names

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITERATOR_ITEM = "data_iterator"
CORRUPT_SUFFIX = ".corrupt"
_TEMPORARY_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step still being written
_MAX_LISTED = 20  # how many offending paths an error message names before summarising


class TreeMismatchError(ValueError):
    """The requested pytree does not match the one in the checkpoint (missing / unexpected paths, shapes)."""


@runtime_checkable
class DataIterator(Protocol):
    """What the checkpointer needs of a data iterator: it writes and reads its own files in the directory `path`.

    `path` is the step's data-iterator directory, which exists when `save` is called and which all processes
    share: each process writes only files whose names say what they hold (e.g. `shard_<i>-of-<n>.*` for the data
    shards it reads), so that a run on another number of processes finds what it needs. `restore` raises
    FileNotFoundError when the state it needs is not there.
    """

    def save(self, path: str) -> None: ...

    def restore(self, path: str) -> None: ...


# ------------------------------------------------------------------------------------------------------------
# The data iterator as an Orbax item, so that it is committed atomically with the train state.


class DataIteratorCheckpointHandler(ocp.CheckpointHandler):
    """Saves and restores a `DataIterator` inside a step directory; every process writes its own files there.

    The save is synchronous: it runs in the blocking part of an async save, so the position recorded is the
    one at the moment `Checkpointer.save` was called; the directory is renamed into place with the rest of the
    step when Orbax finalizes it.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        args.iterator.save(str(directory))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> DataIterator:
        args.iterator.restore(str(directory))
        return args.iterator


@ocp.args.register_with_handler(DataIteratorCheckpointHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: DataIterator


@ocp.args.register_with_handler(DataIteratorCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: DataIterator


# ------------------------------------------------------------------------------------------------------------
# Pytree helpers: abstract targets and a readable comparison against a checkpoint's metadata.


def _path_str(path) -> str:
    return "/".join(path_names(path))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _as_abstract(tree, *, name: str):
    """Returns `tree` with every leaf a `jax.ShapeDtypeStruct` carrying a sharding (`jax.Array`s are converted)."""
    bad = []

    def convert(path, leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        if isinstance(leaf, jax.ShapeDtypeStruct) and isinstance(leaf.sharding, jax.sharding.Sharding):
            return leaf
        bad.append(f"{_path_str(path)} ({type(leaf).__name__}{', no sharding' if hasattr(leaf, 'sharding') else ''})")
        return leaf

    converted = jax.tree_util.tree_map_with_path(convert, tree)
    if bad:
        raise ValueError(
            f"Every leaf of {name} must be a jax.ShapeDtypeStruct with a sharding of the current mesh, e.g. "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)), or a jax.Array; "
            f"offending leaves: {_listing(bad)}"
        )
    if not jax.tree.leaves(converted):
        raise ValueError(f"{name} has no leaves; pass the abstract pytree to restore into.")
    return converted


def _read_tree_metadata(item_directory: epath.Path):
    """The saved pytree with `ArrayMetadata` leaves (`.shape`, `.dtype`); custom nodes come back as dicts."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(item_directory).tree
    finally:
        handler.close()


def _check_tree_matches(saved_tree, abstract_tree, *, what: str, location) -> None:
    """Raises TreeMismatchError naming missing / unexpected leaf paths and shape mismatches."""
    saved = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]}
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved.keys() - wanted.keys())
    shapes = sorted(
        f"{path}: checkpoint {tuple(saved[path].shape)} vs requested {tuple(wanted[path].shape)}"
        for path in wanted.keys() & saved.keys()
        if getattr(saved[path], "shape", None) is not None and tuple(saved[path].shape) != tuple(wanted[path].shape)
    )
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"requested but not in the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not requested: {_listing(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {_listing(shapes)}")
        raise TreeMismatchError(f"The {what} in {location} does not match the requested tree; " + "; ".join(problems))


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # only needed on multi-process runs

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _short(error: BaseException, limit: int = 600) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------------------------------------------------


def absolute_path(path: str) -> epath.Path:
    """A local path made absolute (Orbax's tensorstore writer refuses relative ones, e.g. MODEL_DIR='runs/demo');
    paths with a scheme (gs://...) as they are."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


class Checkpointer:
    """Saves every `save_interval_steps` steps, keeps the last `max_to_keep`, restores onto any mesh.

    Usage::

        checkpointer = Checkpointer(f"{model_dir}/checkpoints", save_interval_steps=1000)
        state, step = checkpointer.restore_latest_good(abstract_state, data_iterator=iterator)
        for step in range(step or 0, train_steps):
            state = train_step(state, next(iterator))
            checkpointer.save(step + 1, state, iterator)
        checkpointer.save(train_steps, state, iterator, force=True)
        checkpointer.close()

    All processes call every method (Orbax coordinates multi-process writes itself).
    """

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        """
        Args:
          directory: where step directories are written (local path or e.g. gs://bucket/run/checkpoints).
          save_interval_steps: `save` writes when step % save_interval_steps == 0 (or when forced, or at a
            preemption sync point).
          max_to_keep: how many of the newest steps to keep; None keeps all. Steps moved aside as corrupt are
            not counted and never deleted.
          async_save: when True, `save` returns once the arrays are copied to host memory and the files are
            written in the background; `wait_until_finished` / `close` wait for them.
        """
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be an int >= 1; got {save_interval_steps!r}")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be None (keep all) or an int >= 1; got {max_to_keep!r}")
        self.directory = absolute_path(directory)
        self.save_interval_steps = save_interval_steps
        self.max_to_keep = max_to_keep
        self.async_save = async_save

        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = ocp.handlers.StandardCheckpointHandler()
        registry.add(STATE_ITEM, ocp.args.StandardSave, state_handler)
        registry.add(STATE_ITEM, ocp.args.StandardRestore, state_handler)
        iterator_handler = DataIteratorCheckpointHandler()
        registry.add(DATA_ITERATOR_ITEM, DataIteratorSave, iterator_handler)
        registry.add(DATA_ITERATOR_ITEM, DataIteratorRestore, iterator_handler)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

        if jax.process_index() == 0:
            leftovers = sorted(p.name for p in self.directory.iterdir() if _TEMPORARY_MARKER in p.name)
            if leftovers:
                logger.warning(
                    "Ignoring half-written checkpoint directories in %s (never finalized, left in place): %s",
                    self.directory,
                    leftovers,
                )

    # -- saving --------------------------------------------------------------------------------------------

    def save(self, step: int, state, data_iterator: DataIterator | None = None, *, force: bool = False) -> bool:
        """Saves `state` (and the iterator's position) as step `step` when it is due; returns whether it saved.

        Due means step % save_interval_steps == 0 and step is newer than the latest saved step, or Orbax reports
        a preemption sync point, or `force`. A step that already exists is never overwritten (returns False).
        Call it on every step from every process; with async saving it returns before the files are written.

        Args:
          step: the training step the state is at (>= 0).
          state: pytree of jax.Arrays, e.g. {'step': int32[], 'params': {...}, 'opt_state': ...}.
          data_iterator: optional object with save(path) / restore(path); its state is committed with `state`.
          force: save even when the step is not on the interval (e.g. the last step of training).
        """
        if isinstance(step, (np.integer, jax.Array)):
            step = int(step)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0; got {step!r}")
        if data_iterator is not None and not isinstance(data_iterator, DataIterator):
            raise TypeError(
                f"data_iterator must have save(path: str) and restore(path: str) methods; got {type(data_iterator)}"
            )
        # Called on every step so that the preemption sync point is seen by every process at the same step.
        preempted = self._manager.reached_preemption(step)
        latest = self._manager.latest_step()
        if step in self._manager.all_steps():
            if force and jax.process_index() == 0:
                logger.info("Checkpoint step %d already exists in %s; not overwriting it.", step, self.directory)
            return False
        on_interval = step % self.save_interval_steps == 0 and (latest is None or step > latest)
        if not (force or on_interval or preempted):
            return False

        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITERATOR_ITEM] = DataIteratorSave(data_iterator)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved and jax.process_index() == 0:
            logger.info(
                "Saving checkpoint step %d to %s%s%s.",
                step,
                self.directory / str(step),
                " with the data iterator" if data_iterator is not None else "",
                " (async)" if self.async_save else "",
            )
        return saved

    def wait_until_finished(self) -> None:
        """Blocks until an async save in flight is committed (raises its error, if it failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in flight and releases Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- finding steps -------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest saved (or being saved) step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first (steps moved aside as corrupt are not listed)."""
        return sorted(self._manager.all_steps())

    def step_directory(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # -- restoring -----------------------------------------------------------------------------------------

    def restore(self, abstract_state, *, step: int | None = None, data_iterator: DataIterator | None = None):
        """Restores step `step` (default: the latest) onto the shardings of `abstract_state`.

        Args:
          abstract_state: pytree of jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(current_mesh, ...))
            (jax.Arrays also accepted) with the structure and shapes of the saved state; leaves are restored
            with these shardings and dtypes, whatever mesh the checkpoint was written on.
          step: which step; None means the latest.
          data_iterator: when given, its restore(path) is called with the state saved at that step (only after
            the train state has been read successfully).

        Returns:
          The restored pytree of jax.Arrays, structured like `abstract_state`.

        Raises:
          FileNotFoundError: no checkpoint (or no such step, or no iterator state at that step).
          TreeMismatchError: the saved tree's paths or shapes differ from `abstract_state`'s.
          RuntimeError: the step could not be read (e.g. it is corrupt); `restore_latest_good` handles that.
        """
        abstract_state = _as_abstract(abstract_state, name="abstract_state")
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint to restore in {self.directory}: it holds no finalized step.")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; saved steps: {self.all_steps()}"
            )
        try:
            return self._restore_step(step, abstract_state, data_iterator)
        except (TreeMismatchError, FileNotFoundError):
            raise
        except Exception as error:
            raise RuntimeError(
                f"Could not restore checkpoint step {step} from {self.step_directory(step)}: {_short(error)}. "
                "If the step is corrupt, restore_latest_good() moves it aside and restores the previous good one."
            ) from error

    def restore_latest_good(self, abstract_state, *, data_iterator: DataIterator | None = None):
        """Restores the newest step that reads back cleanly, moving corrupt newer steps aside.

        Steps are tried newest first. One that fails to read (a truncated or missing file, garbled metadata,
        missing iterator state) is logged as a warning naming its directory and the error; once an older step
        restores, each failed newer step is renamed to `<step>.corrupt` (nothing is deleted or overwritten).
        A tree mismatch is the caller's error, not corruption: it is raised and nothing is moved.

        Args:
          abstract_state: as in `restore`.
          data_iterator: as in `restore`; restored from the same step as the state.

        Returns:
          (state, step), or (None, None) when the directory holds no checkpoint.

        Raises:
          TreeMismatchError: `abstract_state` does not match the saved tree.
          RuntimeError: every step failed to restore; nothing was moved aside, since failing everywhere more
            likely means a problem on this side than that every checkpoint is corrupt.
        """
        abstract_state = _as_abstract(abstract_state, name="abstract_state")
        self._manager.wait_until_finished()
        self._manager.reload()
        failures: list[tuple[int, BaseException]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            error = None
            try:
                state = self._restore_step(step, abstract_state, data_iterator)
            except TreeMismatchError:
                raise
            except Exception as caught:  # anything else that stops a step from reading back is corruption
                error, state = caught, None
            if not _all_processes_agree(error is None):
                error = error or RuntimeError("the step failed to restore on another process")
                logger.warning(
                    "Checkpoint step %d at %s failed to restore: %s", step, self.step_directory(step), _short(error)
                )
                failures.append((step, error))
                continue
            for bad_step, bad_error in failures:
                self._move_aside(bad_step, bad_error)
            if failures:
                self._manager.reload()
            if jax.process_index() == 0:
                logger.info("Restored checkpoint step %d from %s.", step, self.step_directory(step))
            return state, step
        if failures:
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored, so none was moved aside: "
                + "; ".join(f"step {s} at {self.step_directory(s)}: {_short(e, 300)}" for s, e in failures)
                + f". If they are corrupt, rename them to <step>{CORRUPT_SUFFIX} to start afresh."
            )
        return None, None

    def _restore_step(self, step: int, abstract_state, data_iterator: DataIterator | None):
        step_directory = self.step_directory(step)
        saved_tree = _read_tree_metadata(step_directory / STATE_ITEM)
        _check_tree_matches(saved_tree, abstract_state, what="train state", location=step_directory / STATE_ITEM)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
        )
        if data_iterator is not None:
            if not isinstance(data_iterator, DataIterator):
                raise TypeError(
                    f"data_iterator must have save(path: str) and restore(path: str) methods; got {type(data_iterator)}"
                )
            if not (step_directory / DATA_ITERATOR_ITEM).exists():
                raise FileNotFoundError(
                    f"Checkpoint step {step} at {step_directory} holds no data iterator state (items: "
                    f"{sorted(p.name for p in step_directory.iterdir())}); it was saved without data_iterator, "
                    "so restore it without one."
                )
            self._manager.restore(
                step, args=ocp.args.Composite(**{DATA_ITERATOR_ITEM: DataIteratorRestore(data_iterator)})
            )
        return restored[STATE_ITEM]

    def _move_aside(self, step: int, error: BaseException) -> None:
        if jax.process_index() == 0:
            source = self.step_directory(step)
            target = self.directory / f"{step}{CORRUPT_SUFFIX}"
            suffix = 1
            while target.exists():  # an earlier run moved a step of this number aside: keep both
                target = self.directory / f"{step}{CORRUPT_SUFFIX}.{suffix}"
                suffix += 1
            logger.warning(
                "Checkpoint step %d at %s is corrupt (%s); moving it aside to %s and resuming from an earlier step.",
                step,
                source,
                _short(error),
                target,
            )
            source.rename(target)
        _sync_processes(f"t5x_lite.checkpoints.move_aside.{step}")


# ------------------------------------------------------------------------------------------------------------


def _find_state_directory(path: epath.Path) -> epath.Path:
    """The train-state item of a step directory, of the newest step of a checkpoint directory, or a bare PyTree."""
    if not path.exists():
        raise FileNotFoundError(
            f"Checkpoint path {path} does not exist; expected a step directory (<checkpoints>/<step>) or a "
            "checkpoint directory written by t5x_lite.checkpoints.Checkpointer."
        )
    if (path / STATE_ITEM).is_dir():
        return path / STATE_ITEM
    if (path / "_METADATA").exists():  # a bare Orbax PyTree checkpoint (e.g. a converted one)
        return path
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    steps = [int(name) for name in entries if name.isdigit() and (path / name / STATE_ITEM).is_dir()]
    if not steps:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected a step directory containing {STATE_ITEM}/, or step directories "
            f"<step>/{STATE_ITEM}/ under it; found {_listing(entries) or 'nothing'}."
        )
    return path / str(max(steps)) / STATE_ITEM


def _read_saved_state(path: str) -> tuple[epath.Path, Mapping]:
    """The train-state directory that `path` names (see `_find_state_directory`) and its saved tree's metadata."""
    state_directory = _find_state_directory(absolute_path(path))
    try:
        saved_tree = _read_tree_metadata(state_directory)
    except Exception as error:
        raise ValueError(
            f"Cannot read the checkpoint metadata in {state_directory} ({_short(error)}); is it a complete "
            "checkpoint written by t5x_lite.checkpoints.Checkpointer?"
        ) from error
    if not isinstance(saved_tree, Mapping):
        raise ValueError(
            f"The checkpoint in {state_directory} holds a {type(saved_tree).__name__}, not a dict of subtrees "
            "such as {'step', 'params', 'opt_state'}."
        )
    return state_directory, saved_tree


def _restore_subtrees(state_directory: epath.Path, targets: Mapping):
    """Reads the top-level subtrees named by `targets` (abstract pytrees with shardings) and nothing else."""
    restore_args = jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype), targets
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(
            state_directory,
            args=ocp.args.PyTreeRestore(item=dict(targets), restore_args=dict(restore_args), partial_restore=True),
        )


def restore_params(path: str, abstract_params, *, dtype=None):
    """Restores only the 'params' subtree of a checkpoint (INITIAL_CHECKPOINT_PATH) onto the current mesh.

    Args:
      path: a step directory (<checkpoints>/<step>), or a checkpoint directory (its newest step is used), written
        by `Checkpointer`; a bare Orbax PyTree directory holding a 'params' subtree also works.
      abstract_params: pytree of jax.ShapeDtypeStruct with shardings of the current mesh (or jax.Arrays); its
        paths and shapes must equal the saved 'params' subtree's.
      dtype: cast floating-point parameters to this dtype (e.g. jnp.bfloat16); None casts each leaf to its
        abstract dtype. Integer leaves keep their abstract dtype.

    Returns:
      The params pytree, structured like `abstract_params`, placed on its shardings.

    Raises:
      FileNotFoundError: `path` is missing or holds no checkpoint.
      TreeMismatchError: parameters missing from / unexpected in the checkpoint, or shapes differ.
      ValueError: the checkpoint's metadata cannot be read or holds no 'params'.
    """
    abstract_params = _as_abstract(abstract_params, name="abstract_params")
    state_directory, saved_tree = _read_saved_state(path)
    if "params" not in saved_tree:
        raise ValueError(
            f"The checkpoint in {state_directory} holds no 'params' subtree; its top level is {sorted(saved_tree)}."
        )
    _check_tree_matches(saved_tree["params"], abstract_params, what="'params' subtree", location=state_directory)

    def target(leaf):
        cast = dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(leaf.shape, dtype if cast else leaf.dtype, sharding=leaf.sharding)

    restored = _restore_subtrees(state_directory, {"params": jax.tree.map(target, abstract_params)})
    if jax.process_index() == 0:
        logger.info("Restored params from %s.", state_directory)
    return restored["params"]


def restore_train_state(path: str, abstract_state: Mapping):
    """Restores a whole train state (step, params and optimizer state) from a checkpoint of another run.

    What T5X's RestoreCheckpointConfig(mode='specific', strict=True) restores for INITIAL_CHECKPOINT_PATH: every
    top-level subtree of `abstract_state` must be in the checkpoint with the same paths and shapes (an optimizer
    state of another optimizer, or none at all, is an error that names what differs). Entries of the checkpoint
    that `abstract_state` does not name are not read; neither is the data iterator's position.

    Args:
      path: as in `restore_params`.
      abstract_state: dict of pytrees of jax.ShapeDtypeStruct with shardings of the current mesh (or jax.Arrays),
        e.g. {'step': int32[], 'params': {...}, 'opt_state': ...}; leaves are restored with its dtypes.

    Returns:
      The state, structured like `abstract_state`, placed on its shardings.

    Raises:
      FileNotFoundError: `path` is missing or holds no checkpoint.
      TreeMismatchError: a top-level subtree (e.g. 'opt_state') is not in the checkpoint, or its paths or
        shapes differ from `abstract_state`'s.
      ValueError: the checkpoint's metadata cannot be read.
    """
    abstract_state = _as_abstract(abstract_state, name="abstract_state")
    state_directory, saved_tree = _read_saved_state(path)
    absent = [name for name in abstract_state if name not in saved_tree]
    if absent:
        raise TreeMismatchError(
            f"The checkpoint in {state_directory} has no {', '.join(repr(name) for name in absent)}, which a whole "
            f"train state needs; its top level is {sorted(saved_tree)}."
        )
    requested = {name: saved_tree[name] for name in abstract_state}
    _check_tree_matches(requested, abstract_state, what="train state", location=state_directory)
    restored = _restore_subtrees(state_directory, abstract_state)
    if jax.process_index() == 0:
        logger.info("Restored the train state (%s) from %s.", ", ".join(abstract_state), state_directory)
    return restored
