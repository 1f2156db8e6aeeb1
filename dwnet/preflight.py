"""Checks before training, so a 16-rank job fails in seconds with one readable message instead
of hanging or dying an hour in: hostfile vs launched world size, host names that do not resolve,
data files present (.beton files also structurally whole: not cut short, not foreign) and the
checkpoint directory writable on EVERY rank, and the same package
versions everywhere. Every rank runs its local checks, rank 0 gathers and judges, and the verdict
is broadcast, so all ranks raise the same PreflightError together.

    from dwnet.preflight import run_preflight
    run_preflight([cfg.data.train_path, cfg.data.val_path], [cfg.checkpoint.dir], hostfile=None,
                  beton_files=preflight_betons(cfg))

`preflight_betons(cfg)` names the .beton files of an ffcv run for the structural check.
hostfile=None reads the path from $DWNET_HOSTFILE (the launch/ recipes export it); '' skips the
hostfile checks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from dwnet.errors import UserError

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "deepspeed", "timm", "ffcv", "numpy")  # compared across ranks, logged


class PreflightError(UserError, RuntimeError):
    """The job cannot start; the message names the host/rank and what is wrong, one line each."""


@dataclass
class HostEntry:
    host: str
    slots: int
    line: int


# ---- hostfile ---------------------------------------------------------------------------------
def _parse_hostfile_entries(path: str | os.PathLike) -> list[HostEntry]:
    path = str(path)
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise PreflightError(f"{path}: cannot read hostfile ({err.strerror or err})") from None
    entries: list[HostEntry] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{path}:{lineno}"
        tokens = text.split()
        host = tokens[0]
        if "=" in host or len(tokens) < 2 or not tokens[1].startswith("slots="):
            raise PreflightError(f"{where}: bad entry {raw.strip()!r}; expected 'hostname slots=N' "
                                 "(DeepSpeed/OpenMPI hostfile format)")
        options: dict[str, int] = {}
        for token in tokens[1:]:
            key, eq, value = token.partition("=")
            if not eq or key not in ("slots", "max_slots") or key in options:
                raise PreflightError(f"{where}: unexpected {token!r} in {raw.strip()!r}; "
                                     "expected 'hostname slots=N' (optionally max_slots=M)")
            try:
                options[key] = int(value)
            except ValueError:
                raise PreflightError(f"{where}: {key}={value!r} is not an integer (host {host!r})") from None
        if options["slots"] <= 0:
            raise PreflightError(f"{where}: slots={options['slots']} for host {host!r}; slots must be >= 1")
        if host in seen:
            raise PreflightError(f"{where}: host {host!r} listed twice (first on line {seen[host]}); "
                                 "give each host one line with its total slots")
        seen[host] = lineno
        entries.append(HostEntry(host, options["slots"], lineno))
    if not entries:
        raise PreflightError(f"{path}: no hosts; expected lines like 'node1 slots=8'")
    return entries


def parse_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """[(host, slots), ...] in file order from a DeepSpeed/OpenMPI hostfile ('node1 slots=8',
    '#' comments, blank lines). Raises PreflightError naming the file and line on a bad line, a
    duplicate host or slots <= 0."""
    return [(e.host, e.slots) for e in _parse_hostfile_entries(path)]


# ---- per-rank facts ---------------------------------------------------------------------------
def _dwnet_version() -> str:
    """Version plus a hash of the package's sources: different code on two nodes shows up too."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    try:
        from dwnet import __version__ as version
    except Exception:  # pragma: no cover - partial install
        version = "?"
    return f"{version}+src.{digest.hexdigest()[:10]}"


def package_versions() -> dict[str, str]:
    """Python, PACKAGES and dwnet (version + source hash): what train.log records and what the
    preflight requires to be identical on every rank."""
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["dwnet"] = _dwnet_version()
    return versions


def _check_writable(directory: str) -> str | None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".preflight-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as err:
        return f"cannot write to {directory} ({err.strerror or err})"
    return None


def _check_space(directory: str, needed: int, basis: str) -> str | None:
    """Room for two checkpoint tags: the next save is written before the oldest is pruned."""
    from dwnet.checkpoint.layout import human_size

    try:
        free = shutil.disk_usage(directory).free
    except OSError as err:
        return f"cannot measure the free space of {directory} ({err.strerror or err})"
    if free >= needed:
        return None
    return (f"checkpoint.dir {directory}: {human_size(free)} free, two checkpoints need about {human_size(needed)} "
            f"(estimated from {basis}); {human_size(needed - free)} short: free space or set checkpoint.dir "
            "to a larger disk")


@dataclass
class RankReport:
    rank: int
    host: str
    problems: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def _check_beton(key: str, path: str) -> str | None:
    """data_prep verify's structural check (header, version, tables against the file size): a file
    cut short by a copy, or a foreign file, is named here instead of failing inside ffcv."""
    from dwnet.data.beton_check import BetonError, check_structure

    try:
        check_structure(path, fix=f"check it with `python -m data_prep verify {path}`, then re-copy it or "
                                  "re-convert it with `python -m data_prep convert`")
    except BetonError as err:
        return f"{key}: {err}"
    return None


