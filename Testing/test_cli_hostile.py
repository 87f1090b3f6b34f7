"""A hostile new user on the real command line (issue 16): every bad input is refused with exit
status 2 and a message that says what is wrong and what to do, no traceback, and no input or
earlier output changes (every file of the test folder is hashed before and after).

The cases that matter most run the installed command in a subprocess (``python -m
fvlm_training.cli``, the code behind the ``fvlm`` script): the first case of each test, and those
that need a process of their own (umask, exit status of plain ``fvlm``). The rest call the same
``main`` in-process (the real argument parsing, commands and error printing): a subprocess costs
seconds of interpreter and library start-up each, and the tiny model is built once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from dicom_study import Study, write_ct_series

from fvlm_core.data.synth import make_phantom
from fvlm_core.io import write_image
from fvlm_training.cli import main

# ---------------------------------------------------------------- helpers


def fvlm(*args: str | Path, cwd: Path, timeout: int = 120, umask: int | None = None):
    """Run the installed command line in a subprocess (with ``umask``, if given, set in the child
    by subprocess itself, not by a thread-unsafe ``preexec_fn``); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "fvlm_training.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        umask=-1 if umask is None else umask,  # -1: the parent's umask
        check=False,
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path below ``root`` (hidden temporaries too): content hash (or, for big files,
    size, mtime and inode) and mode."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        key = str(p.relative_to(root))
        if p.is_file() and st.st_size < 1 << 20:
            out[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
        elif p.is_file():
            out[key] = (st.st_size, st.st_mtime_ns, st.st_ino, stat.S_IMODE(st.st_mode))
        else:
            out[key] = ("dir", stat.S_IMODE(st.st_mode))
    return out


def refused(rc: int, err: str, *words: str) -> None:
    """Exit status 2, an ``error:`` line holding ``words``, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err and "error:" in err, err
    for w in words:
        assert w in err, f"{w!r} not in: {err}"


@contextlib.contextmanager
def unchanged(root: Path):
    before = snapshot(root)
    yield
    assert snapshot(root) == before


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    """The command line in-process: ``(exit status, stdout, stderr)``."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def fvlm_here(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """:func:`fvlm` in-process (the same ``main``, argument parsing and error printing, in the
    current folder) for the further cases of a test whose first case ran the real command: a
    subprocess costs the interpreter's and the libraries' start-up each time."""
    rc, out, err = run_main(capsys, *args)
    return subprocess.CompletedProcess([str(a) for a in args], rc, out, err)


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_model_config) -> Path:
    """Inputs a user has: a tiny model folder, a CT and its label map, a 5-slice 60 mm CT, a
    DICOM folder holding two series, a prompts file, broken files."""
    import torch

    from fvlm_core.model import FVLM

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    FVLM(small_model_config()).save_pretrained(root / "model")
    s = make_phantom(7, 0, "valid", (32, 32, 32))
    write_image(s.hu.astype(np.int16), s.geometry, root / "ct.nii.gz")
    write_image((s.labels * (s.labels <= 4)).astype(np.uint8), s.geometry, root / "seg.nii.gz")
    thin = make_phantom(7, 0, "valid", (5, 32, 32), spacing_zyx=(60.0, 11.25, 11.25))
    write_image(thin.hu.astype(np.int16), thin.geometry, root / "thin5.nii.gz")
    write_image((thin.labels * (thin.labels <= 4)).astype(np.uint8), thin.geometry, root / "thin5_seg.nii.gz")
    # a DICOM folder holding two series of one study, the second with half the slices
    study = Study("1.2.826.0.1.3680043.2.1125.7", "1.2.826.0.1.3680043.2.1125.7.9")
    write_ct_series(root / "dicom", s.hu, s.geometry, study, 1, "series 1", f"{study.study_uid}.1")
    sx, sy, sz = s.geometry.spacing
    coarse = replace(s.geometry, size=(32, 32, 16), spacing=(sx, sy, 2 * sz))
    write_ct_series(root / "dicom", s.hu[::2], coarse, study, 2, "series 2", f"{study.study_uid}.2")
    nan = s.hu.astype(np.float32)
    nan[16, 16, 8] = np.nan  # in the lung
    nan[20, 20, 20] = np.inf
    image = sitk.GetImageFromArray(nan)
    s.geometry.apply_to(image)
    sitk.WriteImage(image, str(root / "nan.mha"))
    (root / "prompts.yaml").write_text(
        "- name: Fluid\n  anatomy: lung\n"  # no wordings: defaults, with a warning
        "- name: Emphysema\n  anatomy: lung\n"  # a built-in finding's name: replaces it
        "  positive: [Emphysema is present.]\n  negative: [No emphysema.]\n"
    )
    (root / "latin1.yaml").write_bytes("- name: Épanchement\n  anatomy: lung\n".encode("latin-1"))
    (root / "afile").write_text("a file, not a folder")
    (root / "adir").mkdir()
    return root


# ---------------------------------------------------------------- subprocesses: the real command


def test_help_never_crashes(world, capsys):
    for args in (["--help"], ["-h"], []):
        r = fvlm(*args, cwd=world) if args != ["-h"] else fvlm_here(capsys, *args)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == (1 if not args else 0)
        assert "analyze" in r.stdout and "import-checkpoint" in r.stdout and "train" in r.stdout


def test_an_output_that_is_an_input_is_refused(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    with unchanged(world):
        r = fvlm("segment", "ct.nii.gz", "--out", "ct.nii.gz", cwd=world)
        refused(r.returncode, r.stderr, "--out ct.nii.gz is the input CT", "Choose another output path")
        analyze = ("analyze", "ct.nii.gz", "--segmentation", "seg.nii.gz", "--model", "model", "--out")
        r = fvlm(*analyze, "ct.nii.gz", cwd=world)
        refused(r.returncode, r.stderr, "--out ct.nii.gz is the input CT", "Nothing was done")
        r = fvlm_here(capsys, *analyze, "seg.nii.gz")
        refused(r.returncode, r.stderr, "is the input --segmentation seg.nii.gz")
        r = fvlm_here(capsys, "segment", "ct.nii.gz", "--out", "new.nii.gz", "--json", "new.nii.gz")
        refused(r.returncode, r.stderr, "--out and --json are the same path", "its own path")
    assert not (world / "new.nii.gz").exists()


def test_outputs_that_cannot_be_written_are_refused_before_the_work(world, capsys, monkeypatch):
    analyze = ["analyze", "ct.nii.gz", "--segmentation", "seg.nii.gz", "--model", "model"]
    monkeypatch.chdir(world)
    with unchanged(world):
        r = fvlm(*analyze, "--out", "adir", cwd=world)
        refused(r.returncode, r.stderr, "--out adir is an existing folder", "adir/results.json")
        r = fvlm_here(capsys, *analyze, "--out", "r.json", "--maps-dir", "afile")
        refused(r.returncode, r.stderr, "--maps-dir afile is an existing file", "give a folder path")
        r = fvlm_here(capsys, *analyze, "--out", "afile/r.json")
        refused(r.returncode, r.stderr, "afile is a file, not a folder")
        r = fvlm_here(capsys, *analyze, "--out", "/sys/kernel/r.json")  # unwritable even for root
        refused(r.returncode, r.stderr, "cannot write in /sys/kernel", "Choose a folder you can write to")
        r = fvlm_here(capsys, "segment", "ct.nii.gz", "--out", "anatomy.txt")
        refused(r.returncode, r.stderr, "unknown file type", ".nii.gz")


def test_nan_voxels_and_bad_text_files_are_refused(world, capsys, monkeypatch):
    (world / "header_only.csv").write_text("VolumeName,report_text\n")
    monkeypatch.chdir(world)
    with unchanged(world):
        r = fvlm(
            "analyze", "nan.mha", "--model", "model", "--out", "r.json", cwd=world
        )  # was: bincount traceback
        refused(r.returncode, r.stderr, "nan.mha: 2 of 32768 voxels are NaN or infinite", "replace them")
        r = fvlm_here(
            capsys, "analyze", "ct.nii.gz", "--model", "model", "--prompts", "latin1.yaml", "--out", "r.json"
        )
        refused(r.returncode, r.stderr, "--prompts latin1.yaml: not UTF-8 text", "Save the file as UTF-8")
        r = fvlm_here(capsys, "labels", "header_only.csv", "--out", "labels.csv")
        refused(r.returncode, r.stderr, "has a header (VolumeName, report_text) but no rows", "right file")
    (world / "header_only.csv").unlink()


def test_import_checkpoint_refuses_an_existing_folder_and_unsafe_pickles(world, tmp_path, capsys):
    import torch

    class Payload:  # what a malicious .pth would hold: unpickling it runs open(marker, "w")
        def __reduce__(self):
            return (open, (str(tmp_path / "code-ran"), "w"))

    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, tmp_path / "evil.pth")
    args = ["import-checkpoint", tmp_path / "evil.pth", "--text-encoder", world / "model" / "text"]
    with unchanged(world):
        r = fvlm(*args, "--out", world / "model", cwd=tmp_path)
        refused(r.returncode, r.stderr, "model already exists; pass --force to replace it")
        r = fvlm_here(capsys, *args, "--out", tmp_path / "evil.pth")
        refused(r.returncode, r.stderr, "is the input CHECKPOINT")
        # in-process (torch is imported already): the file is opened and refused
        rc, _, err = run_main(capsys, *args, "--out", tmp_path / "imported", "--force")
        refused(rc, err, "not a checkpoint fvlm can read safely", "Unsupported global", "never does")
    assert "weights_only" not in err and "safe_globals" not in err  # no advice to load it unsafely
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "imported").exists()


@pytest.mark.slow
def test_analyze_warns_records_and_keeps_modes(world, tmp_path):
    """A 5-slice 60 mm CT, a prompt without wordings, a prompt named like a built-in finding:
    scored, but each is said (stderr) and recorded (JSON); outputs follow the umask and a
    replaced result keeps its mode."""
    out = tmp_path / "results.json"
    out.write_text("earlier")
    os.chmod(out, 0o644)
    args = ["analyze", world / "thin5.nii.gz", "--segmentation", world / "thin5_seg.nii.gz"]
    args += ["--model", world / "model", "--prompts", world / "prompts.yaml", "--device", "cpu"]
    with unchanged(world):
        r = fvlm(
            *args,
            "--maps-dir",
            tmp_path / "maps",
            "--all-maps",
            "--out",
            out,
            cwd=tmp_path,
            timeout=600,
            umask=0o027,
        )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    d = json.loads(out.read_text())
    printed = [ln for ln in r.stderr.splitlines() if ln.startswith("fvlm analyze: warning: ")]
    assert len(printed) == len(d["warnings"]) == 3, r.stderr
    spacing, default_wording, replaced = (
        next(w for w in d["warnings"] if key in w) for key in ("60 x 11.25 x 11.25 mm", "Fluid", "replaces")
    )
    assert "coarser along z (slice) than the 6 x 6 x 6 mm the model works at" in spacing
    assert "thinner-slice reconstruction" in spacing and spacing in d["notes"]
    assert "'Fluid.' / 'Not Fluid.' are used" in default_wording
    assert "'Emphysema' replaces the model's finding" in replaced and "Rename yours" in replaced
    lung = next(a for a in d["anatomies"] if a["name"] == "lung")
    emphysema = [f for f in lung["findings"] if f["name"] == "Emphysema"]
    assert len(emphysema) == 1 and emphysema[0]["positive"] == ["Emphysema is present."]
    assert d["ct_spacing_mm"] == [11.25, 11.25, 60.0]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # replaced: keeps its mode
    maps = sorted((tmp_path / "maps").iterdir())
    assert len(maps) == len(d["similarity_maps"]) == 17
    assert {stat.S_IMODE(p.stat().st_mode) for p in maps} == {0o640}  # new: the umask
    assert stat.S_IMODE((tmp_path / "maps").stat().st_mode) == 0o750
    assert sorted(m["file"] for m in d["similarity_maps"]) == [
        str(p) for p in maps
    ]  # final places, not staging
    for line in r.stderr.splitlines():
        if line.startswith("flagged: "):
            p, t = line.split("(p = ")[1].split(",")[0].split(" > ")
            assert float(p) > float(t) and p != t


# ---------------------------------------------------------------- in-process: the same main()


def test_more_bad_outputs_of_analyze(world, capsys):
    base = [
        "analyze",
        world / "ct.nii.gz",
        "--segmentation",
        world / "seg.nii.gz",
        "--model",
        world / "model",
    ]
    cases = [
        (
            ["--out", world / "model" / "config.yaml"],
            ["part of the input folder --model", "outside that folder"],
        ),
        (["--out", world / "r.json", "--maps-dir", world / "model"], ["--maps-dir", "is the input --model"]),
        (["--out", world / "prompts.yaml", "--prompts", world / "prompts.yaml"], ["is the input --prompts"]),
        (["--out", world / "r.json", "--all-maps"], ["--all-maps", "give --maps-dir FOLDER too"]),
        (["--out", world / "r.json", "--only-prompts"], ["--only-prompts", "give --prompts FILE too"]),
    ]
    with unchanged(world):
        for extra, words in cases:
            rc, _, err = run_main(capsys, *base, *extra)
            refused(rc, err, *words)


@pytest.mark.parametrize(
    "entries, words",
    [
        (
            [{"name": "A", "anatomy": "lung"}, {"name": "A", "anatomy": "heart"}],
            ["entries 1 and 2 are both named 'A'"],
        ),
        ([{"name": "A", "anatomy": "lung", "postive": ["A."]}], ["unknown key(s) postive", "spelling"]),
        ([{"name": "A", "anatomy": "lung", "positive": 3}], ["positive must be a text or a list of texts"]),
        ([{"anatomy": "lung"}], ["entry 1 needs a name"]),
        ([{"name": "A", "anatomy": "spleen"}], ["anatomies this model does not have", "'A' on 'spleen'"]),
    ],
)
def test_bad_prompt_files(world, tmp_path, capsys, entries, words):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(yaml.safe_dump(entries))
    with unchanged(world):
        rc, _, err = run_main(
            capsys,
            "analyze",
            world / "ct.nii.gz",
            "--model",
            world / "model",
            "--prompts",
            prompts,
            "--out",
            tmp_path / "r.json",
        )
    refused(rc, err, *words)
    assert not (tmp_path / "r.json").exists()


def test_a_model_whose_anatomy_list_was_reordered_is_refused(world, tmp_path, capsys):
    """Same tensor shapes, another anatomy's weights: refused, naming both lists."""
    model = tmp_path / "model"
    shutil.copytree(world / "model", model, copy_function=os.link)  # the weights are not copied
    (model / "config.yaml").unlink()
    cfg = yaml.safe_load((world / "model" / "config.yaml").read_text())
    (model / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "anatomies": ["heart", "lung", "esophagus", "aorta"]})
    )
    with unchanged(world):
        rc, _, err = run_main(
            capsys, "analyze", world / "ct.nii.gz", "--segmentation", world / "seg.nii.gz", "--model", model,
            "--device", "cpu", "--out", tmp_path / "r.json",
        )  # fmt: skip
    refused(
        rc,
        err,
        "saved for the anatomies [lung, heart, esophagus, aorta]",
        "lists [heart, lung, esophagus, aorta]",
    )
    assert "Restore `anatomies: [lung, heart, esophagus, aorta]`" in err
    assert not (tmp_path / "r.json").exists()


