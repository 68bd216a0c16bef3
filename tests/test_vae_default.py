"""The shipped offline default VAE: loads offline and beats bicubic ×4 on held-out real tiles."""

from pathlib import Path

import torch
import torch.nn.functional as F

from dsat_core.data.catalog import load_catalog
from dsat_core.data.dataset import TileDataset
from dsat_core.data.reader import read_item
from dsat_core.data.stac import load_static_catalog
from dsat_core.data.store import DatasetStore
from dsat_core.evaluation import paired_metrics
from dsat_core.imaging import bicubic_upsample
from dsat_core.models.vae import DEFAULT_VAE_DIR, decode_latents, encode_latents, load_vae, vae_scale_factor

SAMPLES = Path(__file__).resolve().parents[1] / "catalogs" / "samples"
# one scene of each sensor with rgb: Landsat 7 (Everest), Landsat 8 (Rondonia), Sentinel-2 (T29RKH)
ITEMS = {
    "landsat7-etm-everest-20001030-rgb",
    "landsat8-oli-sr-rondonia-20190727",
    "sentinel2-l2a-T29RKH-20200219-crop",
}


def _holdout_tiles(tmp_path: Path) -> TileDataset:
    """The held-out split (the one the shipped VAE never trained on) of three real sample scenes."""
    config = load_catalog("local-samples")
    config = config.model_copy(
        update={"products": {"rgb": config.products["rgb"]}, "allowed_roots": [str(SAMPLES)]}
    )
    items = [
        item
        for cat in (SAMPLES / "catalog" / "catalog.json", SAMPLES / "extra" / "catalog" / "catalog.json")
        for item in load_static_catalog(cat)
        if item["id"] in ITEMS
    ]
    store = DatasetStore.open(str(tmp_path / "s.zarr"), create=True, catalog=config)
    store.commit([store.stage(read_item(item, config)) for item in items])
    return TileDataset(str(tmp_path / "s.zarr"), "rgb", split="holdout")


def test_default_vae_is_shipped_and_loads_offline():
    assert (DEFAULT_VAE_DIR / "diffusion_pytorch_model.safetensors").is_file()
    assert (DEFAULT_VAE_DIR / "README.md").is_file()
    vae = load_vae()
    assert vae_scale_factor(vae) == 2 and vae.config.latent_channels == 4  # what the SatUNet configs expect
    assert 0.05 < vae.config.scaling_factor < 20


def test_default_vae_beats_bicubic_x4_on_held_out_real_tiles(tmp_path):
    holdout = _holdout_tiles(tmp_path)
    assert {holdout.item_id(i) for i in range(len(holdout))} == ITEMS
    images = torch.stack([holdout[i]["pixel_values"] for i in range(len(holdout))])
    vae = load_vae().eval()
    recon = decode_latents(vae, encode_latents(vae, images)).clamp(-1, 1)
    bicubic = bicubic_upsample(F.avg_pool2d(images, 4), images.shape[-1]).clamp(-1, 1).float()
    ours = paired_metrics(recon, images, data_range=(-1.0, 1.0)).mean
    base = paired_metrics(bicubic, images, data_range=(-1.0, 1.0)).mean
    assert ours["psnr"] >= 28.0
    assert ours["psnr"] > base["psnr"] + 1.0
    assert ours["ssim"] > base["ssim"]
