"""Catalogue reading: required columns, label parsing, the stratified split."""
from collections import Counter

import pandas as pd
import pytest

from huse_pipeline.data.catalogue import parse_label, read_catalogue, stratified_split
from huse_pipeline.errors import HuseError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("apparel<topwear<tshirts", ("apparel", "topwear", "tshirts")),
        ("kitchen<mugs", ("kitchen", "mugs")),
        ("mugs", ("mugs",)),
        ("  Apparel <  top   wear < T-shirts ", ("Apparel", "top wear", "T-shirts")),
        ("", None),
        ("   ", None),
        ("a<<b", None),
        ("<a", None),
        ("a<", None),
    ],
)
def test_parse_label(raw, expected):
    assert parse_label(raw) == expected


def test_parse_label_custom_separator():
    assert parse_label("a/b/c", "/") == ("a", "b", "c")
    assert parse_label("a<b", "/") == ("a<b",)


def _write(tmp_path, frame: pd.DataFrame):
    path = tmp_path / "cat.csv"
    frame.to_csv(path, index=False)
    return path


def test_missing_columns_are_named(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"image": ["a.jpg"], "title": ["x"]}))
    with pytest.raises(HuseError, match=r"text, label"):
        read_catalogue(path)


def test_missing_file_and_empty_csv(tmp_path):
    with pytest.raises(HuseError, match="does not exist"):
        read_catalogue(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(HuseError, match="cannot read"):
        read_catalogue(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("image,text,label\n")
    with pytest.raises(HuseError, match="no rows"):
        read_catalogue(header_only)


def test_trailing_commas_are_harmless_but_an_unquoted_comma_is_refused(tmp_path):
    path = tmp_path / "trailing.csv"
    path.write_text("image,text,label\na.jpg,Roadster Yellow Flip Flops,footwear<flip flops,\nb.jpg,Tee,a<t,\n")
    cat = read_catalogue(path)  # used to shift every column: the first one became the index
    assert list(cat.frame["image"]) == ["a.jpg", "b.jpg"]
    assert list(cat.frame["label"]) == ["footwear<flip flops", "a<t"]
    shifted = tmp_path / "shifted.csv"
    shifted.write_text('image,text,label\na.jpg,"Tee, red",a<t\nb.jpg,Shirt, blue,a<s\nc.jpg,Cap,b<c\n')
    with pytest.raises(HuseError, match=r"1 row\(s\) have more fields than the header's 3 \(CSV line 3\).*quoted"):
        read_catalogue(shifted)  # pandas' own error here: "Expected 3 fields in line 3, saw 4"
    shifted.write_text('image,text,label\nb.jpg,Shirt, blue,a<s\nc.jpg,Cap,b<c\n')
    with pytest.raises(HuseError, match=r"1 row\(s\) have more fields than the header's 3 \(CSV line 2\)"):
        read_catalogue(shifted)  # here pandas dropped the label silently ("blue" became the label)


def test_bad_split_values_fail_with_rows(tmp_path):
    frame = pd.DataFrame({"image": ["a", "b"], "text": ["x", "y"], "label": ["a<b", "a<c"], "split": ["train", "tset"]})
    with pytest.raises(HuseError, match=r"row 3: 'tset'"):
        read_catalogue(_write(tmp_path, frame))


def test_existing_split_is_kept_and_normalised(tmp_path):
    frame = pd.DataFrame({"image": ["a", "b"], "text": ["x", "y"], "label": ["a<b", "a<<c"], "split": [" Train", "TEST"]})
    cat = read_catalogue(_write(tmp_path, frame))
    assert cat.frame["split"].tolist() == ["train", "test"]
    assert cat.frame["class_name"].tolist() == ["a<b", None]
    assert cat.split_source == "catalogue"
    assert cat.image_root == tmp_path


def test_stratified_split_is_deterministic_and_stratified():
    names = ["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["d"] * 1 + [None]
    split = stratified_split(names, seed=0)
    assert split == stratified_split(names, seed=0)
    assert split != stratified_split(names, seed=1)
    per_class = {c: Counter(s for n, s in zip(names, split) if n == c) for c in "abcd"}
    assert per_class["a"] == {"train": 40, "val": 5, "test": 5}
    assert per_class["b"] == {"train": 16, "val": 2, "test": 2}
    assert per_class["c"] == {"train": 1, "val": 1, "test": 1}  # small classes still reach val and test
    assert per_class["d"] == {"train": 1}  # a single item stays in train
    assert split[-1] == "train"


def test_split_of_a_class_does_not_depend_on_other_classes():
    a_only = stratified_split(["a"] * 30, seed=3)
    mixed = stratified_split(["a"] * 30 + ["b"] * 30, seed=3)
    assert mixed[:30] == a_only


def test_generated_split_recorded(tmp_path):
    frame = pd.DataFrame({"image": [f"{i}.jpg" for i in range(20)], "text": ["t"] * 20, "label": ["x<y"] * 20})
    cat = read_catalogue(_write(tmp_path, frame), split_seed=7)
    assert cat.split_source.startswith("stratified(seed=7")
    assert Counter(cat.frame["split"]) == {"train": 16, "val": 2, "test": 2}


def test_rows_refused_before_any_file_is_read(tmp_path):
    """A NUL byte, an over-long label, a malformed label and an image outside the root each give a
    reason (and no class) when the catalogue is read; the strings HDF5 cannot hold are made safe."""
    from huse_pipeline.data.catalogue import OUTSIDE_ROOT

    frame = pd.DataFrame({"image": ["a.png", "b\0.png", "c.png", "d.png", "../e.png", "f.png"],
                          "text": ["ok", "x", "y\0z", "w", "v", "u"],
                          "label": ["a<b", "a<b", "a<b", "a<<b", "a<b", "l" * 1001]})
    cat = read_catalogue(_write(tmp_path, frame))
    assert cat.frame["reason"].tolist() == ["", "NUL byte in image path", "NUL byte in text", "malformed label",
                                            OUTSIDE_ROOT, "label too long (1,001 characters > 1,000)"]
    assert cat.frame["class_name"].tolist() == ["a<b", None, None, None, None, None]
    assert cat.frame["image"].iat[1] == "b\ufffd.png" and cat.frame["text"].iat[2] == "y\ufffdz"


def test_resolve_image_follows_symlinks_and_dotdot(tmp_path):
    import os

    from huse_pipeline.data.catalogue import OUTSIDE_ROOT, resolve_image

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    os.symlink(tmp_path, root / "up")
    assert resolve_image(root, "sub/../a.jpg") == (str(root / "sub/../a.jpg"), "")  # stays inside
    assert resolve_image(root, "sub/../../a.jpg") == (None, OUTSIDE_ROOT)
    assert resolve_image(root, "up/a.jpg") == (None, OUTSIDE_ROOT)
    assert resolve_image(root, str(root / "sub" / "a.jpg"))[1] == ""
    assert resolve_image(root, "/etc/passwd") == (None, OUTSIDE_ROOT)
    assert resolve_image(root, "/etc/passwd", allow_outside_root=True) == ("/etc/passwd", "")
    assert resolve_image(root / "up", "root/a.jpg")[1] == ""  # a root that is itself a symlink


def test_grouped_split_equals_the_row_wise_split_without_duplicates():
    names = ["a"] * 37 + ["b"] * 9 + [None] + ["c"] * 3
    for seed in range(5):
        assert stratified_split(names, seed, groups=list(range(len(names)))) == stratified_split(names, seed)


def test_duplicates_of_the_same_file_however_spelled(tmp_path):
    frame = pd.DataFrame({"image": ["a.jpg", "./a.jpg", "sub/../a.jpg", "a.jpg", "b.jpg"],
                          "text": ["Red <b>shirt</b>", "Red shirt", " Red  shirt", "Blue shirt", "Red shirt"],
                          "label": ["x<y"] * 5})
    cat = read_catalogue(_write(tmp_path, frame))
    assert cat.duplicates["groups"] == 1 and cat.duplicates["rows"] == 3 and cat.duplicates["across_splits"] == 0
    assert len(set(cat.frame["split"][:3])) == 1


def test_csv_records_read_nul_bytes_and_long_fields(tmp_path):
    from huse_pipeline.data.catalogue import csv_records

    path = tmp_path / "c.csv"
    path.write_text('image,text,label\na\0.jpg,"' + "x" * 200_000 + '",a<b\n', encoding="utf-8")
    records = list(csv_records(path))
    assert [line for line, _ in records] == [1, 2] and len(records[1][1][1]) == 200_000
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is restored
