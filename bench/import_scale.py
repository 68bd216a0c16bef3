"""Bench: the fMoW importer on many images — throughput on 1 vs 2 Dask workers, driver memory vs size.

Builds an fMoW-rgb copy of N images in the published layout (the miniature generator's sidecars and chips,
copied under new location / image ids) and imports it in this process and on a `LocalCluster` of 1 and of 2
workers (each cluster started and warmed up before the clock); then imports a copy of N/4 images to compare
the driver's peak Python memory (tracemalloc): items stream to disk and the driver keeps one small link key
per item, so memory grows far slower than the number of images. On a local disk an image costs under a
millisecond, so this measures overheads; over S3 each sidecar is a request and workers pay off.
Run: `python bench/import_scale.py [--images 20000]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from dsat_core.data.cluster import dask_client
from dsat_core.data.importers import get_importer, run_import
from dsat_core.data.importers.miniature import write_fmow


def make_copy(root: Path, n_images: int) -> None:
    """An fMoW-rgb layout with `n_images` images: 3 dates per location, sidecars from the miniature."""
    template = Path(tempfile.mkdtemp(prefix="fmow-template-"))
    sidecars = write_fmow(template)
    for k in range(n_images):
        source = sidecars[k % len(sidecars)]
        place, image_id = source["place"], k % 3
        name = f"{place.category}_{100 + k // 3}"
        folder = root / "train" / place.category / name
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{name}_{image_id}_rgb"
        shutil.copyfile(Path(source["path"]).with_suffix(".jpg"), folder / f"{stem}.jpg")
        data = {k: v for k, v in source.items() if k not in ("path", "place")} | {
            "img_filename": f"{stem}.jpg"
        }
        (folder / f"{stem}.json").write_text(json.dumps(data))
    shutil.rmtree(template)


def timed_import(source: Path, out: Path, client: Any | None) -> tuple[float, int, float]:
    """(seconds, items, driver peak MiB) of one import on `client` (None: in this process)."""
    tracemalloc.start()
    began = time.perf_counter()
    report = run_import(get_importer("fmow"), str(source), out, client=client, batch_size=256)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    shutil.rmtree(out)
    return seconds, report.n_items, peak


def on_cluster(workers: int, source: Path, out: Path) -> tuple[float, int, float]:
    """`timed_import` on a fresh LocalCluster (started, and its workers warmed up, before the clock)."""
    with dask_client(n_workers=workers) as client:
        client.run(importlib.import_module, "dsat_core.data.importers")
        return timed_import(source, out, client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsat-import-bench-") as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        make_copy(big, args.images)
        make_copy(small, args.images // 4)
        local = timed_import(big, Path(tmp) / "out", None)
        one = on_cluster(1, big, Path(tmp) / "out")
        two = on_cluster(2, big, Path(tmp) / "out")
        quarter = on_cluster(2, small, Path(tmp) / "out")
    print(f"fMoW import of {args.images} images (2 places x 3 dates repeated under new ids)")
    for label, (seconds, items, peak) in (
        ("in process", local),
        ("1 worker ", one),
        ("2 workers", two),
        (f"2 workers, {args.images // 4} images", quarter),
    ):
        print(f"  {label}: {seconds:7.1f} s, {items / seconds:8.0f} images/s, driver peak {peak:6.1f} MiB")
    print(f"2 workers vs 1: {one[0] / two[0]:.2f}x")
    ratio = two[2] / quarter[2]
    print(f"driver peak memory, {args.images} vs {args.images // 4} images (4x): {ratio:.2f}x")


if __name__ == "__main__":
    main()
