import numpy as np
import pytest
import torch

from model.encoders import EncoderConfig, EncoderLoadError, FrameEncoder, describe_encoders


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 256, 256, 3), dtype=np.uint8)


def test_demo_encoders_have_the_real_output_shapes(frames):
    encoder = FrameEncoder(EncoderConfig(preset="demo"))
    features, latents = encoder.encode(frames)
    assert features.shape == (5, 325, 384) and features.dtype == np.float16
    assert latents.shape == (5, 4, 32, 32) and latents.dtype == np.float16
    assert np.isfinite(features).all() and np.isfinite(latents).all()
    assert features.astype(np.float32).std() > 0.1 and latents.astype(np.float32).std() > 0


def test_demo_encoders_are_seeded_and_batch_size_does_not_matter(frames):
    a = FrameEncoder(EncoderConfig(preset="demo", batch_frames=2)).encode(frames)
    b = FrameEncoder(EncoderConfig(preset="demo", batch_frames=5)).encode(frames)
    assert np.allclose(a[0].astype(np.float32), b[0].astype(np.float32), atol=2e-3)
    assert np.allclose(a[1].astype(np.float32), b[1].astype(np.float32), atol=2e-3)
    other = FrameEncoder(EncoderConfig(preset="demo", seed=1)).encode(frames[:1])
    assert not np.allclose(other[0], a[0][:1])


def test_frames_differ_so_features_differ(frames):
    encoder = FrameEncoder(EncoderConfig(preset="demo"))
    features, latents = encoder.encode(frames[:2])
    assert not np.allclose(features[0], features[1])
    assert not np.allclose(latents[0], latents[1])


def test_describe_records_what_training_checks():
    described = describe_encoders(EncoderConfig(preset="demo"))
    assert described["dino"]["id"] == "demo:tiny-dinov2" and described["dino"]["tokens"] == 325
    assert described["dino"]["dim"] == 384
    assert described["vae"]["latent_shape"] == [4, 32, 32] and described["vae"]["scaling_factor"] == 0.18215


def save_tiny_pretrained(tmp_path):
    """Tiny DINOv2 and VAE saved as from_pretrained folders, like an offline cluster's copies of the hub."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=1,
                                    patch_size=14, image_size=518))
    dino.save_pretrained(tmp_path / "dino")
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                        scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    return dino, vae


def test_full_preset_loads_local_folders(tmp_path, frames):
    dino, vae = save_tiny_pretrained(tmp_path)
    config = EncoderConfig(preset="full", dino=str(tmp_path / "dino"), vae=str(tmp_path / "vae"))
    encoder = FrameEncoder(config)
    features, latents = encoder.encode(frames[:2])
    # 518-px position embeddings interpolated to 18 x 18 patches of a 256-px frame
    assert features.shape == (2, 325, 32) and latents.shape == (2, 4, 32, 32)
    x = torch.from_numpy(frames[:2]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want_f = dino(pixel_values=(x - mean) / std).last_hidden_state
        want_z = vae.encode(x * 2 - 1).latent_dist.mean * 0.5  # the saved scaling_factor is used
    assert np.allclose(features.astype(np.float32), want_f.numpy(), atol=2e-2)
    assert np.allclose(latents.astype(np.float32), want_z.numpy(), atol=2e-3)
    described = describe_encoders(config)
    assert described["dino"]["dim"] == 32 and described["vae"]["scaling_factor"] == 0.5
    assert described["dino"]["id"] == str(tmp_path / "dino")


def test_missing_weights_name_the_setting(tmp_path):
    with pytest.raises(EncoderLoadError, match="EncoderConfig.dino"):
        FrameEncoder(EncoderConfig(preset="full", dino=str(tmp_path / "nothing"), vae=str(tmp_path / "nothing")))
    with pytest.raises(EncoderLoadError, match="set"):
        describe_encoders(EncoderConfig(preset="full", dino="no-such-org/no-such-model"))
