"""A real STAC API on 127.0.0.1 over a static catalog, served by `rustac serve` (memory backend)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pystac


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def static_catalog_items(catalog: str | Path, collection: str) -> list[dict]:
    """Items of a static catalog as dicts with absolute asset hrefs and `collection` set."""
    root = pystac.Catalog.from_file(str(catalog))
    items = []
    for item in root.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        data = item.to_dict(include_self_link=False, transform_hrefs=False)
        data["collection"] = collection
        data["links"] = [
            link for link in data["links"] if link["rel"] not in ("root", "parent", "collection")
        ]
        items.append(data)
    if not items:
        raise ValueError(f"static catalog {catalog} holds no items")
    return items


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


@contextmanager
def serve_static_catalog(
    catalog: str | Path, collection: str, *, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[str]:
    """Context manager: a STAC API over a static catalog; yields its root URL.

    `catalog` is a pystac catalog file (its items are served under `collection`), or a folder written by an
    importer (`collection.json` + `items.ndjson`, served as they are).
    """
    folder = Path(catalog)
    if folder.is_dir() and (folder / "items.ndjson").is_file():
        server = start_rustac(["collection.json", "items.ndjson"], folder, host=host, port=port)
    else:
        server = start_stac_server(static_catalog_items(catalog, collection), host=host, port=port)
    try:
        yield server.url
    finally:
        server.stop()
