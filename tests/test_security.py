"""check_href / check_vrt: which asset hrefs the reader may open."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsat_core.data.catalog import CatalogConfig
from dsat_core.data.security import UnsafeHrefError, check_href, check_vrt, resolve_href


def _config(roots: list[Path], schemes=("file", "https", "http", "s3")) -> CatalogConfig:
    return CatalogConfig(
        name="t",
        stac_api="http://127.0.0.1:1",
        collections=["c"],
        products={"p": {"bands": [{"name": "red"}]}},
        allowed_schemes=list(schemes),
        allowed_roots=[str(r) for r in roots],
    )


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "sub" / "a.tif").write_bytes(b"x")
    (tmp_path / "outside.tif").write_bytes(b"x")
    return tmp_path / "root"


def test_local_paths_inside_roots_are_resolved(root: Path) -> None:
    config = _config([root])
    expected = str((root / "sub" / "a.tif").resolve())
    assert check_href(str(root / "sub" / "a.tif"), config) == expected
    assert check_href(f"file://{root}/sub/a.tif", config) == expected
    assert check_href(str(root / "sub" / ".." / "sub" / "a.tif"), config) == expected


def test_local_paths_outside_roots_are_refused(root: Path) -> None:
    config = _config([root])
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots") as err:
        check_href(str(root.parent / "outside.tif"), config)
    assert "outside.tif" in str(err.value)
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots"):
        check_href(str(root / ".." / "outside.tif"), config)  # traversal with ..
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots"):
        check_href("/etc/passwd", config)
    with pytest.raises(UnsafeHrefError, match="host"):
        check_href("file://evil.example.com/etc/passwd", config)


def test_relative_hrefs_resolve_against_base_then_roots(root: Path) -> None:
    config = _config([root])
    item_json = root / "sub" / "item.json"
    assert check_href("./a.tif", config, base_href=str(item_json)) == str((root / "sub" / "a.tif").resolve())
    assert check_href("sub/a.tif", config) == str((root / "sub" / "a.tif").resolve())  # found under a root
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots"):
        check_href("../../outside.tif", config, base_href=str(item_json))
    with pytest.raises(UnsafeHrefError, match="no base href"):
        check_href("missing.tif", config)
    remote = "https://example.com/items/item.json"
    assert check_href("../data/b.tif", config, base_href=remote) == "https://example.com/data/b.tif"
    assert resolve_href("/abs/x.tif", base_href="https://example.com/") == "/abs/x.tif"


def test_symlink_escaping_the_root_is_refused(root: Path) -> None:
    link = root / "sub" / "link.tif"
    link.symlink_to(root.parent / "outside.tif")
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots"):
        check_href(str(link), _config([root]))


def test_schemes(root: Path) -> None:
    config = _config([root], schemes=("https", "s3"))
    assert check_href("HTTPS://example.com/a.tif", config) == "https://example.com/a.tif"
    assert check_href("s3://bucket/key.tif", config) == "s3://bucket/key.tif"
    for href, reason in [
        ("ftp://example.com/a.tif", "scheme 'ftp'"),
        ("http://example.com/a.tif", "scheme 'http'"),
        ("gs://bucket/a.tif", "scheme 'gs'"),
        (str(root / "sub" / "a.tif"), "local files are not allowed"),
        ("https:///a.tif", "without a host"),
        ("", "empty"),
    ]:
        with pytest.raises(UnsafeHrefError, match=reason):
            check_href(href, config)
    assert issubclass(UnsafeHrefError, ValueError)


def test_no_roots_means_no_local_files(root: Path) -> None:
    with pytest.raises(UnsafeHrefError, match="no allowed_roots"):
        check_href(str(root / "sub" / "a.tif"), _config([]))


def _vrt(path: Path, source: str, relative: int) -> None:
    path.write_text(
        '<VRTDataset rasterXSize="1" rasterYSize="1"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="{relative}">{source}</SourceFilename><SourceBand>1</SourceBand>'
        "</SimpleSource></VRTRasterBand></VRTDataset>"
    )


def test_vrt_sources_are_checked(root: Path) -> None:
    config = _config([root])
    good = root / "sub" / "good.vrt"
    _vrt(good, "a.tif", 1)
    check_vrt(str(good), config)
    bad = root / "sub" / "bad.vrt"
    _vrt(bad, "../../outside.tif", 1)
    with pytest.raises(UnsafeHrefError, match="outside the allowed roots"):
        check_vrt(str(bad), config)
    remote = root / "sub" / "remote.vrt"
    _vrt(remote, "/vsicurl/http://example.com/a.tif", 0)
    with pytest.raises(UnsafeHrefError):
        check_vrt(str(remote), config)
