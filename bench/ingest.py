"""Ingest benchmark: the `refresh-dataset` flow vs a plain odc-stac + numpy + zarr path on the same scenes.

    python bench/ingest.py [--scenes 48] [--catalog local-samples] [--workdir /tmp/dsat-bench]

Scenes: the real items of ../shared/data/real/catalog (or catalogs/samples) that carry red/green/blue,
repeated under distinct item ids up to ``--scenes`` and served by a real STAC API (rustac) on 127.0.0.1.
Reported per path: tiles/s, MB/s (uncompressed tile pixels written), peak RSS and cores busy (CPU seconds /
wall seconds), both over this process + every child process but the Prefect server and the STAC API, i.e.
the flow's process (the driver) + Dask nannies/workers; time is the best of ``--repeat`` rounds (each round
runs every path once), memory the worst.

1. flow: the `refresh-dataset` Prefect flow, the path users and the scheduled deployments run (load the
   catalog, search the STAC API, `ingest_items`: real `read_item`, quality filters, captions, lineage,
   staging + commits, report artifact), against a `prefect server` started here, on the project's
   LocalCluster (`dask_client`, as `ingest_items` starts it) that is started (and warmed up) before the
   clock starts and given to the flow as `dask_address`, with 1 and 2 workers; the 2-worker run is
   repeated on half the scenes (`max_items`) to show that peak memory does not grow with scenes.
2. peer: `odc.stac.load` of each item onto its native grid, numpy tiling, per-scene 2/98 % scaling to
   uint8, appended to a zarr array with the same chunking; no search, metadata, captions, filters. One
   process.

Targets printed as ratios: flow(2 workers) / peer >= 1.0 (time on the same scenes: ``s`` is the flow run's
duration as Prefect records it and shows in its UI, ``wall`` the in-process call's, with the engine's start
and teardown, printed beside each ratio),
2 workers / 1 worker >= 1.6,
peak(N scenes) / peak(N/2 scenes) about 1 (flat).
Beside the 2-worker speed-up the machine's own ceiling for it is printed, measured ``--repeat`` times before
any service starts: the flow's per-item work (`read_and_stage`, read + tile + stage) in 1 plain process with
the environment of the project's workers, then split over 2 such processes started together, no Dask, no
Prefect (2.0 on two free physical cores; less where the two vCPUs share a core or memory bandwidth); and in 1
such process, the time per item with the malloc setting Dask gives its own workers
(``MALLOC_TRIM_THRESHOLD_``, left out of the project's LocalCluster) over the time with glibc's defaults.
The CPU seconds of the 1- and 2-worker runs are printed beside their ratio: on a machine with as many cores
as workers, the driver (Dask scheduler, client and committer, Prefect's engine) shares the cores with the
workers, so the speed-up stays under 2 even for equal CPU work; more CPU seconds with 1 worker mean
periodic costs (Dask's heartbeats and monitors) that grow with wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [
    REPO.parent / "shared/data/real/catalog/catalog.json",
    REPO / "catalogs/samples/catalog/catalog.json",
]
RGB = ("red", "green", "blue")


class Usage:
    """Peak summed RSS and CPU seconds of this process and its descendants (driver + Dask nannies/workers),
    less the process trees of ``exclude`` (the services the flow talks to: Prefect server, STAC API).

    RSS is sampled in a background thread; the process tree is listed every ``relist`` seconds, not at
    every sample: listing scans all of /proc, which at 50 samples/s took about 9 % of a core from the
    driver being measured. CPU seconds are those the tree's processes spent between enter and exit.
    """

    def __init__(self, exclude: tuple[int, ...] = (), interval: float = 0.02, relist: float = 0.5) -> None:
        self.interval, self.relist, self.peak, self.cpu_seconds = interval, relist, 0, 0.0
        self.exclude = exclude
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._tree: list[psutil.Process] = []
        self._listed = -float("inf")
        self._cpu_at_enter: dict[int, float] = {}

    def _list(self) -> list[psutil.Process]:
        if time.monotonic() - self._listed > self.relist:
            skip = set(self.exclude)
            for pid in self.exclude:
                with contextlib.suppress(psutil.Error):
                    skip.update(p.pid for p in psutil.Process(pid).children(recursive=True))
            tree = [self._me, *self._me.children(recursive=True)]
            self._tree, self._listed = [p for p in tree if p.pid not in skip], time.monotonic()
        return self._tree

    def _cpu(self) -> dict[int, float]:
        out = {}
        for proc in self._list():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
        return out

    def _sample(self) -> int:
        total = 0
        for proc in self._list():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> Usage:
        self.peak, self._cpu_at_enter = self._sample(), self._cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._listed = -float("inf")
        self.peak = max(self.peak, self._sample())
        now = self._cpu()
        self.cpu_seconds = sum(now[pid] - self._cpu_at_enter.get(pid, 0.0) for pid in now)


def load_items(n_scenes: int) -> list[dict]:
    from dsat_core.data.stac import load_static_catalog

    path = next((p for p in CANDIDATES if p.is_file()), None)
    if path is None:
        raise SystemExit(f"no real catalog found at {[str(p) for p in CANDIDATES]}")
    base = []
    for item in load_static_catalog(path):
        names = {b.get("common_name") for a in item["assets"].values() for b in a.get("eo:bands", [])}
        if set(RGB) <= names:
            base.append(item)
    items = []
    for k in range(n_scenes):
        item = copy.deepcopy(base[k % len(base)])
        item["id"] = f"{item['id']}~{k // len(base)}"
        items.append(item)
    print(
        f"{len(items)} scenes from {path} ({len(base)} distinct: {', '.join(i['id'][:-2] for i in base[:4])})"
    )
    return items


@contextlib.contextmanager
def prefect_server(workdir: Path) -> Iterator[subprocess.Popen]:
    """`prefect server start` on a free 127.0.0.1 port (its own session and database under ``workdir``);
    the flows of this process talk to it (PREFECT_API_URL, set before Prefect is imported)."""
    from dsat_core.data.stac_server import free_port

    port, home = free_port(), workdir / "prefect-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (home / "server.log").open("w")
    cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(home))
        yield proc
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # the last runs' logs, sent while the server is up
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def stac_api(items: list[dict]) -> Iterator:
    """A real STAC API (rustac) on a free 127.0.0.1 port over ``items``; yields its `StacServer`."""
    from dsat_core.data.stac_server import start_stac_server

    server = start_stac_server(items)
    try:
        yield server
    finally:
        server.stop()


def write_catalog(config, workdir: Path) -> Path:
    """The benchmark's catalog (the source catalog, RGB only) as a YAML file the flow loads by path."""
    import yaml

    path = workdir / "bench-catalog.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def run_flow(
    catalog: Path, stac_api: str, workdir: Path, n_workers: int, n_scenes: int, exclude: tuple[int, ...]
) -> dict:
    """One `refresh-dataset` flow run of the first ``n_scenes`` items into a new store, timed."""
    from dsat_core.data.catalog import load_catalog
    from dsat_core.data.cluster import dask_client
    from dsat_core.data.reader import read_item
    from dsat_core.data.stac import search_items
    from flows.refresh_dataset import RefreshParams, refresh_dataset

    uri = str(workdir / f"flow-{n_workers}w-{n_scenes}.zarr")
    shutil.rmtree(uri, ignore_errors=True)
    config = load_catalog(catalog)
    with dask_client(n_workers=n_workers) as client:  # the project's LocalCluster, as ingest_items makes it
        warm = search_items(config, api_url=stac_api, max_items=1)[0]  # a long-running cluster has warm
        client.run(lambda: read_item(warm, config) and None)  # workers (GDAL, pyproj, geocoder caches)
        params = RefreshParams(
            catalog=str(catalog),
            store_uri=uri,
            stac_api=stac_api,
            max_items=n_scenes,
            dask_address=client.scheduler.address,
        )
        with Usage(exclude) as usage:
            began = time.perf_counter()
            state = refresh_dataset(params, return_state=True)
            wall = time.perf_counter() - began
    result = state.result()
    seconds = flow_run_seconds(state.state_details.flow_run_id)
    tiles = sum(result.tiles_added.values())
    mbytes = tiles * len(RGB) * config.tile_size**2 / 1e6
    return {
        "name": f"flow {n_workers}w",
        "scenes": n_scenes,
        "tiles": tiles,
        "seconds": seconds,
        "wall": wall,
        "tiles_s": tiles / seconds,
        "mb_s": mbytes / seconds,
        "peak_mb": usage.peak / 1e6,
        "cores": usage.cpu_seconds / wall,
        "cpu_s": usage.cpu_seconds,
        "rejected": result.rejected,
    }


