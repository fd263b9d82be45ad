"""Device mesh, multi-host start-up and the sharding table.

One table decides where everything lives (the whole "sharding strategy" of this project):

| what                          | partition spec                                   |
|-------------------------------|--------------------------------------------------|
| batch (images, labels)        | leading axis over ("data", "fsdp")               |
| params, optimizer state, EMA  | largest divisible axis over "fsdp", else replicated |
| scalars, small arrays, RNG    | replicated                                       |

DDP is fsdp=1 (everything but the batch replicated); FSDP shards the state along "fsdp" and XLA
inserts the all-gathers / reduce-scatters. The rule depends only on an array's shape, so the
optimizer moments and the EMA automatically get the same layout as their parameters.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mmdit.config import MeshConfig
from jax_mmdit.errors import UserError

BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated: sharding a bias costs more in collectives than it saves.
MIN_SHARDED_SIZE = 2**12


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Start jax.distributed when several processes are asked for (flags or env vars)."""
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    from_env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS"))
    if not (explicit or from_env) or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
    )


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = cfg.data, cfg.fsdp
    if data == -1:
        if n % fsdp:
            raise UserError(f"mesh.fsdp={fsdp} does not divide the {n} available devices.")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise UserError(f"mesh.data={data} does not divide the {n} available devices.")
        fsdp = n // data
    if data * fsdp != n:
        raise UserError(f"mesh data×fsdp = {data}×{fsdp} = {data * fsdp} but {n} devices are available.")
    # Auto axes: XLA propagates shardings through the model (explicit mode would demand
    # annotations on every FSDP matmul).
    return Mesh(
        np.asarray(devices).reshape(data, fsdp),
        ("data", "fsdp"),
        axis_types=(AxisType.Auto, AxisType.Auto),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """FSDP rule: shard the largest axis divisible by the fsdp size, if the array is big enough."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings for a whole train-state pytree (params, opt state, EMA, scalars)."""
    fsdp = mesh.shape["fsdp"]

    def leaf(x):
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, param_spec(tuple(shape), fsdp))

    return jax.tree.map(leaf, abstract_state)


def check_batch_divisible(global_batch: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """Every micro-batch must split evenly over the mesh's devices (and so over its processes,
    which hold equal shares of the devices)."""
    if global_batch % micro_batches or (global_batch // micro_batches) % mesh.size:
        raise UserError(
            f"batch_size {global_batch} (÷ grad_accum_steps {micro_batches}) must be divisible by "
            f"the {mesh.size} devices of the mesh."
        )


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's share (no host-to-host copy)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
