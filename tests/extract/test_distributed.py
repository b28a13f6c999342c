"""Stage one on many processes (huse_pipeline.extract.distributed, store.merge): torchrun with 2 CPU
ranks (gloo) gives the one-process file; kill -9 of the whole job, then one process, gives it too;
job-array workers and --merge-only; the merge refuses a bad shard by name; one job per output;
--dtype float16. Real encoders in one test (EfficientNet-Lite0 + MiniLM on the demo catalogue),
stub encoders elsewhere."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import cli
from huse_pipeline.errors import HuseError
from huse_pipeline.extract import run as extract
from huse_pipeline.extract.distributed import JobLocks, ShardClaims, Worker, claim_order
from huse_pipeline.extract.locks import FileLock, holder_info
from huse_pipeline.extract.plan import parts_folder, plan_parts
from huse_pipeline.extract.run import ExtractConfig, extract_features
from huse_pipeline.store import features, merge
from test_extract import CLASSES, COLOURS, _write_csv, assert_same_file, build_catalogue, stub_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "catalogue.csv"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # the same thread count in every process


def _torchrun(*args: str, nproc: int = 2, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "huse_pipeline", "extract-features", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def _huse(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "huse_pipeline", "extract-features", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _items(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        names: list[str] = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        return {n: f[n][()] for n in names}


# ------------------------------------------------------------------------------- torchrun


def test_torchrun_two_ranks_real_encoders_give_the_one_process_file(tmp_path):
    """The issue's check: `torchrun --standalone --nproc-per-node 2 -m huse_pipeline extract-features`
    on the demo catalogue with real encoders writes what one process writes, bit for bit on CPU."""
    out = tmp_path / "feats.h5"
    args = ["--catalogue", str(DEMO), "--out", str(out), "--image-encoder", "efficientnet-lite0", "--part-rows", "40",
            "--device", "cpu", "--num-workers", "1"]
    one = _huse(*args, "--threads", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.move(out, tmp_path / "one.h5")

    two = _torchrun(*args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "shard" in two.stderr and "[rank 1]" not in two.stderr  # rank 0's bar; rank 1 silent
    assert_same_file(out, tmp_path / "one.h5")  # embeddings, labels, splits, strings and attributes
    a, b = features.read_features(out), features.read_features(tmp_path / "one.h5")
    np.testing.assert_array_equal(a.image_emb, b.image_emb)
    np.testing.assert_array_equal(a.text_emb, b.text_emb)
    assert a.image_emb.shape == (300, 1280 + 768) and (a.labels == b.labels).all() and (a.split == b.split).all()
    assert not parts_folder(out).exists() and not list(tmp_path.glob(".*lock"))


def _slow_catalogue(root: Path, n: int = 96) -> Path:
    """Rows whose images take ~30 ms to decode: a job slow enough to kill in the middle."""
    img = root / "images"
    img.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 255, (1600, 1600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img / "big.png", compress_level=1)
    for c in range(3):
        Image.new("RGB", (10, 10), COLOURS[c]).save(img / f"c{c}.png")
    rows = [{"image": "images/big.png" if i % 4 else f"images/c{i % 3}.png", "text": f"item {i}",
             "label": CLASSES[i % 3], "split": ("train", "train", "val", "test")[i % 4]} for i in range(n)]
    return _write_csv(root / "c.csv", rows)


def _wait_for_parts(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (folder.exists() and any(folder.glob("part-*.h5"))):
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.01)


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave the ranks running, as kill -9 of torchrun alone does)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _kill_job(pid: int, timeout: float = 30) -> None:
    """kill -9 of a whole job (what losing its machine does): every process of its tree, then wait
    until none runs (a zombie holds no file and no lock)."""
    tree = _process_tree(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for p in tree:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {p} of the killed job did not exit")


def test_kill9_of_a_torchrun_job_then_one_process_gives_the_same_file(tmp_path):
    csv_path = _slow_catalogue(tmp_path)
    out = tmp_path / "out" / "f.h5"
    args = ["--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub", "--text-encoder", "stub",
            "--part-rows", "4", "--batch-size", "2", "--num-workers", "1", "--device", "cpu", "--augment-views", "1"]
    cfg = ExtractConfig(catalogue=str(csv_path), out=str(out), image_encoder="stub", text_encoder="stub", part_rows=4,
                        batch_size=2, num_workers=1, device="cpu", augment_views=1)
    extract_features(cfg)
    shutil.move(out, tmp_path / "ref.h5")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "huse_pipeline",
           "extract-features", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    folder = parts_folder(out)
    try:
        _wait_for_parts(folder, proc)
    finally:
        _kill_job(proc.pid)  # torchrun, both ranks and their DataLoader workers
        proc.wait()
    n_parts = len(list(folder.glob("part-*.h5")))
    assert 1 <= n_parts < 24 and not out.exists()

    result = CliRunner().invoke(cli.main, ["extract-features", *args])  # one process
    assert result.exit_code == 0, result.output
    assert f"reusing {n_parts} of 24 shards already done" in result.output
    assert f'"parts_reused": {n_parts}' in result.output
    assert_same_file(out, tmp_path / "ref.h5")
    assert not folder.exists()


def test_a_failing_rank_is_named_with_its_shard(tmp_path):
    """--strict stops at the first bad row: the rank that met it says so with its shard, once."""
    csv_path, _ = build_catalogue(tmp_path, n_good=20, odd=False, bad=False)
    lines = csv_path.read_text().splitlines()
    first = 13
    lines[first + 1] = lines[first + 1].replace("images/g13.png", "images/missing.png")
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "f.h5"
    run = _torchrun("--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub", "--text-encoder",
                    "stub", "--part-rows", "4", "--num-workers", "0", "--device", "cpu", "--strict")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert "of 2 on host" in errors[0] and "failed on shard part-000000012-000000016.h5 (rows 12-15)" in errors[0]
    assert f"row {first} (CSV line {first + 2}, image 'images/missing.png') is unusable: missing file" in errors[0]
    assert "Finished shards are kept" in errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------- job arrays, merge


@pytest.fixture()
def stub_catalogue(tmp_path):
    return build_catalogue(tmp_path / "cat")


def _array(index: int, count: int) -> Worker:
    return Worker(array_index=index, array_count=count)


def test_job_array_workers_share_the_shards_then_merge_only_merges(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    out = tmp_path / "f.h5"
    cfg = stub_config(csv_path, out, augment_views=2)
    extract_features(cfg)
    shutil.move(out, tmp_path / "ref.h5")

    catalogue = extract._read(cfg)
    planned = plan_parts(len(catalogue), cfg.part_rows)
    folder = parts_folder(out)
    settings = extract._settings(cfg, catalogue, torch.device("cpu"))
    extract._create_parts_folder(folder, settings, extract._fingerprint(settings), len(catalogue), cfg.part_rows)
    # worker 1 of 2 is alive and holds its own shards: worker 0 computes the others and leaves them
    busy = ShardClaims(folder, [p for i, p in enumerate(planned) if i % 2 == 1], _array(1, 2))
    held = list(busy)
    assert held and claim_order(planned, _array(0, 2))[:2] == [planned[0], planned[2]]
    summary = extract_features(cfg, worker=_array(0, 2))
    assert summary["shards_missing"] == len(held) and summary["shards_computed"] == len(planned) - len(held)
    assert not out.exists()
    with pytest.raises(HuseError, match=rf"--merge-only: {len(held)} of {len(planned)} shards are missing "
                                        r"\(part-000000008-000000016.h5"):
        extract_features(cfg, merge_only=True)
    busy.close()  # worker 1 dies: its shards are free again
    summary = extract_features(cfg, worker=_array(1, 2))
    assert summary["shards_missing"] == 0 and summary["shards_reused"] == len(planned) - len(held)

    result = CliRunner().invoke(cli.main, ["extract-features", "--catalogue", str(csv_path), "--out", str(out),
                                           "--image-encoder", "stub", "--text-encoder", "stub", "--part-rows", "8",
                                           "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
                                           "--augment-views", "2", "--merge-only"])
    assert result.exit_code == 0, result.output
    assert_same_file(out, tmp_path / "ref.h5")
    with h5py.File(out) as f:  # the merge copies: nothing in the file refers to a shard
        datasets: list[h5py.Dataset] = []
        f.visititems(lambda n, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
        assert datasets and not any(d.is_virtual or d.external for d in datasets)
    assert not folder.exists()


def test_worker_options_through_the_cli(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    base = ["extract-features", "--catalogue", str(csv_path), "--out", str(tmp_path / "f.h5"), "--image-encoder",
            "stub", "--text-encoder", "stub", "--num-workers", "0", "--part-rows", "8"]
    result = CliRunner().invoke(cli.main, base + ["--device", "cpu", "--worker-index", "1", "--worker-count", "3"])
    assert result.exit_code == 0, result.output
    assert "worker 1 of 3: shards written" in result.output and '"shards_missing": 0' in result.output
    assert not (tmp_path / "f.h5").exists()
    bad = CliRunner().invoke(cli.main, base + ["--device", "cpu", "--worker-index", "3", "--worker-count", "3"])
    assert bad.exit_code == 1 and "--worker-index must be in 0..2" in bad.output
    bad = CliRunner().invoke(cli.main, base + ["--device", "cpu", "--worker-index", "0"])
    assert bad.exit_code == 1 and "go together" in bad.output
    bad = CliRunner().invoke(cli.main, base + ["--device", "cpu", "--worker-index", "0", "--worker-count", "1",
                                               "--merge-only"])
    assert bad.exit_code == 1 and "--merge-only merges" in bad.output
    gpu = CliRunner().invoke(cli.main, base + ["--device", "cuda:1"])  # accepted as an option (no GPU here)
    assert gpu.exit_code == 1 and "--device cuda:1 was asked for but no CUDA GPU is visible" in gpu.output
    assert CliRunner().invoke(cli.main, base + ["--device", "gpu"]).exit_code == 2
    assert CliRunner().invoke(cli.main, base + ["--device", "cpu", "--merge-only"]).exit_code == 0


def _finished_shards(cfg: ExtractConfig) -> Path:
    extract_features(cfg, worker=_array(0, 1))
    return parts_folder(cfg.out)


def test_the_merge_refuses_a_truncated_deleted_foreign_or_non_finite_shard(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    cfg = stub_config(csv_path, tmp_path / "f.h5")
    folder = _finished_shards(cfg)
    victim = folder / "part-000000008-000000016.h5"
    kept = tmp_path / "kept.h5"
    shutil.copyfile(victim, kept)
    name = rf"shard {victim} \(rows 8-15\)"

    victim.write_bytes(kept.read_bytes()[: victim.stat().st_size // 2])
    for merge_only in (True, False):
        with pytest.raises(HuseError, match=rf"{name} is unreadable \(truncated or damaged.*; delete it, then run the "
                                            "same `huse extract-features` command again"):
            extract_features(cfg, merge_only=merge_only)

    victim.unlink()
    frame = extract._read(cfg).frame
    planned = plan_parts(len(frame), 8)
    with pytest.raises(HuseError, match=rf"--merge-only: 1 of {len(planned)} shards are missing "
                                        r"\(part-000000008-000000016.h5\)"):
        extract_features(cfg, merge_only=True)
    shards = [merge.Shard(s, e, folder / f"part-{s:09d}-{e:09d}.h5") for s, e in planned]
    fingerprint = json.loads((folder / "manifest.json").read_text())["fingerprint"]
    with pytest.raises(merge.ShardError, match=rf"{name} is missing; run"):
        merge.survey_shards(shards, fingerprint, frame, "run")

    shutil.copyfile(kept, victim)
    with h5py.File(victim, "r+") as f:  # made with other settings
        attrs = json.loads(f.attrs["fingerprint"])
        f.attrs["fingerprint"] = json.dumps("0" * 64)
    for merge_only in (True, False):
        with pytest.raises(HuseError, match=rf"{name} was made with other settings \(settings fingerprint 000000000000…, "
                                            rf"this run's is {attrs[:12]}…\) and is never mixed in; delete it"):
            extract_features(cfg, merge_only=merge_only)

    shutil.copyfile(kept, victim)
    with h5py.File(victim, "r+") as f:
        f["image_emb"][3, 5] = np.nan
    with pytest.raises(HuseError, match=rf"{name} holds 1 non-finite image feature values; delete it"):
        extract_features(cfg, merge_only=True)
    assert not Path(cfg.out).exists() and not list(tmp_path.glob(".f.h5*.tmp"))  # nothing published

    shutil.copyfile(kept, victim)
    assert extract_features(cfg, merge_only=True)["items"] > 0 and not folder.exists()


def test_the_streaming_merge_writes_what_the_in_memory_merge_writes(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    # float32: the in-memory merge it replaced stored what the encoders computed
    cfg = stub_config(csv_path, tmp_path / "f.h5", augment_views=2, part_rows=5, dtype="float32")
    folder = _finished_shards(cfg)
    kept = tmp_path / "parts"
    shutil.copytree(folder, kept)
    extract_features(cfg, merge_only=True)
    attrs = features.read_attrs(cfg.out)
    attrs = {k: v for k, v in attrs.items() if k not in ("has_graph", "graph_incomplete", "has_views")}
    frame = extract._read(cfg).frame
    features.merge_parts(tmp_path / "memory.h5", sorted(kept.glob("part-*.h5")), frame, attrs)
    assert_same_file(cfg.out, tmp_path / "memory.h5")
    # and in blocks smaller than a shard
    shards = [merge.Shard(s, e, kept / f"part-{s:09d}-{e:09d}.h5") for s, e in plan_parts(len(frame), 5)]
    survey = merge.survey_shards(shards, attrs["settings_fingerprint"], frame, "run")
    merge.write_from_shards(tmp_path / "blocks.h5", survey, frame, attrs, block_rows=2)
    assert_same_file(tmp_path / "blocks.h5", tmp_path / "memory.h5")


# ----------------------------------------------------------------------------- one job per output


def test_a_second_job_on_the_same_out_is_refused_naming_the_first(tmp_path):
    """Before: a second run with other settings deleted the first's parts, and the first then
    replaced the second's file; with the same settings it left a folder that blocked every rerun."""
    csv_path = _slow_catalogue(tmp_path, n=64)
    out = tmp_path / "f.h5"
    args = ["extract-features", "--catalogue", str(csv_path), "--out", str(out), "--image-encoder", "stub",
            "--text-encoder", "stub", "--part-rows", "4", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
    first = subprocess.Popen([sys.executable, "-m", "huse_pipeline", *args], cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_parts(parts_folder(out), first)
        for extra in ([], ["--image-fit", "crop", "--overwrite"], ["--worker-index", "0", "--worker-count", "2"]):
            second = CliRunner().invoke(cli.main, args + extra)
            assert second.exit_code == 1, second.output
            assert f"another extraction is writing {out}: pid {first.pid} on host" in second.output, second.output
            assert "(one process)" in second.output and "Traceback" not in second.output
        assert any(parts_folder(out).glob("part-*.h5"))  # the first job's parts are intact
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert features.read_attrs(out)["extract_config"]["image_fit"] == "pad"
    assert not parts_folder(out).exists() and not list(tmp_path.glob(".f.h5*.lock"))


def test_array_workers_run_together_but_not_twice_nor_beside_another_job(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    cfg = stub_config(csv_path, tmp_path / "f.h5")
    other = JobLocks(Path(cfg.out), _array(0, 2))  # worker 0 of 2 is running (another process, as far as flock goes)
    other.acquire()
    try:
        with pytest.raises(HuseError, match=r"worker 0 of 2 of a job array is already running on .*f.h5: pid \d+ on host"):
            extract_features(cfg, worker=_array(0, 2))
        with pytest.raises(HuseError, match=r"job-array workers are writing .*f.h5: pid \d+ on host .*\(worker 0 of 2\)"):
            extract_features(cfg)  # one process would merge under running workers
        assert extract_features(cfg, worker=_array(1, 2))["shards_missing"] == 0  # its fellow worker runs
    finally:
        other.release()
    exclusive = FileLock(tmp_path / ".f.h5.lock")  # a one-process job holds the output
    assert exclusive.acquire(info=holder_info("one process"))
    try:
        with pytest.raises(HuseError, match=r"another extraction is writing .*: pid \d+ on host .*\(one process\)"):
            extract_features(cfg, worker=_array(1, 2))
    finally:
        exclusive.release()
    assert extract_features(cfg, merge_only=True)["items"] > 0
    assert not list(tmp_path.glob(".f.h5*.lock"))


def test_claims_of_a_dead_process_are_taken_over(tmp_path):
    """A claim is an flock: a crashed holder's claim (its file left behind) is free again."""
    folder = tmp_path / "parts"
    code = ("import sys; from pathlib import Path; from huse_pipeline.extract.distributed import ShardClaims, Worker; "
            f"c = ShardClaims(Path({str(folder)!r}), [(0, 4), (4, 8)], Worker()); next(iter(c)); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = ShardClaims(folder, [(0, 4), (4, 8)], Worker())
        assert list(mine) == [(4, 8)]  # (0, 4) is held
        mine.close()
    finally:
        holder.kill()
        holder.wait()
    assert (folder / ".claim-000000000-000000004").exists()  # left by kill -9
    claims = ShardClaims(folder, [(0, 4), (4, 8)], Worker())
    assert list(claims) == [(0, 4), (4, 8)]
    claims.close()


# ----------------------------------------------------------------------------------- dtype


def test_float16_storage_halves_the_features_and_reads_as_float32(stub_catalogue, tmp_path):
    csv_path, _ = stub_catalogue
    full = stub_config(csv_path, tmp_path / "f32.h5", augment_views=1)
    half = replace(full, out=str(tmp_path / "f16.h5"), dtype="float16")
    extract_features(full)
    extract_features(half)
    with h5py.File(full.out) as a, h5py.File(half.out) as b:
        for name in ("items/image_emb", "items/text_emb", "views/image_emb"):
            assert a[name].dtype == np.float32 and b[name].dtype == np.float16
            np.testing.assert_array_equal(b[name][()], a[name][()].astype(np.float16))
    fa, fb = features.read_features(full.out, views=True), features.read_features(half.out, views=True)
    assert fb.image_emb.dtype == fb.text_emb.dtype == np.float32  # readers upcast
    np.testing.assert_allclose(fb.image_emb, fa.image_emb, rtol=1e-3, atol=1e-4)
    for name in ("labels", "split", "row"):
        np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name))
    # float32 stays out of the settings (older files stay up to date); float16 is a setting of its own
    sa, sb = features.read_attrs(full.out)["settings"], features.read_attrs(half.out)["settings"]
    assert "dtype" not in sa["config"] and sb["config"]["dtype"] == "float16"
    assert extract_features(half)["up_to_date"] is True
    with pytest.raises(HuseError, match=r"different settings \(config.dtype differ\)"):
        extract_features(replace(half, out=full.out))


# ---------------------------------------------------------------------------------- planning


def test_each_process_takes_its_own_share_first_then_the_others_from_the_end():
    planned = plan_parts(70, 10)  # 7 shards
    assert claim_order(planned, Worker(rank=1, world=3)) == [(10, 20), (40, 50), (60, 70), (50, 60), (30, 40),
                                                             (20, 30), (0, 10)]
    # a job array of 2 workers, each a torchrun job of 2 ranks: 4 processes in all
    assert Worker(rank=1, world=2, array_index=1, array_count=2).index == 3
    assert claim_order(planned, Worker(rank=1, world=2, array_index=1, array_count=2))[:1] == [(30, 40)]
    assert sorted(claim_order(planned, Worker())) == planned


def test_dataloader_workers_default_to_the_cpus_per_local_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert Worker(local_world=8).default_num_workers() == 7  # 64 CPUs, 8 GPUs: 8 each, one for the rank itself
    assert Worker(local_world=1).default_num_workers() == 8  # at most 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert Worker(local_world=2).default_num_workers() == 1 and Worker().default_num_workers() == 2
