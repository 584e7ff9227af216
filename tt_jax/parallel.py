"""The one place that knows about devices: the mesh, shardings and cross-device helpers.

Training runs data-parallel over a 1-D mesh with the axis "data": the global batch is split
into equal row blocks, one per device, and parameters are replicated. Inside `jax.shard_map`
each device computes its queries against ALL videos of the global batch (the video embeddings are
all-gathered), so the similarity matrix exists only as row blocks and the losses are sums of
per-device shares. The same code runs on 1 CPU, N fake CPU devices, a GPU or a TPU pod slice.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tt_jax.errors import UserInputError

DATA_AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D data-parallel mesh over the first `num_devices` devices (default: all, all hosts)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"asked for {num_devices} devices, {len(devices)} are available")
        devices = devices[:num_devices]
    # In jax.devices() order, so that each process's devices are one contiguous block of the data
    # axis, as its slice of every batch is (jax.make_mesh may reorder them by physical topology).
    # Auto axis: outside the shard_map'ed parts the compiler propagates shardings.
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the "data" axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    devices = mesh.shape[DATA_AXIS]
    if global_batch_size % devices:
        raise UserInputError(
            f"the global batch size {global_batch_size} is not divisible by the {devices} devices of "
            f"the mesh; choose a batch size that is a multiple of {devices}"
        )


def _explicit_transfer():
    """A block whose host-to-device copies are intended. JAX's multi-process array constructors
    place data through callbacks that `jax.transfer_guard("disallow")` counts as implicit copies;
    the training loop runs under that guard to catch every copy but these."""
    return jax.transfer_guard_host_to_device("allow")


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Copies a host pytree to every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch_from_process_data(local_batch: Any, mesh: Mesh) -> Any:
    """One global, batch-sharded jax.Array per leaf from this process's slice of the batch.

    Every process passes its own contiguous rows; single-process runs pass the whole batch.
    """
    sharding = batch_sharded(mesh)

    def to_global(leaf):
        leaf = np.asarray(leaf)
        global_shape = (leaf.shape[0] * jax.process_count(),) + leaf.shape[1:]
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    with _explicit_transfer():
        return jax.tree.map(to_global, local_batch)


def shard_host_arrays(tree: Any, mesh: Mesh) -> Any:
    """Global batch-sharded arrays from host arrays that every process holds whole (evaluation
    inputs): each process places the rows of its own devices."""
    sharding = batch_sharded(mesh)

    def to_global(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    with _explicit_transfer():
        return jax.tree.map(to_global, tree)


def gather_rows(x: jax.Array) -> jax.Array:
    """Inside shard_map: the rows of every device, in device order ([b, ...] -> [B, ...])."""
    return jax.lax.all_gather(x, DATA_AXIS, tiled=True)


def first_local_row(local_rows: int) -> jax.Array:
    """Inside shard_map: the global index of this device's first row."""
    return jax.lax.axis_index(DATA_AXIS) * local_rows


def sum_over_devices(x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, DATA_AXIS)


def varying_over_devices(tree: Any) -> Any:
    """Inside shard_map: marks values (loop carries) as differing between devices, as values
    computed from each device's own rows do."""
    return jax.tree.map(lambda leaf: jax.lax.pcast(leaf, (DATA_AXIS,), to="varying"), tree)


def from_holder(values: jax.Array, here: jax.Array) -> jax.Array:
    """Inside shard_map: on every device, the values of the one device for which `here` holds
    (the others add an exact zero), e.g. what the device holding a row computed about it."""
    return jax.lax.psum(jax.numpy.where(here, values, jax.numpy.zeros_like(values)), DATA_AXIS)


__all__ = [
    "DATA_AXIS",
    "batch_sharded",
    "check_batch_divisible",
    "first_local_row",
    "from_holder",
    "gather_rows",
    "host_values",
    "global_batch_from_process_data",
    "make_mesh",
    "put_replicated",
    "replicated",
    "shard_host_arrays",
    "sum_over_devices",
    "varying_over_devices",
]


def host_values(tree: Any) -> Any:
    """numpy copies of global arrays on every process, also of arrays sharded over the devices
    of other processes (gathered from them; `jax.device_get` can only read local data)."""

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return jax.tree.map(fetch, tree)


def wait_for_every_process(what: str) -> None:
    """A barrier across processes (nothing on one process): e.g. after process 0 wrote a file
    that every host reads next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(what)
