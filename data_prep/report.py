"""The per-split report: every skipped file with its reason (a TSV next to the .beton), and the
summary lines printed at the end of a conversion."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

from dwnet.atomic_io import atomic_open

from .scan import Problem


@dataclass
class SplitSummary:
    split: str
    found_images: int = 0                # files with an image extension in the class folders
    other: int = 0                       # other entries the scan met (non-image files, unreadable folders)
    written: int = 0
    skipped: list[Problem] = field(default_factory=list)
    converted: collections.Counter = field(default_factory=collections.Counter)
    output: str = ""
    bytes: int = 0
    seconds: float = 0.0
    status: str = ""                     # "", "kept" (existing file left alone), "failed"
    empty_classes: list[str] = field(default_factory=list)

    @property
    def report_path(self) -> str:
        return os.path.join(os.path.dirname(self.output), f"skipped_{self.split}.tsv")


def write_report(summary: SplitSummary) -> str:
    """Writes skipped_<split>.tsv (path, reason, detail), header included even when empty, so a
    clean run visibly leaves an empty list rather than a stale one."""
    path = summary.report_path
    with atomic_open(path) as fh:
        fh.write("path\treason\tdetail\n")
        for problem in summary.skipped:
            detail = problem.detail.replace("\t", " ").replace("\n", " ")
            fh.write(f"{problem.path}\t{problem.reason}\t{detail}\n")
    return path


def summary_lines(summary: SplitSummary) -> list[str]:
    if summary.status == "kept":
        return [f"{summary.split}: {summary.output} exists, kept (pass --overwrite to rewrite it)"]
    rate = summary.written / summary.seconds if summary.seconds > 0 else 0.0
    head = f"{summary.split}: " + ", ".join(_counts(summary))
    if summary.status == "failed":
        head += f" -> FAILED, {summary.output} not written"
    else:
        head += f" -> {summary.output} ({_human(summary.bytes)}, {_duration(summary.seconds)}, {rate:,.0f} img/s)"
    lines = [head]
    if summary.skipped:
        reasons = collections.Counter(problem.reason for problem in summary.skipped)
        lines.append("  skipped: " + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
                     + f"  (list: {summary.report_path})")
    if summary.converted:
        lines.append("  converted: " + ", ".join(f"{note} {count}" for note, count in summary.converted.most_common()))
    if summary.empty_classes:
        lines.append(f"  warning: {len(summary.empty_classes)} classes have no usable image: "
                     + ", ".join(summary.empty_classes[:5]) + (" ..." if len(summary.empty_classes) > 5 else ""))
    return lines


def _counts(summary: SplitSummary) -> list[str]:
    """'N found (I image files, O other), W written, S skipped[, L left out by --subset]' with
    N = W + S + L: every entry the scan met is accounted for exactly once."""
    found = summary.found_images + summary.other
    written = summary.written if summary.status != "failed" else 0
    left_out = found - written - len(summary.skipped)
    head = (f"{found:,} found ({summary.found_images:,} image files, {summary.other:,} other)" if summary.other
            else f"{found:,} image files found")
    parts = [head, f"{written:,} written", f"{len(summary.skipped):,} skipped"]
    if left_out:
        parts.append(f"{left_out:,} " + ("left out by --subset" if summary.status != "failed" else "not written"))
    return parts


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s")
