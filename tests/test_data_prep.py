"""`python -m data_prep`: ImageFolder -> .beton conversion on real images, bad input of every kind,
atomic output, and `verify` on good and damaged files."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import DIGITS_TRAIN, DIGITS_VAL, digit_images, write_digits_tree

from data_prep.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def beton_contents(path):
    """(labels, widths, heights) straight from a .beton's metadata."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image = reader.metadata[f"f{reader.field_names.index('image')}"]
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    return labels.astype(int).tolist(), image["width"].tolist(), image["height"].tolist()


def read_report(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return {Path(row["path"]).name: row["reason"] for row in rows}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


# ---- good data ---------------------------------------------------------------------------------
def test_convert_matches_imagefolder(digits_root, digits_betons):
    from torchvision.datasets import ImageFolder

    for split, count in (("train", DIGITS_TRAIN), ("val", DIGITS_VAL)):
        folder = ImageFolder(str(digits_root / split))
        labels, widths, heights = beton_contents(digits_betons / f"{split}.beton")
        assert len(labels) == count
        assert labels == [target for _, target in folder.samples]  # same order, same class indices
        assert set(widths) == {32} and set(heights) == {32}
        assert read_report(digits_betons / f"skipped_{split}.tsv") == {}
    class_to_idx = json.loads((digits_betons / "labels.json").read_text())
    assert class_to_idx == ImageFolder(str(digits_root / "train")).class_to_idx
    assert not list(digits_betons.glob(".*.tmp*"))


def test_subset_is_deterministic_and_covers_classes(digits_root, tmp_path, capsys):
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(["convert", "--train-root", str(digits_root / "train"), "--out", str(out),
                     "--subset", "20", "--num-workers", "1"]) == 0
    first, second = beton_contents(tmp_path / "a" / "train.beton"), beton_contents(tmp_path / "b" / "train.beton")
    assert first == second
    assert sorted(first[0]) == sorted(list(range(10)) * 2)  # round robin: two per class
    assert not (tmp_path / "a" / "val.beton").exists()
    assert "train: 160 image files found, 20 written, 0 skipped, 140 left out by --subset" in capsys.readouterr().out


def test_existing_output_is_kept_unless_overwrite(digits_root, tmp_path, capsys):
    args = ["convert", "--train-root", str(digits_root / "val"), "--out", str(tmp_path), "--num-workers", "1"]
    assert main(args) == 0
    before = (tmp_path / "train.beton").stat().st_mtime_ns
    assert main(args) == 0
    assert "exists, kept" in capsys.readouterr().out
    assert (tmp_path / "train.beton").stat().st_mtime_ns == before
    assert main(args + ["--overwrite", "--max-resolution", "16"]) == 0
    assert set(beton_contents(tmp_path / "train.beton")[1]) == {16}


def test_conversion_is_reproducible_whatever_the_worker_count(digits_root, tmp_path):
    """Same tree, options and seed: byte-identical files with 1 and 2 workers (proportion mode draws
    JPEG vs raw per image from the seed, and one writer lays the records out in order)."""
    for workers, seed in ((1, 0), (2, 0), (2, 1)):
        assert main(["convert", "--root", str(digits_root), "--out", str(tmp_path / f"w{workers}s{seed}"),
                     "--num-workers", str(workers), "--seed", str(seed)]) == 0
    for split in ("train", "val"):
        one, two = (tmp_path / f"w{w}s0" / f"{split}.beton" for w in (1, 2))
        assert one.read_bytes() == two.read_bytes()
    modes = {seed: _modes(tmp_path / f"w2s{seed}" / "train.beton") for seed in (0, 1)}
    assert modes[0] != modes[1] and 0.3 < np.mean(modes[0]) < 0.7  # another seed, another (fair) draw


def _modes(path) -> list[int]:
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return reader.metadata[f"f{reader.field_names.index('image')}"]["mode"].tolist()


def test_each_image_is_decoded_once(digits_root, tmp_path, monkeypatch):
    import data_prep.encode as encode

    decoded = []

    def counting(path, **kwargs):
        decoded.append(path)
        return load_rgb(path, **kwargs)

    load_rgb = encode.load_rgb
    monkeypatch.setattr(encode, "load_rgb", counting)
    assert main(["convert", "--train-root", str(digits_root / "train"), "--out", str(tmp_path),
                 "--num-workers", "2"]) == 0
    assert sorted(decoded) == sorted(str(p) for p in (digits_root / "train").rglob("*.jpg"))  # each exactly once


def test_records_are_those_of_ffcvs_own_writer(digits_root, tmp_path):
    """jpg mode: every stored record is byte for byte what ffcv's DatasetWriter stores for the file."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    DatasetWriter(str(tmp_path / "ffcv.beton"), {"image": RGBImageField(write_mode="jpg", max_resolution=500),
                                                  "label": IntField()},
                  num_workers=1).from_indexed_dataset(ImageFolder(str(digits_root / "val")))
    assert main(["convert", "--val-root", str(digits_root / "val"), "--out", str(tmp_path), "--num-workers", "1",
                 "--write-mode", "jpg"]) == 0

    def records(path):
        reader, data = Reader(str(path)), (tmp_path / path).read_bytes()
        sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
        image = reader.metadata["f0"]
        return [(int(m["mode"]), int(m["width"]), int(m["height"]),
                 data[m["data_ptr"]:m["data_ptr"] + sizes[m["data_ptr"]]]) for m in image], reader.metadata["f1"].tolist()

    ours = records(tmp_path / "val.beton")
    assert len(ours[0]) == DIGITS_VAL and ours == records(tmp_path / "ffcv.beton")


# ---- bad input -----------------------------------------------------------------------------------
def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """Three classes of real digits plus one file of every problematic kind. Returns (root, expected
    skips {name: reason}, odd-but-usable names, number of usable images)."""
    root = tmp_path_factory.mktemp("bad") / "train"
    images = [image for _, _, image in digit_images(0, 12)]
    for k, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for j in range(3):
            images[3 * k + j].save(root / name / f"good{j}.jpg", quality=95)
    photo = Image.fromarray(__import__("skimage.data", fromlist=["x"]).chelsea())
    good = _jpeg_bytes(photo)
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("not an image\n")
    (root / "a" / "garbage.jpeg").write_bytes(os.urandom(2048))
    (root / "b" / "cmyk.jpg").write_bytes(_jpeg_bytes(photo.convert("CMYK")))
    (root / "b" / "png_inside.JPEG").write_bytes(_png_bytes(images[9]))
    images[10].convert("L").save(root / "b" / "gray.jpg")
    deep = Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16))
    deep.save(root / "c" / "deep16.png")
    images[11].convert("P", palette=Image.ADAPTIVE).save(root / "c" / "palette.png")
    (root / "README.txt").write_text("stray file at the split root\n")
    skips = {"truncated.jpg": "truncated", "empty.jpg": "empty-file", "notes.txt": "not-an-image-file",
             "garbage.jpeg": "not-an-image", "README.txt": "outside-class-folder"}
    odd = {"cmyk.jpg", "png_inside.JPEG", "gray.jpg", "deep16.png", "palette.png"}
    return root, skips, odd, 9 + len(odd)


def test_bad_files_are_skipped_and_reported(bad_tree, tmp_path, capsys):
    root, skips, odd, usable = bad_tree
    assert main(["convert", "--train-root", str(root), "--out", str(tmp_path), "--num-workers", "2"]) == 0
    labels, widths, heights = beton_contents(tmp_path / "train.beton")
    assert len(labels) == usable
    assert sorted(set(labels)) == [0, 1, 2]
    assert read_report(tmp_path / "skipped_train.tsv") == skips
    out = capsys.readouterr().out
    # every entry met is counted once: 17 image files + 2 other = 14 written + 5 skipped
    assert f"train: 19 found (17 image files, 2 other), {usable} written, {len(skips)} skipped ->" in out
    for reason in set(skips.values()):
        assert reason in out
    assert "CMYK->RGB 1" in out and "PNG data in .JPEG file 1" in out and "I;16->RGB (rescaled to 8 bits) 1" in out


def test_odd_images_become_sensible_rgb(bad_tree):
    from dwnet.data.image_io import load_rgb

    root = bad_tree[0]
    deep, note = load_rgb(str(root / "c" / "deep16.png"))
    pixels = np.asarray(deep)
    assert deep.mode == "RGB" and "I;16" in note
    assert pixels.min() == 0 and pixels.max() == 255 and 100 < pixels.mean() < 155  # rescaled, not clipped white
    for name in ("cmyk.jpg", "png_inside.JPEG", "gray.jpg", "palette.png"):
        folder = "b" if name != "palette.png" else "c"
        image, note = load_rgb(str(root / folder / name))
        assert image.mode == "RGB" and note


def test_strict_exits_nonzero_without_writing(bad_tree, tmp_path, capsys):
    root, skips, _, _ = bad_tree
    assert main(["convert", "--train-root", str(root), "--out", str(tmp_path), "--strict", "--num-workers", "1"]) == 1
    assert not (tmp_path / "train.beton").exists()
    assert read_report(tmp_path / "skipped_train.tsv") == skips
    assert "--strict" in one_line_error(capsys)


def _without_permission_override() -> list[str]:
    """Command prefix under which chmod 000 really locks a folder. Root bypasses file permissions
    through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; setpriv drops both for the child, so a root test
    run (CI) sees the same PermissionError a user's conversion would. [] when not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv (util-linux): cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_unreadable_folder_is_reported(tmp_path):
    root = tmp_path / "train"
    write_digits_tree(root, 0, 20)
    locked = root / "digit0" / "locked"
    locked.mkdir()
    next(digit_images(0, 1))[2].save(locked / "hidden.jpg")
    locked.chmod(0)
    try:
        out = subprocess.run([*_without_permission_override(), sys.executable, "-m", "data_prep", "convert",
                              "--train-root", str(root), "--out", str(tmp_path / "out"), "--num-workers", "1"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert read_report(tmp_path / "out" / "skipped_train.tsv") == {"locked": "unreadable-folder"}
        assert len(beton_contents(tmp_path / "out" / "train.beton")[0]) == 20
        assert "unreadable-folder" in out.stdout  # the summary names the reason too
    finally:
        locked.chmod(0o755)


def test_disk_full_while_writing_keeps_the_old_file(digits_root, tmp_path, capsys, monkeypatch):
    import errno

    from data_prep.beton_writer import BetonWriter

    args = ["convert", "--val-root", str(digits_root / "val"), "--out", str(tmp_path), "--num-workers", "1"]
    assert main(args) == 0
    before = (tmp_path / "val.beton").read_bytes()

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BetonWriter, "_flush_page", full)
    assert main(args + ["--overwrite", "--write-mode", "raw"]) == 1
    line = one_line_error(capsys)
    assert f"{tmp_path / 'val.beton'}: writing failed (No space left on device)" in line
    assert (tmp_path / "val.beton").read_bytes() == before and not list(tmp_path.glob(".val.beton.tmp.*"))


def test_empty_tree_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert main(["convert", "--train-root", str(tmp_path / "train"), "--out", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys)
    assert str(tmp_path / "train") in line and "no class folders" in line


def test_empty_class_folder_is_a_one_line_error(tmp_path, capsys):
    write_digits_tree(tmp_path / "train", 0, 20)
    (tmp_path / "train" / "zz_empty").mkdir()
    assert main(["convert", "--train-root", str(tmp_path / "train"), "--out", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys)
    assert str(tmp_path / "train" / "zz_empty") in line and "no image files" in line


def test_root_without_splits_explains_the_fix(tmp_path, capsys):
    write_digits_tree(tmp_path / "flat", 0, 10)
    assert main(["convert", "--root", str(tmp_path / "flat"), "--out", str(tmp_path / "out")]) == 1
    assert "--train-root" in one_line_error(capsys)


def test_help_explains_options():
    result = subprocess.run([sys.executable, "-m", "data_prep", "convert", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--root", "--train-root", "--val-root", "--max-resolution", "--jpeg-quality",
                   "--compress-probability", "--write-mode", "--seed", "--num-workers", "--subset", "--strict"):
        assert option in result.stdout


# ---- atomic output -----------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_conversion_leaves_no_final_file_and_rerun_succeeds(tmp_path):
    import skimage.data

    root = tmp_path / "photos"
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    for k, photo in enumerate(photos):
        (root / f"class{k}").mkdir(parents=True)
        Image.fromarray(photo).save(root / f"class{k}" / "0.jpg", quality=90)
        for j in range(1, 60):  # hard links: many files, little disk
            os.link(root / f"class{k}" / "0.jpg", root / f"class{k}" / f"{j}.jpg")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep", "convert", "--train-root", str(root), "--out", str(out),
               "--num-workers", "1", "--write-mode", "raw", "--max-resolution", "0"]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not any(p.stat().st_size > (8 << 20) for p in out.glob(".train.beton.tmp.*")):  # pages written
            assert proc.poll() is None, "converter finished before it could be interrupted"
            assert time.monotonic() < deadline, "converter never started writing"
            time.sleep(0.02)
        assert proc.poll() is None, "converter finished before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the encoding workers too
        proc.wait(timeout=30)
    assert not (out / "train.beton").exists()
    assert list(out.glob(".train.beton.tmp.*"))  # the partial file exists, but only under its temp name
    assert main(["convert", "--train-root", str(root), "--out", str(out), "--num-workers", "1",
                 "--write-mode", "raw", "--max-resolution", "0"]) == 0
    assert not list(out.glob(".train.beton.tmp.*"))  # the rerun removed the dead run's temporary file
    labels, widths, _ = beton_contents(out / "train.beton")
    assert len(labels) == 240 and max(widths) == 640
    assert main(["verify", str(out / "train.beton"), "--decode", "8"]) == 0


# ---- verify --------------------------------------------------------------------------------------
def test_verify_good_file(digits_betons, capsys):
    assert main(["verify", str(digits_betons / "train.beton"), "--decode", "0"]) == 0
    out = capsys.readouterr().out
    assert f"samples: {DIGITS_TRAIN}" in out and "classes: 10 present" in out
    assert "width: min 32" in out and f"decoded: {DIGITS_TRAIN}/{DIGITS_TRAIN}" in out and out.strip().endswith("OK")


def _damage(source: Path, target: Path, how: str) -> str:
    """Writes a damaged copy of `source`; returns what verify must say about it."""
    data = bytearray(source.read_bytes())
    message = {"truncated": "truncated", "garbage": "not an ffcv .beton", "missing": "no such file"}.get(how)
    if how == "truncated":
        data = data[: int(len(data) * 0.6)]
    elif how == "garbage":
        data = bytearray(os.urandom(4096))
    elif how == "record":
        from ffcv.reader import Reader

        reader = Reader(str(source))
        images = reader.metadata[f"f{reader.field_names.index('image')}"]
        jpeg = int(np.flatnonzero(images["mode"] == 0)[0])  # a JPEG record (proportion mode mixes in raw)
        ptr = int(images["data_ptr"][jpeg])
        data[ptr:ptr + 16] = bytes(16)  # wipe its JPEG header
        message = f"sample {jpeg} does not decode"
    if how != "missing":
        target.write_bytes(bytes(data))
    return message


@pytest.mark.parametrize("how", ["truncated", "garbage", "record", "missing"])
def test_verify_damaged_file_fails_in_one_line(digits_betons, tmp_path, capsys, how):
    target = tmp_path / "damaged.beton"
    message = _damage(digits_betons / "val.beton", target, how)
    assert main(["verify", str(target), "--decode", "0"]) == 1
    line = one_line_error(capsys)
    assert str(target) in line and message in line


def test_verify_cli_exit_code(digits_betons, tmp_path):
    shutil.copy(digits_betons / "val.beton", tmp_path / "v.beton")
    os.truncate(tmp_path / "v.beton", 1000)
    result = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(tmp_path / "v.beton")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "truncated" in result.stderr
