"""A real STAC API on 127.0.0.1 over a static catalog, served by `rustac serve` (memory backend).

`catalog_api` gives the API a catalog config searches: its `stac_api`, or its `static_catalog` served for
the duration of a block (what `dsat ingest` and the `refresh-dataset` flow do for `catalogs/local-samples`).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pystac

from dsat_core.data.catalog import CatalogConfig

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SkippedItem:
    """An item of a static catalog that is not served, and why."""

    item_id: str | None
    source: str  # the item's file, or "items.ndjson line N"
    reason: str

    def __str__(self) -> str:
        name = f"{self.item_id} ({self.source})" if self.item_id else self.source
        return f"skipped item {name}: {self.reason}"


SkipHandler = Callable[[SkippedItem], None]


def log_skipped(skipped: SkippedItem) -> None:
    """The default `on_skip`: one warning line per skipped item."""
    logger.warning("%s", skipped)


def _datetime_problem(properties: dict[str, Any]) -> str | None:
    """Why the item's datetime fields are unusable (None when they are fine)."""
    ranged = properties.get("start_datetime") is not None and properties.get("end_datetime") is not None
    if properties.get("datetime") is None and not ranged:
        return "no datetime (nor start_datetime and end_datetime)"
    for key in ("datetime", "start_datetime", "end_datetime"):
        value = properties.get(key)
        if value is None:
            continue
        try:
            datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return f"{key} {value!r} is not an RFC 3339 date-time"
    return None


def item_problem(data: Any) -> str | None:
    """Why `data` is not a servable STAC item (None when it is): type, id, geometry, properties, datetime."""
    if not isinstance(data, dict):
        return f"not a JSON object but {type(data).__name__}"
    if data.get("type") != "Feature":
        return f"type is {data.get('type')!r}, not 'Feature'"
    if not isinstance(data.get("id"), str) or not data["id"]:
        return "no id"
    if "geometry" not in data:
        return "no geometry"
    if not isinstance(data.get("properties"), dict):
        return "no properties"
    if not isinstance(data.get("assets", {}), dict):
        return "assets is not an object"
    return _datetime_problem(data["properties"])


def _item_hrefs(catalog: pystac.Catalog) -> Iterator[str]:
    """Absolute hrefs of the item links of `catalog` and of its sub-catalogs."""
    for link in catalog.get_links(pystac.RelType.ITEM):
        href = link.get_absolute_href()
        if href:
            yield href
    for child in catalog.get_children():
        yield from _item_hrefs(child)


def _read_item(href: str, collection: str) -> dict:
    """The item file at `href` as a dict with absolute asset hrefs; `ValueError` names what is wrong."""
    data = pystac.StacIO.default().read_json(href)
    problem = item_problem(data)
    if problem:
        raise ValueError(problem)
    item = pystac.Item.from_dict(data, href=href)
    item.make_asset_hrefs_absolute()
    out = item.to_dict(include_self_link=False, transform_hrefs=False)
    out["collection"] = collection
    out["links"] = [link for link in out["links"] if link["rel"] not in ("root", "parent", "collection")]
    return out


def _item_id(href: str) -> str | None:
    """The id in the item file at `href`, when it can be read."""
    try:
        data = pystac.StacIO.default().read_json(href)
    except Exception:  # noqa: BLE001 - only for the report line
        return None
    return data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None


def static_catalog_items(
    catalog: str | Path, collection: str, *, on_skip: SkipHandler | None = log_skipped
) -> list[dict]:
    """Items of a static catalog as dicts with absolute asset hrefs and `collection` set.

    A malformed item (unreadable, no datetime, not a Feature, ...) is skipped and reported to `on_skip`;
    `ValueError` when no item is left.
    """
    root = pystac.Catalog.from_file(str(catalog))
    items = []
    for href in _item_hrefs(root):
        try:
            items.append(_read_item(href, collection))
        except Exception as err:  # noqa: BLE001 - any broken item is skipped, with its reason
            if on_skip is not None:
                on_skip(SkippedItem(_item_id(href), href, str(err) or type(err).__name__))
    if not items:
        raise ValueError(f"static catalog {catalog} holds no servable items")
    return items


def _ndjson_items(path: Path, on_skip: SkipHandler | None) -> tuple[list[str], int]:
    """The good lines of an items.ndjson file and how many were skipped (each reported to `on_skip`)."""
    good: list[str] = []
    skipped = 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        problem: str | None
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            data, problem = None, f"not JSON ({err})"
        else:
            problem = item_problem(data)
        if problem is None:
            good.append(line)
            continue
        skipped += 1
        if on_skip is not None:
            item_id = data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None
            on_skip(SkippedItem(item_id, f"{path} line {number}", problem))
    return good, skipped


