"""The ingest driver: read STAC items into tiles on Dask workers, stage them, commit once.

Pure Python + Dask (the Prefect flow is a thin layer over `ingest_items`). Each item is read and staged by
one task on a worker (`reader` then `DatasetStore.stage`), so pixels never travel back to the driver; the
driver keeps at most ``max_in_flight`` items submitted and is the single committer: it decides which staged
tiles go to which rows, while the copies of whole shards of images into the store run as worker tasks.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.cluster import dask_client, n_workers_of
from dsat_core.data.store import TILES_PER_SHARD, CommitResult, CommitTransaction, DatasetStore, StagedScene
from dsat_core.data.tiles import Rejection, SceneTiles

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)
Reader = Callable[..., SceneTiles]
COMMIT_BATCH_TILES = TILES_PER_SHARD  # copy each shard as soon as it is complete


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


def _merge(report: IngestReport, result: CommitResult) -> None:
    for attr in ("added_tiles", "skipped_duplicates"):
        total = getattr(report, attr)
        for product, n in getattr(result, attr).items():
            total[product] = total.get(product, 0) + n
    report.items_added.extend(result.items_added)
    report.rejected.extend(result.rejected)
    report.version = result.version
    report.content_hash = result.content_hash


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
    progress: bool = False,
    reader: Reader | None = None,
    commit_every: int | None = None,
    max_in_flight: int | None = None,
) -> IngestReport:
    """Ingest STAC ``items`` (dicts) into the store at ``store_uri`` (created when missing).

    Items already in the store are skipped, so a refresh adds only what is new. Work runs on ``client``,
    else on the scheduler at ``scheduler_address``, else on a new ``LocalCluster(n_workers)``.
    ``storage_options`` are for the store, ``read_options`` for the reader's asset access. At most
    ``max_in_flight`` (default 2 × workers) items are in flight; staged scenes are committed once at the
    end, or every ``commit_every`` items. ``reader`` defaults to `dsat_core.data.reader.read_item`.
    """
    from distributed import as_completed

    began = time.perf_counter()
    store = DatasetStore.open(store_uri, storage_options=storage_options, create=True, catalog=config)
    plan = plan_ingest(items, store)
    report = IngestReport(store_uri=store_uri, version=store.version, content_hash=store.content_hash)
    report.skipped_items, report.n_items = plan.skipped, len(plan.todo)
    todo, bad = plan.todo, plan.invalid
    transaction: CommitTransaction | None = None
    submit: Callable[..., Any] | None = None  # image copies of whole shards run on the workers
    in_transaction = 0

    def commit() -> None:
        nonlocal transaction, in_transaction
        if transaction is not None:
            _merge(report, transaction.finish())
            transaction, in_transaction = None, 0

    def add(staged: StagedScene) -> None:
        nonlocal transaction, in_transaction
        if transaction is None:
            transaction = store.begin_commit(batch_tiles=COMMIT_BATCH_TILES, submit=submit)
        transaction.add(staged)  # the driver plans rows and copies shards while the workers go on reading
        in_transaction += 1

    with ExitStack() as stack:
        if todo:
            client = stack.enter_context(
                dask_client(client, scheduler_address=scheduler_address, n_workers=n_workers)
            )
            workers = n_workers_of(client, n_workers)
            submit = partial(client.submit, pure=False, priority=1)  # shard copies go before queued reads
            limit = max_in_flight or 2 * workers
            pending = iter(todo)
            futures: dict[Any, str] = {}
            bar = _progress(len(todo)) if progress else None

            def submit_next(ac: Any) -> None:
                item = next(pending, None)
                if item is None:
                    return
                fut = client.submit(
                    read_and_stage,
                    item,
                    config,
                    store_uri,
                    aoi_bbox=aoi_bbox,
                    storage_options=storage_options,
                    read_options=read_options,
                    reader=reader,
                    pure=False,
                    key=f"ingest-{item['id']}-{time.time_ns()}",
                )
                futures[fut] = item["id"]
                ac.add(fut)

            ac = as_completed()
            for _ in range(limit):
                submit_next(ac)
            for fut in ac:
                item_id = futures.pop(fut)
                try:
                    staged = fut.result()
                except Exception as err:  # a worker died or the store write failed: record, go on
                    reason = f"ingest task failed: {type(err).__name__}: {err}"
                    log.warning("%s: %s", item_id, reason)
                    staged = store.stage(SceneTiles(item_id, rejected=[Rejection(item_id, reason)]))
                finally:
                    fut.release()
                submit_next(ac)
                add(staged)
                if bar is not None:
                    bar.update(1)
                if commit_every and in_transaction >= commit_every:
                    commit()
            if bar is not None:
                bar.close()
        if bad:
            add(store.stage(SceneTiles("<invalid items>", rejected=bad)))
        commit()
    return _finish_report(report, store, began)


def _finish_report(report: IngestReport, store: DatasetStore, began: float) -> IngestReport:
    report.total_tiles = {p: store.n_tiles(p) for p in store.products()}
    report.version, report.content_hash = store.version, store.content_hash
    report.seconds = time.perf_counter() - began
    return report


@dataclass
class IngestPlan:
    """Which items of a search are new to the store, already ingested, or not valid STAC items."""

    todo: list[dict[str, Any]]
    skipped: list[str]
    invalid: list[Rejection]


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


def commit_staged(
    store: DatasetStore, staged: Sequence[StagedScene], plan: IngestPlan, *, began: float | None = None
) -> IngestReport:
    """Commit scenes staged elsewhere (e.g. by Prefect tasks) as one version; report like `ingest_items`."""
    began = time.perf_counter() if began is None else began
    report = IngestReport(store_uri=store.uri, version=store.version, content_hash=store.content_hash)
    report.skipped_items, report.n_items = plan.skipped, len(plan.todo)
    staged = list(staged)
    if plan.invalid:
        staged.append(store.stage(SceneTiles("<invalid items>", rejected=plan.invalid)))
    if staged:
        transaction = store.begin_commit()
        for scene in staged:
            transaction.add(scene)
        _merge(report, transaction.finish())
    return _finish_report(report, store, began)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ingest", unit="item")


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
    "commit_staged",
    "ingest_items",
    "ingest_report_markdown",
    "plan_ingest",
    "read_and_stage",
]
