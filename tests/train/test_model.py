"""The HUSE model (paper §3.2) and the checkpoint contract."""
import pytest
import torch

from huse_pipeline.errors import HuseError
from huse_pipeline.train.model import (
    HuseModel,
    ModelConfig,
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def _model(**kw):
    torch.manual_seed(0)
    return HuseModel(ModelConfig(image_dim=12, text_dim=7, num_classes=5, embed_dim=8, hidden_dim=16, **kw))


def test_architecture_matches_the_paper():
    model = _model()
    image_linear = [m for m in model.image_tower.hidden if isinstance(m, torch.nn.Linear)]
    text_linear = [m for m in model.text_tower.hidden if isinstance(m, torch.nn.Linear)]
    assert len(image_linear) == 5 and len(text_linear) == 2
    dropouts = [m.p for m in model.image_tower.hidden if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.15] * 5
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.in_features == 8


def test_outputs_are_unit_norm_and_classifier_is_shared():
    model = _model().eval()
    out = model(torch.randn(4, 12), torch.randn(4, 7))
    torch.testing.assert_close(out["image_emb"].norm(dim=1), torch.ones(4))
    torch.testing.assert_close(out["text_emb"].norm(dim=1), torch.ones(4))
    # one shared linear layer, applied separately to each modality's embedding
    torch.testing.assert_close(out["image_logits"], model.classifier(out["image_emb"]))
    torch.testing.assert_close(out["text_logits"], model.classifier(out["text_emb"]))
    assert (out["image_emb"] < 0).any()  # no ReLU before the norm by default: the whole sphere is used


def test_image_input_dropout_drops_standardised_inputs_in_training_only():
    model = _model(image_input_dropout=0.5)
    plain = _model()
    assert model.image_tower.input_dropout.p == 0.5 and plain.image_tower.input_dropout.p == 0.0
    assert model.text_tower.input_dropout.p == 0.0  # the text tower is untouched
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their layout
    x = torch.randn(64, 12) * 3 + 1
    model.image_tower.set_input_stats(torch.ones(12), torch.full((12,), 3.0))
    standardised = (x - 1) / 3
    seen = []
    model.image_tower.hidden.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.train()
    model.image_tower(x)
    dropped = seen[-1] == 0
    # every input is either dropped or standardised and scaled by 1 / (1 - p); about half are dropped
    torch.testing.assert_close(seen[-1][~dropped], standardised[~dropped] / 0.5)
    assert 0.4 < dropped.float().mean().item() < 0.6
    model.eval()  # at evaluation time nothing is dropped
    model.image_tower(x)
    torch.testing.assert_close(seen[-1], standardised)


def test_relu_before_norm_option_confines_to_positive_orthant():
    model = _model(relu_before_norm=True).eval()
    assert (model(torch.randn(16, 12), torch.randn(16, 7))["image_emb"] >= 0).all()


def test_input_standardisation_is_part_of_the_model():
    model = _model().eval()
    x = torch.randn(3, 12) * 5 + 2
    before = model.embed_image(x)
    model.image_tower.set_input_stats(torch.full((12,), 2.0), torch.full((12,), 5.0))
    after = model.embed_image(x)
    torch.testing.assert_close(after, _model().eval().embed_image((x - 2) / 5))
    assert not torch.allclose(before, after)


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = _model().eval()
    model.image_tower.set_input_stats(torch.ones(12), torch.full((12,), 2.0))
    meta = {"image_encoder": "e", "image_dim": 12, "text_encoder": "t", "text_dim": 7}
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, list("abcde"), meta, epoch=3, rng_state=torch.get_rng_state(), metrics={"acc": 0.5})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["epoch"] == 3
    ckpt = load_checkpoint(path)
    rebuilt = model_from_checkpoint(ckpt)
    x, y = torch.randn(2, 12), torch.randn(2, 7)
    torch.testing.assert_close(rebuilt(x, y)["image_logits"], model(x, y)["image_logits"])
    check_compatible(ckpt, meta, list("abcde"), "f.h5")
    with pytest.raises(HuseError, match=r"text_encoder: checkpoint 't' vs features 'u'"):
        check_compatible(ckpt, {**meta, "text_encoder": "u"}, list("abcde"), "f.h5")
    with pytest.raises(HuseError, match="only in the features"):
        check_compatible(ckpt, meta, list("abcdf"), "f.h5")
    with pytest.raises(HuseError, match="different order"):
        check_compatible(ckpt, meta, list("edcba"), "f.h5")


def test_checkpoint_from_before_input_dropout_still_loads(tmp_path):
    """A checkpoint's model_config saved before image_input_dropout existed (that key absent, the old
    key order) rebuilds the model through ModelConfig(**model_config), with no input dropout."""
    model = _model().eval()
    meta = {"image_encoder": "e", "image_dim": 12, "text_encoder": "t", "text_dim": 7}
    save_checkpoint(tmp_path / "c.pt", model, list("abcde"), meta)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    old = {k: ckpt["model_config"][k] for k in ("image_dim", "text_dim", "num_classes", "embed_dim", "hidden_dim",
                                                "image_layers", "text_layers", "dropout", "relu_before_norm")}
    assert set(ckpt["model_config"]) == set(old) | {"image_input_dropout"}
    rebuilt = model_from_checkpoint({**ckpt, "model_config": old})
    assert rebuilt.cfg == model.cfg and rebuilt.image_tower.input_dropout.p == 0.0
    x, y = torch.randn(2, 12), torch.randn(2, 7)
    torch.testing.assert_close(rebuilt(x, y)["image_logits"], model(x, y)["image_logits"], rtol=0, atol=0)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(HuseError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(HuseError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(HuseError, match="not a huse checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("kw", [dict(), dict(image_layers=0, text_layers=3), dict(image_layers=1, relu_before_norm=True)])
def test_expected_state_shapes_are_the_models(kw):
    from huse_pipeline.train.model import expected_state_shapes

    model = _model(**kw)
    assert expected_state_shapes(model.cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_checkpoint_checks_name_the_file(tmp_path):
    model = _model()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, list("abcde"), {}, epoch=1)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_state"]["text_tower.projection.weight"] = torch.zeros(8, 3)
    torch.save(ckpt, path)
    with pytest.raises(HuseError, match=r"checkpoint .*c\.pt does not match its model_config: wrong shapes: "
                                        r"text_tower\.projection\.weight \(8, 3\) \(expected \(8, 16\)\)"):
        load_checkpoint(path)
    save_checkpoint(path, model, list("abcde"), {}, epoch=1)
    with pytest.raises(HuseError, match="lacks train_config"):
        load_checkpoint(path, resumable=True)  # a best.pt-like file cannot be resumed from
