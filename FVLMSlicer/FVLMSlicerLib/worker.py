"""Subprocess entry point: ``python -m FVLMSlicerLib.worker JOB_DIR`` (see ``runner.ProcessJob``).

Exit codes: 0 done, 1 failed (``error.json`` holds the message), 2 cancelled. Needs no Slicer.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m FVLMSlicerLib.worker JOB_DIR", file=sys.stderr)
        return 1
    job = Path(argv[0])

    from fvlm_core.atomic import atomic_write_text
    from fvlm_core.errors import CancelledError, FVLMError
    from fvlm_core.io import CTVolume, Geometry, read_image, read_label_map, write_image

    from .runner import AnalysisRequest, run_analysis

    def progress(stage: str, fraction: float) -> None:
        atomic_write_text(job / "progress.json", json.dumps({"stage": stage, "fraction": fraction}))

    def should_cancel() -> bool:
        return (job / "cancel").exists()

    try:
        doc = json.loads((job / "request.json").read_text())
        import SimpleITK as sitk

        geometry = Geometry.from_dict(doc["geometry"])
        array = sitk.GetArrayFromImage(read_image(job / "ct.nrrd")).astype(np.float32)
        ct = CTVolume(array=array, geometry=geometry, source=doc.get("ct_source", "ct"))
        labels = None
        if (job / "labels.nrrd").exists():
            labels = read_label_map(job / "labels.nrrd").array.astype(np.uint8)
        request = AnalysisRequest(
            ct=ct,
            model_dir=doc["model_dir"],
            labelmap=labels,
            anatomy_source=doc.get("anatomy_source", "segmentation"),
            findings=doc.get("findings"),
            device=doc.get("device", "auto"),
            similarity_maps=bool(doc.get("similarity_maps", True)),
            segmentation_options=doc.get("segmentation_options") or {},
        )
        output = run_analysis(request, progress, should_cancel, cache_model=False)
        out = job / "output"
        output.summary.save(out)
        write_image(output.labelmap, geometry, out / "labels.nrrd")
        atomic_write_text(
            out / "meta.json",
            json.dumps({"anatomies": output.anatomies, "backend": output.segmentation_backend}),
        )
        return 0
    except CancelledError:
        atomic_write_text(job / "error.json", json.dumps({"cancelled": True, "message": "cancelled"}))
        return 2
    except FVLMError as exc:
        atomic_write_text(job / "error.json", json.dumps({"message": str(exc)}))
        return 1
    except Exception as exc:
        traceback.print_exc()
        atomic_write_text(job / "error.json", json.dumps({"message": f"{type(exc).__name__}: {exc}"}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