def test_a_full_disk_leaves_no_half_result(world, tmp_path, capsys):
    """The similarity maps do not fit (file size limit, as a full disk): the earlier results.json
    stays as it was and no maps folder appears."""
    resource = pytest.importorskip("resource")
    import signal

    out = tmp_path / "results.json"
    out.write_text("earlier result")
    before = snapshot(tmp_path)
    old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, old[1]))  # less than one compressed NIfTI
    try:
        rc, _, err = run_main(
            capsys, "analyze", world / "ct.nii.gz", "--segmentation", world / "seg.nii.gz", "--model", world / "model",
            "--device", "cpu", "--maps-dir", tmp_path / "maps", "--all-maps", "--out", out, "--quiet",
        )  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    refused(rc, err, "could not be written", "free space", "nothing was written")
    assert snapshot(tmp_path) == before


def test_dicom_folder_with_two_series(world, tmp_path, capsys):
    with unchanged(world):
        rc, _, err = run_main(
            capsys, "segment", world / "dicom", "--out", tmp_path / "a.nii.gz", "--json", tmp_path / "a.json"
        )
        assert rc == 0, err
        summary = json.loads((tmp_path / "a.json").read_text())
        (warning,) = [w for w in summary["warnings"] if "DICOM series" in w]
        assert f"fvlm segment: warning: {warning}" in err
        assert "holds 2 DICOM series; reading 1.2.826.0.1.3680043.2.1125.7.1 (32 slices" in warning
        assert (
            'Others: 1.2.826.0.1.3680043.2.1125.7.2 (16 slices, "series 2")' in warning
            and "--series UID" in warning
        )
        assert summary["dicom_series"] == "1.2.826.0.1.3680043.2.1125.7.1" and summary["shape_zyx"] == [
            32,
            32,
            32,
        ]
        rc, _, err = run_main(
            capsys, "segment", world / "dicom", "--series", "1.2.826.0.1.3680043.2.1125.7.2", "--out", tmp_path / "b.nii.gz",
            "--json", tmp_path / "b.json",
        )  # fmt: skip
        summary = json.loads((tmp_path / "b.json").read_text())
        assert (
            rc == 0
            and "DICOM series" not in err
            and not any("DICOM series" in w for w in summary["warnings"])
        )
        assert summary["shape_zyx"] == [16, 32, 32] and summary["spacing_mm"][2] == 18.0
        rc, _, err = run_main(
            capsys, "segment", world / "dicom", "--series", "9.9", "--out", tmp_path / "c.nii.gz"
        )
        refused(
            rc,
            err,
            "holds no DICOM series 9.9",
            "1.2.826.0.1.3680043.2.1125.7.1 (32 slices",
            "Pass one of these UIDs",
        )
        rc, _, err = run_main(
            capsys, "segment", world / "ct.nii.gz", "--series", "9.9", "--out", tmp_path / "c.nii.gz"
        )
        refused(rc, err, "can only be chosen in a DICOM folder", "Leave --series out")
    assert not (tmp_path / "c.nii.gz").exists()


