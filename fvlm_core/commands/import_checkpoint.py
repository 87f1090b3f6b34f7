"""Convert an official fVLM checkpoint (.pth, LAVIS layout) into this project's checkpoint folder.

The file is read with torch.load(weights_only=True); every tensor is mapped 1:1 by name; tensors
that are not needed (position_ids, the tied MLM head) and any other unused tensor are listed.
Missing or mis-shaped vision, text or head weights are refused. The text encoder's tokenizer and
config come from --text-encoder (the CXR-BERT the checkpoint was trained with: a local folder, or
a hub name already in the local Hugging Face cache); they are copied into the output folder,
with the embeddings of the model's finding prompts (prompt_embeddings.safetensors), so that
`fvlm analyze` scores the model's own findings without loading the text encoder.
An existing --out folder is refused unless --force, which replaces it as a whole (no file of the
old folder is left mixed in); the folder is written all or none.

Example::

    fvlm import-checkpoint fvlm_ctrate.pth --text-encoder ./BiomedVLP-CXR-BERT-specialized --out models/fvlm-ctrate
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fvlm_core.outputs import OutputPlan


def _names(text: str) -> list[str]:
    """``"lung, heart,"`` -> ``["lung", "heart"]``; argparse reports a list with no name."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one anatomy name, e.g. lung,heart,esophagus,aorta")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official fVLM checkpoint (.pth with a ['model'] dict)")
    parser.add_argument(
        "--text-encoder",
        required=True,
        help="CXR-BERT folder or hub name (microsoft/BiomedVLP-CXR-BERT-specialized) for tokenizer and config",
    )
    parser.add_argument("--out", required=True, help="output checkpoint folder (must not exist, see --force)")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing --out folder (all its files are removed)"
    )
    parser.add_argument(
        "--anatomies",
        type=_names,
        metavar="A,B,...",
        help="comma-separated anatomy names in label order (default: lung,heart,esophagus,aorta)",
    )
    parser.add_argument(
        "--img-size",
        nargs=3,
        type=int,
        metavar=("Z", "Y", "X"),
        help="training image size when not 112 256 352 (sets the native position-embedding grid)",
    )


def run(args: argparse.Namespace) -> int:
    plan = OutputPlan()
    plan.input("CHECKPOINT", args.checkpoint)
    if Path(args.text_encoder).exists():  # else a hub name
        plan.input("--text-encoder", args.text_encoder)
    plan.folder("--out", args.out, replace=True, force=args.force)
    plan.check()  # before reading gigabytes
    from fvlm_core.model.official import import_official  # torch and transformers: seconds to import

    model, report = import_official(
        args.checkpoint,
        args.text_encoder,
        anatomies=args.anatomies,
        img_size=tuple(args.img_size) if args.img_size else None,
    )
    with plan.writing() as staged:
        model.save_pretrained(staged.path("--out"))
    print(report.summary())
    print(f"wrote {args.out}")
    return 0
