"""Which asset hrefs the reader may open.

A STAC item is untrusted input: its asset hrefs decide what GDAL opens. `check_href` allows only the
schemes of `CatalogConfig.allowed_schemes` and, for local files (plain paths or `file://`), only paths
that resolve (after `..` and symlinks) inside one of `CatalogConfig.allowed_roots`. GDAL-specific names
(`/vsi...` prefixes, inline `<VRTDataset>` XML) can never come through: local paths are returned absolute
and resolved, remote ones are turned into `/vsicurl/` names by the reader itself. Local VRT files are
checked source by source (`check_vrt`).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from dsat_core.data.catalog import CatalogConfig

REMOTE_SCHEMES = ("http", "https", "s3")


class UnsafeHrefError(ValueError):
    """An href the catalog config does not allow (the message names the href and why)."""


def _is_local(href: str) -> bool:
    scheme = urlsplit(href).scheme.lower()
    # A one-letter "scheme" is a Windows drive letter.
    return scheme in ("", "file") or len(scheme) == 1


def _local_path(href: str) -> str:
    parts = urlsplit(href)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsafeHrefError(f"{href!r}: file:// URLs with a host ({parts.netloc!r}) are not allowed")
        return unquote(parts.path)
    return href


def resolve_href(href: str, base_href: str | None = None, roots: list[str] | tuple[str, ...] = ()) -> str:
    """Make a relative href absolute.

    Against `base_href` when given (the href of the document holding it, or a folder ending in `/`); otherwise
    against the first of `roots` under which the file exists. Absolute hrefs are returned unchanged.
    """
    href = href.strip()
    if not _is_local(href) or os.path.isabs(_local_path(href)):
        return href
    path = _local_path(href)
    if base_href:
        if not _is_local(base_href):
            return urljoin(base_href, path)
        base = Path(_local_path(base_href))
        folder = base if base_href.endswith("/") or base.is_dir() else base.parent
        return str(folder / path)
    for root in roots:
        candidate = Path(root) / path
        if candidate.exists():
            return str(candidate)
    raise UnsafeHrefError(
        f"{href!r}: relative href with no base href, and not found under any allowed root {list(roots)}"
    )


def check_href(href: str, config: CatalogConfig, *, base_href: str | None = None) -> str:
    """Return the normalised href (an absolute, resolved path for local files) or raise `UnsafeHrefError`."""
    if not isinstance(href, str) or not href.strip():
        raise UnsafeHrefError(f"{href!r}: empty or non-string href")
    if "\x00" in href:
        raise UnsafeHrefError(f"{href!r}: NUL byte in href")
    href = resolve_href(href, base_href, config.allowed_roots)
    allowed = set(config.allowed_schemes)
    if not _is_local(href):
        parts = urlsplit(href)
        scheme = parts.scheme.lower()
        if scheme not in allowed:
            raise UnsafeHrefError(f"{href!r}: scheme {scheme!r} is not in allowed_schemes {sorted(allowed)}")
        if not parts.netloc:
            raise UnsafeHrefError(f"{href!r}: URL without a host")
        return scheme + href[len(scheme) :]
    if "file" not in allowed:
        raise UnsafeHrefError(f"{href!r}: local files are not allowed (scheme 'file' not in allowed_schemes)")
    path = _local_path(href)
    if not os.path.isabs(path):
        raise UnsafeHrefError(f"{href!r}: relative path could not be resolved")
    if not config.allowed_roots:
        raise UnsafeHrefError(f"{href!r}: local path, but the catalog config has no allowed_roots")
    resolved = Path(path).resolve()
    for root in config.allowed_roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return str(resolved)
    raise UnsafeHrefError(
        f"{href!r}: resolves to {str(resolved)!r}, outside the allowed roots {config.allowed_roots}"
    )


def check_vrt(path: str, config: CatalogConfig, *, _depth: int = 0) -> None:
    """Check every source file a local VRT names (recursively), so a VRT cannot reach outside the roots."""
    if _depth > 4:
        raise UnsafeHrefError(f"{path!r}: VRTs nested more than 4 deep")
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise UnsafeHrefError(f"{path!r}: not a readable VRT ({err})") from err
    for element in tree.iter():
        if element.tag == "VRTRasterBand" and element.get("subClass") == "VRTRawRasterBand":
            raise UnsafeHrefError(f"{path!r}: VRTRawRasterBand is not allowed")
        if element.tag != "SourceFilename":
            continue
        name = (element.text or "").strip()
        if element.get("relativeToVRT", "0") == "1":
            source = check_href(name, config, base_href=str(Path(path).parent) + "/")
        elif _is_local(name) and not os.path.isabs(_local_path(name)):
            raise UnsafeHrefError(f"{path!r}: source {name!r} is relative to the working directory")
        else:
            source = check_href(name, config)
        if source.lower().endswith(".vrt") and _is_local(source):
            check_vrt(source, config, _depth=_depth + 1)
