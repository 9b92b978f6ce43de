import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.encoders import EncoderConfig
from storage.import_pt import import_pt_folder
from storage.store import FAILED, OK, FeatureStore, StoreConfig, StoreError

SEED_ENCODERS = dict(dino_id=EncoderConfig().dino, vae_id=EncoderConfig().vae)


def write_seed_folder(folder, n=5, frames=6, tokens=5, dim=8):
    """Seed-format files: bf16 tensors, like the seed's precompute script wrote them."""
    folder.mkdir()
    expected = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sample = {
            "dino_features": torch.randn(frames, tokens, dim, generator=g).to(torch.bfloat16),
            "latents": torch.randn(frames, 4, 2, 2, generator=g).to(torch.bfloat16),
            "caption": f"caption number {i}",
        }
        torch.save(sample, folder / f"vid{i:03d}.pt")
        expected[f"vid{i:03d}"] = sample
    return expected


def test_import_converts_every_file(tmp_path):
    expected = write_seed_folder(tmp_path / "pt")
    counts = import_pt_folder(tmp_path / "pt", tmp_path / "s.zarr", StoreConfig(chunk_videos=2), **SEED_ENCODERS)
    assert counts == {"videos": 5, "ok": 5, "failed": 0, "pending": 0}
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.shapes.frames == 6 and store.shapes.tokens == 5 and store.shapes.feature_dim == 8
    ids = list(store.read_column("video_id"))
    assert ids == sorted(expected)
    captions = store.read_column("caption")
    for row, vid in enumerate(ids):
        want = expected[vid]
        got = np.asarray(store.group["dino_features"][row])
        assert got.dtype == np.float16
        assert np.allclose(got, want["dino_features"].float().numpy(), atol=1e-2)
        assert np.allclose(np.asarray(store.group["latents"][row]), want["latents"].float().numpy(), atol=1e-2)
        assert captions[row] == want["caption"]
    assert store.attrs["dino"]["id"] == "facebook/dinov2-small"


def test_bad_files_become_failed_rows_and_the_rest_is_kept(tmp_path):
    write_seed_folder(tmp_path / "pt", n=4)
    (tmp_path / "pt" / "vid001.pt").write_bytes(b"truncated")
    torch.save({"dino_features": torch.zeros(6, 5, 8)}, tmp_path / "pt" / "vid002.pt")
    torch.save({"dino_features": torch.zeros(3, 5, 8), "latents": torch.zeros(3, 4, 2, 2)},
               tmp_path / "pt" / "vid003.pt")
    import_pt_folder(tmp_path / "pt", tmp_path / "s.zarr", StoreConfig(chunk_videos=2), **SEED_ENCODERS)
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert list(store.read_status()) == [OK, FAILED, FAILED, FAILED]
    errors = store.read_column("error")
    assert "cannot load vid001.pt" in errors[1]
    assert "no tensor 'latents'" in errors[2]
    assert "shapes" in errors[3]


def test_files_with_nan_inf_or_values_beyond_float16_become_failed_rows(tmp_path):
    expected = write_seed_folder(tmp_path / "pt", n=4)
    for name, key, value in (("vid001", "latents", float("nan")), ("vid002", "dino_features", 1e6)):
        sample = dict(expected[name])
        sample[key] = sample[key].float().clone()
        sample[key][0, 0, 0] = value  # 1e6 is finite in float32 but inf once stored as float16
        torch.save(sample, tmp_path / "pt" / f"{name}.pt")
    import_pt_folder(tmp_path / "pt", tmp_path / "s.zarr", StoreConfig(chunk_videos=2), **SEED_ENCODERS)
    store = FeatureStore.open(tmp_path / "s.zarr")
    failures = {f["video_id"]: f["error"] for f in store.failures()}
    assert failures == {"vid001": "vid001.pt: latents has NaN or inf values (in float16)",
                        "vid002": "vid002.pt: dino_features has NaN or inf values (in float16)"}
    assert store.counts()["ok"] == 2


def test_rerun_only_does_what_is_missing_and_refuses_another_folder(tmp_path):
    write_seed_folder(tmp_path / "pt", n=4)
    import_pt_folder(tmp_path / "pt", tmp_path / "s.zarr", StoreConfig(chunk_videos=2), **SEED_ENCODERS)
    before = (tmp_path / "s.zarr" / "dino_features" / "c" / "0").stat().st_mtime_ns
    import_pt_folder(tmp_path / "pt", tmp_path / "s.zarr", **SEED_ENCODERS)
    assert (tmp_path / "s.zarr" / "dino_features" / "c" / "0").stat().st_mtime_ns == before
    write_seed_folder(tmp_path / "other", n=2)
    with pytest.raises(StoreError, match="other videos"):
        import_pt_folder(tmp_path / "other", tmp_path / "s.zarr", **SEED_ENCODERS)


def test_command_line_import_and_info_json(tmp_path):
    write_seed_folder(tmp_path / "pt", n=3)
    (tmp_path / "pt" / "broken.pt").write_bytes(b"xx")
    run = subprocess.run([sys.executable, "-m", "flows.cli", "store", "import-pt", str(tmp_path / "pt"),
                          str(tmp_path / "s.zarr"), "--chunk-videos", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = subprocess.run([sys.executable, "-m", "flows.cli", "store", "info", str(tmp_path / "s.zarr"), "--json"],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert (report["videos"], report["ok"], report["failed"], report["pending"]) == (4, 3, 1, 0)
    assert report["failures"][0]["video_id"] == "broken"
    assert report["listing"]["source"] == "import-pt"
    assert report["sizes"]["disk_bytes"] > 0
