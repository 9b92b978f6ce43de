import numpy as np
import pytest
import torch

from model.encoders import (
    DEMO_COLOUR_MIX, EncoderConfig, EncoderLoadError, FrameEncoder, describe_encoders, sincos_position_codes,
)


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
    assert described["dino"]["id"] == "demo:sincos-dinov2" and described["dino"]["tokens"] == 325
    assert described["dino"]["dim"] == 384 and described["vae"]["id"] == "demo:colour-vae"
    assert described["vae"]["latent_shape"] == [4, 32, 32] and described["vae"]["scaling_factor"] == 1.0


def test_sincos_codes_are_smooth_and_peak_at_their_own_patch():
    codes = sincos_position_codes(18, 384)  # (324, 384), row-major
    assert codes.shape == (324, 384)
    similarity = codes @ codes.T  # (324, 324)
    assert torch.equal(similarity.argmax(dim=1), torch.arange(324))  # each code is closest to itself
    centre = 9 * 18 + 9
    near, far = similarity[centre, centre + 1], similarity[centre, 0]
    assert similarity[centre, centre] > near > far  # smooth: a neighbour is more alike than a far corner
    with pytest.raises(ValueError):
        sincos_position_codes(18, 30)


def test_demo_tokens_say_where_and_what():
    """A patch's token holds its place (the nearest position code) and its colour (tokens of two colours at one
    place differ); the CLS token has no place."""
    encoder = FrameEncoder(EncoderConfig(preset="demo"))
    grey, red = np.full((1, 256, 256, 3), 128, np.uint8), np.full((1, 256, 256, 3), (200, 30, 30), np.uint8)
    features = torch.from_numpy(np.concatenate([encoder.encode(grey)[0], encoder.encode(red)[0]]).astype(np.float32))
    codes = sincos_position_codes(18, 384)
    place = (features[:, 1:] @ codes.T).argmax(-1)  # (2, 324) the code each patch token matches best
    assert (place == torch.arange(324)).float().mean() > 0.9
    assert (features[0, 1:] - features[1, 1:]).abs().mean() > 0.1


def test_demo_latents_keep_a_frames_colour_at_unit_scale():
    """A flat frame's latents are the fixed colour mix of its colour (no normalisation removes the colour)."""
    encoder = FrameEncoder(EncoderConfig(preset="demo"))
    colours = np.array([[200, 30, 30], [30, 200, 30], [20, 20, 220], [128, 128, 128]], np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (4, 256, 256, 3)).copy()
    latents = encoder.encode(frames)[1].astype(np.float32)  # (4, 4, 32, 32)
    expected = (colours / 255.0 * 2 - 1) @ DEMO_COLOUR_MIX.T  # (4, 4)
    np.testing.assert_allclose(latents.mean(axis=(2, 3)), expected, atol=1e-2)
    assert latents.std(axis=(2, 3)).max() < 1e-3  # flat in, flat out
    assert 0.3 < np.abs(expected).mean() < 2.0


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
