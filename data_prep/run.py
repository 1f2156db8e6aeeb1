"""The `convert` command: which splits to write, their labels, and per split scan -> check ->
report -> write, ending with a summary. Errors that stop a conversion are raised as one-line
exceptions (ScanError, ConvertError) and printed by the CLI."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

from dwnet.atomic_io import atomic_open

from .convert import ConvertError, WriteOptions, write_split
from .report import SplitSummary, summary_lines, write_report
from .scan import Problem, ScanError, class_index, round_robin, scan_tree

SPLITS = ("train", "val")


@dataclass
class ConvertRequest:
    splits: dict[str, str]               # split name -> ImageFolder root, train first
    out: str
    options: WriteOptions = field(default_factory=WriteOptions)
    subset: int = 0                      # 0: everything
    strict: bool = False
    overwrite: bool = False


def resolve_splits(root: str | None, train_root: str | None, val_root: str | None,
                   only: str | None) -> dict[str, str]:
    """--root R means R/train and R/val (whichever exist); --train-root/--val-root name one tree each."""
    if root and (train_root or val_root):
        raise ScanError("give either --root (a folder with train/ and val/) or --train-root/--val-root, not both")
    if root:
        if not os.path.isdir(root):
            raise ScanError(f"{root}: no such directory")
        splits = {name: os.path.join(root, name) for name in SPLITS if os.path.isdir(os.path.join(root, name))}
        if not splits:
            raise ScanError(f"{root}: has no train/ or val/ subfolder; to convert this tree as one split "
                            f"pass --train-root {root} (or --val-root {root})")
    else:
        splits = {name: path for name, path in (("train", train_root), ("val", val_root)) if path}
        if not splits:
            raise ScanError("nothing to convert: pass --root, --train-root or --val-root")
    if only:
        if only not in splits:
            raise ScanError(f"--only {only}: no {only} split was given (found: {', '.join(splits)})")
        splits = {only: splits[only]}
    return splits


def convert(request: ConvertRequest) -> int:
    """Runs the conversion; returns the process exit code (0 ok, 1 something was not written or
    --strict saw a skipped file). Raises ScanError/ConvertError for one-line fatal errors."""
    _check_writable(request.out)
    class_to_idx = _labels(request)
    summaries = []
    for split, root in request.splits.items():
        summary = _convert_split(request, split, root, class_to_idx)
        summaries.append(summary)
        for line in summary_lines(summary):
            print(line, flush=True)
    skipped = sum(len(s.skipped) for s in summaries if s.status != "kept")
    if request.strict and skipped:
        print(f"error: --strict: {skipped} files would be skipped, so nothing was written for the splits that "
              f"have them (list in {request.out}/skipped_<split>.tsv)", file=sys.stderr, flush=True)
        return 1
    return 1 if any(s.status == "failed" for s in summaries) else 0


def _labels(request: ConvertRequest) -> dict[str, int]:
    """Class name -> index from the train tree (ImageFolder order), or from an existing labels.json
    / the val tree when only val is converted. Written to <out>/labels.json."""
    labels_path = os.path.join(request.out, "labels.json")
    existing = None
    if os.path.exists(labels_path):
        with open(labels_path) as fh:
            existing = json.load(fh)
    if "train" in request.splits:
        class_to_idx = class_index(request.splits["train"])
    elif existing is not None:
        class_to_idx = existing
    else:
        class_to_idx = class_index(request.splits["val"])
        print("note: labels taken from the val tree's own folders; convert train first (or together) "
              "if val may lack classes, so indices match the train split", flush=True)
    if existing is not None and existing != class_to_idx:
        raise ConvertError(f"{labels_path} lists a different class set than {request.splits.get('train', '')}; "
                           "use a fresh --out folder or delete the old labels.json and .beton files")
    with atomic_open(labels_path) as fh:
        json.dump(class_to_idx, fh, indent=0)
    return class_to_idx


def _check_writable(out: str) -> None:
    """Fails in one line before any work if `out` cannot hold the output (nothing is written)."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ConvertError(f"--out {out}: cannot write there ({err.strerror or err}); pass a writable --out "
                           "folder or fix its permissions (nothing was converted)") from None


def _convert_split(request: ConvertRequest, split: str, root: str, class_to_idx: dict[str, int]) -> SplitSummary:
    final = os.path.join(request.out, f"{split}.beton")
    summary = SplitSummary(split=split, output=final)
    if os.path.exists(final) and not request.overwrite:
        summary.status = "kept"
        return summary
    tree = scan_tree(root, class_to_idx)
    summary.found_images = len(tree.samples)
    summary.skipped.extend(tree.problems)
    summary.other = len(tree.problems)
    keys = [os.path.relpath(path, root) for path, _ in tree.samples]  # seeds the JPEG/raw draw per image
    candidates = round_robin(tree.samples) if request.subset > 0 else None
    result = write_split(final, tree.samples, keys, request.options, candidates=candidates, want=request.subset,
                         strict=request.strict, already_skipped=len(tree.problems), desc=f"convert {split}")
    summary.skipped.extend(Problem(tree.samples[i][0], r.reason, r.detail) for i, r in sorted(result.failed.items()))
    summary.converted.update(result.converted)
    summary.seconds, summary.written, summary.bytes = result.seconds, result.written, result.bytes
    names = {idx: name for name, idx in class_to_idx.items()}
    summary.empty_classes = [names[label] for label in sorted({label for _, label in tree.samples} - set(result.labels))]
    write_report(summary)
    if result.written == 0:
        raise ConvertError(f"{root}: none of its {len(tree.samples)} image files could be read; nothing was "
                           f"written (reasons in {summary.report_path})")
    if not result.installed:
        summary.status = "failed"
        summary.written = 0
    return summary
