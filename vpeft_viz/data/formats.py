"""Task folder formats: VTAB-1k, FGVC (VPT JSON) and plain ImageFolder, read into one shape.

Every reader returns a :class:`TaskSplits` whose ``splits`` hold ``train``/``val``/``test`` lists
of :class:`Sample` (absolute image path + integer label). Readers check the whole folder up front
(split files, line syntax, labels, that each listed image exists) so a bad task fails at once
with a :class:`DataError` naming the file and line to fix, instead of minutes into a run.

Layouts:

- VTAB-1k as released by NOAH (https://github.com/ZhangYuanhan-AI/NOAH) and used by V-PETL Bench
  (https://github.com/synbol/Parameter-Efficient-Transfer-Learning-Benchmark): one folder per
  task holding ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one
  ``relative/path label`` per line. NOAH names CIFAR-100 ``cifar``, V-PETL Bench ``cifar100``.
- FGVC as prepared by VPT (https://github.com/KMnP/vpt): ``{train,val,test}.json`` mapping an
  image path to a class id.
- ImageFolder: ``<root>/<class>/<image>``, split here by seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

VTAB_SPLIT_FILES = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt")
FGVC_SPLIT_FILES = ("train.json", "val.json", "test.json")
SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
)
# Folders VPT looks in for FGVC images, in the order tried: Cars and Flowers keep images under the
# task root, CUB and NABirds under ``images/``, Stanford Dogs under ``Images/``.
FGVC_IMAGE_DIRS = (".", "images", "Images")
# Class counts of the 19 VTAB-1k tasks (NOAH's table). A train800 split can miss classes (SUN397
# has 397 classes for 800 images), so for these folder names the count comes from here, not from
# the labels seen. CIFAR-100 appears under both names in use.
# The 19 VTAB-1k tasks: folder name → (group, classes). NOAH names CIFAR-100 ``cifar``;
# V-PETL Bench names it ``cifar100``: both are listed.
VTAB_TASKS: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100), "cifar100": ("natural", 100),
    "caltech101": ("natural", 102), "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102), "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10), "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2), "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45), "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8), "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6), "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16), "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18), "smallnorb_ele": ("structured", 9),
}
VTAB_NUM_CLASSES = {name: n for name, (_, n) in VTAB_TASKS.items()}
VTAB_GROUPS = {name: group for name, (group, _) in VTAB_TASKS.items()}
FORMAT_HELP = (
    "Expected one of:\n"
    "  vtab: a task folder with train800.txt, val200.txt, train800val200.txt and test.txt, "
    "each line 'relative/path label';\n"
    "  fgvc: a folder with train.json, val.json and test.json, each mapping image path -> "
    "class id (images under the folder, or its images/ or Images/ subfolder);\n"
    "  imagefolder: a folder with one subfolder per class holding that class's images."
)


# A head (and a confusion matrix) beyond this many classes is refused: no task of this lab
# comes close, and a typo label must not allocate a 100,001-class head.
MAX_CLASSES = 10_000


class DataError(ValueError):
    """Bad task data; the message names the file (and line) to fix."""


def _inside(root: Path, rel_path: str, where: str) -> Path:
    """``root / rel_path``, refused when it leaves ``root`` (absolute, ``..`` or a symlink out)."""
    if Path(rel_path).is_absolute():
        raise DataError(f"{where}: image path {rel_path!r} is absolute; split entries must be "
                        f"relative to the task folder {root}")
    image = root / rel_path
    try:
        image.resolve().relative_to(root)
    except ValueError:
        raise DataError(f"{where}: image {rel_path!r} resolves to {image.resolve()}, outside "
                        f"the task folder {root} ('..' or a symbolic link out)") from None
    return image


def _read_text(path: Path) -> str:
    """A split file as text; a file that is not UTF-8 is refused naming it and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x} "
                        f"at offset {exc.start}); save the split file as UTF-8") from None


