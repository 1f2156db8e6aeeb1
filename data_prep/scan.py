"""Finding the images of an ImageFolder tree (decoding them is `encode.py`'s job).

The class list and the sample order are torchvision's (`find_classes`, then a sorted walk of each
class folder, following links), so label i of a .beton is class i of `ImageFolder` and, when nothing
is skipped, sample i is ImageFolder's sample i. Everything the walk meets but cannot use (non-image
files, unreadable folders, files outside class folders) is kept as a Problem so it is reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Iterable

from torchvision.datasets.folder import find_classes

from dwnet.data.image_io import is_image_name
from dwnet.errors import UserError


class ScanError(UserError):
    """A tree that cannot be converted at all; the message is one line with the fix."""


@dataclass
class Problem:
    path: str
    reason: str
    detail: str


@dataclass
class SplitTree:
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]          # (path, label) in ImageFolder order
    problems: list[Problem] = field(default_factory=list)


def class_index(root: str) -> dict[str, int]:
    """torchvision ImageFolder's class name -> label for the tree at `root`; ScanError if none."""
    if not os.path.isdir(root):
        raise ScanError(f"{root}: no such directory; point --root/--train-root/--val-root at an "
                        "ImageFolder tree (<root>/<class>/<image>)")
    try:
        return find_classes(root)[1]
    except FileNotFoundError:
        raise ScanError(f"{root}: no class folders found (empty tree); an ImageFolder tree needs "
                        "<root>/<class>/<image> files") from None
    except PermissionError:
        raise ScanError(f"{root}: permission denied; make the directory readable "
                        f"(chmod a+rx {root})") from None


def scan_tree(root: str, class_to_idx: dict[str, int] | None = None) -> SplitTree:
    """Lists the class folders and candidate images under `root`. With `class_to_idx` (the train
    split's labels) the folders must be a subset of those classes (a val split may lack some)."""
    own_index = class_index(root)
    classes = list(own_index)
    if class_to_idx is None:
        class_to_idx = own_index
    else:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ScanError(f"{root}: class folders {unknown[:5]} are not classes of the train split; "
                            "both splits must use the same class folder names")

    tree = SplitTree(root=root, classes=sorted(class_to_idx, key=class_to_idx.get), samples=[])
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            tree.problems.append(Problem(entry.path, "outside-class-folder",
                                         "file directly under the split root is not part of any class"))
    for name in classes:
        class_dir = os.path.join(root, name)
        found = _walk_class(class_dir, class_to_idx[name], tree)
        if found == 0 and not any(p.path.startswith(class_dir + os.sep) or p.path == class_dir
                                  for p in tree.problems if p.reason == "unreadable-folder"):
            raise ScanError(f"{class_dir}: class folder holds no image files ({', '.join(IMG_HINT)}); "
                            "add its images or remove the folder")
    return tree


IMG_HINT = (".jpg", ".jpeg", ".png", "...")


def _walk_class(class_dir: str, label: int, tree: SplitTree) -> int:
    """Appends the class's images in torchvision's order; returns how many files it found."""
    def on_error(err: OSError) -> None:
        tree.problems.append(Problem(err.filename or class_dir, "unreadable-folder",
                                     err.strerror or str(err)))

    found = 0
    for dirpath, _, filenames in sorted(os.walk(class_dir, onerror=on_error, followlinks=True)):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if is_image_name(name):
                tree.samples.append((path, label))
                found += 1
            else:
                tree.problems.append(Problem(path, "not-an-image-file",
                                             "extension is not one ImageFolder reads"))
    return found


def round_robin(samples: Iterable[tuple[str, int]]) -> list[int]:
    """Sample indices taking classes in turn (first image of each class, then the second, ...):
    the deterministic order --subset draws from, so a small subset still covers every class."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    order, depth = [], 0
    while True:
        row = [queue[depth] for queue in queues if depth < len(queue)]
        if not row:
            return order
        order.extend(row)
        depth += 1
