"""Image decoding, mode conversion, fits and augmentation (huse_pipeline.images), on tiny files built here."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from huse_pipeline.data.images import (
    BadImage,
    CatalogueImages,
    ImageTransform,
    collate_images,
    fit_image,
    load_rgb,
    to_rgb,
    view_seed,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int64)  # (H, W, 3)


def _two_halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    """A w x h image whose left half is `left` and right half `right`."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels but holds almost no data (a decompression-bomb look-alike)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------- unusable files


def test_unusable_files_give_stable_reasons(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    png = tmp_path / "good.png"
    _two_halves(64, 64).save(png)
    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[:80])
    (tmp_path / "folder.jpg").mkdir()
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)

    expected = {
        "missing.jpg": "missing file",
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated image",
        "truncated.png": "truncated image",
        "text.jpg": "not an image",
        "folder.jpg": "not a file",
        "bomb.png": "image too large (30000 x 30000 > 64000000 pixels)",
    }
    for name, reason in expected.items():
        with pytest.raises(BadImage) as info:
            load_rgb(tmp_path / name)
        assert info.value.reason == reason, name
    assert load_rgb(good).size == (160, 120)
    # paths the OS refuses outright (a text put in the image column, say) are bad rows, not a crash
    with pytest.raises(BadImage, match=r"unusable path \(File name too long\)"):
        load_rgb(tmp_path / ("x" * 300 + ".jpg"))
    with pytest.raises(BadImage):  # "missing file" or "unusable path", by Python version
        load_rgb(str(tmp_path / "nul\0byte.jpg"))


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "a.png"
    _two_halves(100, 50).save(path)
    with pytest.raises(BadImage, match=r"image too large \(100 x 50 > 4999 pixels\)"):
        load_rgb(path, max_pixels=4999)
    assert load_rgb(path, max_pixels=5000).size == (100, 50)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "large.jpg"
    _two_halves(3000, 2000).save(path, quality=90)
    im = load_rgb(path, min_side=256)
    assert im.size == (750, 500)  # DCT scaling 1/4: the smallest scale keeping both sides >= 256
    px = _rgb(im)
    assert np.abs(px[250, 100] - RED).max() < 10 and np.abs(px[250, 650] - BLUE).max() < 10
    assert load_rgb(path).size == (3000, 2000)  # without min_side: full resolution


# ------------------------------------------------------------------------------- conversions


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(np.tile(ramp, (8, 1))).save(path)
    assert Image.open(path).mode == "I;16"
    px = _rgb(load_rgb(path))
    row = px[0, :, 0]
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # grey
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and np.abs(row - np.rint(ramp / 257)).max() <= 1  # a gradient, v / 257
    assert (row == 255).mean() < 0.01  # a clipping conversion makes nearly everything white


def test_thirty_two_bit_integer_greyscale(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.int32)
    path = tmp_path / "i32.tif"
    Image.fromarray(np.tile(ramp, (4, 1))).save(path)
    assert Image.open(path).mode == "I"
    row = _rgb(load_rgb(path))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((4, 6, 4), np.uint8)
    arr[:, :2] = (0, 0, 255, 0)  # fully transparent (its colour must not show)
    arr[:, 2:4] = (255, 0, 0, 255)  # opaque red
    arr[:, 4:] = (255, 0, 0, 128)  # half-transparent red over white -> light red
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    px = _rgb(load_rgb(path))
    assert (px[:, :2] == WHITE).all()
    assert (px[:, 2:4] == RED).all()
    assert np.abs(px[:, 4:] - (255, 127, 127)).max() <= 1


def test_la_and_pa_are_composited_on_white(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[0] = (0, 0)  # transparent black -> white
    la[1] = (0, 255)  # opaque black
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    px = _rgb(load_rgb(path))
    assert (px[0] == WHITE).all() and (px[1] == 0).all()

    p = Image.new("P", (2, 2))
    p.putpalette([0, 0, 255] + [0] * 765)  # every pixel blue
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(np.array([[0, 0], [255, 255]], np.uint8)))
    px = _rgb(to_rgb(pa))
    assert (px[0] == WHITE).all() and (px[1] == BLUE).all()


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    palette = [255, 0, 0, 0, 0, 255] + [0] * 762  # 0 red, 1 blue
    opaque = Image.fromarray(idx, "P")
    opaque.putpalette(palette)
    opaque.save(tmp_path / "p.png")
    px = _rgb(load_rgb(tmp_path / "p.png"))
    assert (px[0, 0] == RED).all() and (px[0, 1] == BLUE).all()

    opaque.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    assert Image.open(tmp_path / "pt.png").info.get("transparency") == 0
    px = _rgb(load_rgb(tmp_path / "pt.png"))
    assert (px[0, 0] == WHITE).all() and (px[1, 1] == WHITE).all() and (px[0, 1] == BLUE).all()

    gif = tmp_path / "t.gif"
    opaque.save(gif, transparency=1)
    px = _rgb(load_rgb(gif))
    assert (px[0, 1] == WHITE).all() and (px[0, 0] == RED).all()


