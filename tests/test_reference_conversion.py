"""Converting the reference code's released checkpoints (tiny copies of each layout, written in code).

The converted models are checked against reference-semantics forward passes written here from the facts of
the reference layout (per-field metadata MLPs added to the time embedding; the 3D ControlNet's zero conv,
then gated temporal mixing, then a sum over frames; conditioning in [0, 1]), not from the project's code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from reference_checkpoints import (
    NUM_METADATA,
    TEMPORAL_POSITIONS,
    TIME_DIM,
    UNET,
    temporal_block,
    write_controlnet_release,
    write_reference_pipeline,
    write_reference_unet,
)

from dsat_core.models import SatUNet
from dsat_core.models.reference_layout import LayoutError
from dsat_core.models.weights_io import WeightsError, read_state_dict, sha256_file
from dsat_core.pipelines import DiffusionSatPipeline, SatControlNetPipeline
from dsat_core.pipelines.reference import convert_reference, export_reference
from flows.cli import main as dsat

ENCODER_PARTS = (
    "conv_in.",
    "time_embedding.",
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_norm_out.",
    "conv_out.",
)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The single-image release (pickle .bin, as on Zenodo), a 3D and a 2D ControlNet release."""
    root = tmp_path_factory.mktemp("releases")
    states = write_reference_pipeline(root / "single", fmt="bin")
    states["controlnet3d"] = write_controlnet_release(root / "texas-3d", "3d")
    states["controlnet2d"] = write_controlnet_release(root / "fmow-sentinel-2d", "2d")
    return {"root": root, "states": states}


@pytest.fixture(scope="module")
def converted(release: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    root = release["root"]
    convert_reference(root / "single", out / "single", allow_pickle=True)
    # ControlNet releases take their base from the converted single-image model
    convert_reference(root / "texas-3d", out / "texas-3d", base=out / "single", allow_pickle=True)
    convert_reference(root / "fmow-sentinel-2d", out / "sr-2d", base=out / "single", allow_pickle=True)
    return {"single": out / "single", "3d": out / "texas-3d", "2d": out / "sr-2d"}


# ------------------------------------------------------------------------------------------ reference math
def _sinusoid(values: torch.Tensor) -> torch.Tensor:
    return get_timestep_embedding(
        values.reshape(-1).float(), TIME_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
    )


def reference_metadata_embedding(state: dict, values: torch.Tensor) -> torch.Tensor:
    """Σ_i MLP_i(sinusoid(value_i)) with the reference's ``metadata_embedding.{i}.linear_{1,2}`` tensors."""
    out = 0
    for i in range(NUM_METADATA):
        p = f"metadata_embedding.{i}."
        hidden = F.linear(_sinusoid(values[:, i]), state[p + "linear_1.weight"], state[p + "linear_1.bias"])
        out = out + F.linear(F.silu(hidden), state[p + "linear_2.weight"], state[p + "linear_2.bias"])
    return out


def plain_unet(state: dict) -> UNet2DConditionModel:
    """A diffusers UNet holding the reference tensors it has names for."""
    unet = UNet2DConditionModel(**UNET)
    own = {k: v for k, v in state.items() if k.startswith(ENCODER_PARTS)}
    missing, _ = unet.load_state_dict(own, strict=False)
    assert not [
        k for k in missing if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))
    ]
    return unet.eval()


@torch.no_grad()
def reference_unet_forward(state: dict, sample, t, text, metadata) -> torch.Tensor:
    """The reference SatUNet: the summed metadata embedding added to the time embedding."""
    unet = plain_unet(state)
    extra = reference_metadata_embedding(state, metadata)
    hook = unet.time_embedding.register_forward_hook(lambda _m, _i, out: out + extra)
    try:
        return unet(sample, t, text).sample
    finally:
        hook.remove()


def _conv(x: torch.Tensor, state: dict, name: str, **kwargs) -> torch.Tensor:
    conv = F.conv2d if x.ndim == 4 else F.conv3d
    return conv(x, state[name + ".weight"], state[name + ".bias"], **kwargs)