def _check_classes(num_classes: int, present: set[int], what: str, warnings: list[str],
                   *, known: bool = False) -> None:
    """Refuse fewer than two classes, or (unless the count is ``known``, e.g. a VTAB-1k task)
    a label space mostly made of absent labels (a typo); note smaller gaps."""
    if len(present) < 2:
        raise DataError(f"{what}: only {len(present)} class present (label(s) "
                        f"{sorted(present)}); a classifier needs at least two")
    if num_classes > MAX_CLASSES:
        raise DataError(f"{what}: {num_classes} classes exceed the limit of {MAX_CLASSES}")
    missing = sorted(set(range(num_classes)) - present)
    if len(missing) > len(present) and not known:
        raise DataError(f"{what}: labels run to {num_classes - 1} but only {len(present)} "
                        f"distinct labels are used ({len(missing)} absent); a typo in a label?")
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        warnings.append(f"{len(missing)} of {num_classes} class labels never occur in training "
                     f"data: {shown}")


@dataclass(frozen=True)
class Sample:
    """One labelled image of a split."""

    path: Path  # absolute path of the image file
    label: int
    where: str = field(default="", compare=False)  # split file and line listing it, if any


@dataclass
class TaskSplits:
    """A task read from disk: its train/val/test samples and how many classes its head needs."""

    name: str  # task name (folder name)
    format: str  # "vtab" | "fgvc" | "imagefolder"
    root: Path
    num_classes: int
    splits: dict[str, list[Sample]]  # keys exactly "train", "val", "test"
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # facts about the split worth showing a user
    warnings: list[str] = field(default_factory=list)  # likely mistakes, recorded in each run

    def describe(self) -> dict:
        """A JSON-able summary for run configs and the dashboard's task card."""
        return {
            "name": self.name,
            "format": self.format,
            "root": str(self.root),
            "num_classes": self.num_classes,
            "split_sizes": {split: len(samples) for split, samples in self.splits.items()},
            "notes": list(self.notes),
        }


def _as_dir(root: Path | str) -> Path:
    """Absolute path of ``root``, which must be an existing folder."""
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise DataError(f"task folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{path} is a file; point at the task folder that holds the split files")
    return path


def _listing(root: Path, limit: int = 12) -> str:
    """What a folder holds, for error messages: the split files it has (by name) and how many
    other files and sub-folders — never the names of other entries, so an error shown on a
    web page does not list arbitrary directories."""
    entries = list(root.iterdir())
    if not entries:
        return "the folder is empty"
    splits = sorted(p.name for p in entries if p.is_file() and p.suffix in (".txt", ".json"))
    folders = sum(1 for p in entries if p.is_dir())
    others = len(entries) - len(splits) - folders
    shown = ", ".join(splits[:limit]) + (f", ... ({len(splits) - limit} more)"
                                         if len(splits) > limit else "")
    counts = [f"{n} {what}{'s' if n != 1 else ''}"
              for n, what in ((folders, "sub-folder"), (others, "other file")) if n]
    return "the folder has: " + "; ".join(x for x in (shown, ", ".join(counts)) if x)


def _missing_split_file(root: Path, missing: list[str], expected: tuple[str, ...]) -> DataError:
    return DataError(
        f"{root}: missing split file(s) {', '.join(missing)} "
        f"(expected {', '.join(expected)}); {_listing(root)}"
    )


def _parse_vtab_file(path: Path, root: Path) -> list[tuple[Sample, int]]:
    """Samples of one VTAB split file, each with its 1-based line number, checked line by line."""
    entries: list[tuple[Sample, int]] = []
    for line_no, raw in enumerate(_read_text(path).split("\n"), start=1):
        text = raw.strip()
        if not text:
            continue
        parts = text.rsplit(None, 1)
        where = f"{path}, line {line_no}"
        if len(parts) != 2:
            raise DataError(f"{where}: malformed line {text!r}; expected 'relative/path label'")
        rel_path, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(
                f"{where}: label {label_text!r} is not an integer in line {text!r}"
            ) from None
        if label < 0:
            raise DataError(f"{where}: negative label {label} in line {text!r}")
        image = _inside(root, rel_path, where)
        if not image.is_file():
            raise DataError(f"{where}: image {image} listed in {path.name} does not exist")
        entries.append((Sample(image, label, where), line_no))
    if not entries:
        raise DataError(f"{path}: split file is empty (no 'relative/path label' lines)")
    return entries


