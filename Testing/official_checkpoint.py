"""Stand-ins for the user-provided parts of an official fVLM import, shared by
test_import_official and benchmarks/bench_analyze.py:

* :func:`random_official_state`: a state dict in the released checkpoint's exact layout (names and
  shapes from ``checkpoint_keys.json``) with random values scaled as trained weights roughly are
  (norm weights near 1, the rest small), so every key and shape rule of the import is exercised;
* :func:`bert_base_folder`: a local BERT-base folder the size of CXR-BERT's (config + WordPiece
  vocabulary of 30522 entries, letters as word pieces so any word tokenizes), which the import's
  ``--text-encoder`` takes instead of the hub model;
* :func:`narrow_official_shapes`: the official layout at a smaller width (every name, layer and
  token count kept), for the benchmarks' smoke size (``benchmarks/timing.py``), imported with
  a :func:`bert_base_folder` of the same width.
"""

from __future__ import annotations

from pathlib import Path

import torch


def random_official_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the official checkpoint's ``["model"]`` dict."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).reshape(shape)
        elif key == "temp":
            state[key] = torch.tensor(0.05)
        elif "LayerNorm.weight" in key or key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key == "query_tokens":
            state[key] = torch.randn(shape, generator=gen)
        else:
            state[key] = 0.02 * torch.randn(shape, generator=gen)
    return state


#: Widths of the official checkpoint: ViT and BERT hidden size, their MLPs, the ViT's fused qkv,
#: and the shared embedding space.
OFFICIAL_WIDTHS = {"hidden": 768, "mlp": 3072, "qkv": 2304, "embed": 256}


def narrow_official_shapes(shapes: dict[str, list[int]], hidden: int, embed: int) -> dict[str, list[int]]:
    """``shapes`` (``checkpoint_keys.json``) with the hidden width ``hidden`` (MLPs ``4 * hidden``,
    qkv ``3 * hidden``) and embedding width ``embed``; names, layer counts, the vocabulary, the
    1232 tokens and the patch are kept. ``hidden`` must be a multiple of 12 (the heads)."""
    if hidden % 12:
        raise ValueError(f"hidden {hidden} must be a multiple of the 12 attention heads")
    width = {
        OFFICIAL_WIDTHS["hidden"]: hidden,
        OFFICIAL_WIDTHS["mlp"]: 4 * hidden,
        OFFICIAL_WIDTHS["qkv"]: 3 * hidden,
        OFFICIAL_WIDTHS["embed"]: embed,
    }
    return {k: [width.get(int(s), int(s)) for s in shape] for k, shape in shapes.items()}


def bert_base_folder(folder: Path, hidden: int = 768) -> Path:
    """Write a BERT-base config and tokenizer (CXR-BERT's sizes; ``hidden``: another width, MLP
    ``4 * hidden``, same 12 layers and heads) into ``folder``; returns it."""
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=4 * hidden,
    ).save_pretrained(folder)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *letters, *[f"##{c}" for c in letters]]
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder
