"""Worker of the 2-process zero-shot test (tests/test_zeroshot.py), launched by torchrun or accelerate launch.

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/zeroshot_ddp_script.py
        --data FOLDER --out OUT_DIR [--model DIR]     (one command line)

Each process evaluates the same image folder through ``evaluate_zeroshot`` under ``accelerate.Accelerator()``
and writes ``OUT_DIR/rank{r}.json``: the launch it saw (rank, world size), the dataset indices it read
itself, and the metrics it returned, so the test can check that the shards were disjoint and every image
counted once.

Without ``--model`` the model is :func:`toy_encoder`, a seeded pure-torch CLIP-like encoder: each process then
imports only torch and accelerate (not transformers / open_clip), which keeps the 2-process test fast; the
multi-process path (sharded DataLoader, gather, de-duplication, metrics) is the same for every model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from mmkd.data.preprocessing import Preprocessing
from mmkd.distributed import shutdown
from mmkd.eval.datasets import load_classification_dataset
from mmkd.eval.encoders import CLIPEncoder
from mmkd.eval.zeroshot import evaluate_zeroshot


def toy_encoder(seed: int = 0) -> CLIPEncoder:
    """A seeded CLIP-like model: 8x8 pixels -> linear image tower, characters -> embedding-bag text tower."""
    g = torch.Generator().manual_seed(seed)
    model = nn.ModuleDict(
        {
            "image": nn.Linear(3 * 8 * 8, 16),
            "chars": nn.EmbeddingBag(128, 16, mode="mean", padding_idx=0),  # padding left out of the mean
            "text": nn.Linear(16, 16),
        }
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))

    def preprocess(images):
        arrays = [np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0 for img in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, 8, 8) in [0, 1]
        return pixels - pixels.mean(dim=(1, 2, 3), keepdim=True)  # centred: the colour, not the brightness

    def tokenize(texts):
        ids = torch.zeros(len(texts), 64, dtype=torch.long)  # (B, 64) character codes, 0-padded
        for i, text in enumerate(texts):
            codes = [min(ord(ch), 127) for ch in text[:64]]
            ids[i, : len(codes)] = torch.tensor(codes)
        return {"input_ids": ids}

    def text_fn(tokens):
        chars = model["chars"](tokens["input_ids"])  # (B, 64) ids -> (B, 16), the mean over the characters
        return model["text"](chars)  # (B, 16)

    return CLIPEncoder(
        model,
        Preprocessing(preprocess, tokenize, {}, "toy"),
        "toy",
        lambda px: model["image"](px.flatten(1)),  # (B, 16)
        text_fn,
    )


class RecordingDataset(torch.utils.data.Dataset):
    """Wraps a classification dataset and records which indices this process read."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = dataset.name
        self.classnames = dataset.classnames
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.dataset[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a model spec for load_encoder; default: toy_encoder()")
    parser.add_argument("--data", required=True, help="image folder, one sub-folder per class")
    parser.add_argument("--out", required=True, help="directory for rank{r}.json")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = Accelerator()
    dataset = RecordingDataset(load_classification_dataset(args.data))
    result = evaluate_zeroshot(
        args.model or toy_encoder(),
        dataset,
        batch_size=args.batch_size,
        templates=["a photo of a {c}.", "a drawing of a {c}."],
        accelerator=accelerator,
        progress=False,
        return_predictions=True,
    )
    # The same without an accelerator argument: evaluate_zeroshot finds the launch itself.
    result_default = evaluate_zeroshot(
        args.model or toy_encoder(),
        load_classification_dataset(args.data),
        batch_size=args.batch_size,
        templates=["a photo of a {c}.", "a drawing of a {c}."],
        progress=False,
        return_predictions=True,
    )
    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "indices": dataset.seen,
        "result": result,
        "result_default": result_default,
    }
    out = Path(args.out) / f"rank{accelerator.process_index}.json"
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    shutdown()


if __name__ == "__main__":
    main()
