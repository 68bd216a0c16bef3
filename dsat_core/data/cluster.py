"""The Dask client a data job runs on: the caller's, an existing scheduler's, or a new `LocalCluster`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Environment of each worker process. A worker runs one task at a time on one core (``threads_per_worker=1``),
# and as Dask caps OpenMP / MKL / OpenBLAS at one thread per worker, zarr's codec thread pool is capped
# too: by default it starts cores + 4 threads in every worker, which then fight each other for the same
# cores (more CPU for the same writes, measured in bench/ingest.py).
WORKER_ENV = {"ZARR_THREADING__MAX_WORKERS": "1"}
# Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in each worker process they spawn, to hand freed memory back
# to the OS at once. Setting it also turns off glibc's dynamic mmap threshold, so every array above 128 KiB is
# mmapped, page-faulted in and unmapped again: `read_and_stage` took 1.4-2× as long (page faults ×100;
# bench/ingest.py prints the ratio). The project's workers keep glibc's defaults.
GLIBC_DEFAULTS = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
# Background work of every Dask server that the project's batch jobs do not use: each worker's event loop
# samples the running task's stack 100 times a second (the dashboard's profile page), and every scheduler,
# nanny and worker checks its own event loop 50 times a second (warnings after 3 s unresponsive, kept). Each
# wake-up takes the worker's GIL from the running task; without them the workers spent 4-6 % less CPU on the
# same ingest work (`stage_batch` of 48 real scenes on 1 and on 2 workers, with and without, in turns).
QUIET_BACKGROUND = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "500ms"}


def local_cluster_kwargs(n_workers: int) -> dict[str, Any]:
    """Keyword arguments of the project's `LocalCluster`: single-threaded worker processes with
    `WORKER_ENV`, the dashboard on 127.0.0.1 (``":0"`` would bind every interface)."""
    return {
        "n_workers": n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": "127.0.0.1:0",
        "env": dict(WORKER_ENV),
    }


@contextmanager
def dask_client(
    client: Any | None = None, *, scheduler_address: str | None = None, n_workers: int = 2
) -> Iterator[Any]:
    """Yield ``client``, else a client of ``scheduler_address``, else of a new local cluster (closed after).

    The local cluster is ``LocalCluster(**local_cluster_kwargs(n_workers))``, its scheduler, nannies and
    workers made with `GLIBC_DEFAULTS` and `QUIET_BACKGROUND`.
    """
    if client is not None:
        yield client
        return
    import dask
    from distributed import Client, LocalCluster

    if scheduler_address:
        with Client(scheduler_address) as own:
            yield own
        return
    # over distributed's defaults (imported above); read by the scheduler, the nannies and their workers
    with dask.config.set({**GLIBC_DEFAULTS, **QUIET_BACKGROUND}):
        cluster = LocalCluster(**local_cluster_kwargs(n_workers))
    try:
        with Client(cluster) as own:
            yield own
    finally:
        cluster.close()


def n_workers_of(client: Any, default: int) -> int:
    """How many workers the client's scheduler has (``default`` when it does not say)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})) or default)