@pytest.mark.parametrize("suffix", ["jpg", "tif"])
def test_cmyk_colours(tmp_path, suffix):
    cmyk = np.zeros((16, 48, 4), np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:32] = (255, 255, 0, 0)  # blue
    cmyk[:, 32:] = (0, 0, 0, 0)  # white (no ink)
    path = tmp_path / f"cmyk.{suffix}"
    Image.fromarray(cmyk, "CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    px = _rgb(load_rgb(path))
    tol = 40 if suffix == "jpg" else 0
    assert np.abs(px[8, 4] - RED).max() <= tol
    assert np.abs(px[8, 24] - BLUE).max() <= tol
    assert np.abs(px[8, 44] - WHITE).max() <= tol


def test_greyscale_and_bilevel(tmp_path):
    Image.fromarray(np.array([[0, 128, 255]], np.uint8), "L").save(tmp_path / "l.png")
    px = _rgb(load_rgb(tmp_path / "l.png"))
    assert px.shape == (1, 3, 3) and (px[0, :, 0] == [0, 128, 255]).all() and (px[..., 0] == px[..., 2]).all()
    Image.fromarray(np.array([[False, True]])).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    px = _rgb(load_rgb(tmp_path / "b.png"))
    assert (px[0, 0] == 0).all() and (px[0, 1] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    im = _two_halves(40, 20)  # wide: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)  # now tall
    px = _rgb(out)
    assert np.abs(px[5, 10] - RED).max() < 30  # the left side turned to the top
    assert np.abs(px[35, 10] - BLUE).max() < 30


# ------------------------------------------------------------------------------------- fits


def test_pad_keeps_the_whole_image_on_white():
    im = Image.new("RGB", (200, 100), RED)
    px = _rgb(fit_image(im, 64, "pad"))
    assert px.shape == (64, 64, 3)
    assert (px[:15] == WHITE).all() and (px[-15:] == WHITE).all()  # 64 * 100/200 = 32 rows of image
    assert (np.abs(px[17:47] - RED).max()) <= 2
    tall = _rgb(fit_image(Image.new("RGB", (50, 100), BLUE), 64, "pad"))
    assert (tall[:, :15] == WHITE).all() and np.abs(tall[:, 17:47] - BLUE).max() <= 2


def test_crop_takes_the_centre():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100] = BLUE
    arr[:, 100:200] = RED  # the centre square
    arr[:, 200:] = BLUE
    px = _rgb(fit_image(Image.fromarray(arr), 64, "crop"))
    assert px.shape == (64, 64, 3)
    # shorter side -> round(64 / 0.875) = 73, centre 64 of it: all from the red centre square
    assert np.abs(px[:, 2:-2] - RED).max() <= 2


def test_crop_resizes_only_the_cropped_region():
    """Same pixels as resizing the whole image and cropping (to rounding), without allocating the
    whole image at the new scale: a 4 x 8000 strip would have become 256 x 512,000 (1.2 GB peak)."""
    from huse_pipeline.data.images import RESAMPLE

    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((400, 300), Image.BICUBIC)
    short = round(64 / 0.875)
    whole = photo.resize((round(400 * short / 300), short), RESAMPLE)
    left = (whole.width - 64) // 2
    reference = _rgb(whole.crop((left, (short - 64) // 2, left + 64, (short - 64) // 2 + 64)))
    assert np.abs(_rgb(fit_image(photo, 64, "crop")) - reference).max() <= 3
    strip = fit_image(Image.new("RGB", (4, 8000), RED), 224, "crop")
    assert strip.size == (224, 224) and np.abs(_rgb(strip) - RED).max() <= 2


def test_squash_keeps_everything_and_loses_the_aspect():
    px = _rgb(fit_image(_two_halves(200, 100), 64, "squash"))
    assert px.shape == (64, 64, 3)
    assert np.abs(px[:, :30] - RED).max() <= 2 and np.abs(px[:, 34:] - BLUE).max() <= 2


def test_transform_gives_uint8_square(tmp_path):
    path = tmp_path / "a.png"
    _two_halves(90, 30).save(path)
    for fit in ("pad", "crop", "squash"):
        x = ImageTransform(size=32, fit=fit)(path)
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    with pytest.raises(ValueError, match="unknown image fit"):
        ImageTransform(size=32, fit="stretch")


# ----------------------------------------------------------------------------- augmentation


def _photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))


def test_augmented_views_depend_only_on_seed_row_and_view():
    t = ImageTransform(size=32, seed=7)
    im = _photo()
    a = t.views(im, row=5, n_views=3)
    torch.manual_seed(123)  # the global RNG state must not matter ...
    torch.rand(10)
    b = t.views(im, row=5, n_views=3)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert torch.equal(t.views(im, row=5, n_views=2), a[:2])  # view v does not depend on how many are made
    assert not torch.equal(a[0], a[1])  # different views differ
    assert not torch.equal(t.views(im, row=6, n_views=1)[0], a[0])  # different rows differ
    assert not torch.equal(ImageTransform(size=32, seed=8).views(im, row=5, n_views=1)[0], a[0])


def test_augmentation_leaves_the_global_rng_alone():
    t = ImageTransform(size=32)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    t.views(_photo(), row=0, n_views=2)
    assert torch.equal(torch.rand(3), expected)


def test_view_seed_is_a_pure_function():
    assert view_seed(0, 1, 2) == view_seed(0, 1, 2)
    assert len({view_seed(0, 1, 2), view_seed(0, 2, 1), view_seed(1, 1, 2), view_seed(0, 1, 3)}) == 4
    assert 0 <= view_seed(3, 4, 5) < 2**63


def test_dataset_reports_bad_images_instead_of_raising(tmp_path):
    good = tmp_path / "good.png"
    _two_halves(40, 40).save(good)
    ds = CatalogueImages([str(good), str(tmp_path / "nope.png"), None], [2, 2, 0], ImageTransform(size=16))
    batch = collate_images([ds[0], ds[1], ds[2]])
    assert batch["reasons"] == ["", "missing file", "not decoded"]
    assert batch["images"].shape == (3, 3, 16, 16) and batch["views"].shape == (2, 3, 16, 16)
    assert batch["view_counts"].tolist() == [2, 0, 0] and batch["rows"].tolist() == [0, 1, 2]
    assert batch["images"][1].sum() == 0
