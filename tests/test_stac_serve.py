"""`dsat stac serve` over static catalogs with a malformed item: it is skipped and named, the rest served."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pystac_client import Client

from dsat_core.data.stac_server import SkippedItem, free_port, serve_static_catalog
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "catalogs" / "samples"
DSAT = Path(sys.executable).with_name("dsat")
BAD = "landsat8-oli-sr-rondonia-20190727"
GOOD = ["landsat7-etm-bahamas-rgb", "landsat8-oli-sr-madre-de-dios-20180906"]


@pytest.fixture(autouse=True)
def _needs_rustac() -> None:
    if shutil.which("rustac") is None and not Path(sys.executable).with_name("rustac").exists():
        pytest.skip("the rustac CLI is not installed")


def _drop_datetime(item: dict) -> dict:
    for key in ("datetime", "start_datetime", "end_datetime"):
        item["properties"].pop(key, None)
    return item


def _bad_catalog(tmp_path: Path) -> Path:
    """A copy of the shipped static catalog whose Rondonia item has no datetime at all."""
    folder = tmp_path / "catalog"
    shutil.copytree(SAMPLES / "catalog", folder)
    path = folder / BAD / f"{BAD}.json"
    path.write_text(json.dumps(_drop_datetime(json.loads(path.read_text()))))
    return folder / "catalog.json"


def _searchable_ids(url: str) -> list[str]:
    return sorted(item.id for item in Client.open(url).search(collections=["local-samples"]).items())


def _ctrl_c_on() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_url(out: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The URL `dsat stac serve` prints once the API answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("STAC API over"):
                return line.split(" at ", 1)[1].split(" ", 1)[0]
        assert proc.poll() is None, f"dsat stac serve exited with {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError("dsat stac serve printed no URL")


def test_cli_skips_the_item_without_datetime_and_serves_the_rest(tmp_path: Path) -> None:
    catalog = _bad_catalog(tmp_path)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    cmd = [str(DSAT), "stac", "serve", "--catalog", str(catalog), "--port", str(free_port())]
    with out.open("w") as stdout, err.open("w") as stderr:
        # as from a terminal: a job started in the background (`cmd &`, nohup) inherits SIGINT ignored
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=tmp_path, preexec_fn=_ctrl_c_on)
    try:
        url = _wait_for_url(out, proc)
        assert _searchable_ids(url) == GOOD
        bahamas = Client.open(url).search(collections=["local-samples"], bbox=[-79, 23.5, -76.5, 25.6])
        assert [i.id for i in bahamas.items()] == ["landsat7-etm-bahamas-rgb"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the CLI stops rustac on its way out
        rc = proc.wait(timeout=30)
    assert rc == 0
    lines = err.read_text().splitlines()
    skipped = [line for line in lines if "skipped item" in line]
    assert len(skipped) == 1, lines
    assert BAD in skipped[0] and "no datetime" in skipped[0]
    assert "Traceback" not in err.read_text()
    with pytest.raises(OSError):  # the API went away with the command
        urllib.request.urlopen(url, timeout=2)


def test_imported_folder_with_a_malformed_line_serves_the_rest(tmp_path: Path) -> None:
    """The `dsat import` layout (collection.json + items.ndjson): bad lines are left out of a served copy."""
    folder = tmp_path / "imported"
    folder.mkdir()
    shutil.copy(SAMPLES / "collection.json", folder)
    lines = (SAMPLES / "items.ndjson").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    items = [_drop_datetime(i) if i["id"] == BAD else i for i in items]
    text = "\n".join(json.dumps(i) for i in items) + "\n{not json\n"
    (folder / "items.ndjson").write_text(text)
    skipped: list[SkippedItem] = []
    with serve_static_catalog(folder, "local-samples", on_skip=skipped.append) as url:
        assert _searchable_ids(url) == GOOD
    assert [(s.item_id, s.source.rsplit(" ", 1)[-1]) for s in skipped] == [(BAD, "2"), (None, "4")]
    assert "no datetime" in skipped[0].reason and "not JSON" in skipped[1].reason
    assert (folder / "items.ndjson").read_text() == text  # the user's files are left as they are


def test_catalog_without_a_servable_item_is_one_error_line(tmp_path: Path, capsys) -> None:
    catalog = _bad_catalog(tmp_path)
    for name in GOOD:
        path = catalog.parent / name / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "type": "Collection"}))
    assert main(["stac", "serve", "--catalog", str(catalog), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if "skipped item" in line]) == 3
    assert err[-1].startswith("dsat stac: error: static catalog") and "no servable items" in err[-1]