def reference_cond_embedding(state: dict, cond01: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """``controlnet_cond_embedding``: conv_in, (3x3, strided (1,)3x3) pairs, conv_out; SiLU between."""
    two_d = cond01.ndim == 4
    pad_odd = 1 if two_d else (0, 1, 1)
    p = "controlnet_cond_embedding."
    x = F.silu(_conv(cond01, state, p + "conv_in", padding=1))
    for i, stride in enumerate(strides):
        x = F.silu(_conv(x, state, p + f"blocks.{2 * i}", padding=1))
        step = stride if two_d else (1, stride, stride)
        x = F.silu(_conv(x, state, p + f"blocks.{2 * i + 1}", padding=pad_odd, stride=step))
    return _conv(x, state, p + "conv_out", padding=1)


@torch.no_grad()
def reference_controlnet_forward(
    state: dict, sample, t, text, metadata, frame_metadata, cond01, strides, temporal
):
    """The reference ControlNet: frames through the encoder as a (B·T) batch; per residual the zero conv,
    then (``temporal``) α·attn + (1 − α)·x over T, then a SUM over T. ``frame_metadata`` is (B, 7, T)."""
    batch, frames = sample.shape[0], frame_metadata.shape[2]
    enc = plain_unet(state)
    emb = enc.time_embedding(_sinusoid(t.expand(batch))) + reference_metadata_embedding(state, metadata)
    emb = emb.repeat_interleave(frames, 0)
    per_frame = frame_metadata.permute(0, 2, 1).reshape(batch * frames, NUM_METADATA)
    emb = emb + reference_metadata_embedding(state, per_frame)
    cond_emb = reference_cond_embedding(state, cond01, strides)
    if cond_emb.ndim == 5:
        cond_emb = cond_emb.permute(0, 2, 1, 3, 4).reshape(
            batch * frames, *cond_emb.shape[1:2], *cond_emb.shape[3:]
        )
    hidden = enc.conv_in(sample).repeat_interleave(frames, 0) + cond_emb
    text = text.repeat_interleave(frames, 0)
    residuals = (hidden,)
    for block in enc.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden, temb=emb, encoder_hidden_states=text)
        else:
            hidden, res = block(hidden, temb=emb)
        residuals += res
    hidden = enc.mid_block(hidden, emb, encoder_hidden_states=text)

    def frames_out(x: torch.Tensor, name: str, position: int | None) -> torch.Tensor:
        if cond01.ndim == 4:
            return _conv(x, state, name)
        x5 = x.reshape(batch, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        z = _conv(x5, state, name)
        if temporal and position in TEMPORAL_POSITIONS:
            block = temporal_block(position).eval()
            prefix = f"temporal_blocks.{position}."
            block.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            flat = z.permute(0, 2, 1, 3, 4).reshape(batch * frames, *z.shape[1:2], *z.shape[3:])
            mixed = block(flat, num_frames=frames).sample
            mixed = mixed.reshape(batch, frames, *mixed.shape[1:]).permute(0, 2, 1, 3, 4)
            alpha = state[f"mixing_attns.{position}"].clamp(0, 1)
            z = alpha * mixed + (1 - alpha) * z
        return z.sum(dim=2)

    down = [frames_out(r, f"controlnet_down_blocks.{i}", i) for i, r in enumerate(residuals)]
    return down, frames_out(hidden, "controlnet_mid_block", None)


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, UNET["cross_attention_dim"], generator=g)
    # encoded metadata (×1000-normalised values), one field 0 (as a dropped field was fed)
    metadata = torch.rand(batch, NUM_METADATA, generator=g) * 1000
    metadata[:, 3] = 0
    return sample, torch.tensor(421), text, metadata


# ---------------------------------------------------------------------------------------------- single image
def test_every_unet_tensor_arrives(release: dict, converted: dict[str, Path]) -> None:
    reference = release["states"]["unet"]
    record = json.loads((converted["single"] / "conversion.json").read_text())
    unet = DiffusionSatPipeline.from_pretrained(str(converted["single"])).unet
    project = unet.state_dict()
    rows = {row["reference"]: row for row in record["components"]["unet"]["tensors"]}
    assert set(reference) <= set(rows)
    for name, tensor in reference.items():
        target = rows[name]["project"]
        assert rows[name]["shape"] == list(tensor.shape)
        assert torch.equal(project[target], tensor), name  # a copy of the same tensor
    assert rows[""]["project"] == "metadata_embedding.missing_embedding"  # the only project-only tensor
    assert unet.config.missing_metadata == "zero"
    assert {Path(f).name for f in record["files"]} >= {"diffusion_pytorch_model.bin"}
    unet_file = release["root"] / "single" / "checkpoint-150" / "unet" / "diffusion_pytorch_model.bin"
    assert record["files"][str(unet_file)] == sha256_file(unet_file)


