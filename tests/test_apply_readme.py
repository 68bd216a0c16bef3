"""The README's "Apply a model to a place" commands, run verbatim in a scratch folder where
`demo-output/controlnet-sr/pipeline` is a tiny SR ControlNet (the demo's trained one takes minutes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]


def readme_commands() -> list[str]:
    """The lines of the first bash block of the README's apply section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Apply a model to a place", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the apply section has a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _tiny_sr(folder: Path) -> None:
    from dsat_core.data.tasks import SuperResolutionTask, write_task_card
    from dsat_core.models.controlnet3d import ControlNet3D
    from dsat_core.pipelines import SatControlNetPipeline, make_tiny_pipeline

    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe = make_tiny_pipeline(sample_size=16, vae_downsample=2, seed=0)
        controlnet = ControlNet3D.from_unet(
            pipe.unet, 6, (8, 16), vae_scale_factor=2, conditioning_bands=BANDS
        )
        SatControlNetPipeline.from_diffusionsat(pipe, controlnet).save_pretrained(str(folder))
    write_task_card(SuperResolutionTask(degradation={"factor": 2, "blur_sigma": 0.0}), folder)


@pytest.mark.slow
def test_readme_apply_commands_run_verbatim(tmp_path: Path) -> None:
    import rasterio
    from PIL import Image

    commands = readme_commands()
    assert any(c.startswith("dsat apply sr") for c in commands)
    _tiny_sr(tmp_path / "demo-output" / "controlnet-sr" / "pipeline")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "apply_figure.py").symlink_to(REPO / "bench" / "apply_figure.py")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    catalog = json.loads((tmp_path / "applied" / "sr" / "catalog.json").read_text())
    assert [link["rel"] for link in catalog["links"]].count("item") == 1
    figure = tmp_path / "bench" / "figures" / "apply-sr.png"
    assert figure.stat().st_size < 150_000
    [item] = [p for p in (tmp_path / "applied" / "sr").glob("*/*.json") if p.stem == p.parent.name]
    with Image.open(figure) as png, rasterio.open(item.with_suffix(".tif")) as cog:
        assert png.size == (2 * (2 * cog.width + 4), 2 * cog.height)  # input | gap | output, zoom 2
