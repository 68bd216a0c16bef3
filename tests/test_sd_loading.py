"""Loading a Stable Diffusion folder (diffusers layout), written tiny by the test itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dsat_core.metadata import SatMetadata, encode_batch
from dsat_core.models import (
    ClipTextEncoder,
    SatUNet,
    load_sd_components,
    load_text_encoder,
    make_tiny_vae,
    unet_config,
)
from dsat_core.pipelines import DiffusionSatPipeline

MAX_LENGTH = 16
WORDS = ["a", "satellite", "image", "of", "farm", "port", "city", "in", "greece"]


def _write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer: single letters, letters ending a word, and whole-word merges for WORDS."""
    folder.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            piece = char + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{current} {piece}")
            current += piece
            if current not in vocab:
                vocab.append(current)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH})
    )


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_config("tiny", sample_size=8)).save_pretrained(root / "unet")
    make_tiny_vae().save_pretrained(root / "vae")
    clip_config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
    )
    CLIPTextModel(clip_config).save_pretrained(root / "text_encoder")
    _write_tokenizer(root / "tokenizer")
    # SD 2.1-base itself is epsilon-prediction: the loader switches to DiffusionSat's v-prediction
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon"
    ).save_pretrained(root / "scheduler")
    return root


def test_tokenizer_fixture_is_real_bpe(sd_folder: Path) -> None:
    encoder = ClipTextEncoder.from_pretrained(sd_folder)
    tokens = encoder.tokenizer.tokenize("A satellite image of a farm")
    assert tokens == ["a</w>", "satellite</w>", "image</w>", "of</w>", "a</w>", "farm</w>"]


def test_load_sd_components(sd_folder: Path) -> None:
    parts = load_sd_components(sd_folder)
    assert set(parts) == {"unet", "vae", "text_encoder", "scheduler"}
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    assert isinstance(unet, SatUNet) and isinstance(text_encoder, ClipTextEncoder)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.num_train_timesteps == 1000
    kept = load_sd_components(sd_folder, prediction_type=None)["scheduler"]
    assert kept.config.prediction_type == "epsilon"

    states = text_encoder.encode(["a satellite image of a port", ""], "cpu")
    assert states.shape == (2, MAX_LENGTH, 32)
    assert not torch.allclose(states[0], states[1])

    # a fresh SatUNet predicts what the SD UNet does, whatever the metadata
    sd_unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet").eval()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    values, mask = encode_batch([SatMetadata(lon=23.7, lat=37.9, gsd=0.5, year=2017), SatMetadata()])
    with torch.no_grad():
        expected = sd_unet(sample, 300, states).sample
        got = unet.eval()(
            sample, 300, states, metadata=torch.as_tensor(values).float(), metadata_mask=torch.as_tensor(mask)
        ).sample
    # two loaded instances (weights are views into the safetensors files) may round differently
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pipeline_from_sd_folder_round_trip(sd_folder: Path, tmp_path: Path) -> None:
    pipe = DiffusionSatPipeline.from_sd_folder(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    metadata = SatMetadata(lon=23.7, lat=37.9, gsd=0.5, cloud_cover=0.0, year=2017, month=8, day=3)

    def run(p: DiffusionSatPipeline) -> np.ndarray:
        gen = torch.Generator().manual_seed(0)
        prompt = "a satellite image of a port in greece"
        out = p(prompt, metadata, num_inference_steps=3, generator=gen, output_type="np", guidance_scale=4.0)
        return out.images

    images = run(pipe)
    assert images.shape == (1, 16, 16, 3)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder" / "text_encoder" / "config.json").is_file()
    assert (tmp_path / "text_encoder" / "tokenizer" / "tokenizer_config.json").is_file()
    loaded = DiffusionSatPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, ClipTextEncoder)
    np.testing.assert_allclose(run(loaded), images, atol=1e-6)
    # the saved text encoder also loads on its own
    assert isinstance(load_text_encoder(tmp_path / "text_encoder", cross_attention_dim=32), ClipTextEncoder)


def test_sd_folder_errors(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sd_components(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"lacks subfolder\(s\) \['tokenizer'\]"):
        DiffusionSatPipeline.from_sd_folder(broken)
    # an SD folder passed to load_text_encoder gives its CLIP encoder
    assert isinstance(load_text_encoder(sd_folder), ClipTextEncoder)
