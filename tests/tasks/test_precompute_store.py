"""Opening an existing store for a rerun: the same manifest continues, another listing or encoder is refused."""

import logging

import pandas as pd
import pytest

from model.encoders import EncoderConfig
from storage.store import FeatureStore, StoreError
from tasks.listing import Listing
from tasks.precompute import PrecomputeConfig, prepare_store


def listing(ids, manifest="collection/manifest.csv", max_duration=60.0) -> Listing:
    videos = pd.DataFrame({"video_id": ids, "source": [f"videos/{i}.mp4" for i in ids],
                           "caption": [f"caption of {i}" for i in ids], "duration_s": [30.0] * len(ids)})
    summary = {"manifest": manifest, "rows": len(ids), "kept": len(ids), "dropped": {},
               "min_duration_s": 20.0, "max_duration_s": max_duration, "probed": 0}
    return Listing(videos=videos, summary=summary)


CONFIG = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), device="cpu")


def test_the_same_manifest_keeping_other_rows_today_continues_the_store_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b", "c", "d"]), CONFIG)
    with caplog.at_level(logging.WARNING, logger="tasks.precompute"):
        store = prepare_store(path, listing(["a", "c", "d", "e"]), CONFIG)  # b not probed today, e probed now
    assert list(store.read_column("video_id")) == ["a", "b", "c", "d"]
    assert "keeps 1 the store does not have (e.g. ['e'])" in caplog.text and "drops 1 it has (e.g. ['b'])" in caplog.text


@pytest.mark.parametrize("other", [dict(manifest="elsewhere/manifest.csv"), dict(max_duration=90.0)])
def test_another_manifest_or_other_bounds_are_refused(tmp_path, other):
    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b", "c"]), CONFIG)
    with pytest.raises(StoreError, match="videos of another listing"):
        prepare_store(path, listing(["a", "b", "x"], **other), CONFIG)
    assert list(FeatureStore.open(path).read_column("video_id")) == ["a", "b", "c"]


def test_other_encoders_are_refused_even_with_the_same_rows(tmp_path):
    import zarr

    path = str(tmp_path / "s.zarr")
    prepare_store(path, listing(["a", "b"]), CONFIG)
    group = zarr.open_group(path, mode="r+")
    group.attrs["dino"] = {**group.attrs["dino"], "id": "facebook/dinov2-small"}  # as a full-preset run made it
    with pytest.raises(StoreError, match="was encoded with dino 'facebook/dinov2-small', this run uses 'demo:"):
        prepare_store(path, listing(["a", "b"]), CONFIG)