def _check_range(entries: list[tuple[Sample, int]], path: Path, num_classes: int, why: str) -> None:
    for sample, line_no in entries:
        if sample.label >= num_classes:
            raise DataError(
                f"{path}, line {line_no}: label {sample.label} is out of range for "
                f"{num_classes} classes ({why})"
            )


def read_vtab(root: Path | str, *, trainval: bool = False) -> TaskSplits:
    """Read one VTAB-1k task folder (NOAH / V-PETL Bench layout).

    train is ``train800.txt``, val ``val200.txt`` and test ``test.txt``. With ``trainval=True``
    train is ``train800val200.txt`` (the protocol's final 1000-image training set); val stays
    ``val200.txt`` and is then NOT held out, so it must not be used to pick checkpoints.

    The head covers the task's known class count when the folder has a VTAB-1k task name
    (``cifar`` and ``cifar100`` both count as CIFAR-100), otherwise max label over the training
    files (train800 and val200) + 1; a label beyond that in any file is an error.
    """
    root = _as_dir(root)
    missing = [name for name in VTAB_SPLIT_FILES if not (root / name).is_file()]
    if missing:
        raise _missing_split_file(root, missing, VTAB_SPLIT_FILES)
    entries = {name: _parse_vtab_file(root / name, root) for name in VTAB_SPLIT_FILES}

    known = VTAB_NUM_CLASSES.get(root.name)
    fit_files = ("train800.txt", "val200.txt", "train800val200.txt")
    if known is not None:
        num_classes = known
        why = f"VTAB-1k task {root.name!r} has {known} classes"
    else:
        top, top_file, top_line = max((s.label, name, line) for name in fit_files
                                      for s, line in entries[name])
        num_classes = 1 + top
        why = "the class count is max label over train800/val200/train800val200 + 1"
    for name in VTAB_SPLIT_FILES:
        _check_range(entries[name], root / name, num_classes, why)
    notes: list[str] = []
    warnings: list[str] = []
    present = {s.label for name in fit_files for s, _ in entries[name]}
    what = (str(root) if known is not None
            else f"{root / top_file}, line {top_line} (label {num_classes - 1})")
    _check_classes(num_classes, present, what, warnings, known=known is not None)

    train_file = "train800val200.txt" if trainval else "train800.txt"
    splits = {
        "train": [s for s, _ in entries[train_file]],
        "val": [s for s, _ in entries["val200.txt"]],
        "test": [s for s, _ in entries["test.txt"]],
    }
    if trainval:
        notes.append("val200 is part of the training set (trainval=True): not held out")
    return TaskSplits(root.name, "vtab", root, num_classes, splits, notes=notes,
                      warnings=warnings)


def _line_of(text: str, key: str) -> int | None:
    """1-based line where a JSON object key appears in ``text``, if it can be found."""
    for encoded in (json.dumps(key), json.dumps(key, ensure_ascii=False)):
        pos = text.find(encoded + ":")
        if pos < 0:
            pos = text.find(encoded)
        if pos >= 0:
            return text.count("\n", 0, pos) + 1
    return None


def _json_where(path: Path, key: str) -> str:
    """``"<file>, line <n>"`` for an error about ``key`` of a JSON split (line found on demand)."""
    line_no = _line_of(_read_text(path), key)
    return f"{path}, line {line_no}" if line_no is not None else str(path)


