"""The Dask client a data job runs on: the caller's, an existing scheduler's, or a new `LocalCluster`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def dask_client(
    client: Any | None = None, *, scheduler_address: str | None = None, n_workers: int = 2
) -> Iterator[Any]:
    """Yield ``client``, else a client of ``scheduler_address``, else of a new local cluster (closed after).

    The local cluster has ``n_workers`` single-threaded worker processes, its dashboard on 127.0.0.1.
    """
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster

    if scheduler_address:
        with Client(scheduler_address) as own:
            yield own
        return
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",  # ":0" binds every interface
    )
    try:
        with Client(cluster) as own:
            yield own
    finally:
        cluster.close()


def n_workers_of(client: Any, default: int) -> int:
    """How many workers the client's scheduler has (``default`` when it does not say)."""
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})) or default)
