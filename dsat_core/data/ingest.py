"""The ingest driver: read STAC items into tiles on Dask workers, stage them, commit as it goes.

Pure Python + Dask, and the one way items get into a store: `dsat ingest` calls `ingest_items`, and so does
the `refresh-dataset` Prefect flow (with a ``progress`` hook of its own). Items are read and staged on the
workers (`read_and_stage`), so pixels never travel back to the driver, in tasks of several consecutive items
(`stage_batch`): each Dask task costs the scheduler and the client a few milliseconds of CPU, on the cores
the workers use, so the tasks are as large as the load balance allows (`guided_batches`: large while many
items are left, single items at the end). The driver keeps at most ``max_in_flight`` tasks submitted
and is the single committer: it decides which staged tiles go to which rows, while the copies of whole
shards of images into the store run as worker tasks. An item whose task fails (a worker died, the staging
write failed) is recorded as a rejection, like a reader error, and the run goes on: the items of a failed
batch are tried again one task each, so that only the failing item is rejected.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.cluster import dask_client, n_workers_of
from dsat_core.data.store import CommitResult, CommitTransaction, DatasetStore, StagedScene
from dsat_core.data.tiles import Rejection, SceneTiles

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)
Reader = Callable[..., SceneTiles]
# progress(items done, items to do): called on the driver after each item's task has finished
Progress = Callable[[int, int], None]
T = TypeVar("T")
MAX_BATCH = 16  # items per read task at most (up to a few seconds of a worker's time)


@dataclass
class IngestReport:
    """What one `ingest_items` run did."""

    store_uri: str
    version: int
    added_tiles: dict[str, int] = field(default_factory=dict)
    skipped_items: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    content_hash: str = ""
    items_added: list[str] = field(default_factory=list)
    n_items: int = 0
    skipped_duplicates: dict[str, int] = field(default_factory=dict)
    total_tiles: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_added(self) -> int:
        return sum(self.added_tiles.values())


@dataclass
class IngestPlan:
    """Which items of a search are new to the store, already ingested, or not valid STAC items."""

    todo: list[dict[str, Any]]
    skipped: list[str]
    invalid: list[Rejection]


def _default_reader() -> Reader:
    from dsat_core.data.reader import read_item

    return read_item


def read_and_stage(
    item: dict[str, Any],
    config: CatalogConfig,
    store_uri: str,
    *,
    aoi_bbox: Sequence[float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    read_options: Mapping[str, Any] | None = None,
    reader: Reader | None = None,
) -> StagedScene:
    """One Dask task: read an item into tiles and stage them in the store (runs on a worker)."""
    read = reader or _default_reader()
    item_id = str(item.get("id"))
    try:
        scene = read(item, config, aoi_bbox=aoi_bbox, storage_options=read_options)
    except Exception as err:  # readers should not raise; if one does, record it as a scene rejection
        scene = SceneTiles(
            item_id, rejected=[Rejection(item_id, f"reader error: {type(err).__name__}: {err}")]
        )
    store = DatasetStore.open(store_uri, storage_options=storage_options)
    return store.stage(scene)


def stage_batch(
    items: Sequence[dict[str, Any]], config: CatalogConfig, store_uri: str, **kwargs: Any
) -> list[StagedScene]:
    """One Dask task: `read_and_stage` of each item in turn (``kwargs`` are its keyword arguments)."""
    return [read_and_stage(item, config, store_uri, **kwargs) for item in items]


def guided_batches(items: Sequence[T], n_workers: int, *, max_size: int = MAX_BATCH) -> Iterator[list[T]]:
    """Consecutive batches of ``items``, each sized when it is taken: the items left // (4 × ``n_workers``),
    1 to ``max_size`` (guided self-scheduling): few tasks while many items are left, single items at the
    end, where a large task would keep one worker busy while the others wait."""
    start = 0
    while start < len(items):
        size = min(max_size, max(1, (len(items) - start) // (4 * n_workers)))
        yield list(items[start : start + size])
        start += size


def ingest_items(
    items: Sequence[Mapping[str, Any]],
    config: CatalogConfig,
    store_uri: str,
    *,
    aoi_bbox: Sequence[float] | None = None,
    client: distributed.Client | None = None,
    scheduler_address: str | None = None,
    n_workers: int = 2,
    storage_options: Mapping[str, Any] | None = None,
    read_options: Mapping[str, Any] | None = None,
    progress: bool | Progress = False,
    reader: Reader | None = None,
    commit_every: int | None = None,
    max_in_flight: int | None = None,
) -> IngestReport:
    """Ingest STAC ``items`` (dicts) into the store at ``store_uri`` (created when missing).

    Items already in the store are skipped, so a refresh adds only what is new. Work runs on ``client``,
    else on the scheduler at ``scheduler_address``, else on a new ``LocalCluster(n_workers)``.
    ``storage_options`` are for the store, ``read_options`` for the reader's asset access. Items go to the
    workers in `guided_batches`, at most ``max_in_flight`` tasks (default 2 × workers) at once: those the
    workers cannot start yet wait in Dask's queues (item dicts, no pixels), so the workers go on while the
    driver writes a batch of per-tile columns. Staged scenes are committed once at the end, or every
    ``commit_every`` items.
    ``progress``: True for a terminal bar, or a `Progress` hook. ``reader`` defaults to
    `dsat_core.data.reader.read_item`.
    """
    began = time.perf_counter()
    store = DatasetStore.open(store_uri, storage_options=storage_options, create=True, catalog=config)
    plan = plan_ingest(items, store)
    committer = _Committer(store, _new_report(store, plan), commit_every)
    job = {
        "config": config,
        "store_uri": store_uri,
        "aoi_bbox": aoi_bbox,
        "storage_options": storage_options,
        "read_options": read_options,
        "reader": reader,
    }
    with ExitStack() as stack:
        if plan.todo:
            dask = stack.enter_context(
                dask_client(client, scheduler_address=scheduler_address, n_workers=n_workers)
            )
            committer.submit = partial(dask.submit, pure=False, priority=1)  # before queued reads
            workers = n_workers_of(dask, n_workers)
            batches = guided_batches(plan.todo, workers)
            report_progress = _progress_hook(progress, len(plan.todo))
            staged = _stage_on_workers(dask, batches, job, max_in_flight or 2 * workers)
            for done, (item_id, outcome) in enumerate(staged, 1):
                committer.add_outcome(item_id, outcome)
                report_progress(done, len(plan.todo))
        committer.add_invalid(plan.invalid)
        committer.commit()  # while the cluster is up: the last shard copies run on its workers
    return _finish_report(committer.report, store, began)


def plan_ingest(items: Sequence[Mapping[str, Any]], store: DatasetStore) -> IngestPlan:
    """Split ``items`` into new ones (deduplicated by id), already ingested ids, and items without an id."""
    done = store.ingested_items()
    plan = IngestPlan([], [], [])
    queued: set[str] = set()
    for item in items:
        item_id = item.get("id") if isinstance(item, Mapping) else None
        if not isinstance(item_id, str) or not item_id:
            plan.invalid.append(Rejection(str(item_id), "STAC item has no string 'id'"))
        elif item_id in done:
            plan.skipped.append(item_id)
        elif item_id not in queued:
            queued.add(item_id)
            plan.todo.append(dict(item))
    return plan


def _new_report(store: DatasetStore, plan: IngestPlan) -> IngestReport:
    report = IngestReport(store_uri=store.uri, version=store.version, content_hash=store.content_hash)
    report.skipped_items, report.n_items = plan.skipped, len(plan.todo)
    return report


def _stage_on_workers(
    client: distributed.Client, batches: Iterator[list[dict[str, Any]]], job: Mapping[str, Any], limit: int
) -> Iterator[tuple[str, StagedScene | Exception]]:
    """Run `stage_batch` for every batch on the workers, at most ``limit`` tasks at once, and yield
    ``(item id, staged scene)`` for each item of a task as it finishes. The items of a failed task are tried
    again one task each; a failed single-item task yields ``(item id, exception)``."""
    from distributed import as_completed

    retry: list[list[dict[str, Any]]] = []  # single-item batches, taken before new ones
    futures: dict[Any, list[dict[str, Any]]] = {}
    running = as_completed()

    def fill() -> None:
        while len(futures) < limit:
            batch = retry.pop() if retry else next(batches, None)
            if batch is None:
                return
            key = f"ingest-{batch[0]['id']}-{len(batch)}-{time.time_ns()}"
            future = client.submit(stage_batch, batch, **job, pure=False, key=key)
            futures[future] = batch
            running.add(future)

    fill()
    for future in running:
        batch = futures.pop(future)
        outcomes: list[tuple[str, StagedScene | Exception]] = []
        try:
            outcomes = [(item["id"], scene) for item, scene in zip(batch, future.result(), strict=True)]
        except Exception as err:  # a worker died or the store write failed
            if len(batch) > 1:
                retry.extend([item] for item in reversed(batch))
            else:
                outcomes = [(batch[0]["id"], err)]  # the item is rejected
        finally:
            future.release()
        fill()  # the workers go on reading while the driver commits these
        yield from outcomes


class _Committer:
    """The single writer of one run: adds staged scenes to an open commit (its shard copies go to
    ``submit``), commits every ``commit_every`` scenes and at the end, merging each commit into ``report``."""

    def __init__(self, store: DatasetStore, report: IngestReport, commit_every: int | None) -> None:
        self.store, self.report, self.commit_every = store, report, commit_every
        self.submit: Callable[..., Any] | None = None
        self._transaction: CommitTransaction | None = None
        self._scenes = 0

    def add(self, staged: StagedScene) -> None:
        if self._transaction is None:
            self._transaction = self.store.begin_commit(submit=self.submit)  # copies: whole tasks of shards
        self._transaction.add(staged)  # rows are planned and full shards copied while workers read on
        self._scenes += 1
        if self.commit_every and self._scenes >= self.commit_every:
            self.commit()

    def add_outcome(self, item_id: str, outcome: StagedScene | Exception) -> None:
        """A staged scene, or a failed task recorded as the rejection of its item."""
        if isinstance(outcome, StagedScene):
            self.add(outcome)
            return
        reason = f"ingest task failed: {type(outcome).__name__}: {outcome}"
        log.warning("%s: %s", item_id, reason)
        self.add(self.store.stage(SceneTiles(item_id, rejected=[Rejection(item_id, reason)])))

    def add_invalid(self, rejections: list[Rejection]) -> None:
        """Items that are not valid STAC items, recorded as rejections."""
        if rejections:
            self.add(self.store.stage(SceneTiles("<invalid items>", rejected=rejections)))

    def commit(self) -> None:
        if self._transaction is not None:
            _merge(self.report, self._transaction.finish())
            self._transaction, self._scenes = None, 0


def _merge(report: IngestReport, result: CommitResult) -> None:
    for attr in ("added_tiles", "skipped_duplicates"):
        total = getattr(report, attr)
        for product, n in getattr(result, attr).items():
            total[product] = total.get(product, 0) + n
    report.items_added.extend(result.items_added)
    report.rejected.extend(result.rejected)
    report.version = result.version
    report.content_hash = result.content_hash


def _finish_report(report: IngestReport, store: DatasetStore, began: float) -> IngestReport:
    report.total_tiles = {p: store.n_tiles(p) for p in store.products()}
    report.version, report.content_hash = store.version, store.content_hash
    report.seconds = time.perf_counter() - began
    return report


def _progress_hook(progress: bool | Progress, total: int) -> Progress:
    """The hook for ``progress``: the caller's, a tqdm bar (closed at the last item), or nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="ingest", unit="item")

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def ingest_report_markdown(report: IngestReport, *, max_reasons: int = 20) -> str:
    """A short markdown summary (published by the refresh flow as an artifact)."""
    lines = [
        "# Dataset refresh",
        "",
        f"- store: `{report.store_uri}`",
        f"- version: **{report.version}**, content hash `{report.content_hash[:16]}…`",
        f"- items: {report.n_items} processed, {len(report.items_added)} added, "
        f"{len(report.skipped_items)} already ingested (skipped)",
        f"- took {report.seconds:.1f} s",
        "",
        "| product | tiles added | duplicates skipped | tiles in store |",
        "|---|---:|---:|---:|",
    ]
    for product in sorted(set(report.total_tiles) | set(report.added_tiles)):
        lines.append(
            f"| {product} | {report.added_tiles.get(product, 0)} | "
            f"{report.skipped_duplicates.get(product, 0)} | {report.total_tiles.get(product, 0)} |"
        )
    lines += ["", f"## Rejected ({len(report.rejected)})", ""]
    if report.rejected:
        reasons = Counter(
            (r.reason.split(":")[0] if r.reason.startswith(("reader error", "ingest task")) else r.reason)
            for r in report.rejected
        )
        lines += ["| reason | count |", "|---|---:|"]
        lines += [f"| {reason.replace('|', '/')} | {n} |" for reason, n in reasons.most_common(max_reasons)]
        scenes = sorted({r.item_id for r in report.rejected if r.tile_index < 0})
        if scenes:
            lines += ["", "Scenes rejected whole: " + ", ".join(f"`{s}`" for s in scenes[:max_reasons])]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


__all__ = [
    "IngestPlan",
    "IngestReport",
    "Progress",
    "guided_batches",
    "ingest_items",
    "ingest_report_markdown",
    "plan_ingest",
    "read_and_stage",
    "stage_batch",
]
