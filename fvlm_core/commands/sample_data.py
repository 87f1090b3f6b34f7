"""Fetch openly licensed example CTs (TotalSegmentator's test files, Apache-2.0) to try fvlm on.

The TotalSegmentator source distribution on PyPI carries real example CTs and reference
segmentations. This command obtains it with pip (``pip download --no-binary :all:``), extracts
only those files (plus the LICENSE) into DEST and leaves the rest. Files already in DEST are not
fetched again. ``--sdist FILE`` uses a local copy of the tarball instead of pip (offline).

Examples::

    fvlm sample-data                        # into ~/.cache/fvlm/sample-data
    fvlm sample-data --dest data/examples --sdist totalsegmentator-2.18.0.tar.gz
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tqdm import tqdm

from fvlm_core.atomic import atomic_path, atomic_write_text
from fvlm_core.errors import DataError, InputError
from fvlm_core.outputs import OutputPlan

TOTALSEG_VERSION = "2.18.0"

#: sdist path (below its top folder) -> name in DEST. The chest CT and its masks are the test
#: files of TotalSegmentator's aorta and pulmonary reports.
SAMPLE_FILES: dict[str, str] = {
    "LICENSE": "LICENSE",
    "tests/reference_files/example_ct_sm.nii.gz": "example_ct_sm.nii.gz",
    "tests/reference_files/example_seg.nii.gz": "example_seg.nii.gz",
    "tests/reference_files/example_ct.nii.gz": "example_ct.nii.gz",
    "tests/reference_files/example_seg_fast_force_split.nii.gz": "example_seg_fast_force_split.nii.gz",
    "tests/reference_files/example_seg_dicom.nii.gz": "example_seg_dicom.nii.gz",
    "tests/reference_files/aorta_report/example_ct.nii.gz": "chest_ct.nii.gz",
    "tests/reference_files/aorta_report/test_result/models/aorta.nii.gz": "chest_aorta_cropped.nii.gz",
    "tests/reference_files/pulmonary_report/models/heart.nii.gz": "chest_heart.nii.gz",
}
#: sdist folders extracted whole (their files only, no sub-folders).
SAMPLE_DIRS: dict[str, str] = {"tests/reference_files/example_ct_dicom": "example_ct_dicom"}
#: files every complete sample-data folder holds (used to decide whether the cache is complete).
REQUIRED = ("LICENSE", "example_ct_sm.nii.gz", "example_seg.nii.gz")

NOTICE = (
    "Example CTs and reference segmentations from the TotalSegmentator {version} source distribution\n"
    "(https://pypi.org/project/TotalSegmentator/, https://github.com/wasserth/TotalSegmentator),\n"
    "licensed under the Apache License 2.0 (see LICENSE). The segmentations are TotalSegmentator\n"
    "model outputs, not manual ground truth.\n"
)


def default_dest() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fvlm" / "sample-data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dest", type=Path, default=None, help="folder to put them in (default ~/.cache/fvlm/sample-data)"
    )
    parser.add_argument("--sdist", type=Path, help="use this local TotalSegmentator .tar.gz instead of pip")
    parser.add_argument(
        "--version-pin",
        default=TOTALSEG_VERSION,
        help=f"TotalSegmentator version (default {TOTALSEG_VERSION})",
    )
    parser.add_argument("--force", action="store_true", help="extract again even when DEST is complete")


def _wanted(member_name: str) -> str | None:
    """Path inside DEST for an sdist member, or ``None`` when it is not a sample file."""
    parts = Path(member_name).parts
    if len(parts) < 2:
        return None
    inner = "/".join(parts[1:])  # drop "totalsegmentator-<version>/"
    if inner in SAMPLE_FILES:
        return SAMPLE_FILES[inner]
    folder, _, name = inner.rpartition("/")
    if folder in SAMPLE_DIRS and name:
        return f"{SAMPLE_DIRS[folder]}/{name}"
    return None


def extract_samples(sdist: Path, dest: Path, progress: bool = True) -> list[Path]:
    """Extract the sample files of a TotalSegmentator sdist into ``dest`` (each file atomically).

    Raises :class:`~fvlm_core.errors.DataError` when the tarball holds none of them.
    """
    try:
        tar = tarfile.open(sdist, "r:*")  # noqa: SIM115 (closed by the with-block below)
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{sdist}: not a readable source distribution tarball ({exc}).") from exc
    with tar:
        members = [(m, rel) for m in tar.getmembers() if m.isfile() and (rel := _wanted(m.name))]
        if not any(rel != "LICENSE" for _, rel in members):
            raise DataError(
                f"{sdist}: holds none of the example files (tests/reference_files/example_ct_sm.nii.gz, ...). "
                "Is it the TotalSegmentator source distribution?"
            )
        written = []
        total = sum(m.size for m, _ in members)
        with tqdm(total=total, unit="B", unit_scale=True, desc="extracting", disable=not progress) as bar:
            for m, rel in members:
                target = dest / rel
                if ".." in Path(rel).parts:  # never write outside dest
                    continue
                src = tar.extractfile(m)
                if src is None:
                    continue
                with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                    while chunk := src.read(1 << 20):
                        fh.write(chunk)
                        bar.update(len(chunk))
                written.append(target)
    return written


def download_sdist(version: str, tmp: Path) -> Path:
    """``pip download`` the TotalSegmentator sdist into ``tmp`` (pip shows its progress bar)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"totalsegmentator=={version}",
        "-d",
        str(tmp),
    ]
    print("running: " + " ".join(cmd), file=sys.stderr)
    result = subprocess.run(cmd, check=False)
    found = sorted(tmp.glob("*.tar.gz"))
    if result.returncode != 0 or not found:
        raise DataError(
            f"pip could not download the TotalSegmentator {version} source distribution (exit {result.returncode}). "
            "Check the internet/PyPI connection, or download it elsewhere and pass --sdist FILE."
        )
    return found[0]


def is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in REQUIRED)


def fetch_sample_data(
    dest: Path | None = None, sdist: Path | None = None, version: str = TOTALSEG_VERSION, force: bool = False
) -> Path:
    """Make sure ``dest`` holds the example CTs; returns ``dest``."""
    dest = Path(dest) if dest else default_dest()
    if is_complete(dest) and not force:
        print(f"sample data already in {dest} (use --force to extract again)")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fvlm-sdist-") as tmp:
        tarball = sdist if sdist is not None else download_sdist(version, Path(tmp))
        files = extract_samples(Path(tarball), dest)
    atomic_write_text(dest / "NOTICE.txt", NOTICE.format(version=version))
    print(f"extracted {len(files)} files into {dest}")
    return dest


def run(args: argparse.Namespace) -> int:
    plan = OutputPlan()
    plan.input("--sdist", args.sdist)
    plan.folder("--dest", args.dest or default_dest())
    plan.check()  # before a download
    dest = fetch_sample_data(args.dest, args.sdist, args.version_pin, args.force)
    for p in sorted(dest.iterdir()):
        print(f"  {p.name}{'/' if p.is_dir() else ''}")
    return 0