def test_segment_warns_on_coarse_slices_and_follows_the_umask(world, tmp_path, capsys):
    (tmp_path / "thin.json").write_text("{}")
    os.chmod(tmp_path / "thin.json", 0o664)
    old = os.umask(0o077)
    try:
        rc, _, err = run_main(
            capsys,
            "segment",
            world / "thin5.nii.gz",
            "--out",
            tmp_path / "thin.nii.gz",
            "--json",
            tmp_path / "thin.json",
        )
    finally:
        os.umask(old)
    assert rc == 0, err
    (warning,) = json.loads((tmp_path / "thin.json").read_text())["warnings"]
    assert "60 x 11.25 x 11.25 mm" in warning and "the builtin segmenter works at" in warning
    assert f"warning: {warning}" in err
    assert stat.S_IMODE((tmp_path / "thin.nii.gz").stat().st_mode) == 0o600  # new file: umask 077
    assert stat.S_IMODE((tmp_path / "thin.json").stat().st_mode) == 0o664  # replaced: kept


def test_every_other_command_checks_its_outputs(world, tmp_path, capsys):
    reports = tmp_path / "reports.csv"
    reports.write_text("VolumeName,report_text\nv1,No effusion.\n")
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "stale.nii.gz").write_text("an earlier cohort")
    cases = [
        (["labels", reports, "--out", reports], ["--out", "is the input REPORTS"]),
        (
            ["synth", "--out", tmp_path / "cohort", "--n", "2", "--size", "16"],
            ["already exists; pass --force"],
        ),
        (["synth", "--out", world / "afile", "--n", "2", "--size", "16"], ["is an existing file"]),
        (
            ["prepare", "--dataset", tmp_path / "cohort", "--out", tmp_path / "cohort"],
            ["is the input --dataset"],
        ),
        (["prepare", "--dataset", tmp_path / "cohort", "--out", world / "afile"], ["is an existing file"]),
        (["sample-data", "--dest", world / "afile", "--sdist", reports], ["--dest", "is an existing file"]),
        (["import-checkpoint", reports, "--text-encoder", "x", "--out", world / "model"], ["pass --force"]),
    ]
    with unchanged(world), unchanged(tmp_path):
        for args, words in cases:
            rc, _, err = run_main(capsys, *args)
            refused(rc, err, *words)
    # --force replaces the folder as a whole: nothing of the earlier cohort stays mixed in
    rc, _, err = run_main(
        capsys, "synth", "--out", tmp_path / "cohort", "--n", "2", "--size", "16", "--force"
    )
    assert rc == 0, err
    assert not (tmp_path / "cohort" / "stale.nii.gz").exists() and (tmp_path / "cohort" / "metadata").is_dir()


