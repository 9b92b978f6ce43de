"""Precompute under faults: SIGKILL at seeded random moments, two writers at once, a full or read-only target.

Everything here is real: generated and corrupt videos decoded by decord workers, the demo encoders, a Zarr
store on disk, real processes killed with SIGKILL (their whole process group, decode workers included), a real
file-size limit (RLIMIT_FSIZE, which makes write() fail with EFBIG exactly as a full disk fails with ENOSPC)
and a real read-only folder (chmod for a normal user; for root, who ignores permissions, a read-only bind
mount in a private mount namespace).

The killed runs drive the same plain functions the flow's tasks wrap (listing -> prepare_store ->
encode_chunks). So that 20 kills fit in about a minute, they are forked from a warm process that imported
torch, prefect and diffusers once (`serve`): each run is its own process group, killed whole. The reference,
the final rerun and the concurrent writers are fresh processes; the write-failure tests run the CLI (`fvlm
precompute`, the flow on the session's Prefect server), and `fvlm store info --json` is read between kills
as a user would. The existing tests/flows/test_precompute_flow.py kills the CLI itself. The object-store cases
put the store at s3://BUCKET/store.zarr on moto's S3 server (tests/s3_server.py) and hold the run at an exact
moment (FAULT_TEST_HOLD) before killing it, so each kill lands where it is aimed.

This module is also the subprocess: `python -m tests.faults.test_precompute_faults MANIFEST STORE [CHUNK ...]`
runs one precompute (see `main`), `... --serve` the fork server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.store import FAILED, OK, PENDING, ChunkRows, FeatureStore
from storage.zarr_files import is_url

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK_VIDEOS = 2
SEED = 20261125
KILLS = 20
# float16 keeps 11 significant bits; rows encoded in another batch differ in the last bits only
RTOL = ATOL = 2e-3


# ---- the subprocess ------------------------------------------------------------------------------------


def _hold_if_asked(moment: str) -> None:
    """Stop here for good when FAULT_TEST_HOLD names this moment ('written ARRAY@ROW': after the write of that
    array starting at that row; 'before attrs': before the group's attributes), so a kill lands exactly on it."""
    if os.environ.get("FAULT_TEST_HOLD") == moment:
        print("phase held", flush=True)
        while True:
            time.sleep(3600)


def _instrument() -> None:
    """Print a line as each step starts, so the test knows which phase a kill landed in (no behaviour change)."""
    import zarr

    from storage import store as store_module

    def say(text: str) -> None:
        print(f"phase {text}", flush=True)

    set_item, create_array = zarr.Array.__setitem__, zarr.Group.create_array
    attrs_update = zarr.core.attributes.Attributes.update

    def traced_set_item(self, key, value):
        name = self.basename
        in_chunks = getattr(store_module, "_fault_test_chunks", False)
        say(("write-status" if name == "status" else "write-features") if in_chunks else "create-rows")
        set_item(self, key, value)
        if in_chunks:
            say("decode-encode" if name == "status" else "between-writes")
        _hold_if_asked(f"written {name}@{getattr(key, 'start', None)}")

    def traced_create_array(self, name, **kwargs):
        say("create-arrays")
        return create_array(self, name, **kwargs)

    def traced_attrs_update(self, *args, **kwargs):
        say("create-attrs")
        _hold_if_asked("before attrs")
        return attrs_update(self, *args, **kwargs)

    zarr.Array.__setitem__ = traced_set_item
    zarr.Group.create_array = traced_create_array
    zarr.core.attributes.Attributes.update = traced_attrs_update


def main(argv: list[str]) -> int:
    """Listing -> prepare_store -> encode_chunks, as the flow's tasks do, printing its phases."""
    print("phase start", flush=True)
    level = os.environ.get("FAULT_TEST_LOG_LEVEL")  # e.g. INFO: every library's log lines (the secrets check)
    if level:
        logging.basicConfig(level=level)
    _instrument()
    from storage import store as store_module
    from tasks.listing import list_videos
    from tasks.precompute import encode_chunks, prepare_store

    manifest, store, *chunks = argv
    config = precompute_config()
    if not chunks:
        print("phase listing", flush=True)
        listing = list_videos(manifest)
        print("phase store-open" if FeatureStore.exists(store) else "phase store-create", flush=True)
        todo = prepare_store(store, listing, config).pending_chunks()
    else:
        todo = [int(c) for c in chunks]
    barrier = os.environ.get("FAULT_TEST_BARRIER")  # 'FOLDER:N': start writing together with N-1 others
    if barrier:
        folder, count = barrier.rsplit(":", 1)
        Path(folder, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while len(list(Path(folder).glob("ready-*"))) < int(count) and time.monotonic() < deadline:
            time.sleep(0.01)
    print("phase decode-encode", flush=True)
    store_module._fault_test_chunks = True
    started = time.time()
    report = encode_chunks(store, todo, config)
    print(f"phase done {started:.3f} {time.time():.3f} {json.dumps(report.as_dict())}", flush=True)
    return 0


def serve() -> int:
    """Fork one precompute run per line of stdin ('MANIFEST<TAB>STORE<TAB>PHASE_LOG[<TAB>HOLD]') from a warm
    process (HOLD: the run's FAULT_TEST_HOLD, see `_hold_if_asked`).

    A fresh Python needs ~8 s (torch, prefect, diffusers imports) before it touches the store; forking a
    process that imported them once lets the 20 kills land in the phases that write. Each child is a process
    group leader (killpg takes its decode workers too), writes its phase lines to PHASE_LOG, and is reaped here:
    the reply lines are 'pid N' and then 'exit N CODE'.
    """
    _instrument()
    import tasks.listing  # noqa: F401 - imported once here, so that forked children start warm
    import tasks.precompute  # noqa: F401
    from model.encoders import EncoderConfig, describe_encoders

    describe_encoders(EncoderConfig(preset="demo"))  # imports diffusers and transformers' configs
    print("ready", flush=True)
    for line in sys.stdin:
        manifest, store, phase_log, *hold = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                if hold:
                    os.environ["FAULT_TEST_HOLD"] = hold[0]
                out = os.open(phase_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                err = os.open(phase_log + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(out, 1)
                os.dup2(err, 2)
                code = main([manifest, store])
            except BaseException:  # noqa: BLE001 - the child reports and exits, never returns to the loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def precompute_config():
    from model.encoders import EncoderConfig
    from storage.store import StoreConfig
    from tasks.decode import DecodeConfig
    from tasks.precompute import PrecomputeConfig

    return PrecomputeConfig(encoder=EncoderConfig(preset="demo"), decode=DecodeConfig(workers=1, timeout_s=60),
                            layout=StoreConfig(chunk_videos=CHUNK_VIDEOS), device="cpu")


# ---- helpers of the tests ------------------------------------------------------------------------------


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PREFECT_HOME=str(tmp / "prefect-home"))
    env.pop("FVLM_PROGRESS", None)
    return env


def driver(manifest: Path, store: Path, *chunks: int) -> list[str]:
    return [sys.executable, "-m", "tests.faults.test_precompute_faults", str(manifest), str(store),
            *map(str, chunks)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_driver(manifest: Path, store: Path, env: dict, *chunks: int) -> subprocess.CompletedProcess:
    done = subprocess.run(driver(manifest, store, *chunks), env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def write_collection(folder: Path, corrupt: Path | None) -> Path:
    """Twelve short clips inside 20-60 s, a file that is not a video, and (when present) a corrupt mp4."""
    from tasks.samples import iso_duration, make_video, write_manifest

    rows = []
    for i in range(12):
        seconds = 20 + 3 * i % 37
        name = f"videos/v{i:02d}{'.mkv' if i % 5 == 4 else '.mp4'}"
        make_video(folder / name, seconds, fps=2, size=(64, 48), seed=i)
        rows.append({"videoid": f"v{i:02d}", "contentUrl": name, "duration": iso_duration(seconds),
                     "name": f"clip {i}"})
    (folder / "videos" / "garbage.mp4").write_bytes(b"this is not a video\n" * 200)
    rows.insert(3, {"videoid": "garbage", "contentUrl": "videos/garbage.mp4", "duration": "PT00H00M30S",
                    "name": "text pretending to be a video"})
    if corrupt is not None:
        shutil.copy(corrupt, folder / "videos" / "corrupt.mp4")
        rows.insert(8, {"videoid": "corrupt", "contentUrl": "videos/corrupt.mp4", "duration": "PT00H00M25S",
                        "name": "a corrupt file with a believable duration"})
    return write_manifest(folder / "manifest.csv", rows)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.conftest import SHARED_VIDEOS

    folder = tmp_path_factory.mktemp("faults")
    corrupt = SHARED_VIDEOS / "decord_corrupted.mp4"
    manifest = write_collection(folder / "collection", corrupt if corrupt.is_file() else None)
    return folder, manifest


@pytest.fixture(scope="module")
def reference(workspace):
    """The store of one uninterrupted run: what every faulted run must end up equal to."""
    folder, manifest = workspace
    store = folder / "reference.zarr"
    started = time.perf_counter()
    run_driver(manifest, store, subprocess_env(folder))
    counts = FeatureStore.open(store).counts()
    assert counts["pending"] == 0 and counts["failed"] >= 1 and counts["ok"] == 12, counts
    return store, time.perf_counter() - started


def reason_kind(reason: str) -> str:
    """The category of a failure reason: its words before the details, numbers left out ('frame N of N cannot
    be decoded'; which frame of a corrupt file fails first varies from one decode to the next)."""
    return re.sub(r"\d+", "N", reason.split(":", 1)[0])


def check_committed_rows(store_path: Path | str, reference_path: Path) -> dict[str, int]:
    """Every row the store calls ok or failed must be exactly what the uninterrupted run committed."""
    store, ref = FeatureStore.open(store_path), FeatureStore.open(reference_path)
    assert list(store.read_column("video_id")) == list(ref.read_column("video_id"))
    status, ref_status = store.read_status(), ref.read_status()
    assert set(np.unique(status)) <= {PENDING, OK, FAILED}
    done = status != PENDING
    assert np.array_equal(status[done], ref_status[done]), "a committed row differs from the reference run"
    errors, ref_errors = store.read_column("error"), ref.read_column("error")
    for row in np.flatnonzero(status == FAILED):
        assert reason_kind(str(errors[row])) == reason_kind(str(ref_errors[row])), row
    ok = np.flatnonzero(status == OK)
    if ok.size:
        for name in ("dino_features", "latents"):
            got = np.asarray(store.group[name].oindex[ok], np.float32)
            want = np.asarray(ref.group[name].oindex[ok], np.float32)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{name} of ok rows {ok}")
    return store.counts()


def assert_same_store(store_path: Path | str, reference_path: Path) -> None:
    """Same rows (none lost or duplicated), same status and reasons, same features, same attributes."""
    store, ref = FeatureStore.open(store_path), FeatureStore.open(reference_path)
    ids = list(store.read_column("video_id"))
    assert len(ids) == len(set(ids)) == store.num_videos == ref.num_videos
    for column in ("video_id", "caption", "source"):
        assert list(store.read_column(column)) == list(ref.read_column(column)), column
    np.testing.assert_array_equal(store.read_column("duration_s"), ref.read_column("duration_s"))
    assert store.counts() == ref.counts() and store.counts()["pending"] == 0
    check_committed_rows(store_path, reference_path)
    failed = store.read_status() == FAILED
    assert [reason_kind(str(e)) for e in store.read_column("error")[failed]] == \
        [reason_kind(str(e)) for e in ref.read_column("error")[failed]]
    assert store.attrs == ref.attrs
    assert store.attrs["schema_version"] and store.attrs["chunk_videos"] == CHUNK_VIDEOS


def leftovers(store: Path | str) -> list[Path | str]:
    """Temporary files and half-built stores a killed run may leave next to or inside the store (at a URL: the
    objects of such names next to or under it)."""
    if is_url(str(store)):
        parent, name = str(store).rstrip("/").rsplit("/", 1)
        return [key for key in store_objects(parent)
                if key.startswith(f".{name}.creating-") or (key.startswith(f"{name}/") and key.endswith(".partial"))]
    found = list(store.parent.glob(f".{store.name}.creating-*"))
    if store.exists():
        found += [p for p in store.rglob("*.partial")]
    return found


def store_objects(url: str) -> list[str]:
    """The keys of every object under a URL, relative to it, listed now (no cached listing of this process)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    return sorted(key[len(root):].lstrip("/") for key in fs.find(root))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class ForkServer:
    """The test's side of `serve`: start runs, watch their phase lines, SIGKILL their process group."""

    def __init__(self, env: dict[str, str], folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.faults.test_precompute_faults", "--serve"],
                                     env=env, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "the fork server did not start"
        self.runs = 0

    def start(self, manifest: Path, store: Path | str, hold: str | None = None) -> "Run":
        """Fork a run; with `hold`, it stops for good at that moment (`_hold_if_asked`) and prints 'phase held'."""
        self.runs += 1
        log = self.folder / f"run-{self.runs:03d}.phases"
        self.proc.stdin.write(f"{manifest}\t{store}\t{log}" + (f"\t{hold}" if hold else "") + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return Run(self, int(pid), log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class Run:
    """One forked run: its phase lines as they come, `last` is where it is (or was when it was killed)."""

    def __init__(self, server: ForkServer, pid: int, log: Path):
        self.server, self.pid, self.log = server, pid, log
        self.returncode: int | None = None

    def phases(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split()[1] for line in text.splitlines() if line.startswith("phase ")]

    @property
    def last(self) -> str:
        seen = self.phases()
        return seen[-1] if seen else "start"

    def poll(self) -> int | None:
        """The exit code once the server reaped the run (a 'done' line means it is about to exit)."""
        if self.returncode is None and "done" in self.phases():
            self._reap()
        return self.returncode

    def _reap(self) -> None:
        word, pid, code = self.server.proc.stdout.readline().split()
        assert (word, int(pid)) == ("exit", self.pid)
        self.returncode = int(code)

    def wait_for(self, phase: str, count: int = 1, timeout: float = 120) -> bool:
        """Wait until `phase` has been entered `count` times; False when the run ended first."""
        deadline = time.monotonic() + timeout
        errors, next_look = Path(f"{self.log}.stderr"), time.monotonic() + 0.1
        while time.monotonic() < deadline:
            seen = self.phases()
            if seen.count(phase) >= count:
                return True
            if "done" in seen:
                return False
            if time.monotonic() > next_look:  # a run that crashed says so instead of timing out
                next_look += 0.1
                text = errors.read_text() if errors.exists() else ""
                if "Traceback (most recent call last)" in text:
                    raise AssertionError(f"run {self.pid} failed in {self.last}: {text[-3000:]}")
            time.sleep(0.001)
        raise AssertionError(f"run {self.pid} is stuck in {self.last} (aimed at {phase})")

    def wait(self, timeout: float = 300) -> int:
        """Wait for the run to end by itself; its exit code."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, f"run {self.pid} is stuck in {self.last}"
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)
        self._reap()
        assert self.returncode == -signal.SIGKILL


# Where a kill is aimed: a phase marker to wait for, then a random delay up to this many seconds.
TARGETS_BEFORE_STORE = {"listing": 0.05, "store-create": 0.1, "create-arrays": 0.05, "create-rows": 0.02,
                        "create-attrs": 0.01}
# How often a phase is entered in one run (of those that repeat): 8 arrays, 4 row columns, 3 arrays + status
# of each chunk (a run's first chunks). A kill aims at one of these entries.
REPEATS = {"create-arrays": 8, "create-rows": 4, "write-features": 9, "write-status": 3}
# Landed in 'write-features' / 'write-status': killed inside zarr's write of a chunk's array (the marker is
# printed before the write starts, 'between-writes' / 'decode-encode' after it ends).
TARGETS_WITH_STORE = {"store-open": 0.5, "decode-encode": 1.0, "write-features": 0.012, "write-status": 0.002}


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_sigkills_at_random_moments_lose_nothing(workspace, reference, tmp_path):
    """Kill the precompute 20 times (seeded moments over every phase), rerun after each, compare to the
    uninterrupted run; between kills no row the store calls done may differ from the reference."""
    folder, manifest = workspace
    reference_store, _ = reference
    env = subprocess_env(tmp_path)
    store = tmp_path / "killed.zarr"
    rng = random.Random(SEED)
    kills: list[dict] = []
    finished_before_kill = 0
    info_checks = 0
    server = ForkServer(env, tmp_path)
    try:
        while len(kills) < KILLS:
            if len(kills) == KILLS - 3:  # the last kills hit reruns of a complete store: let one run finish
                assert server.start(manifest, store).wait() == 0
            exists = FeatureStore.exists(store)
            state = "complete" if exists and FeatureStore.open(store).counts()["pending"] == 0 \
                else "store" if exists else "no-store"
            if state == "no-store" and len(kills) >= 6:  # enough kills before the store exists: let it be made
                targets = {k: v for k, v in TARGETS_WITH_STORE.items() if k != "store-open"}
            elif state == "no-store":
                targets = TARGETS_BEFORE_STORE
            elif state == "store":
                targets = TARGETS_WITH_STORE
            else:
                targets = {"listing": 0.3, "store-open": 0.5, "decode-encode": 1.0}
            target = rng.choice(sorted(targets))
            count = rng.randint(1, REPEATS.get(target, 1))  # e.g. the 3rd array created, the 2nd chunk's status
            delay = rng.uniform(0, targets[target])
            run = server.start(manifest, store)
            if run.wait_for(target, count):
                time.sleep(delay)
            if run.poll() is not None:  # it finished before the moment came: not a kill
                assert run.returncode == 0, f"the run aimed at {target} exited {run.returncode}: " \
                                            f"{Path(str(run.log) + '.stderr').read_text()[-3000:]}"
                finished_before_kill += 1
                assert finished_before_kill <= 10, "runs keep finishing before the kill; the schedule is off"
                continue
            run.kill()
            landed = run.last if state != "complete" else "after-complete"
            kills.append({"aimed": target, "landed": landed, "state": state, "delay": round(delay, 3),
                          "leftovers": len(leftovers(store))})
            if FeatureStore.exists(store):
                check_committed_rows(store, reference_store)  # a half-written row is never ok
                if len(kills) % 5 == 0:  # and what a user sees says the same
                    shown = subprocess.run(cli("store", "info", str(store), "--json"), env=env, cwd=REPO_ROOT,
                                           capture_output=True, text=True, timeout=120)
                    assert shown.returncode == 0, shown.stderr[-2000:]
                    info = json.loads(shown.stdout)
                    assert {k: info[k] for k in ("videos", "ok", "failed", "pending")} == \
                        FeatureStore.open(store).counts()
                    info_checks += 1
    finally:
        server.close()

    final = run_driver(manifest, store, env)  # a fresh process reruns after the last kill and completes it
    assert "phase done" in final.stdout
    assert_same_store(store, reference_store)
    assert leftovers(store) == [], "a killed run left temporary files that the reruns did not clean"
    landed = Counter(k["landed"] for k in kills)
    print(f"\n{len(kills)} SIGKILLs, all survived; landed in {dict(sorted(landed.items()))}; "
          f"{finished_before_kill} runs finished before their kill moment; {info_checks} `store info` checks; "
          f"temporary files left by kills (all cleaned by reruns): {[k['leftovers'] for k in kills]}")
    assert info_checks >= 3
    # the schedule really spread the kills: before the store, inside chunk writes, and on a complete store
    assert any(k["state"] == "no-store" for k in kills)
    assert landed["write-features"] + landed["write-status"] + landed["between-writes"] >= 2
    assert any(k["state"] == "complete" for k in kills)


@pytest.mark.slow
def test_a_kill_during_creation_is_cleaned_up_by_the_rerun(workspace, reference, tmp_path):
    """A half-built store (killed creator) is removed by the next creation; the rerun does not trip on it."""
    folder, manifest = workspace
    env = subprocess_env(tmp_path)
    store = tmp_path / "created.zarr"
    server = ForkServer(env, tmp_path)
    try:
        run = server.start(manifest, store)
        assert run.wait_for("create-rows", 2), "the run never got to write the store's rows"
        run.kill()
        half_built = list(tmp_path.glob(".created.zarr.creating-*"))
        assert len(half_built) == 1 and not store.exists()
        assert server.start(manifest, store).wait() == 0
    finally:
        server.close()
    assert not half_built[0].exists()
    assert_same_store(store, reference[0])


CREATE_IN_PLACE = """
import sys
from storage.store import FeatureStore, StoreConfig
ids = [f"v{i}" for i in range(40000)]
FeatureStore.create(sys.argv[1], ids, ids, ids, [30.0] * len(ids), attrs={}, config=StoreConfig(chunk_videos=4))
"""


def test_a_store_killed_while_created_in_place_is_named_as_such(tmp_path):
    """A store created in place (an fsspec URL has no rename) and killed before its attributes were set is
    refused with a message that says what happened and what to do, not 'already exists' or a KeyError."""
    store = tmp_path / "inplace.zarr"
    proc = subprocess.Popen([sys.executable, "-c", CREATE_IN_PLACE, str(store)], cwd=REPO_ROOT,
                            env=subprocess_env(tmp_path), stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (store / "video_id" / "c").exists():  # the row columns are being written
        assert proc.poll() is None and time.monotonic() < deadline, "the creation ended before it could be killed"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    from storage.store import StoreError

    with pytest.raises(StoreError, match="creation was interrupted.*delete it and run again"):
        FeatureStore.open(store)
    shown = subprocess.run(cli("store", "info", str(store)), env=subprocess_env(tmp_path), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 2 and "creation was interrupted" in shown.stderr, shown.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_workers_on_disjoint_chunks_at_once_lose_nothing(workspace, reference, tmp_path, request, where):
    """Two processes fill disjoint chunk lists of one store (a folder, or s3:// on the test S3 server) at the same
    time; the store equals the reference."""
    from tasks.listing import list_videos
    from tasks.precompute import encode_chunks, prepare_store

    folder, manifest = workspace
    store = tmp_path / "shared.zarr" if where == "local" else f"{request.getfixturevalue('s3_env')}/shared.zarr"
    env = subprocess_env(tmp_path)  # (after s3_env: it copies the AWS variables)
    chunks = prepare_store(str(store), list_videos(manifest), precompute_config()).pending_chunks()
    assert len(chunks) >= 4
    # interleaved, so that the two writers' chunks are neighbours all along the store
    parts = [chunks[0::2], chunks[1::2]]
    (tmp_path / "barrier").mkdir()
    env["FAULT_TEST_BARRIER"] = f"{tmp_path / 'barrier'}:2"  # both start writing at the same moment
    procs = [subprocess.Popen(driver(manifest, store, *part), env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for part in parts]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    spans = [tuple(float(x) for x in out.split("phase done ")[1].split()[:2]) for out, _ in outputs]
    assert max(s[0] for s in spans) < min(s[1] for s in spans), f"the writers did not overlap: {spans}"
    if where == "s3":
        fresh_s3_view()
    assert_same_store(store, reference[0])

    # the unit of work is a whole chunk: an index the store does not have is refused, not silently skipped
    from storage.store import StoreError

    with pytest.raises(StoreError, match="whole chunk indices"):
        encode_chunks(str(store), [len(chunks) + 3], precompute_config())
    with pytest.raises(StoreError, match="whole chunk indices"):
        encode_chunks(str(store), [-1], precompute_config())


WRITE_ONE_CHUNK = """
import sys
import numpy as np
from storage.store import OK, ChunkRows, FeatureStore
store = FeatureStore.open(sys.argv[1], mode="r+")
n, s = store.chunk_videos, store.shapes
store.write_chunk(0, ChunkRows(
    features=np.full((n, s.frames, s.tokens, s.feature_dim), 1.5, np.float16),
    latents=np.full((n, s.frames, *s.latent_shape), -2.0, np.float16),
    status=np.full(n, OK, np.uint8), error=[""] * n))
"""


def test_a_kill_in_the_middle_of_a_chunk_file_commits_nothing_and_its_temporary_file_is_cleaned(tmp_path):
    """SIGKILL while zarr is writing the features of a chunk (its temporary file is on disk, growing): the
    chunk stays pending, the old chunk file is intact, and the next writer of the chunk removes the
    leftover `*.partial` file and commits the chunk."""
    ids = [f"v{i}" for i in range(20)]
    store_path = tmp_path / "big.zarr"
    from storage.store import StoreConfig

    FeatureStore.create(store_path, ids, ids, ids, [30.0] * 20, attrs={}, config=StoreConfig(chunk_videos=16))
    chunk_dir = store_path / "dino_features" / "c" / "0" / "0" / "0"
    proc = subprocess.Popen([sys.executable, "-c", WRITE_ONE_CHUNK, str(store_path)], cwd=REPO_ROOT,
                            env=subprocess_env(tmp_path), stderr=subprocess.PIPE, start_new_session=True)

    def writing() -> bool:
        for partial in chunk_dir.glob("*.partial") if chunk_dir.exists() else []:
            try:
                if partial.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed into place between the listing and the stat
                pass
        return False

    deadline = time.monotonic() + 60
    while not writing():
        assert proc.poll() is None and time.monotonic() < deadline, "the write ended before it could be killed"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    store = FeatureStore.open(store_path, mode="r+")
    assert store.counts()["pending"] == 20 and store.counts()["ok"] == 0
    assert len(list(chunk_dir.glob("*.partial"))) == 1 and not (chunk_dir / "0").exists()

    n, s = store.chunk_videos, store.shapes
    store.write_chunk(0, ChunkRows(features=np.ones((n, s.frames, s.tokens, s.feature_dim), np.float16),
                                   latents=np.ones((n, s.frames, *s.latent_shape), np.float16),
                                   status=np.full(n, OK, np.uint8), error=[""] * n))
    assert list(chunk_dir.glob("*.partial")) == [] and store.counts()["ok"] == 16
    assert float(np.asarray(store.group["dino_features"][15]).min()) == 1.0


def half_done_copy(reference_store: Path, target: Path, committed_chunks: int) -> None:
    """A copy of the reference store whose chunks after the first few are pending again, zeroed."""
    shutil.copytree(reference_store, target)
    store = FeatureStore.open(target, mode="r+")
    shapes = store.shapes
    for chunk in range(committed_chunks, store.num_chunks):
        n = len(store.chunk_rows(chunk))
        store.write_chunk(chunk, ChunkRows(
            features=np.zeros((n, shapes.frames, shapes.tokens, shapes.feature_dim), np.float16),
            latents=np.zeros((n, shapes.frames, *shapes.latent_shape), np.float16),
            status=np.full(n, PENDING, np.uint8), error=[""] * n))


def file_size_limit(limit: int):
    """For preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def cli_env(tmp_path: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return dict(subprocess_env(tmp_path), PREFECT_API_URL=PREFECT_API_URL.value())


def precompute_cli(manifest: Path, store: Path) -> list[str]:
    return cli("precompute", "--manifest", str(manifest), "--store", str(store), "--preset", "demo",
               "--device", "cpu", "--chunk-videos", str(CHUNK_VIDEOS), "--decode-workers", "1")


def assert_write_failure_left_store_as_it_was(done: subprocess.CompletedProcess, store: Path,
                                              before: dict[str, str], counts: dict[str, int], *hints: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    message = done.stderr
    assert "could not write chunk" in message and str(store) in message, message[-3000:]
    assert "they stay pending" in message and "rerun" in message
    for hint in hints:
        assert hint in message, (hint, message[-3000:])
    assert tree_digest(store) == before, "the failed write changed the store"
    assert FeatureStore.open(store).counts() == counts


@pytest.mark.slow
def test_full_disk_ends_with_a_clear_error_and_leaves_the_store_as_it_was(workspace, reference, tmp_path,
                                                                          prefect_harness):
    """`fvlm precompute` on a store it cannot grow (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk): exit 2, a
    message naming the store and what to do, every file unchanged; the rows stay pending, not failed, and the
    next run with room finishes the store as the uninterrupted run did."""
    folder, manifest = workspace
    store = tmp_path / "full.zarr"
    half_done_copy(reference[0], store, committed_chunks=3)
    before, counts = tree_digest(store), FeatureStore.open(store).counts()
    assert counts["pending"] > 0
    started = time.perf_counter()
    done = subprocess.run(precompute_cli(manifest, store), env=cli_env(tmp_path), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(1 << 20))
    assert_write_failure_left_store_as_it_was(done, store, before, counts, "File too large", "free disk space")
    assert time.perf_counter() - started < 60, "a write failure was retried as if it were transient"

    run_driver(manifest, store, subprocess_env(tmp_path))  # room again: the pending rows are done now
    assert_same_store(store, reference[0])


@pytest.mark.slow
def test_full_disk_while_creating_leaves_no_half_store(workspace, tmp_path):
    """With a limit below the size of the store's metadata, creation fails cleanly: no store, no staging."""
    folder, manifest = workspace
    store = tmp_path / "never.zarr"
    done = subprocess.run(driver(manifest, store), env=subprocess_env(tmp_path), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(200))
    assert done.returncode != 0
    assert "StoreWriteError" in done.stderr and "could not write the new store" in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr and "free disk space" in done.stderr
    assert not store.exists() and leftovers(store) == []


def read_only_runner(store: Path) -> list[str]:
    """A command prefix under which `store` cannot be written: the folder itself for a normal user, a read-only
    bind mount in a private mount namespace for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        pytest.skip("running as root, and no `unshare` to mount the store read-only")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind -o ro '{store}' '{store}'"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root, and this machine refuses a read-only bind mount: {probe.stderr.strip()}")
    return ["unshare", "--mount", "sh", "-c", f"mount --bind -o ro '{store}' '{store}' && exec \"$@\"", "sh"]


@pytest.mark.slow
def test_read_only_store_ends_with_a_clear_error_and_leaves_the_store_as_it_was(workspace, reference, tmp_path,
                                                                                prefect_harness):
    folder, manifest = workspace
    store = tmp_path / "readonly.zarr"
    half_done_copy(reference[0], store, committed_chunks=2)
    before, counts = tree_digest(store), FeatureStore.open(store).counts()
    prefix = read_only_runner(store)
    modes = {}
    if not prefix:
        for path in [store, *store.rglob("*")]:
            modes[path] = path.stat().st_mode
            path.chmod(modes[path] & ~0o222)
    try:
        done = subprocess.run(prefix + precompute_cli(manifest, store), env=cli_env(tmp_path), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    expected = "Read-only file system" if prefix else "Permission denied"
    assert_write_failure_left_store_as_it_was(done, store, before, counts, expected, "check that this user may write")


# ---- on an object store: s3://bucket/store.zarr on moto's S3 server (tests/s3_server.py) ------------------


def s3_run_env(tmp_path: Path, s3_server) -> dict[str, str]:
    """The runs' environment: the AWS variables `s3_env` set (subprocess_env copies them), every log line on."""
    env = dict(subprocess_env(tmp_path), FAULT_TEST_LOG_LEVEL="INFO")
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint and env["AWS_SECRET_ACCESS_KEY"]
    return env


def fresh_s3_view() -> None:
    """Forget the listings this process's s3fs clients cached: the next read sees what the runs wrote."""
    import s3fs

    for fs in list(s3fs.S3FileSystem._cache.values()):
        fs.invalidate_cache()


def kill_unfinished(runs: list["Run"]) -> None:
    """SIGKILL runs a failed test left behind (a held run would keep the fork server waiting for ever)."""
    for run in runs:
        if run.returncode is None and "done" not in run.phases():
            try:
                os.killpg(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def assert_no_secret_in_logs(runs: list["Run"]) -> None:
    """The secret key is in no run's output, though each read it and logged at INFO (botocore says so)."""
    from tests.s3_server import TEST_SECRET_KEY

    for run in runs:
        text = "".join(path.read_text() for path in (run.log, Path(f"{run.log}.stderr")) if path.exists())
        assert "Found credentials in environment variables" in text, f"run {run.pid} logged no S3 client line"
        assert TEST_SECRET_KEY not in text, f"the S3 secret key is in the output of run {run.pid} ({run.log})"


def rerun_to_the_end(server: ForkServer, runs: list[Run], manifest: Path, store: str) -> None:
    runs.append(server.start(manifest, store))
    assert runs[-1].wait_for("done", timeout=180)
    assert runs[-1].wait() == 0


def assert_completed_on_s3(store: str, reference, runs: list[Run]) -> None:
    """The rerun's store equals the reference, nothing is left over and no run printed the secret key."""
    fresh_s3_view()
    assert_same_store(store, reference[0])
    assert leftovers(store) == []
    assert_no_secret_in_logs(runs)


@pytest.mark.slow
def test_a_kill_inside_a_chunk_write_on_s3_counts_no_half_written_row_and_the_rerun_completes_it(
        workspace, reference, tmp_path, s3_server, s3_env):
    """SIGKILL after the dino_features object of the store's second chunk was put, before its latents and status:
    the first chunk's rows are ok and equal to the reference, the second chunk's rows (features there, latents
    not) are pending, and a rerun completes the store as the uninterrupted local run did."""
    folder, manifest = workspace
    store = f"{s3_env}/store.zarr"
    server = ForkServer(s3_run_env(tmp_path, s3_server), tmp_path)
    runs: list[Run] = []
    try:
        runs.append(server.start(manifest, store, hold=f"written dino_features@{CHUNK_VIDEOS}"))
        assert runs[0].wait_for("held", timeout=90), "the run ended before it wrote the second chunk's features"
        runs[0].kill()
        assert_no_secret_in_logs(runs)
        fresh_s3_view()
        after_kill = store_objects(store)
        assert "dino_features/c/1/0/0/0" in after_kill, "the kill was meant to land after the features were put"
        assert "latents/c/1/0/0/0/0" not in after_kill and "status/c/1" not in after_kill
        assert "status/c/0" in after_kill and "zarr.json" in after_kill
        counts = check_committed_rows(store, reference[0])  # the committed rows equal the reference's
        assert counts["ok"] + counts["failed"] == CHUNK_VIDEOS, counts  # the first chunk, and only it
        killed = FeatureStore.open(store)
        half = range(CHUNK_VIDEOS, 2 * CHUNK_VIDEOS)
        assert (killed.read_status()[half.start:half.stop] == PENDING).all()
        # the second chunk is really half written: its features are there, its latents are not
        assert np.abs(np.asarray(killed.group["dino_features"][half.start], np.float32)).max() > 0
        assert not np.asarray(killed.group["latents"][half.start:half.stop]).any()

        rerun_to_the_end(server, runs, manifest, store)
    finally:
        kill_unfinished(runs)
        server.close()
    assert_completed_on_s3(store, reference, runs)
    print(f"\nafter the kill, under {store}: {after_kill}")


@pytest.mark.slow
def test_a_kill_while_the_store_is_created_on_s3_is_recreated_by_the_rerun(workspace, reference, tmp_path,
                                                                           s3_server, s3_env):
    """SIGKILL while the store is created at its URL, with every array and row column written but not the group's
    attributes (an object store has no rename to build it under another name): the rerun removes it, creates it
    again and completes it."""
    from storage.store import StoreError

    folder, manifest = workspace
    store = f"{s3_env}/store.zarr"
    server = ForkServer(s3_run_env(tmp_path, s3_server), tmp_path)
    runs: list[Run] = []
    try:
        runs.append(server.start(manifest, store, hold="before attrs"))
        assert runs[0].wait_for("held", timeout=90), "the run ended before it wrote the store's attributes"
        runs[0].kill()
        assert_no_secret_in_logs(runs)
        fresh_s3_view()
        after_kill = store_objects(store)
        assert "zarr.json" in after_kill and "video_id/c/0" in after_kill and "dino_features/zarr.json" in after_kill
        assert not [key for key in after_kill if key.startswith(("dino_features/c/", "latents/c/", "status/c/"))]
        with pytest.raises(StoreError, match="creation was interrupted"):
            FeatureStore.open(store)
        print(f"\nafter the kill, under {store}: {after_kill}")

        rerun_to_the_end(server, runs, manifest, store)
    finally:
        kill_unfinished(runs)
        server.close()
    assert_completed_on_s3(store, reference, runs)


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1:]))
