"""Multi-host runs: one process per host (or per GPU group), joined by ``jax.distributed``.

Every process runs the same program on its shard of the data; the coordinator (process 0's
address) lets them agree on devices and run collectives. On TPU pods and under SLURM JAX finds the
coordinator itself; elsewhere give ``--coordinator HOST:PORT --num-processes N --process-id I``.
"""

from __future__ import annotations

import os

import jax


def multi_process_env() -> str | None:
    """The cluster we run in as one of several processes, if the environment says so."""
    if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" in os.environ and \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False, log=None) -> bool:
    """Join a multi-process run; returns whether one was joined.

    Explicit settings must come together. Without them, ``auto`` (``--distributed``) or a detected
    multi-process environment (SLURM with several tasks, a multi-worker TPU slice) lets JAX detect
    the cluster. Must run before anything touches a JAX device.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together: give all three "
                         "(or none, to let JAX detect a TPU pod or SLURM job)")
    if all(given):
        if ":" not in coordinator:
            raise ValueError(f"--coordinator={coordinator!r} must be HOST:PORT, e.g. 10.0.0.2:1234")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id={process_id} must be in [0, {num_processes}) "
                             f"for --num-processes={num_processes}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif auto or multi_process_env():
        jax.distributed.initialize()
    else:
        return False
    if log is not None and jax.process_index() == 0:
        log(f"joined {jax.process_count()} processes, {jax.device_count()} devices in all")
    return True
