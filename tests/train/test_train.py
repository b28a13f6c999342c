"""Stage two on tiny synthetic class-structured feature files: learning, determinism, a real
interruption and resume, refusals with clear messages, non-finite losses, and `huse train`
through click's CliRunner."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cli
from huse_pipeline.errors import HuseError
from huse_pipeline.extract.graph import GraphConfig, build_graph
from huse_pipeline.store import features
from huse_pipeline.train import loop as train
from huse_pipeline.train.batches import ResidentSource
from huse_pipeline.train.config import PRESETS, TrainConfig, make_config
from huse_pipeline.train.loop import fit
from huse_pipeline.train.model import HuseModel, load_checkpoint, model_from_checkpoint
from huse_pipeline.train.run import resume_config

CLASSES = [f"{top}<{leaf}" for top in ("bags", "shoes", "tops") for leaf in ("blue", "red")]  # 6 classes, depth 2
SMALL = dict(embed_dim=16, hidden_dim=32, image_layers=2, text_layers=1, batch_size=64, epochs=6, lr=1e-2,
             zeta=0.75, device="cpu")  # tree graph: siblings at A = 0.5 < zeta, other classes at A = 1


def make_features(path, seed=0, n=300, graph=True, views=0, noise=1.0):
    """Items around per-class centres in a 24-d image space and a 12-d text space; 60/20/20 split."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    image = (2 * rng.normal(size=(len(CLASSES), 24))[labels] + noise * rng.normal(size=(n, 24))).astype(np.float32)
    text = (2 * rng.normal(size=(len(CLASSES), 12))[labels] + noise * rng.normal(size=(n, 12))).astype(np.float32)
    split = np.array(["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10))
    image_views = None
    if views:
        image_views = (image[:, None, :] + 0.3 * rng.normal(size=(n, views, 24))).astype(np.float32)
    features.write_synthetic(path, image, text, [CLASSES[i] for i in labels], split, image_views=image_views)
    if graph:
        build_graph(GraphConfig(features=str(path), method="tree"))
    return path


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("feats") / "feats.h5", views=2)


def small(**kw):
    return TrainConfig(**{**SMALL, **kw})


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ learning


def test_training_lowers_every_loss_part_and_beats_chance(feats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs = features.read_features(feats, views=True)
    model, history = fit(fs, small(epochs=12, gamma=0.5))
    first, last = history[0], history[-1]
    for part in ("train/loss", "train/class", "train/graph", "train/gap", "train/inst"):
        assert last[part] < first[part], part
    chance = 1 / len(CLASSES)
    for m in ("image", "text", "fused"):
        assert last[f"val/acc/{m}"] > 3 * chance, m
    assert not model.training
    assert list(tmp_path.iterdir()) == []  # run_dir None: nothing written


def test_history_keys_and_run_folder(feats, tmp_path):
    fs = features.read_features(feats, views=True)
    model, history = fit(fs, small(epochs=3), tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {"best.pt", "last.pt", "config.json", "metrics.jsonl", "curves.png"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history))
    needed = {"epoch", "step", "time_s", "train/loss", "train/class", "train/graph", "train/gap",
              "val/acc/image", "val/acc/text", "val/acc/fused"}
    assert all(needed <= set(r) for r in rows) and [r["epoch"] for r in rows] == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["train"] == dataclasses.asdict(small(epochs=3)) and config["model"]["image_dim"] == 24
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints: plain types (weights_only), rebuild the model, best = the best epoch by val/acc/mean
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    best_epoch = max(rows, key=lambda r: r["val/acc/mean"])["epoch"]  # first maximum, as strict > keeps it
    assert best["epoch"] == best_epoch and best["metrics"]["val/acc/mean"] == rows[best_epoch - 1]["val/acc/mean"]
    assert best["class_names"] == CLASSES and best["train_config"] == dataclasses.asdict(small(epochs=3))
    assert {"optimizer_state", "rng_state", "history"} <= set(last)
    rebuilt = model_from_checkpoint(best)
    x = torch.as_tensor(fs.image_emb[:5])
    torch.testing.assert_close(rebuilt.embed_image(x), model.embed_image(x), rtol=0, atol=0)


def test_separate_model_baselines_train_one_tower(feats):
    fs = features.read_features(feats)
    for modality in ("image", "text"):
        model, history = fit(fs, small(modality=modality, epochs=8))
        last = history[-1]
        assert f"val/acc/{modality}" in last and "val/acc/fused" not in last and "train/graph" not in last
        assert last[f"val/acc/{modality}"] > 3 / len(CLASSES)
        assert last["val/acc/mean"] == last[f"val/acc/{modality}"]
    # the untrained tower keeps its initial weights: same seed, same init
    init = fit(fs, small(epochs=1, lr=1e-30))[0]
    assert states_equal(model.image_tower.state_dict(), init.image_tower.state_dict())
    assert not states_equal(model.text_tower.state_dict(), init.text_tower.state_dict())


def test_steps_override_epochs_and_schedule_reaches_zero(feats):
    fs = features.read_features(feats)
    _, history = fit(fs, small(steps=5, epochs=99))  # 180 train items / 64 = 3 steps per epoch
    assert [r["step"] for r in history] == [3, 5]
    assert train._lr_factor(small(), 5, 5) == pytest.approx(0.0, abs=1e-12)
    assert train._lr_factor(small(schedule="constant"), 3, 5) == 1.0


def test_patience_stops_early(feats):
    fs = features.read_features(feats)
    _, history = fit(fs, small(lr=1e-30, patience=2, epochs=10))  # nothing moves, nothing improves
    assert len(history) == 3


def test_fresh_view_per_item_per_epoch():
    """image_batch picks view k-1 of the item's row for choice k > 0 and the deterministic view for 0."""
    n, k, di = 5, 3, 2
    image = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, di)  # item i -> (i, i)
    view_item = torch.tensor([1, 3, 4])  # items with augmented views
    view_emb = 100 * (view_item[:, None, None] + 1) + torch.arange(1, k + 1)[None, :, None].float().repeat(1, 1, di)
    view_row = torch.full((n,), -1)
    view_row[view_item] = torch.arange(len(view_item))
    data = ResidentSource(image, image, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.arange(n), None,
                          view_emb, view_row)
    idx = torch.tensor([0, 1, 3, 4, 3, 1])
    choice = torch.tensor([2, 0, 1, 3, 2, 2])
    got = data.image_batch(idx, choice)[:, 0].tolist()
    assert got == [0.0, 1.0, 100 * 4 + 1, 100 * 5 + 3, 100 * 4 + 2, 100 * 2 + 2]  # 100 * (item + 1) + k


# ------------------------------------------------------------------- determinism and resume


def test_same_seed_same_checkpoint_bit_for_bit(feats, tmp_path):
    fs = features.read_features(feats, views=True)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fit(fs, small(epochs=3, seed=seed), tmp_path / name)
    state = {n: load_checkpoint(tmp_path / n / "last.pt")["model_state"] for n in "abc"}
    assert states_equal(state["a"], state["b"])
    assert not states_equal(state["a"], state["c"])  # the comparison can fail


def fit_interrupted(monkeypatch, source, cfg, out, in_epoch: int) -> None:
    """`fit` interrupted by Ctrl-C at the second training step of epoch `in_epoch` (the loss of
    validation batches, which run under no_grad, is not counted)."""
    real_loss, calls = train._loss, {"n": 0}
    steps_per_epoch = math.ceil(len(source.indices("train")) / cfg.batch_size)

    def interrupted(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == (in_epoch - 1) * steps_per_epoch + 2:
                raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(source, cfg, out)
    monkeypatch.setattr(train, "_loss", real_loss)


def test_resume_after_interruption_matches_an_uninterrupted_run(feats, tmp_path, monkeypatch):
    fs = features.read_features(feats, views=True)
    cfg = small(epochs=6, patience=10)
    fit(fs, cfg, tmp_path / "straight")

    fit_interrupted(monkeypatch, fs, cfg, tmp_path / "cut", in_epoch=4)  # in the middle of epoch 4
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 3
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(HuseError, match="already holds a run"):
        fit(fs, cfg, tmp_path / "cut")  # without resume: refused, not overwritten
    _, history = fit(fs, cfg, tmp_path / "cut", resume=True)

    for name in ("last.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / run / name) for run in ("straight", "cut"))
        assert a["epoch"] == b["epoch"] and states_equal(a["model_state"], b["model_state"]), name
    rows = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("straight", "cut")}
    strip = [[{k: v for k, v in r.items() if k != "time_s"} for r in rows[run]] for run in ("straight", "cut")]
    assert strip[0] == strip[1] and len(history) == 6


def test_resume_refuses_other_features_and_changed_settings(feats, tmp_path):
    fs = features.read_features(feats, views=True)
    fit(fs, small(epochs=1), tmp_path / "run")
    other = features.read_features(make_features(tmp_path / "other.h5", seed=5))
    with pytest.raises(HuseError, match="different items or features"):
        fit(other, small(epochs=2), tmp_path / "run", resume=True)
    with pytest.raises(HuseError, match=r"cannot change lr"):
        fit(fs, small(epochs=2, lr=0.5), tmp_path / "run", resume=True)
    with pytest.raises(HuseError, match="no run to resume"):
        resume_config(tmp_path / "nothing")
    path, cfg = resume_config(tmp_path / "run", {"epochs": 2})
    assert path == str(feats.resolve()) and cfg == small(epochs=2)


# ------------------------------------------------------------------------------- refusals


def test_missing_graph_says_to_run_build_graph(tmp_path):
    path = make_features(tmp_path / "nograph.h5", graph=False)
    with pytest.raises(HuseError, match="huse build-graph"):
        fit(features.read_features(path), small())
    fit(features.read_features(path), small(epochs=1, modality="text"))  # the baseline needs no graph
    # beta 0 needs no graph either: the graph part is left out of the log (it was a bare AttributeError)
    _, history = fit(features.read_features(path), small(epochs=1, beta=0.0))
    assert "train/graph" not in history[0] and math.isfinite(history[0]["train/loss"])


def test_non_finite_features_are_refused(tmp_path):
    path = tmp_path / "nan.h5"
    make_features(path)
    fs = features.read_features(path)
    fs.image_emb[3, 2] = np.nan
    with pytest.raises(HuseError, match="non-finite image feature"):
        fit(fs, small())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(feats, tmp_path, monkeypatch):
    fs = features.read_features(feats)
    real_loss, calls = train.huse_loss, {"n": 0}

    def blows_up(*args, **kwargs):
        total, parts = real_loss(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > 7:  # epoch 3 (3 steps per epoch)
                parts = {**parts, "graph": parts["graph"] * torch.nan}
                total = total + parts["graph"]
        return total, parts

    monkeypatch.setattr(train, "huse_loss", blows_up)
    with pytest.raises(HuseError, match=r"non-finite loss .* epoch 3, step 8.*last good checkpoint"):
        fit(fs, small(epochs=5), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and all(torch.isfinite(v).all() for v in last["model_state"].values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_bad_config_values_are_clear_errors():
    with pytest.raises(HuseError, match="graph_pairs"):
        TrainConfig(graph_pairs="diagonal")
    with pytest.raises(HuseError, match="unknown preset"):
        make_config("fast")
    with pytest.raises(HuseError, match=r"zeta is a margin on cosine distances.*-0.1"):
        TrainConfig(zeta=-0.1)
    with pytest.raises(HuseError, match="finite"):
        TrainConfig(beta=float("nan"))  # nan passed the ">= 0" check
    paper = make_config("paper", batch_size=32)
    assert paper.optimizer == "rmsprop" and paper.lr == 1.6192e-5 and paper.batch_size == 32 and paper.preset == "paper"


# ------------------------------------------------------------------------------------- CLI


def test_cli_defaults_match_train_config():
    """--help shows the CLI's defaults: they must be TrainConfig's (preset-driven ones are None)."""
    defaults = TrainConfig()
    params = {p.name: p for p in cli.train_cmd.params}
    for field in dataclasses.fields(TrainConfig):
        if field.name == "preset":
            continue
        assert field.name in params, field.name
        if field.name in PRESETS["default"]:
            assert params[field.name].default is None, field.name
            assert PRESETS["default"][field.name] == getattr(defaults, field.name), field.name
        else:
            assert params[field.name].default == getattr(defaults, field.name), field.name


def test_cli_train_writes_the_run_folder_and_resumes(feats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["train", "--features", str(feats), "--epochs", "2", "--batch-size", "64", "--embed-dim", "16",
            "--hidden-dim", "32", "--image-layers", "1", "--text-layers", "1", "--zeta", "0.75", "--device", "cpu"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "cache" / "runs").iterdir())
    assert len(runs) == 1
    assert {p.name for p in runs[0].iterdir()} == {"best.pt", "last.pt", "config.json", "metrics.jsonl", "curves.png"}
    assert f"run: {runs[0].relative_to(tmp_path)}" in result.output and "best epoch" in result.output
    assert "acc/fused" in result.output
    # --resume with more epochs continues the same run; only the given options change
    result = runner.invoke(cli.main, ["train", "--resume", "--out", str(runs[0]), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert len((runs[0] / "metrics.jsonl").read_text().splitlines()) == 3
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["train"]["embed_dim"] == 16 and config["train"]["epochs"] == 3 and len(config["resumed"]) == 1
    result = runner.invoke(cli.main, ["train", "--resume", "--out", str(runs[0]), "--lr", "0.5"])
    assert result.exit_code == 1 and "cannot change lr" in result.output and "Traceback" not in result.output


def test_cli_train_clean_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["train", "--features", "missing.h5"])
    assert result.exit_code == 1 and "missing.h5 does not exist" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cache").exists()
    nograph = make_features(tmp_path / "nograph.h5", graph=False)
    result = runner.invoke(cli.main, ["train", "--features", str(nograph), "--device", "cpu"])
    assert result.exit_code == 1 and "huse build-graph" in result.output
    result = runner.invoke(cli.main, ["train", "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.output


def test_bf16_autocast_path_keeps_losses_float32(feats):
    """The CUDA path runs the towers under bf16 autocast; exercise the same code with CPU autocast."""
    fs = features.read_features(feats, views=True)
    cfg = small()
    data = ResidentSource.from_features(fs, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = HuseModel(cfg.model_config(24, 12, len(CLASSES)))
    idx = data.train_idx[:32]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert model.classify(model.embed_image(data.image[idx])).dtype == torch.bfloat16  # autocast really acts
    batch = data.batch(idx, torch.ones(32, dtype=torch.long))
    out = train._forward(model, batch, cfg, amp=True)
    assert all(v.dtype == torch.float32 for v in out.values())
    loss, parts = train._loss(out, batch.labels, data.class_dist, cfg)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and all(p.dtype == torch.float32 for p in parts.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.image_tower.parameters())
    metrics = train.validate(model, data, cfg, amp=True)
    assert 0 <= metrics["val/acc/fused"] <= 1


def test_a_run_saved_before_input_dropout_existed_keeps_training_without_it():
    """config.json / checkpoints written before --image-input-dropout lack the field; resuming or
    training their baselines must use the value they were trained with (0), not today's default."""
    from dataclasses import asdict

    old = asdict(make_config(seed=3))
    del old["image_input_dropout"]
    assert TrainConfig.from_saved(old).image_input_dropout == 0.0
    assert TrainConfig.from_saved(old).seed == 3
    assert make_config().image_input_dropout == 0.3  # today's default is unchanged
    new = asdict(make_config(image_input_dropout=0.2))
    assert TrainConfig.from_saved(new).image_input_dropout == 0.2  # a saved value always wins


def test_a_run_saved_before_input_dropout_existed_can_be_resumed(feats, tmp_path):
    """Its checkpoint's train_config lacks the field; --resume must read it as 0, not refuse with
    'cannot change image_input_dropout (None -> 0.0)'."""
    fs = features.read_features(feats, views=True)
    cfg = small(epochs=1, image_input_dropout=0.0)
    fit(fs, cfg, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(tmp_path / "run" / name, weights_only=False)
        del ckpt["train_config"]["image_input_dropout"]
        torch.save(ckpt, tmp_path / "run" / name)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    del config["train"]["image_input_dropout"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    _, resumed = resume_config(tmp_path / "run", {"epochs": 2})
    _, history = fit(fs, resumed, tmp_path / "run", resume=True)
    assert [h["epoch"] for h in history] == [1, 2]


def test_train_config_builds_on_the_tower_settings_once():
    """The tower fields are declared once (TowerSettings) and copied whole into ModelConfig; the saved
    layout stays flat; only image_input_dropout overrides its default (with its added-later marker)."""
    from huse_pipeline.train.model import ModelConfig, TowerSettings
    from huse_pipeline.utils import fields_added_later

    towers = [f.name for f in dataclasses.fields(TowerSettings)]
    assert {"embed_dim", "hidden_dim", "image_layers", "text_layers", "dropout", "image_input_dropout",
            "relu_before_norm"} == set(towers)
    own = TrainConfig.__dict__["__annotations__"]
    assert set(own) & set(towers) == {"image_input_dropout"}  # not repeated by hand
    assert fields_added_later(TrainConfig) == {"image_input_dropout": 0.0, "delta": 0.0}
    assert TrainConfig().image_input_dropout == 0.3  # training's default, chosen on val
    assert ModelConfig(image_dim=1, text_dim=1, num_classes=1).image_input_dropout == 0.0  # the model's: off
    # every tower field reaches the model, with the run's value
    changed = dict(embed_dim=24, hidden_dim=40, image_layers=3, text_layers=4, dropout=0.05, image_input_dropout=0.2,
                   relu_before_norm=True)
    assert set(changed) == set(towers) and all(getattr(TrainConfig(), k) != v for k, v in changed.items())
    mcfg = TrainConfig(**changed).model_config(24, 12, 6)
    assert dataclasses.asdict(mcfg) == {**changed, "image_dim": 24, "text_dim": 12, "num_classes": 6}
    # flat layout: one level, the same keys as a run saved before the restructuring
    saved = dataclasses.asdict(TrainConfig())
    assert all(not isinstance(v, dict) for v in saved.values())
    assert set(saved) == {
        "modality", "preset", "optimizer", "lr", "weight_decay", "momentum", "batch_size", "epochs", "steps",
        "schedule", "alpha", "beta", "gamma", "zeta", "margin_rule", "graph_pairs", "embed_dim", "hidden_dim",
        "image_layers", "text_layers", "dropout", "image_input_dropout", "relu_before_norm", "input_norm", "use_views",
        "select", "patience", "eval_every", "seed", "device", "amp",
        "data", "stream_buffer_mb", "stream_block_rows", "val_sample",  # issue 18: where the items live, val sample
        "delta", "instance_loss", "temperature", "instance_margin"}  # issue 21: the instance-level term
    assert TrainConfig.from_saved(saved) == TrainConfig()


# ------------------------------------------------------------------------ streaming (issue 18)


def test_streaming_and_resident_training_reach_the_same_accuracy(feats):
    """The two sources draw different orders, so their runs differ; both must learn equally well:
    the streamed run's val accuracy lies within the resident runs' spread over seeds (plus a little)."""
    ff = features.open_features(feats)
    cfg = small(epochs=10, stream_block_rows=16, stream_buffer_mb=1)
    resident = [fit(ff, dataclasses.replace(cfg, data="resident", seed=s))[1][-1]["val/acc/mean"] for s in (0, 1, 2)]
    stream = [fit(ff, dataclasses.replace(cfg, data="stream", seed=s))[1][-1]["val/acc/mean"] for s in (0, 1)]
    low, high = min(resident), max(resident)
    assert all(low - 0.05 <= a <= high + 0.05 for a in stream), (resident, stream)
    assert min(stream) > 3 / len(CLASSES)


def test_streaming_is_bit_reproducible_and_resumes_identically(feats, tmp_path, monkeypatch):
    ff = features.open_features(feats)
    cfg = small(epochs=4, patience=10, data="stream", stream_block_rows=16, stream_buffer_mb=1)
    fit(ff, cfg, tmp_path / "straight")
    fit(ff, cfg, tmp_path / "again")
    fit_interrupted(monkeypatch, ff, cfg, tmp_path / "cut", in_epoch=3)  # in the middle of epoch 3
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    fit(ff, cfg, tmp_path / "cut", resume=True)
    a, b, c = (load_checkpoint(tmp_path / r / "last.pt") for r in ("straight", "again", "cut"))
    assert a["data_mode"] == "stream" and a["epoch"] == c["epoch"] == 4
    assert states_equal(a["model_state"], b["model_state"]) and states_equal(a["model_state"], c["model_state"])
    rows = [[{k: v for k, v in json.loads(x).items() if k != "time_s"}
             for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("straight", "cut")]
    assert rows[0] == rows[1]
    fit(ff, dataclasses.replace(cfg, data="resident"), tmp_path / "res")
    resident = load_checkpoint(tmp_path / "res" / "last.pt")
    assert resident["data_mode"] == "resident" and not states_equal(a["model_state"], resident["model_state"])


def test_resume_with_auto_continues_in_the_mode_the_run_ran_in(feats, tmp_path, monkeypatch):
    ff = features.open_features(feats)
    cfg = small(epochs=2, stream_block_rows=16, stream_buffer_mb=1)
    fit(ff, dataclasses.replace(cfg, data="stream"), tmp_path / "run")
    made = []
    real = train.default_source
    monkeypatch.setattr(train, "default_source", lambda fs, c, d: made.append(c.data) or real(fs, c, d))
    fit(ff, dataclasses.replace(cfg, epochs=3), tmp_path / "run", resume=True, make_source=train.default_source)
    assert made == ["stream"]


def test_val_sample_validates_each_epoch_on_a_stratified_sample_and_the_best_on_all(feats, tmp_path, monkeypatch):
    ff = features.open_features(feats)
    seen = []
    real = train.validate

    def counting(model, source, cfg, amp=False, items=None):
        seen.append(None if items is None else list(items))
        return real(model, source, cfg, amp, items)

    monkeypatch.setattr(train, "validate", counting)
    _, history = fit(ff, small(epochs=3, val_sample=24), tmp_path / "run")
    val = ff.indices("val")
    assert len(seen) == 4 and seen[-1] is None  # 3 epochs on the sample, then the best on every val item
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 24 and set(seen[0]) <= set(val.tolist())
    counts = np.bincount(ff.labels[seen[0]], minlength=len(CLASSES))
    share = 24 * np.bincount(ff.labels[val], minlength=len(CLASSES)) / len(val)
    assert np.all(np.abs(counts - share) < 1)  # stratified by class
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["metrics"]["val/items"] == len(val) and "val/sample_metrics" in best["metrics"]
    row = history[best["epoch"] - 1]
    assert best["metrics"]["val/sample_metrics"]["val/acc/mean"] == row["val/acc/mean"]
    assert {"val/acc/image", "val/acc/text", "val/acc/fused", "val/acc/mean", "val/loss"} <= set(best["metrics"])
    # the default validates every val item every epoch, as before
    seen.clear()
    fit(ff, small(epochs=2))
    assert seen == [None, None]


def test_cli_train_streams_when_asked(feats, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--features", str(feats), "--epochs", "2", "--embed-dim", "16", "--hidden-dim", "32",
            "--image-layers", "1", "--text-layers", "1", "--zeta", "0.75", "--device", "cpu", "--data", "stream",
            "--stream-buffer-mb", "1", "--stream-block-rows", "32", "--val-sample", "30", "--out", "run"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["data"] == "stream" and config["train"]["val_sample"] == 30
    assert load_checkpoint(tmp_path / "run" / "last.pt")["data_mode"] == "stream"
    bad = CliRunner().invoke(cli.main, args[:-2] + ["--data", "disk"])
    assert bad.exit_code == 2 and "disk" in bad.output
