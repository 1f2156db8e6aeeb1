"""What a checkpoint directory holds, by name: the one place that spells the file names (ours and
DeepSpeed's), the tag names, the metadata in COMPLETE (`TagMeta`) and the sizes of tags.

A leaf: it imports nothing else of `dwnet.checkpoint`, so every other module of it can use it.

Layout under the run directory:
    checkpoints/step_00001200/...   DeepSpeed files of that tag, plus
        COMPLETE                    written by rank 0 after a barrier: the tag is whole (TagMeta)
        rng_rank{r}.pt              each rank's RNG states (exact resume)
    checkpoints/latest              name of the newest complete tag (atomic replace)
    checkpoints/best                name of the tag with the best validation top-1
    checkpoints/universal/<tag>     the tag resharded for another rank layout (`universal.py`)
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Protocol

from dwnet.atomic_io import atomic_open
from dwnet.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)
DAMAGED = ".damaged"  # suffix of a tag moved aside because a file of it could not be loaded
EPISODE = "nonfinite_episode"  # COMPLETE key: first skipped step of the episode open at save time
IDENTITY = "identity"  # COMPLETE key: model, num_classes, global batch, data sizes, ZeRO stage, precision

# DeepSpeed's files inside a tag. The model-states file holds the module and the client state:
# ZeRO 0-2 write the first name, ZeRO-3 the second.
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
MODEL_STATES_SUFFIX = "model_states.pt"
OPTIM_STATES_GLOB = "*optim_states.pt"  # per-rank optimizer shards (ZeRO 1-3, bf16 at ZeRO-0)
# ZeRO optimizer shards written by an engine with DeepSpeed's bf16 on carry this prefix.
BF16_ZERO_SHARDS_GLOB = "bf16_zero_pp_rank_*optim_states.pt"


class DamagedCheckpointError(UserError):
    """A file of a complete tag cannot be read (disk error, truncated copy); names the file."""


class Log(Protocol):
    """What this package writes its announcements to (the engine's RunLog)."""

    def info(self, msg: str, *args: Any, all_ranks: bool = False) -> None: ...

    def warning(self, msg: str, *args: Any, all_ranks: bool = False) -> None: ...

    def to_file(self, msg: str, *args: Any) -> None: ...


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR)


def rng_file(root: str, tag: str, rank: int) -> str:
    return os.path.join(root, tag, f"rng_rank{rank}.pt")


def tag_for_step(step: int, suffix: str = "") -> str:
    """Tags sort by step; a suffixed tag of the same step sorts after (is newer than) the plain one."""
    return f"step_{step:08d}" + (f".{suffix}" if suffix else "")


def is_tag_name(name: str) -> bool:
    """A live tag directory name (not a damaged one moved aside, not a path)."""
    return name.startswith("step_") and not name.endswith(DAMAGED) and os.sep not in name


def is_complete(root: str, tag: Any) -> bool:
    return isinstance(tag, str) and is_tag_name(tag) and os.path.isfile(os.path.join(root, tag, COMPLETE))


def complete_tags(root: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if is_complete(root, t))


def newest_complete_tag(root: str) -> str | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


@dataclass(frozen=True)
class TagMeta:
    """The metadata in a tag's COMPLETE file: the only code that writes or reads it. Readable
    without DeepSpeed. Defaults are what tags written before a key existed mean."""

    step: int
    epoch: int = 0
    precision: str | None = None  # None: not recorded (the run's engine.precision applies)
    identity: dict[str, Any] = field(default_factory=dict)  # the saving run (`resume.identity`); {}: unknown
    world_history: list = field(default_factory=list)
    # First skipped step of the non-finite episode open at save time: such a tag is no rollback target.
    episode: int | None = None
    best: str | None = None  # the best tag as of this save, so that a rollback can restore the pointer

    @property
    def clean(self) -> bool:
        """Saved with no non-finite episode open."""
        return self.episode is None

    def to_json(self) -> dict[str, Any]:
        out = {"step": self.step, "epoch": self.epoch, "precision": self.precision, IDENTITY: self.identity,
               "world_history": self.world_history, "best": self.best}
        if self.episode is not None:
            out[EPISODE] = self.episode
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TagMeta:
        return cls(step=data.get("step", 0), epoch=data.get("epoch", 0), precision=data.get("precision"),
                   identity=data.get(IDENTITY) or {}, world_history=data.get("world_history") or [],
                   episode=data.get(EPISODE), best=data.get("best"))

    @classmethod
    def read(cls, root: str, tag: str) -> TagMeta:
        """DamagedCheckpointError when COMPLETE is unreadable."""
        path = os.path.join(root, tag, COMPLETE)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise DamagedCheckpointError(f"{path}: unreadable ({type(err).__name__})") from err
        if not isinstance(data, dict):
            raise DamagedCheckpointError(f"{path}: not a JSON object")
        return cls.from_json(data)

    @classmethod
    def read_or_none(cls, root: str, tag: str) -> TagMeta | None:
        """`read`, or None for a damaged COMPLETE (for pruning and pointers, which must not crash)."""
        try:
            return cls.read(root, tag)
        except DamagedCheckpointError:
            return None

    def write(self, root: str, tag: str) -> None:
        write_text(os.path.join(root, tag, COMPLETE), json.dumps(self.to_json()))


def write_text(path: str, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


# ---- sizes --------------------------------------------------------------------------------------
def human_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def tag_size(root: str, tag: str) -> int:
    """Bytes of the files of `tag`."""
    total = 0
    for dirpath, _, files in os.walk(os.path.join(root, tag)):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free
