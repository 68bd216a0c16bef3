"""An unreachable (or failing) STAC API is one clear error: `StacApiUnreachable`, and one line from `dsat`."""

from __future__ import annotations

import http.server
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsat_core.data.catalog import load_catalog
from dsat_core.data.stac import StacApiUnreachable, search_items
from dsat_core.data.stac_server import free_port

REPO = Path(__file__).resolve().parents[1]
DSAT = Path(sys.executable).with_name("dsat")


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server hook
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_found_api() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every request with 404 (not a STAC API)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_dsat_ingest_against_a_closed_port_prints_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/"  # bound, then closed again: nothing listens there
    store = tmp_path / "store.zarr"
    cmd = [str(DSAT), "ingest", "--store", str(store), "--stac-api", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"dsat ingest: error: cannot reach STAC API {url} (connection refused): check the URL "
        "(the catalog's stac_api or --stac-api) and the network"
    ]
    assert not store.exists()  # nothing was written


def test_search_items_raises_a_connection_error_naming_the_url(not_found_api: str) -> None:
    config = load_catalog("local-samples")
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(StacApiUnreachable, match="connection refused") as refused:
        search_items(config, api_url=url)
    assert isinstance(refused.value, ConnectionError)
    assert refused.value.url == url and url in str(refused.value)
    copy = pickle.loads(pickle.dumps(refused.value))  # Prefect may persist task failures
    assert str(copy) == str(refused.value) and copy.reason == "connection refused"
    with pytest.raises(StacApiUnreachable, match=r"\(HTTP 404\)"):
        search_items(config, api_url=not_found_api)