def test_converted_unet_computes_the_reference_forward(release: dict, converted: dict[str, Path]) -> None:
    reference = release["states"]["unet"]
    unet = DiffusionSatPipeline.from_pretrained(str(converted["single"])).unet.eval()
    sample, t, text, metadata = _inputs()
    expected = reference_unet_forward(reference, sample, t, text, metadata)
    with torch.no_grad():
        got = unet(sample, t, text, metadata=metadata).sample
        # a dropped field (mask False) is embedded as the value 0, as the reference fed it
        mask = torch.ones_like(metadata, dtype=torch.bool)
        mask[:, 3] = False
        garbage = metadata.clone()
        garbage[:, 3] = 12345.0
        dropped = unet(sample, t, text, metadata=garbage, metadata_mask=mask).sample
    assert (expected - reference_unet_forward(reference, sample, t, text, metadata + 1)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dropped, expected, atol=2e-5, rtol=1e-4)


def test_converted_single_image_model_samples(converted: dict[str, Path], tmp_path: Path) -> None:
    pipe = DiffusionSatPipeline.from_pretrained(str(converted["single"]))
    assert pipe.config.uncond_metadata == "zero"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe("a satellite image of a farm", num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    args = ["sample", "--model", str(converted["single"]), "--prompt", "a satellite image of a port"]
    args += ["--lat", "37.9", "--lon", "23.7", "--gsd", "0.5", "--date", "2020-06-01", "--steps", "2"]
    assert dsat([*args, "--out", str(tmp_path)]) == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png", ".tif"]
    card = (converted["single"] / "README.md").read_text()
    record = json.loads((converted["single"] / "conversion.json").read_text())
    assert record["sha256"] in card and "Open RAIL++-M" in card and "Zenodo" in card


def test_single_image_round_trip_is_tensor_for_tensor_equal(
    release: dict, converted: dict[str, Path], tmp_path: Path
) -> None:
    back = export_reference(converted["single"], tmp_path / "reference")
    states = release["states"]
    for component in ("unet", "vae", "text_encoder"):
        exported = read_state_dict(back / component)
        assert set(exported) == set(states[component]), component
        for name, tensor in states[component].items():
            assert torch.equal(exported[name], tensor), f"{component}: {name}"
    config = json.loads((back / "unet" / "config.json").read_text())
    assert config["num_metadata"] == NUM_METADATA and "num_metadata_fields" not in config
    # the exported folder is a reference checkpoint again: it converts to the same model
    record = convert_reference(back, tmp_path / "again")
    assert record.components["unet"]["count"] == len(states["unet"]) + 1


def test_diffusers_format_copy_converts(tmp_path: Path) -> None:
    """The hub copy: the same layout with safetensors weights and unet/ at the top level (no pickle)."""
    root = tmp_path / "hub-copy"
    write_reference_pipeline(root, fmt="safetensors")
    (root / "checkpoint-150").rename(root / "ckpt")
    shutil.move(root / "ckpt" / "unet", root / "unet")
    record = convert_reference(root, tmp_path / "out")
    assert not any(f.endswith(".bin") for f in record.files)
    assert DiffusionSatPipeline.from_pretrained(str(tmp_path / "out")).unet.config.missing_metadata == "zero"


# ---------------------------------------------------------------------------------------------- ControlNets
def _frame_inputs(channels: int, frames: int, size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond01 = torch.rand(2, channels, frames, size, size, generator=g)
    frame_metadata = torch.rand(2, NUM_METADATA, frames, generator=g) * 1000  # the reference's (B, 7, T)
    return cond01, frame_metadata


def test_3d_controlnet_computes_the_reference_forward(release: dict, converted: dict[str, Path]) -> None:
    state = release["states"]["controlnet3d"]
    controlnet = SatControlNetPipeline.from_pretrained(str(converted["3d"])).controlnet.eval()
    rows = json.loads((converted["3d"] / "conversion.json").read_text())["components"]["controlnet"][
        "tensors"
    ]
    by_name = {row["reference"]: row for row in rows}
    assert set(state) <= set(by_name)  # every tensor of the release is accounted for
    project = controlnet.state_dict()
    for name, tensor in state.items():
        target = by_name[name]["project"]
        if target is None:  # the reference's frozen, unused gates: zero, no project tensor
            assert name.startswith("mixing_attns.") and not tensor.any(), name
        else:
            assert torch.equal(project[target], tensor), name  # copied unchanged
    assert controlnet.config.temporal_mixing == "after_zero_conv"
    assert controlnet.config.frame_reduction == "sum"
    sample, t, text, metadata = _inputs()
    cond01, frame_md = _frame_inputs(3, frames=3, size=16)
    down_ref, mid_ref = reference_controlnet_forward(
        state, sample, t, text, metadata, frame_md, cond01, strides=[2], temporal=True
    )
    with torch.no_grad():
        down, mid = controlnet(
            sample, t, text, metadata, None, cond01 * 2 - 1, frame_md.transpose(1, 2), None
        )
        with pytest.raises(ValueError, match="transpose"):
            controlnet(sample, t, text, metadata, None, cond01 * 2 - 1, frame_md, None)
    assert len(down) == len(down_ref)
    for got, want in zip(down, down_ref, strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(mid, mid_ref, atol=5e-5, rtol=1e-4)


def test_2d_sr_controlnet_computes_the_reference_forward_and_samples(
    release: dict, converted: dict[str, Path]
) -> None:
    state = release["states"]["controlnet2d"]
    pipe = SatControlNetPipeline.from_pretrained(str(converted["2d"]))
    controlnet = pipe.controlnet.eval()
    assert controlnet.config.conditioning_temporal_kernel == 1 and controlnet.config.temporal_layers == []
    sample, t, text, metadata = _inputs()
    cond01, frame_md = _frame_inputs(10, frames=1, size=8)  # half the 16 px target, as 256 px for 512 px
    down_ref, mid_ref = reference_controlnet_forward(
        state, sample, t, text, metadata, frame_md, cond01[:, :, 0], strides=[1], temporal=False
    )
    with torch.no_grad():
        down, mid = controlnet(
            sample, t, text, metadata, None, cond01 * 2 - 1, frame_md.transpose(1, 2), None
        )
    for got, want in zip(down, down_ref, strict=True):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(mid, mid_ref, atol=5e-5, rtol=1e-4)
    out = pipe(cond=cond01 * 2 - 1, num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("kind", ["3d", "2d"])
def test_controlnet_round_trip_is_tensor_for_tensor_equal(
    kind: str, release: dict, converted: dict[str, Path], tmp_path: Path
) -> None:
    back = export_reference(converted[kind], tmp_path / "reference")
    exported = read_state_dict(back / "controlnet")
    original = release["states"][f"controlnet{kind}"]
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    class_name = json.loads((back / "controlnet" / "config.json").read_text())["_class_name"]
    assert class_name == ("ControlNetModel3D" if kind == "3d" else "ControlNetModel")


def test_project_options_the_reference_cannot_express_are_refused(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    pipe = DiffusionSatPipeline.from_pretrained(str(converted["single"]))
    pipe.unet.register_to_config(missing_metadata="learned")
    pipe.save_pretrained(str(tmp_path / "learned"), safe_serialization=True)
    with pytest.raises(LayoutError, match="missing_metadata='learned'"):
        export_reference(tmp_path / "learned", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_checkpoints_give_clear_errors(
    release: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="neither a reference pipeline folder"):
        convert_reference(tmp_path / "empty", tmp_path / "out")
    # pickle weights without --allow-pickle: the CLI says which file and why, one line, rc 2
    single = release["root"] / "single"
    assert dsat(["convert", "reference", "--checkpoint", str(single), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin" in err and "--allow-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # a truncated safetensors file
    unet = tmp_path / "unet"
    write_reference_unet(unet, fmt="safetensors")
    weights = unet / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        convert_reference(unet, tmp_path / "out", base=single, allow_pickle=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.update({"class_embedding.weight": torch.ones(2)}),
            "class_embedding.weight .* not in the name table",
        ),
        (
            lambda s: s.pop("metadata_embedding.6.linear_2.bias"),
            "no tensor for metadata_embedding.mlps.6.linear_2.bias",
        ),
        (lambda s: s.update({"conv_in.bias": torch.ones(7)}), "conv_in.bias has shape \\[7\\]"),
    ],
)
def test_unmapped_missing_or_misshaped_tensors_are_named(
    release: dict, tmp_path: Path, edit, message: str
) -> None:
    from safetensors.torch import save_file

    state = dict(release["states"]["unet"])
    edit(state)
    folder = tmp_path / "unet"
    write_reference_unet(folder, fmt="safetensors")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors")
    )
    with pytest.raises(LayoutError, match=message):
        convert_reference(folder, tmp_path / "out", base=release["root"] / "single", allow_pickle=True)


def test_satunet_from_pretrained_names_the_converter(release: dict) -> None:
    folder = release["root"] / "single" / "checkpoint-150" / "unet"
    with pytest.raises(ValueError, match="dsat convert reference"):
        SatUNet.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- README
def _readme_block(title: str) -> list[str]:
    """The `dsat` lines of the first bash block under the README heading ``title``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("dsat ")]


def test_readme_release_commands_run_verbatim(tmp_path: Path) -> None:
    """The README's commands, on tiny copies of the four releases named as the Zenodo folders are."""
    import shlex
    import subprocess
    import sys

    write_reference_pipeline(tmp_path / "finetune_sd21_sn-satlas-fmow_snr5_md7norm_bs64", fmt="bin")
    write_controlnet_release(tmp_path / "controlnet_sd21_md7norm_fmow_condres256", "2d")
    write_controlnet_release(tmp_path / "controlnet3d-mixattn_sd21_md7norm_texas", "3d")
    commands = _readme_block("Start from the released weights")
    assert len(commands) == 5
    dsat_bin = Path(sys.executable).parent / "dsat"
    for command in commands:
        args = shlex.split(command)
        done = subprocess.run([str(dsat_bin), *args[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert sorted(p.suffix for p in (tmp_path / "samples" / "released").iterdir()) == [".png", ".tif"]
    for name in ("diffusionsat-512", "diffusionsat-sr-fmow-sentinel", "diffusionsat-sr-texas"):
        assert (tmp_path / "models" / name / "README.md").is_file()
    assert (
        tmp_path / "exported" / "diffusionsat-512" / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_fine_tuning_a_converted_model_runs_through_the_flows_and_resumes(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    """``init_from`` a converted model: train-diffusionsat and train-controlnet (sr) stop, resume, and the
    saved pipelines keep the reference's options and the source's model card."""
    from dsat_core.data.synthetic import make_synthetic_store
    from dsat_core.training.config import TrainConfig
    from dsat_core.training.train_controlnet import TrainControlNetConfig
    from flows.train_controlnet import TrainControlNetParams, train_controlnet
    from flows.train_diffusionsat import TrainDiffusionSatParams, train_diffusionsat
    from flows.training import LaunchParams

    store = make_synthetic_store(str(tmp_path / "store.zarr"), n_scenes=2, tiles_per_scene=4, size=16)
    common = dict(store_uri=store, resolution=16, train_batch_size=2, max_steps=3, checkpointing_steps=1,
                  lr_warmup_steps=0, use_mlflow=False, seed=3)  # fmt: skip
    launch = LaunchParams(nproc_per_node=1)
    runs = {
        "unet": (
            train_diffusionsat,
            TrainDiffusionSatParams,
            TrainConfig,
            {"init_from": str(converted["single"])},
        ),
        "sr": (
            train_controlnet,
            TrainControlNetParams,
            TrainControlNetConfig,
            {
                "task": "sr",
                "product": "rgb",
                "cond_product": "rgb",
                "init_from": str(converted["3d"]),
                "degradation": {"factor": 2, "blur_sigma": 0.8},
            },
        ),  # fmt: skip
    }
    saved: dict[str, str] = {}
    for name, (flow, params_cls, config_cls, extra) in runs.items():
        config = dict(common, output_dir=str(tmp_path / name), **extra)
        first = flow(params_cls(train=config_cls(**config, stop_at_step=2), launch=launch))
        assert first.global_step == 2, name
        done = flow(params_cls(train=config_cls(**config), launch=launch))
        assert done.global_step == 3 and done.pipeline_dir, name
        assert "Converted DiffusionSat checkpoint" in (Path(done.pipeline_dir) / "README.md").read_text()
        saved[name] = done.pipeline_dir
    unet_pipe = DiffusionSatPipeline.from_pretrained(saved["unet"])
    assert unet_pipe.unet.config.missing_metadata == "zero" and unet_pipe.config.uncond_metadata == "zero"
    sr = SatControlNetPipeline.from_pretrained(saved["sr"])
    assert sr.controlnet.config.temporal_mixing == "after_zero_conv" and sr.config.uncond_metadata == "zero"
    start = SatControlNetPipeline.from_pretrained(str(converted["3d"])).controlnet.state_dict()
    trained = sr.controlnet.state_dict()
    assert set(start) == set(trained)
    assert (
        trained["controlnet_down_blocks.0.weight"] - start["controlnet_down_blocks.0.weight"]
    ).abs().max() > 0