def _parse_fgvc_file(path: Path, root: Path) -> list[tuple[str, Sample]]:
    """(key as written, sample) pairs of one FGVC JSON split; labels still as written."""
    text = _read_text(path)

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{_json_where(path, key)}: image {key!r} listed twice")
            seen[key] = value
        return seen

    try:
        mapping = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected a JSON object mapping image path -> class id")
    if not mapping:
        raise DataError(f"{path}: split file is empty (no image -> class id entries)")
    bases = [root / sub for sub in FGVC_IMAGE_DIRS]
    entries: list[tuple[str, Sample]] = []
    for rel_path, label in mapping.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(
                f"{_json_where(path, rel_path)}: label {label!r} of {rel_path!r} is not an integer"
            )
        if label < 0:
            raise DataError(
                f"{_json_where(path, rel_path)}: negative label {label} for {rel_path!r}"
            )
        _inside(root, rel_path, f"{path} (entry {rel_path!r})")
        image = next((base / rel_path for base in bases if (base / rel_path).is_file()), None)
        if image is None:
            tried = ", ".join(str(base / rel_path) for base in bases)
            raise DataError(
                f"{_json_where(path, rel_path)}: image {rel_path!r} listed in {path.name} "
                f"does not exist (tried {tried})"
            )
        _inside(root, str(image.relative_to(root)), f"{path} (entry {rel_path!r})")
        entries.append((rel_path, Sample(image, label, f"{path} (entry {rel_path!r})")))
    return entries


def read_fgvc(root: Path | str) -> TaskSplits:
    """Read an FGVC task prepared as in VPT: ``{train,val,test}.json`` of image path -> class id.

    Image paths are resolved as VPT does for its five datasets: relative to the task folder
    (Stanford Cars, Oxford Flowers), to ``images/`` (CUB-200-2011, NABirds) or to ``Images/``
    (Stanford Dogs); here each path is tried in that order, so one reader serves all five.

    Class ids are kept when the train+val ids are already 0..K-1. Otherwise they are mapped,
    in sorted order, to 0..K-1 as VPT does (its JSONs may use e.g. 1-based ids), with the
    original ids kept as ``class_names``. VPT maps each split on its own; here the mapping comes
    from train+val and applies to test too, so ids mean the same class in every split. A test id
    that train+val never use is an error.
    """
    root = _as_dir(root)
    missing = [name for name in FGVC_SPLIT_FILES if not (root / name).is_file()]
    if missing:
        raise _missing_split_file(root, missing, FGVC_SPLIT_FILES)
    entries = {name: _parse_fgvc_file(root / name, root) for name in FGVC_SPLIT_FILES}

    fit_ids = sorted({s.label for name in ("train.json", "val.json") for _, s in entries[name]})
    contiguous = fit_ids == list(range(len(fit_ids)))
    class_ids = {cid: i for i, cid in enumerate(fit_ids)}
    for name in FGVC_SPLIT_FILES:
        for key, sample in entries[name]:
            if sample.label not in class_ids:
                raise DataError(
                    f"{_json_where(root / name, key)}: class id {sample.label} of "
                    f"{key!r} never occurs in train.json/val.json "
                    f"({len(fit_ids)} classes there)"
                )
    splits = {
        split: [Sample(s.path, class_ids[s.label], s.where) for _, s in entries[f"{split}.json"]]
        for split in SPLIT_NAMES
    }
    notes = [] if contiguous else [f"class ids {fit_ids[0]}..{fit_ids[-1]} mapped to 0..K-1"]
    _check_classes(len(fit_ids), set(range(len(fit_ids))), f"{root} (train.json/val.json)", [])
    return TaskSplits(
        root.name,
        "fgvc",
        root,
        len(fit_ids),
        splits,
        class_names=None if contiguous else [str(cid) for cid in fit_ids],
        notes=notes,
    )