def _rustac() -> str:
    found = shutil.which("rustac") or str(Path(sys.executable).with_name("rustac"))
    if not Path(found).exists():
        raise RuntimeError("the `rustac` command is not installed (pip install rustac)")
    return found


@dataclass
class StacServer:
    """A running `rustac serve` process."""

    url: str
    process: subprocess.Popen
    workdir: Path
    extra_dirs: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for folder in (self.workdir, *self.extra_dirs):
            shutil.rmtree(folder, ignore_errors=True)


def start_rustac(
    args: list[str],
    cwd: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 30.0,
) -> StacServer:
    """Run `rustac serve ARGS --addr HOST:PORT` in `cwd`; returns once `/collections` answers."""
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="dsat-stac-"))
    log_path = workdir / "rustac.log"
    with log_path.open("w") as log:
        cmd = [_rustac(), "serve", *args, "--addr", f"{host}:{port}"]
        process = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    server = StacServer(url=f"http://{host}:{port}", process=process, workdir=workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            message = log_path.read_text()[-2000:]
            server.stop()
            raise RuntimeError(f"rustac serve exited with {process.returncode}: {message}")
        try:
            with urllib.request.urlopen(f"{server.url}/collections", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"STAC API at {server.url} did not answer within {timeout} s")


def start_stac_server(
    items: list[dict], *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0
) -> StacServer:
    """Serve `items` (each with a `collection`) as a STAC API."""
    folder = Path(tempfile.mkdtemp(prefix="dsat-items-"))
    (folder / "items.ndjson").write_text("".join(json.dumps(item) + "\n" for item in items))
    try:
        server = start_rustac(
            ["items.ndjson", "--create-collections"], folder, host=host, port=port, timeout=timeout
        )
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    server.extra_dirs.append(folder)
    return server


def _serve_imported_folder(
    folder: Path, host: str, port: int | None, on_skip: SkipHandler | None
) -> StacServer:
    """rustac over `collection.json` + `items.ndjson`; a filtered copy when some items are malformed."""
    good, skipped = _ndjson_items(folder / "items.ndjson", on_skip)
    if not good:
        raise ValueError(f"{folder / 'items.ndjson'} holds no servable items")
    if not skipped:
        return start_rustac(["collection.json", "items.ndjson"], folder, host=host, port=port)
    copy = Path(tempfile.mkdtemp(prefix="dsat-items-"))
    shutil.copy(folder / "collection.json", copy / "collection.json")
    (copy / "items.ndjson").write_text("\n".join(good) + "\n")
    try:
        server = start_rustac(["collection.json", "items.ndjson"], copy, host=host, port=port)
    except Exception:
        shutil.rmtree(copy, ignore_errors=True)
        raise
    server.extra_dirs.append(copy)
    return server


@contextmanager
def serve_static_catalog(
    catalog: str | Path,
    collection: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    on_skip: SkipHandler | None = log_skipped,
) -> Iterator[str]:
    """Context manager: a STAC API over a static catalog; yields its root URL.

    `catalog` is a pystac catalog file (its items are served under `collection`), or a folder written by an
    importer (`collection.json` + `items.ndjson`, served as they are). Malformed items are not served: each
    is reported to `on_skip` (default: one warning line) and the rest are served.
    """
    folder = Path(catalog)
    if folder.is_dir() and (folder / "items.ndjson").is_file():
        server = _serve_imported_folder(folder, host, port, on_skip)
    else:
        items = static_catalog_items(catalog, collection, on_skip=on_skip)
        server = start_stac_server(items, host=host, port=port)
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def catalog_api(config: CatalogConfig, *, on_skip: SkipHandler | None = log_skipped) -> Iterator[str]:
    """Context manager: the root URL of the STAC API to search for `config`.

    That is `config.stac_api` when set (a run-time override included); else the catalog's
    `static_catalog`, served under its first collection on a free 127.0.0.1 port by `serve_static_catalog`
    (the server `dsat stac serve` and the demo use) until the block ends.
    """
    if config.stac_api:
        yield config.stac_api
        return
    if not config.static_catalog:
        raise ValueError(f"catalog {config.name!r} names neither a stac_api nor a static_catalog")
    with serve_static_catalog(config.static_catalog, config.collections[0], on_skip=on_skip) as url:
        logger.info("serving %s as a STAC API at %s", config.static_catalog, url)
        yield url
