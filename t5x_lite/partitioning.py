"""The device mesh, logical-axis rules, and the shardings they give parameters, optimizer state and batches.

The model names every parameter and key activation with logical axes (`batch`, `embed`, `mlp`, ...); the
rules here map those names onto the mesh axes `data` and `model`. Change the rules, not the model, to
change the parallelism:

- 1-D parameter partitioning (Megatron-style tensor parallelism): `mlp`, `heads`, `joined_kv` and `vocab`
  are split over `model`; `batch` over `data`.
- 2-D parameter partitioning (ZeRO-3 style) also splits each parameter's `embed` dimension over `data`; an
  activation whose `batch` already uses `data` keeps `embed` whole (a mesh axis is used once per array).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "model")


def path_names(path) -> tuple[str, ...]:
    """A pytree key path as plain names: (DictKey('encoder'), GetAttrKey('v_row'), SequenceKey(0)) -> ('encoder', 'v_row', '0')."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def is_logical_axes(x: Any) -> bool:
    """A leaf of a logical-axes tree: None (replicated) or a plain tuple of axis names."""
    return x is None or (type(x) is tuple and all(isinstance(name, str) or name is None for name in x))


def standard_logical_axis_rules(parameter_partitioning_dims: int = 1) -> list[tuple[str, str | None]]:
    """Rules from logical axis names to the mesh axes `data` and `model`, in order of precedence."""
    if parameter_partitioning_dims not in (1, 2):
        raise ValueError(f"parameter_partitioning_dims={parameter_partitioning_dims}; valid: 1 or 2")
    rules = [
        ("batch", "data"),
        ("vocab", "model"),
        ("mlp", "model"),
        ("heads", "model"),
        ("joined_kv", "model"),
        ("kv", None),
        ("length", None),
        ("layers", None),
        ("relpos_buckets", None),
    ]
    if parameter_partitioning_dims == 2:
        rules.append(("embed", "data"))
    rules.append(("embed", None))
    return rules


def make_mesh(
    mesh_shape: Sequence[int] | None = None,
    *,
    num_partitions: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, model) mesh from an explicit shape, or from the model-parallel width `num_partitions`
    (data = the remaining devices). With neither, all devices do data parallelism."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh_shape is None:
        num_partitions = num_partitions or 1
        if len(devices) % num_partitions:
            raise ValueError(
                f"num_partitions={num_partitions} does not divide the {len(devices)} devices; valid: "
                f"{[d for d in range(1, len(devices) + 1) if len(devices) % d == 0]}"
            )
        mesh_shape = (len(devices) // num_partitions, num_partitions)
    mesh_shape = tuple(int(d) for d in mesh_shape)
    if len(mesh_shape) != len(MESH_AXES) or math.prod(mesh_shape) != len(devices):
        raise ValueError(
            f"mesh shape {mesh_shape} (axes {MESH_AXES}) does not fit the {len(devices)} devices: "
            f"give two sizes whose product is {len(devices)}, e.g. ({len(devices)}, 1)"
        )
    return jax.make_mesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


class Partitioner:
    """Maps logical axis names onto a mesh: shardings for parameters, optimizer state and batches.

    Args:
      mesh_shape: (data, model) sizes; or `num_partitions`, the model-parallel width.
      parameter_partitioning_dims: 1 (model-parallel only) or 2 (also shard `embed` over `data`).
      logical_axis_rules: overrides the standard rules entirely.
    """

    def __init__(
        self,
        mesh_shape: Sequence[int] | None = None,
        *,
        num_partitions: int | None = None,
        parameter_partitioning_dims: int = 1,
        logical_axis_rules: LogicalRules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.mesh = make_mesh(mesh_shape, num_partitions=num_partitions, devices=devices)
        self.logical_axis_rules = tuple(
            logical_axis_rules
            if logical_axis_rules is not None
            else standard_logical_axis_rules(parameter_partitioning_dims)
        )

    def __repr__(self):
        return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={list(self.logical_axis_rules)})"

    @contextlib.contextmanager
    def activation_context(self):
        """Inside: activation sharding constraints (`nn.with_logical_constraint`) take effect."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
            yield

    def mesh_axes(self, logical_axes: Sequence[str | None] | None) -> PartitionSpec:
        if logical_axes is None:
            return PartitionSpec()
        return nn.logical_to_mesh_axes(tuple(logical_axes), self.logical_axis_rules)

    def sharding(self, logical_axes: Sequence[str | None] | None) -> NamedSharding:
        return NamedSharding(self.mesh, self.mesh_axes(logical_axes))

    def shardings(self, logical_axes_tree: Any) -> Any:
        """A tree of logical axes (tuples of names, None for replicated) -> NamedShardings."""
        return jax.tree.map(
            self.sharding,
            logical_axes_tree,
            is_leaf=is_logical_axes,
        )

    @property
    def batch_sharding(self) -> NamedSharding:
        """Batches [batch, length] are split over `data` along the batch dimension."""
        return self.sharding(("batch", "length"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def check_divisible(self, abstract_tree: Any, logical_axes_tree: Any) -> None:
        """Raises a ValueError naming the parameter and dimension when a dimension does not divide its mesh axes."""
        shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
        axes = jax.tree.leaves(logical_axes_tree, is_leaf=is_logical_axes)
        for (path, leaf), logical in zip(shapes, axes):
            spec = self.mesh_axes(logical)
            for dim, (size, mesh_axis) in enumerate(zip(leaf.shape, tuple(spec) + (None,) * len(leaf.shape))):
                if mesh_axis is None:
                    continue
                names = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
                ways = math.prod(self.mesh.shape[n] for n in names)
                if size % ways:
                    raise ValueError(
                        f"parameter {jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: dimension {dim} "
                        f"({logical[dim]!r}, size {size}) does not divide mesh axis {mesh_axis!r} of size {ways} "
                        f"(mesh {dict(self.mesh.shape)}); change the mesh shape or the logical-axis rules"
                    )


def logical_axes(boxed_tree: Any) -> Any:
    """Logical axis names (tuples of names) of a tree of flax `LogicallyPartitioned` boxes; None for unboxed
    leaves (replicated)."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )

