"""Task formats, datasets and loaders on tiny folders built under tmp_path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vpeft_viz.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    class_counts,
    make_loader,
    resolve_normalization,
)
from vpeft_viz.data.formats import (
    DataError,
    Sample,
    detect_format,
    read_fgvc,
    read_imagefolder,
    read_task,
    read_vtab,
)


def png(path: Path, color: tuple[int, int, int] = (10, 20, 30), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_vtab(root: Path, labels: dict[str, list[int]] | None = None) -> Path:
    """A VTAB-1k task folder; train800val200 = train800 + val200 as in the release."""
    labels = labels or {"train800": [0, 1, 2, 0, 1, 2], "val200": [0, 1], "test": [2, 1, 0]}
    lines: dict[str, list[str]] = {}
    for split, split_labels in labels.items():
        lines[split] = []
        for i, label in enumerate(split_labels):
            rel = f"images/{split}/{i}.png"
            png(root / rel, color=(label * 40, 0, 0))
            lines[split].append(f"{rel} {label}")
    write_lines(root / "train800.txt", lines["train800"])
    write_lines(root / "val200.txt", lines["val200"])
    write_lines(root / "train800val200.txt", lines["train800"] + lines["val200"])
    write_lines(root / "test.txt", lines["test"])
    return root


def make_fgvc(root: Path, ids: dict[str, list[int]], image_dir: str = "images") -> Path:
    for split, split_ids in ids.items():
        mapping = {}
        for i, cid in enumerate(split_ids):
            rel = f"{cid:03d}.cls/{split}_{i}.jpg"
            png(root / image_dir / rel)
            mapping[rel] = cid
        (root / f"{split}.json").write_text(json.dumps(mapping, indent=1), encoding="utf-8")
    return root


def make_imagefolder(root: Path, sizes: dict[str, int]) -> Path:
    for cls, n in sizes.items():
        for i in range(n):
            png(root / cls / f"{i}.png", color=(i, 0, 0))
    return root


# ---------------------------------------------------------------- VTAB-1k


def test_read_vtab_splits_labels_and_classes(tmp_path: Path) -> None:
    task = read_vtab(make_vtab(tmp_path / "mytask"))
    assert task.format == "vtab" and task.name == "mytask"
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 6, "val": 2, "test": 3}
    assert [s.label for s in task.splits["train"]] == [0, 1, 2, 0, 1, 2]
    assert [s.label for s in task.splits["test"]] == [2, 1, 0]
    assert task.num_classes == 3
    first = task.splits["train"][0]
    assert first.path.is_absolute() and first.path == (tmp_path / "mytask/images/train800/0.png")
    assert task.describe() == {
        "name": "mytask",
        "format": "vtab",
        "root": str(tmp_path / "mytask"),
        "num_classes": 3,
        "split_sizes": {"train": 6, "val": 2, "test": 3},
        "notes": [],
    }
    json.dumps(task.describe())


def test_read_vtab_trainval_uses_the_1000_image_file(tmp_path: Path) -> None:
    task = read_vtab(make_vtab(tmp_path / "t"), trainval=True)
    assert len(task.splits["train"]) == 8
    assert len(task.splits["val"]) == 2
    assert "not held out" in task.notes[0]


def test_read_vtab_paths_with_spaces_and_blank_lines(tmp_path: Path) -> None:
    root = make_vtab(tmp_path / "t")
    png(root / "my images" / "a b.png")
    write_lines(root / "test.txt", ["", "my images/a b.png   1", "   ", "images/test/0.png\t2", ""])
    task = read_vtab(root)
    assert [(s.path.name, s.label) for s in task.splits["test"]] == [("a b.png", 1), ("0.png", 2)]


def test_read_vtab_class_count_from_val_when_train_misses_a_class(tmp_path: Path) -> None:
    root = make_vtab(tmp_path / "t", {"train800": [0, 1], "val200": [3], "test": [3, 2]})
    assert read_vtab(root).num_classes == 4


@pytest.mark.parametrize(("folder", "expected"), [("cifar", 100), ("cifar100", 100), ("dtd", 47)])
def test_read_vtab_known_task_names_give_the_full_class_count(
    tmp_path: Path, folder: str, expected: int
) -> None:
    assert read_vtab(make_vtab(tmp_path / folder)).num_classes == expected


def test_read_vtab_missing_split_file_names_it_and_lists_the_folder(tmp_path: Path) -> None:
    root = make_vtab(tmp_path / "t")
    (root / "val200.txt").unlink()
    with pytest.raises(DataError) as err:
        read_vtab(root)
    message = str(err.value)
    assert "missing split file(s) val200.txt" in message
    assert "train800.txt" in message.split("the folder has:")[1]
    assert "1 sub-folder" in message and "images" not in message  # names no other entry


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("justonefield", "malformed line 'justonefield'"),
        ("images/test/0.png two", "label 'two' is not an integer"),
        ("images/test/0.png 1.5", "label '1.5' is not an integer"),
        ("images/test/0.png -1", "negative label -1"),
        ("images/test/0.png 3", "label 3 is out of range for 3 classes"),
        ("images/test/nope.png 0", "nope.png listed in test.txt does not exist"),
    ],
)
def test_read_vtab_bad_line_names_file_and_line(
    tmp_path: Path, bad_line: str, expected: str
) -> None:
    root = make_vtab(tmp_path / "t")
    write_lines(root / "test.txt", ["images/test/0.png 2", "", bad_line])
    with pytest.raises(DataError) as err:
        read_vtab(root)
    message = str(err.value)
    assert f"{root / 'test.txt'}, line 3" in message
    assert expected in message


def test_read_vtab_out_of_range_uses_known_count(tmp_path: Path) -> None:
    root = make_vtab(tmp_path / "eurosat")
    png(root / "x.png")
    write_lines(root / "test.txt", ["x.png 10"])
    with pytest.raises(DataError, match=r"test\.txt, line 1: label 10 .* 'eurosat' has 10 classes"):
        read_vtab(root)


def test_read_vtab_empty_split_file(tmp_path: Path) -> None:
    root = make_vtab(tmp_path / "t")
    (root / "val200.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"val200\.txt: split file is empty"):
        read_vtab(root)


# ---------------------------------------------------------------- FGVC


def test_read_fgvc_images_subfolder_and_zero_based_ids(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "CUB", {"train": [0, 1, 2, 2], "val": [1], "test": [0, 2]})
    task = read_fgvc(root)
    assert task.format == "fgvc"
    assert task.num_classes == 3
    assert task.class_names is None
    assert [s.label for s in task.splits["train"]] == [0, 1, 2, 2]
    assert task.splits["test"][1].path == root / "images" / "002.cls" / "test_1.jpg"


def test_read_fgvc_images_at_root_and_one_based_ids_are_remapped(tmp_path: Path) -> None:
    root = make_fgvc(
        tmp_path / "cars", {"train": [1, 2, 3], "val": [3], "test": [2]}, image_dir="."
    )
    task = read_fgvc(root)
    assert task.num_classes == 3
    assert task.class_names == ["1", "2", "3"]
    assert [s.label for s in task.splits["train"]] == [0, 1, 2]
    assert [s.label for s in task.splits["test"]] == [1]
    assert task.splits["test"][0].path == root / "002.cls" / "test_0.jpg"


def test_read_fgvc_missing_json(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0], "val": [0], "test": [0]})
    (root / "test.json").unlink()
    with pytest.raises(DataError, match=r"missing split file\(s\) test\.json.*train\.json"):
        read_fgvc(root)


def test_read_fgvc_bad_json_gives_line(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0], "val": [0], "test": [0]})
    (root / "val.json").write_text('{\n  "a.jpg": 0,\n  "b.jpg" 1\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"val\.json, line 3: not valid JSON"):
        read_fgvc(root)


def test_read_fgvc_non_integer_label_names_file_and_line(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0, 1], "val": [0], "test": [0]})
    mapping = json.loads((root / "train.json").read_text())
    second = list(mapping)[1]
    mapping[second] = "1"
    (root / "train.json").write_text(json.dumps(mapping, indent=1), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_fgvc(root)
    assert f"{root / 'train.json'}, line 3: label '1' of '{second}' is not an integer" in str(
        err.value
    )


def test_read_fgvc_missing_image_lists_places_tried(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0], "val": [0], "test": [0]})
    (root / "images" / "000.cls" / "val_0.jpg").unlink()
    with pytest.raises(DataError) as err:
        read_fgvc(root)
    message = str(err.value)
    assert (
        "val.json, line 2: image '000.cls/val_0.jpg' listed in val.json does not exist" in message
    )
    assert str(root / "Images" / "000.cls" / "val_0.jpg") in message


def test_read_fgvc_test_class_unknown_to_train(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0, 1], "val": [1], "test": [0, 5]})
    with pytest.raises(DataError, match=r"test\.json, line 3: class id 5 .* never occurs"):
        read_fgvc(root)


def test_read_fgvc_empty_split(tmp_path: Path) -> None:
    root = make_fgvc(tmp_path / "f", {"train": [0], "val": [0], "test": [0]})
    (root / "val.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"val\.json: split file is empty"):
        read_fgvc(root)


# ---------------------------------------------------------------- ImageFolder


def split_of(task_splits, split: str) -> list[tuple[str, int]]:
    return [(s.path.name, s.label) for s in task_splits.splits[split]]


def test_read_imagefolder_stratified_and_sorted_classes(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "pets", {"dog": 10, "cat": 20, "emu": 1})
    (root / "cat" / "notes.txt").write_text("not an image")
    task = read_imagefolder(root, seed=3)
    assert task.class_names == ["cat", "dog", "emu"]
    assert task.num_classes == 3
    per_split = {k: Counter(s.label for s in v) for k, v in task.splits.items()}
    assert per_split["train"] == {0: 14, 1: 7, 2: 1}
    assert per_split["val"] == {0: 2, 1: 1}
    assert per_split["test"] == {0: 4, 1: 2}
    every = [s.path for v in task.splits.values() for s in v]
    assert len(every) == len(set(every)) == 31


def test_read_imagefolder_is_deterministic_by_seed(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 12, "b": 12})
    first, again = read_imagefolder(root, seed=1), read_imagefolder(root, seed=1)
    other = read_imagefolder(root, seed=2)
    assert split_of(first, "test") == split_of(again, "test")
    assert split_of(first, "train") == split_of(again, "train")
    assert split_of(first, "test") != split_of(other, "test")


def test_read_imagefolder_new_class_leaves_other_splits_alone(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 12, "b": 12})
    before = split_of(read_imagefolder(root, seed=0), "test")
    make_imagefolder(root, {"0first": 5})
    after = read_imagefolder(root, seed=0)
    assert after.class_names == ["0first", "a", "b"]
    shifted = [(name, label - 1) for name, label in split_of(after, "test") if label > 0]
    assert shifted == before


def test_read_imagefolder_classes_get_their_own_shuffle(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 12, "b": 12})
    task = read_imagefolder(root, seed=0)
    tests = [sorted(s.path.name for s in task.splits["test"] if s.label == c) for c in (0, 1)]
    assert len(tests[0]) == len(tests[1]) == 2
    assert tests[0] != tests[1]


def test_read_imagefolder_small_class_keeps_a_train_image(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 2, "b": 10})
    task = read_imagefolder(root, val_fraction=0.4, test_fraction=0.5)
    sizes = {k: Counter(s.label for s in v) for k, v in task.splits.items()}
    assert sizes == {"train": {0: 1, 1: 1}, "val": {0: 1, 1: 4}, "test": {1: 5}}


def test_read_imagefolder_errors(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", {"a": 12})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*empty holds no image files"):
        read_imagefolder(root)
    (root / "empty").rmdir()
    tiny = make_imagefolder(tmp_path / "tiny", {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"the val split is empty"):
        read_imagefolder(tiny)
    with pytest.raises(ValueError, match="must be < 1"):
        read_imagefolder(root, val_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------- detection


def test_detect_format_three_layouts_and_read_task(tmp_path: Path) -> None:
    vtab = make_vtab(tmp_path / "v")
    fgvc = make_fgvc(tmp_path / "f", {"train": [0, 1], "val": [0], "test": [1]})
    folder = make_imagefolder(tmp_path / "i", {"a": 10, "b": 10})
    assert detect_format(vtab) == "vtab"
    assert detect_format(fgvc) == "fgvc"
    assert detect_format(folder) == "imagefolder"
    assert read_task(str(vtab)).format == "vtab"
    assert read_task(fgvc).num_classes == 2
    assert (
        read_task(folder, seed=1).splits["test"] == read_imagefolder(folder, seed=1).splits["test"]
    )


def test_detect_format_vtab_parent_hint(tmp_path: Path) -> None:
    make_vtab(tmp_path / "vtab-1k" / "cifar")
    make_vtab(tmp_path / "vtab-1k" / "caltech101")
    with pytest.raises(DataError) as err:
        detect_format(tmp_path / "vtab-1k")
    message = str(err.value)
    assert "looks like a VTAB-1k root holding tasks [caltech101, cifar]" in message
    assert "point at one task folder" in message
    assert "'cifar100' in V-PETL Bench" in message


def test_detect_format_unknown_folder_explains_each_format(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "readme.md").write_text("hi")
    with pytest.raises(DataError) as err:
        detect_format(tmp_path / "x")
    message = str(err.value)
    assert "matches no known task format" in message and "1 other file" in message
    assert "readme.md" not in message  # names no other entry (shown on a web page)
    assert (
        "train800.txt" in message
        and "train.json" in message
        and "one subfolder per class" in message
    )
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "nowhere")


# ---------------------------------------------------------------- datasets and loaders


def test_resolve_normalization() -> None:
    assert resolve_normalization("backbone", [0.5] * 3, [0.25] * 3) == ((0.5,) * 3, (0.25,) * 3)
    assert resolve_normalization("imagenet", [0.5] * 3, [0.5] * 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_normalization("none", [0.5] * 3, [0.5] * 3) == ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(DataError, match="allowed: backbone, imagenet, none"):
        resolve_normalization("zscore", [0.5] * 3, [0.5] * 3)


def test_image_dataset_normalises_a_constant_colour(tmp_path: Path) -> None:
    path = png(tmp_path / "c.png", color=(255, 0, 51), size=9)
    gray = tmp_path / "g.png"
    Image.new("L", (5, 7), 102).save(gray)
    mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
    ds = ImageDataset(
        [Sample(path, 1), Sample(gray, 0)], image_size=4, mean=mean, std=std, num_classes=2
    )
    image, label = ds[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and label == 1
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.2) / 0.1])
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(image.std(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    gray_image, _ = ds[1]
    torch.testing.assert_close(gray_image[:, 0, 0], (0.4 - torch.tensor(mean)) / torch.tensor(std))
    batch, labels = ds[[1, 0]]
    assert batch.shape == (2, 3, 4, 4) and labels.tolist() == [0, 1]
    torch.testing.assert_close(batch[1], image)


def test_image_dataset_cache_keeps_decoded_images(tmp_path: Path) -> None:
    path = png(tmp_path / "a.png", color=(0, 0, 0))
    samples = [Sample(path, 0)]
    cached = ImageDataset(samples, image_size=2, mean=(0,) * 3, std=(1,) * 3, num_classes=1)
    uncached = ImageDataset(
        samples, image_size=2, mean=(0,) * 3, std=(1,) * 3, num_classes=1, cache=False
    )
    assert cached[0][0].max() == 0 and uncached[0][0].max() == 0
    png(path, color=(255, 255, 255))
    assert cached[0][0].max() == 0
    assert uncached[0][0].min() == 1.0


def test_image_dataset_preload_reports_progress(tmp_path: Path) -> None:
    samples = [Sample(png(tmp_path / f"{i}.png", color=(i, i, i)), i % 2) for i in range(5)]
    ds = ImageDataset(samples, image_size=3, mean=(0,) * 3, std=(1,) * 3, num_classes=2)
    calls: list[tuple[int, int]] = []
    ds.preload(lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]
    for i in range(5):
        samples[i].path.unlink()
    torch.testing.assert_close(ds[4][0], torch.full((3, 3, 3), 4 / 255))


def test_image_dataset_corrupt_image_and_bad_label(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = ImageDataset([Sample(broken, 0)], image_size=4, mean=(0,) * 3, std=(1,) * 3, num_classes=1)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        ds[0]
    with pytest.raises(DataError, match=r"label 3 of image .*broken\.png is out of range for 2"):
        ImageDataset([Sample(broken, 3)], image_size=4, mean=(0,) * 3, std=(1,) * 3, num_classes=2)


def label_order(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


def test_make_loader_is_deterministic_by_seed(tmp_path: Path) -> None:
    samples = [Sample(png(tmp_path / f"{i}.png"), i) for i in range(10)]
    ds = ImageDataset(samples, image_size=4, mean=(0,) * 3, std=(1,) * 3, num_classes=10)
    ds.preload()
    first = make_loader(ds, batch_size=4, shuffle=True, seed=7)
    epoch1, epoch2 = label_order(first), label_order(first)
    second = make_loader(ds, batch_size=4, shuffle=True, seed=7)
    assert [epoch1, epoch2] == [label_order(second), label_order(second)]
    assert sorted(epoch1) == list(range(10)) and epoch1 != epoch2
    assert label_order(make_loader(ds, batch_size=4, shuffle=True, seed=8)) != epoch1
    ordered = make_loader(ds, batch_size=4, shuffle=False, seed=0)
    assert label_order(ordered) == list(range(10))
    assert [images.shape[0] for images, _ in ordered] == [4, 4, 2]
    dropped = make_loader(ds, batch_size=4, shuffle=False, seed=0, drop_last=True)
    assert len(dropped) == 2 and [images.shape for images, _ in dropped][0] == (4, 3, 4, 4)


def test_class_counts() -> None:
    samples = [Sample(Path("/x.png"), label) for label in (0, 2, 2, 1, 2)]
    assert class_counts(samples, 4) == [1, 1, 3, 0]
    with pytest.raises(DataError, match="out of range"):
        class_counts(samples, 2)