def local_report(rank: int, required_files: list[str], writable_dirs: list[str],
                 beton_files: dict[str, str] | None = None,
                 space_needed: dict[str, tuple[int, str]] | None = None) -> RankReport:
    report = RankReport(rank=rank, host=socket.gethostname())
    try:
        unusable = set()
        for path in dict.fromkeys(p for p in [*required_files, *(beton_files or {}).values()] if p):
            if not os.path.exists(path):
                report.problems.append(f"missing {path}")
                unusable.add(path)
            elif not os.access(path, os.R_OK):
                report.problems.append(f"cannot read {path}")
                unusable.add(path)
        for key, path in (beton_files or {}).items():
            problem = _check_beton(key, path) if path and path not in unusable else None
            if problem:
                report.problems.append(problem)
        for directory in [d for d in writable_dirs if d]:
            problem = _check_writable(directory)
            if problem:
                report.problems.append(problem)
            elif directory in (space_needed or {}):
                problem = _check_space(directory, *space_needed[directory])
                if problem:
                    report.problems.append(problem)
        report.versions = package_versions()
    except Exception as err:  # noqa: BLE001 - every rank must reach the gather
        report.problems.append(f"local checks crashed: {type(err).__name__}: {err}")
    return report


# ---- judging (rank 0) -------------------------------------------------------------------------
def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    ranks = sorted(ranks)
    parts: list[str] = []
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _where(reports: list[RankReport]) -> str:
    hosts = sorted({r.host for r in reports})
    label = "rank" if len(reports) == 1 else "ranks"
    return f"{label} {_ranks([r.rank for r in reports])} on {', '.join(hosts)}"


def judge(reports: list[RankReport], world_size: int, hostfile: str | None) -> list[str]:
    """One line per problem found in the gathered per-rank reports."""
    problems: list[str] = []

    if hostfile:
        try:
            entries = _parse_hostfile_entries(hostfile)
        except PreflightError as err:
            problems.append(str(err))
            entries = []
        if entries:
            slots = sum(e.slots for e in entries)
            if slots != world_size:
                listing = ", ".join(f"{e.host}:{e.slots}" for e in entries)
                problems.append(f"world size {world_size} launched but {hostfile} lists {slots} slots ({listing}); "
                                "fix the hostfile or the launcher's process count (-np / --num_gpus / --num_nodes)")
            for e in entries:
                try:
                    socket.getaddrinfo(e.host, None)
                except OSError as err:
                    problems.append(f"host {e.host!r} ({hostfile}:{e.line}) does not resolve from rank 0 "
                                    f"({err.strerror or err}); fix /etc/hosts or DNS, or the hostfile")
            # per-host rank counts, when the hostfile uses the names the hosts report themselves
            short = {e.host.split(".")[0]: e for e in entries}
            per_host: dict[str, list[int]] = {}
            for r in reports:
                per_host.setdefault(r.host.split(".")[0], []).append(r.rank)
            if per_host and all(h in short for h in per_host):
                for h, ranks in sorted(per_host.items()):
                    if len(ranks) != short[h].slots:
                        problems.append(f"host {h} runs {len(ranks)} rank(s) ({_ranks(ranks)}) but {hostfile}:"
                                        f"{short[h].line} gives it slots={short[h].slots}")

    groups: dict[tuple[str, ...], list[RankReport]] = {}
    for r in reports:
        if r.problems:
            groups.setdefault((r.host, *r.problems), []).append(r)
    for key, members in sorted(groups.items(), key=lambda kv: min(m.rank for m in kv[1])):
        problems.append(f"{_where(members)}: {'; '.join(key[1:])}")

    names = sorted({k for r in reports for k in r.versions})
    for name in names:
        by_version: dict[str, list[RankReport]] = {}
        for r in reports:
            by_version.setdefault(r.versions.get(name, "unknown"), []).append(r)
        if len(by_version) > 1:
            detail = "; ".join(f"{v} on {_where(m)}" for v, m in
                               sorted(by_version.items(), key=lambda kv: min(x.rank for x in kv[1])))
            problems.append(f"{name} differs across ranks: {detail}; install the same environment on every node")
    return problems


def preflight_betons(cfg, splits: tuple[str, ...] = ("train", "val")) -> dict[str, str]:
    """{'data.train_path': path, ...} for the set .beton paths of an ffcv run (none for imagefolder)."""
    if cfg.data.backend != "ffcv":
        return {}
    paths = {f"data.{split}_path": getattr(cfg.data, f"{split}_path") for split in splits}
    return {key: path for key, path in paths.items() if path}


# ---- entry point ------------------------------------------------------------------------------
def run_preflight(required_files: list[str], writable_dirs: list[str], hostfile: str | None = None,
                  beton_files: dict[str, str] | None = None,
                  space_needed: dict[str, tuple[int, str]] | None = None) -> None:
    """Runs on every rank (collective: call it on all ranks after init_distributed()).

    `beton_files` ({config key: path}) get the structural check of `python -m data_prep verify`.
    `space_needed` ({writable dir: (bytes, what the estimate comes from)}) checks free space.
    Raises PreflightError with the same message on every rank: one line for one problem, else a
    line per problem. hostfile=None reads $DWNET_HOSTFILE; '' skips the hostfile checks."""
    import torch.distributed as dist

    if hostfile is None:
        hostfile = os.environ.get("DWNET_HOSTFILE", "")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    mine = local_report(rank, list(required_files), list(writable_dirs), dict(beton_files or {}),
                        dict(space_needed or {}))
    if world > 1:
        gathered: list[RankReport | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        reports = [r for r in gathered if r is not None]
    else:
        reports = [mine]

    verdict: str | None = None
    if rank == 0:
        try:
            problems = judge(reports, world, hostfile or None)
        except Exception as err:  # noqa: BLE001 - the verdict must still reach every rank
            problems = [f"preflight judging crashed: {type(err).__name__}: {err}"]
        if len(problems) == 1:
            verdict = f"preflight failed: {problems[0]}"
        elif problems:
            verdict = f"preflight failed ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems)
        else:
            versions = reports[0].versions
            log.info("preflight ok: %d rank(s) on %d host(s); torch %s, deepspeed %s", world,
                     len({r.host for r in reports}), versions.get("torch"), versions.get("deepspeed"))
    if world > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if verdict:
        raise PreflightError(verdict)