def test_flagged_numbers_never_print_equal():
    from fvlm_core.commands.analyze import distinct_numbers

    assert distinct_numbers(0.5000004, 0.5) == ("0.5000004", "0.5000000")  # was "0.500 > 0.500"
    assert distinct_numbers(0.73, 0.5) == ("0.730", "0.500")


def test_nan_reaching_the_analyzer_directly_is_refused(world):
    """The 3D Slicer worker builds CTVolume from an array itself: the analyzer checks too."""
    import torch

    from fvlm_core.anatomy import get_catalog
    from fvlm_core.errors import InputError
    from fvlm_core.io import CTVolume, read_label_map
    from fvlm_core.segmentation import AnatomySegmentation
    from fvlm_core.zeroshot.analyzer import Analyzer

    torch.manual_seed(0)
    analyzer = Analyzer.from_pretrained(world / "model", device="cpu")
    labels = read_label_map(world / "seg.nii.gz")
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(world / "nan.mha"))).astype(np.float32)
    ct = CTVolume(hu, labels.geometry, "slicer volume")
    seg = AnatomySegmentation.from_labelmap(
        labels.array, labels.geometry, get_catalog(analyzer.anatomies), "test"
    )
    with pytest.raises(InputError, match="slicer volume: 2 of 32768 voxels are NaN or infinite"):
        analyzer.analyze(ct, seg, similarity_maps=False)
