"""The demo's phantoms: the train, calibration and test splits of synthetic chest CTs, as arrays.

Each split holds the phantoms' HU and anatomy labels in the model's anatomy order, each report
decomposed into anatomy descriptions (:mod:`fvlm_core.reports`), the labels a real dataset would
extract from the reports, and the ground truth of the rendered findings. A split is also the
dataset the trainer reads (``data[i]`` is a :class:`~fvlm_core.data.cache.CachedSample`), and is
written to a folder once for the training processes, which memory-map it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Findings the demo scores: those the phantoms render on an anatomy of the 4-anatomy model.
DEMO_FINDINGS: tuple[str, ...] = (
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pleural effusion",
    "Consolidation",
)


@dataclass
class DemoData:
    """The phantoms of one split, as arrays; also the dataset the trainer reads (``data[i]`` is a
    :class:`~fvlm_core.data.cache.CachedSample`, the sample type of a prepare cache).

    ``hu`` (N, Z, Y, X) int16; ``labels`` (N, Z, Y, X) uint8 in ``anatomies`` order (value i + 1);
    ``anatomy_texts`` per phantom, one per anatomy; ``reports``; ``abnormal`` (N, A);
    ``finding_labels`` (labels extracted from each report, as a real dataset would have them);
    ``truth`` {finding: (N,) 0/1} from the rendered findings.
    """

    names: list[str]
    anatomies: list[str]
    hu: np.ndarray
    labels: np.ndarray
    geometry: list[Any]
    anatomy_texts: list[list[str]]
    reports: list[str]
    abnormal: np.ndarray
    finding_labels: list[dict[str, int]]
    truth: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Any:
        from fvlm_core.data.cache import CachedSample

        a = self.anatomies
        return CachedSample(
            name=self.names[i],
            hu=np.asarray(self.hu[i]),
            labels=np.asarray(self.labels[i]),
            geometry=self.geometry[i],
            anatomies=list(a),
            texts=dict(zip(a, self.anatomy_texts[i])),
            abnormal={k: bool(v) for k, v in zip(a, self.abnormal[i])},
            finding_labels=dict(self.finding_labels[i]),
            report=self.reports[i],
        )

    def texts(self, reports: bool = False) -> list[str]:
        """Every text the text encoder will see (the trainer encodes them once, up front)."""
        if reports:
            return list(self.reports)
        return [t for row in self.anatomy_texts for t in row]

    def save(self, folder: Path) -> None:
        """Write the split to ``folder`` (arrays as ``.npy``, the rest as JSON) for :meth:`load`."""
        np.save(folder / "hu.npy", self.hu)
        np.save(folder / "labels.npy", self.labels)
        meta = {
            "names": self.names,
            "anatomies": self.anatomies,
            "geometry": [g.to_dict() for g in self.geometry],
            "anatomy_texts": self.anatomy_texts,
            "reports": self.reports,
            "abnormal": self.abnormal.tolist(),
            "finding_labels": self.finding_labels,
            "truth": {k: v.tolist() for k, v in self.truth.items()},
        }
        (folder / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DemoData:
        """A split written by :meth:`save`, its arrays memory-mapped (both training processes
        share one copy)."""
        from fvlm_core.geometry import Geometry

        d = Path(folder)
        meta = json.loads((d / "meta.json").read_text())
        return cls(
            names=meta["names"],
            anatomies=meta["anatomies"],
            hu=np.load(d / "hu.npy", mmap_mode="r"),
            labels=np.load(d / "labels.npy", mmap_mode="r"),
            geometry=[Geometry.from_dict(g) for g in meta["geometry"]],
            anatomy_texts=meta["anatomy_texts"],
            reports=meta["reports"],
            abnormal=np.asarray(meta["abnormal"], dtype=bool),
            finding_labels=meta["finding_labels"],
            truth={k: np.asarray(v, dtype=np.int64) for k, v in meta["truth"].items()},
        )


def make_split(samples: Sequence[Any], anatomies: Sequence[str]) -> DemoData:
    from fvlm_core.anatomy import get_catalog
    from fvlm_core.data.synth import MASK_VALUES
    from fvlm_core.reports import decompose_report, extract_labels

    n, a = len(samples), len(anatomies)
    # The phantom mask values in the model's anatomy order (anything else -> background).
    catalog = get_catalog(list(anatomies))
    phantom_values = {v: name for name, v in MASK_VALUES.items()}
    hu = np.stack([s.hu for s in samples]).astype(np.int16)
    labels = np.stack([catalog.relabel(s.labels, phantom_values) for s in samples])
    texts, reports = [], []
    abnormal = np.zeros((n, a), dtype=bool)
    finding_labels = []
    for k, s in enumerate(samples):
        findings, impression = s.report.get("Findings_EN", ""), s.report.get("Impressions_EN", "")
        dec = decompose_report(findings, impression, anatomies)
        texts.append([dec.texts[name] for name in anatomies])
        abnormal[k] = [bool(dec.abnormal[name]) for name in anatomies]
        finding_labels.append(extract_labels(f"{findings}\n{impression}"))
        # Impression first: the text encoder truncates at max_length, and the impression holds
        # every abnormal finding, the findings section mostly normal boilerplate.
        reports.append(f"{impression} {findings}".strip())
    truth = {f: np.array([int(f in s.findings) for s in samples], dtype=np.int64) for f in DEMO_FINDINGS}
    return DemoData(
        names=[s.name for s in samples],
        anatomies=list(anatomies),
        hu=hu,
        labels=labels,
        geometry=[s.geometry for s in samples],
        anatomy_texts=texts,
        reports=reports,
        abnormal=abnormal,
        finding_labels=finding_labels,
        truth=truth,
    )


def phantom_splits(cfg: Any, model_cfg: Any) -> dict[str, DemoData]:
    """The train, calibration and test phantoms of ``cfg`` (a :class:`~fvlm_training.demo.DemoConfig`),
    from disjoint streams (different seeds)."""
    from tqdm import tqdm

    from fvlm_core.data.synth import iter_cohort

    size = (cfg.size, cfg.size, cfg.size)
    spacing = tuple(model_cfg.model_space().spacing_zyx)
    splits: dict[str, DemoData] = {}
    plan = [
        ("train", cfg.n_train, cfg.seed),
        ("calibration", cfg.n_calibration, cfg.seed + 1),
        ("test", cfg.n_test, cfg.seed + 2),
    ]
    with tqdm(total=sum(n for _, n, _ in plan), desc="phantoms", unit="CT") as bar:
        for name, n, seed in plan:
            samples = []
            for s in iter_cohort(
                n, seed, size_zyx=size, spacing_zyx=spacing, workers=cfg.workers, valid_fraction=0.0
            ):
                samples.append(s)
                bar.update(1)
            splits[name] = make_split(samples, list(model_cfg.anatomies))
    return splits