def _is_visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_images(folder: Path) -> list[Path]:
    """Image files under a class folder (recursively), sorted, hidden files and folders skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) image counts for a class of ``n`` images, leaving train at least one."""
    n_val = int(n * val_fraction + 0.5)
    n_test = int(n * test_fraction + 0.5)
    while n_val + n_test > n - 1:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def read_imagefolder(
    root: Path | str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> TaskSplits:
    """Read ``<root>/<class>/<image>`` and split it per class (stratified) by ``seed``.

    Classes are the subfolders sorted by name (label = position). Within each class the sorted
    images are shuffled by a seed derived from ``seed`` and the class name, then cut into
    test, val and train by the fractions (rounded), every class keeping at least one train
    image. Same files + same seed -> same split.
    """
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1); "
            f"got {val_fraction} and {test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 so train keeps images; "
            f"got {val_fraction} + {test_fraction}"
        )
    root = _as_dir(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders found. {FORMAT_HELP}")
    splits: dict[str, list[Sample]] = {split: [] for split in SPLIT_NAMES}
    if len(class_dirs) < 2:
        raise DataError(f"{root}: only one class folder ({class_dirs[0].name}); a classifier "
                        "needs at least two classes")
    if len(class_dirs) > MAX_CLASSES:
        raise DataError(f"{root}: {len(class_dirs)} class folders exceed the limit of "
                        f"{MAX_CLASSES}")
    largest = 0
    for label, class_dir in enumerate(class_dirs):
        images = _class_images(class_dir)
        for image in images:
            _inside(root, str(image.relative_to(root)), str(image))
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        largest = max(largest, len(images))
        # A string seed is hashed by Python itself (SHA-512), stable across runs and platforms;
        # one stream per class keeps a class's split unchanged when other classes come or go.
        random.Random(f"{seed}/{class_dir.name}").shuffle(images)
        n_val, n_test = _split_counts(len(images), val_fraction, test_fraction)
        splits["test"] += [Sample(p, label) for p in images[:n_test]]
        splits["val"] += [Sample(p, label) for p in images[n_test : n_test + n_val]]
        splits["train"] += [Sample(p, label) for p in images[n_test + n_val :]]
    for split in ("val", "test"):
        if not splits[split]:
            raise DataError(
                f"{root}: the {split} split is empty: the classes are too small for "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}; add images "
                f"(the largest class has {largest})"
            )
    return TaskSplits(
        root.name,
        "imagefolder",
        root,
        len(class_dirs),
        splits,
        class_names=[d.name for d in class_dirs],
    )


def _has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / name).is_file() for name in names)


def _holds_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def detect_format(root: Path | str) -> str:
    """Which layout ``root`` holds: ``"vtab"``, ``"fgvc"`` or ``"imagefolder"``.

    A folder of VTAB-1k (or FGVC) task folders is refused with a hint to point at one task.
    """
    root = _as_dir(root)
    if _has_any(root, VTAB_SPLIT_FILES):
        return "vtab"
    if _has_any(root, FGVC_SPLIT_FILES):
        return "fgvc"
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _is_visible(p))
    vtab_tasks = [p.name for p in subdirs if _has_any(p, VTAB_SPLIT_FILES)]
    if vtab_tasks:
        cifar_note = ""
        if {"cifar", "cifar100"} & set(vtab_tasks):
            cifar_note = (
                " (CIFAR-100 is the folder 'cifar' in NOAH's release and 'cifar100' in "
                "V-PETL Bench; either name works)"
            )
        raise DataError(
            f"{root} looks like a VTAB-1k root holding tasks [{', '.join(vtab_tasks)}]; "
            f"point at one task folder, e.g. {root / vtab_tasks[0]}{cifar_note}"
        )
    fgvc_tasks = [p.name for p in subdirs if _has_any(p, FGVC_SPLIT_FILES)]
    if fgvc_tasks:
        raise DataError(
            f"{root} looks like a folder of FGVC tasks [{', '.join(fgvc_tasks)}]; "
            f"point at one task folder, e.g. {root / fgvc_tasks[0]}"
        )
    if subdirs and any(_holds_images(p) for p in subdirs):
        return "imagefolder"
    raise DataError(f"{root} matches no known task format; {_listing(root)}.\n{FORMAT_HELP}")


def read_task(root: Path | str, *, seed: int = 0) -> TaskSplits:
    """Read any supported task folder: :func:`detect_format` then the matching reader.

    ``seed`` only matters for ImageFolder, whose split is made here.
    """
    fmt = detect_format(root)
    if fmt == "vtab":
        return read_vtab(root)
    if fmt == "fgvc":
        return read_fgvc(root)
    return read_imagefolder(root, seed=seed)
