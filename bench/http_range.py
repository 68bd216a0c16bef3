"""Bench: how much of a COG does `read_item` download when the AOI covers a quarter of it?

Starts `RangeHTTPServer` (a threaded HTTP file server on 127.0.0.1 that honours Range requests and counts the
bytes it sends), writes a synthetic 2048 x 2048 x 3 COG (512 px blocks, overviews) to a temp folder, reads it
over HTTP with an AOI covering its top-left quarter, and prints bytes served / file size against the target
(<= 40 %). Run: `python bench/http_range.py`.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TARGET_FRACTION = 0.40
_RANGE = re.compile(r"(\d*)-(\d*)")


class _Handler(SimpleHTTPRequestHandler):
    server: _CountingServer

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _ranges(self, size: int) -> list[tuple[int, int]] | None:
        header = self.headers.get("Range")
        if not header or not header.startswith("bytes="):
            return None
        out = []
        for part in header[6:].split(","):
            match = _RANGE.fullmatch(part.strip())
            if not match or match.groups() == ("", ""):
                return None
            first, last = match.groups()
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            if start <= end:
                out.append((start, end))
        return out or None

    def _send(self, body_parts: list[bytes]) -> None:
        for part in body_parts:
            self.wfile.write(part)
        self.server.count(sum(len(p) for p in body_parts), ranged=self.headers.get("Range") is not None)

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        ranges = self._ranges(size)
        with path.open("rb") as f:
            if ranges is None:
                data = f.read()
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self._send([data])
                return
            chunks = []
            for start, end in ranges:
                f.seek(start)
                chunks.append((start, end, f.read(end - start + 1)))
        self.send_response(206)
        self.send_header("Accept-Ranges", "bytes")
        if len(chunks) == 1:
            start, end, data = chunks[0]
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._send([data])
            return
        boundary = "dsatbyteranges"
        parts = []
        for start, end, data in chunks:
            head = (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n"
            )
            parts += [head.encode(), data, b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        self.send_header("Content-Type", f"multipart/byteranges; boundary={boundary}")
        self.send_header("Content-Length", str(sum(len(p) for p in parts)))
        self.end_headers()
        self._send(parts)

    def do_HEAD(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.server.count(0, ranged=False)


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.bytes_served = 0
        self.requests = 0
        self.range_requests = 0

    def count(self, n: int, *, ranged: bool) -> None:
        with self.lock:
            self.bytes_served += n
            self.requests += 1
            self.range_requests += int(ranged)


class RangeHTTPServer:
    """Serve `root` on 127.0.0.1 (free port) with Range support; counts body bytes and requests.

    Use as a context manager: `with RangeHTTPServer(folder) as server: ... server.url, server.bytes_served`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._server = _CountingServer(("127.0.0.1", 0), partial(_Handler, directory=str(self.root)))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def bytes_served(self) -> int:
        return self._server.bytes_served

    @property
    def requests(self) -> int:
        return self._server.requests

    @property
    def range_requests(self) -> int:
        return self._server.range_requests

    def reset(self) -> None:
        with self._server.lock:
            self._server.bytes_served = self._server.requests = self._server.range_requests = 0

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_cog(path: Path, size: int = 2048) -> dict:
    """A synthetic 3-band uint8 COG, EPSG:32633, 10 m (512 px blocks, overviews); returns its STAC item."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.warp import transform_bounds

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (np.sin(xx / 37.0) + np.cos(yy / 53.0)) * 50 + 120
    data = np.stack([base + rng.normal(0, 12, base.shape) for _ in range(3)]).clip(1, 255).astype("uint8")
    transform = Affine(10.0, 0.0, 300000.0, 0.0, -10.0, 5800000.0)
    profile = {
        "driver": "COG", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32633",
        "transform": transform, "nodata": 0, "compress": "DEFLATE", "blocksize": 512,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    bounds = (300000.0, 5800000.0 - 10.0 * size, 300000.0 + 10.0 * size, 5800000.0)
    bbox = transform_bounds("EPSG:32633", "EPSG:4326", *bounds)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": "synthetic-cog",
        "bbox": list(bbox),
        "geometry": None,
        "properties": {"datetime": "2021-06-01T10:00:00Z", "gsd": 10.0, "platform": "synthetic"},
        "assets": {
            "image": {
                "href": path.name,
                "eo:bands": [{"name": n, "common_name": n} for n in ("red", "green", "blue")],
                "roles": ["data"],
            }
        },
    }


def quarter_aoi(size: int = 2048, margin: float = 0.05) -> tuple[float, float, float, float]:
    """WGS84 bbox inside the top-left quarter of the synthetic COG (shrunk so its UTM box stays in it)."""
    from rasterio.warp import transform_bounds

    half = 10.0 * size / 2
    pad = half * margin
    box = (300000.0 + pad, 5800000.0 - half + pad, 300000.0 + half - pad, 5800000.0 - pad)
    return transform_bounds("EPSG:32633", "EPSG:4326", *box)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsat_core.data.catalog import CatalogConfig
    from dsat_core.data.reader import read_item

    with tempfile.TemporaryDirectory() as tmp, RangeHTTPServer(tmp) as server:
        cog = Path(tmp) / "synthetic.tif"
        item = make_cog(cog)
        item["assets"]["image"]["href"] = f"{server.url}/{cog.name}"
        config = CatalogConfig(
            name="bench",
            stac_api="http://127.0.0.1:1",
            collections=["bench"],
            products={"rgb": {"bands": [{"name": c} for c in ("red", "green", "blue")], "scaling": {"mode": "percentile"}}},  # noqa: E501
            target_crs="native",
            target_gsd=None,
            tile_size=128,
            allowed_schemes=["http"],
        )  # fmt: skip
        start = time.perf_counter()
        scene = read_item(item, config, aoi_bbox=quarter_aoi())
        seconds = time.perf_counter() - start
        size = cog.stat().st_size
        fraction = server.bytes_served / size
        print(f"file size        : {size:,} bytes")
        print(
            f"bytes served     : {server.bytes_served:,} in {server.requests} requests "
            f"({server.range_requests} ranged)"
        )
        print(f"tiles            : {scene.n_tiles} ({len(scene.rejected)} rejected) in {seconds:.2f} s")
        print(f"fraction read    : {fraction:.1%} (target <= {TARGET_FRACTION:.0%})")
        ok = scene.n_tiles > 0 and fraction <= TARGET_FRACTION
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