def flow_run_seconds(flow_run_id) -> float:
    """The run's duration as Prefect records it (Running → Completed, what the UI shows). The call's wall time
    adds the engine's start and teardown: the flow-run heartbeat thread (every 180 s by default) sleeps in
    whole seconds and is joined at exit, so an in-process call ends on its next one-second tick."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    if run.start_time is None or run.end_time is None:
        raise RuntimeError(f"flow run {flow_run_id} has no start/end time (state {run.state_name})")
    return (run.end_time - run.start_time).total_seconds()


def _stage_items(items: list[dict], config, uri: str, barrier, times) -> None:
    """One plain process of `split_wall`: warm up, wait for the others, time `read_and_stage`."""
    from dsat_core.data.ingest import read_and_stage

    read_and_stage(items[0], config, uri)
    barrier.wait()
    began = time.perf_counter()
    for item in items:
        read_and_stage(item, config, uri)
    times.put(time.perf_counter() - began)


def split_wall(items: list[dict], config, uri: str, n: int, env: dict[str, str] | None = None) -> float:
    """Wall time of `read_and_stage` of every item split over ``n`` plain processes started together (no Dask,
    no Prefect), each started with the environment of the project's workers (`WORKER_ENV`: one zarr codec
    thread; without it each process starts cores + 4, which fight the other process for the cores) and
    ``env`` added to it."""
    import multiprocessing

    from dsat_core.data.cluster import WORKER_ENV

    ctx = multiprocessing.get_context("spawn")
    barrier, times = ctx.Barrier(n), ctx.Queue()
    # contiguous parts: the items cycle through the distinct scenes, so each part gets its share of each
    # (a stride of n would give all copies of a scene to one process when n divides their number)
    parts = [items[len(items) * k // n : len(items) * (k + 1) // n] for k in range(n)]
    procs = [ctx.Process(target=_stage_items, args=(part, config, uri, barrier, times)) for part in parts]
    with mock.patch.dict(os.environ, {**WORKER_ENV, **(env or {})}):  # read at start by glibc and zarr
        for proc in procs:
            proc.start()
    wall = max(times.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    return wall


def machine_scaling(items: list[dict], config, workdir: Path) -> tuple[float, float]:
    """What 2 cores give on the flow's per-item work without Dask or Prefect: `read_and_stage` of every
    item in 1 process, then split over 2 processes started together (wall 1 / wall 2; 2.0 = perfect); and what
    the malloc setting of Dask's own workers (`MALLOC_TRIM_THRESHOLD_`, which the project's LocalCluster
    leaves out) costs that 1 process (its wall / wall with glibc's defaults)."""
    import dask
    import distributed  # noqa: F401 - Dask's worker defaults

    from dsat_core.data.store import DatasetStore

    uri = str(workdir / "machine.zarr")
    shutil.rmtree(uri, ignore_errors=True)
    DatasetStore.open(uri, create=True, catalog=config)
    one, two = split_wall(items, config, uri, 1), split_wall(items, config, uri, 2)
    trim = dask.config.get("distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_")
    dask_env = split_wall(items, config, uri, 1, {"MALLOC_TRIM_THRESHOLD_": str(trim)})
    return one / two, dask_env / one


def _odc_item(item: dict):
    import pystac

    item = copy.deepcopy(item)
    for asset in item["assets"].values():  # odc-stac reads multi-band assets from STAC 1.1 `bands`
        if "eo:bands" in asset:
            asset["bands"] = [
                {"name": b["name"], "eo:common_name": b["common_name"]} for b in asset["eo:bands"]
            ]
    return pystac.Item.from_dict(item)


def run_peer(items, config, workdir: Path, exclude: tuple[int, ...]) -> dict:
    import odc.stac
    import zarr

    size = config.tile_size
    odc.stac.load([_odc_item(items[0])], bands=list(RGB), chunks=None)  # warm up GDAL like the workers
    uri = str(workdir / f"peer-{len(items)}.zarr")
    shutil.rmtree(uri, ignore_errors=True)
    with Usage(exclude) as usage:
        began = time.perf_counter()
        root = zarr.open_group(uri, mode="w", zarr_format=3)
        arr = root.create_array(
            "images",
            shape=(0, 3, size, size),
            dtype="uint8",
            chunks=(1, 3, size, size),
            shards=(64, 3, size, size),
        )
        n = 0
        for item in items:
            ds = odc.stac.load([_odc_item(item)], bands=list(RGB), chunks=None)
            image = np.stack([ds[b].values[0].astype(np.float32) for b in RGB])
            rows, cols = image.shape[1] // size, image.shape[2] // size
            if rows * cols == 0:
                continue
            tiles = image[:, : rows * size, : cols * size].reshape(3, rows, size, cols, size)
            tiles = tiles.transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
            low, high = np.percentile(image.reshape(3, -1), [2, 98], axis=1)
            scaled = (tiles - low[None, :, None, None]) / np.maximum(high - low, 1e-6)[None, :, None, None]
            out = (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)
            arr.resize((n + len(out), 3, size, size))
            arr[n:] = out
            n += len(out)
        seconds = time.perf_counter() - began
    mbytes = n * 3 * size * size / 1e6
    return {
        "name": "peer odc-stac",
        "scenes": len(items),
        "tiles": n,
        "seconds": seconds,
        "wall": seconds,
        "tiles_s": n / seconds,
        "mb_s": mbytes / seconds,
        "peak_mb": usage.peak / 1e6,
        "cores": usage.cpu_seconds / seconds,
        "cpu_s": usage.cpu_seconds,
        "rejected": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=48, help="at least 16; more scenes, steadier ratios")
    parser.add_argument("--catalog", default="local-samples")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsat-bench"))
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds; each path keeps its best time (noisy machines)"
    )
    args = parser.parse_args()

    from dsat_core.data.catalog import load_catalog

    base = load_catalog(args.catalog)
    config = base.with_overrides(products={"rgb": base.products["rgb"].model_dump()})
    args.workdir.mkdir(parents=True, exist_ok=True)
    items = load_items(args.scenes)
    half = args.scenes // 2
    catalog = write_catalog(config, args.workdir)
    served = [{**item, "collection": config.collections[0], "links": []} for item in items]
    # measured before any service starts, so that no server shares the cores with it
    rounds = [machine_scaling(served, config, args.workdir) for _ in range(max(1, args.repeat))]
    machine, malloc = [m for m, _ in rounds], [c for _, c in rounds]

    with prefect_server(args.workdir) as server, stac_api(served) as api:
        exclude = (server.pid, api.process.pid)
        run_flow(catalog, api.url, args.workdir, 1, 1, exclude)  # warm up Prefect (its first flow run)
        paths = [
            (run_peer, items, config, args.workdir, exclude),
            (run_flow, catalog, api.url, args.workdir, 1, args.scenes, exclude),
            (run_flow, catalog, api.url, args.workdir, 2, args.scenes, exclude),
            (run_flow, catalog, api.url, args.workdir, 2, half, exclude),
        ]
        runs: list[list[dict]] = [[] for _ in paths]
        for _ in range(max(1, args.repeat)):  # rounds interleave the paths: a slow minute hits all of them
            for done, (run, *run_args) in zip(runs, paths, strict=True):
                done.append(run(*run_args))
    results = [
        {**min(done, key=lambda r: r["seconds"]), "peak_mb": max(r["peak_mb"] for r in done)} for done in runs
    ]
    header = (
        f"{'path':<16}{'scenes':>7}{'tiles':>7}{'s':>8}{'wall':>7}{'tiles/s':>9}{'MB/s':>8}{'peak MB':>9}"
        f"{'cores':>7}{'rejected':>9}"
    )
    print("\n" + header)
    for r in results:
        print(
            f"{r['name']:<16}{r['scenes']:>7}{r['tiles']:>7}{r['seconds']:>8.2f}{r['wall']:>7.2f}{r['tiles_s']:>9.1f}"
            f"{r['mb_s']:>8.2f}{r['peak_mb']:>9.0f}{r['cores']:>7.2f}{r['rejected']:>9}"
        )
    peer, one, two, two_half = results
    checks = [
        # Same scenes in, so "as fast" is wall time; tiles/s also shown (the peer writes the nodata border
        # tiles that the flow rejects, so it has more tiles per scene).
        ("flow(2w) / peer  same scenes", peer["seconds"] / two["seconds"], ">= 1.0"),
        ("flow(2w) / peer  tiles/s", two["tiles_s"] / peer["tiles_s"], "(info)"),
        ("  wall-clock (incl. engine)", peer["wall"] / min(r["wall"] for r in runs[2]), "(info)"),
        ("2 workers / 1 worker", one["seconds"] / two["seconds"], ">= 1.6"),
        (
            "  wall-clock (incl. engine)",
            min(r["wall"] for r in runs[1]) / min(r["wall"] for r in runs[2]),
            "(info)",
        ),
        ("  per round (1w / 2w)", _ratios(runs[1], runs[2]), "(info)"),
        ("  CPU seconds 1w / 2w", f"{one['cpu_s']:.1f} / {two['cpu_s']:.1f}", "(info)"),
        ("  machine: 2 procs / 1 proc", " ".join(f"{m:.2f}" for m in machine), "(info: the ceiling)"),
        ("  1 proc: Dask's malloc / ours", " ".join(f"{m:.2f}" for m in malloc), "(info: time per item)"),
        (
            f"peak RSS {two['scenes']} / {two_half['scenes']} scenes",
            two["peak_mb"] / two_half["peak_mb"],
            "~ 1.0",
        ),
    ]
    print(f"\ncpu cores: {psutil.cpu_count()}, load average: {psutil.getloadavg()}")
    for name, value, target in checks:
        shown = value if isinstance(value, str) else f"{value:6.2f}"
        print(f"{name:<32} {shown}  (target {target})")


def _ratios(slow: list[dict], fast: list[dict]) -> str:
    return " ".join(f"{a['seconds'] / b['seconds']:.2f}" for a, b in zip(slow, fast, strict=True))


if __name__ == "__main__":
    main()
