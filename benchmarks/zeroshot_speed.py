"""Zero-shot evaluation speed: mmkd.eval.zeroshot vs CLIP_benchmark's own zero-shot code, in one run.

Both evaluate the same open_clip model (ViT-B-32 by default; random weights cost the same compute as trained ones)
on the same images, with the same batch size, precision, data-loader workers and machine, and with CIFAR-10's class
names and CLIP_benchmark's 18 CIFAR templates. The script times the text-classifier build and the image pass
separately, reports images/s, and checks that both give the same predictions, acc@1 and acc@5. Two more rows run
mmkd's evaluator on the same model exported with ``mmkd export --format onnx`` (fp32 and int8) through onnxruntime,
preprocessing with the exported transformers image processor (the teacher's exact twin).

    python benchmarks/zeroshot_speed.py                       # ViT-B-32, 512 images, batch 64, fp32
    python benchmarks/zeroshot_speed.py --images 512 --batch-size 64 --precision bf16       # autocast
    python benchmarks/zeroshot_speed.py --tiny --images 8 --batch-size 8                    # smoke test

Each side's classifier build and image pass are timed by mmkd.reporting.timing (the median of --repeats calls).

Needs the `bench` extra: pip install -e '.[bench]' (clip-benchmark).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmkd.reporting.timing import interleaved_times

TINY_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_openclip_vit.json"


def make_images(n: int, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """n deterministic 32x32 RGB images (CIFAR-sized) with labels 0..9."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return [Image.fromarray(p) for p in pixels], [int(x) for x in rng.integers(0, 10, size=n)]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, classnames, transform=None):
        self.images, self.labels, self.classnames, self.transform = images, labels, classnames, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.labels[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--tiny", action="store_true", help="use recipes/configs/tiny_openclip_vit.json (smoke test)")
    p.add_argument("--images", type=int, default=512, help="number of images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on both sides")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of each side (median reported)")
    p.add_argument("--output", default=None, help="write the figures as JSON")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows (they need the onnx extra)")
    args = p.parse_args()

    import open_clip
    from clip_benchmark.metrics import zeroshot_classification as cb

    from mmkd.eval.zeroshot import (
        default_classnames,
        default_templates,
        evaluate_zeroshot,
        zero_shot_classifier,
    )
    from mmkd.teachers import OpenCLIPTeacher

    if args.tiny:
        open_clip.add_model_config(TINY_CONFIG)
        args.model = TINY_CONFIG.stem
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    classnames, templates = default_classnames("cifar10"), default_templates("cifar10")
    images, labels = make_images(args.images)
    # bf16 means autocast over fp32 weights on both sides (CLIP_benchmark's amp=True); bf16 *weights* take a slow
    # path on CPUs (about 8x slower than fp32 here), which would measure the kernels, not the evaluators.
    amp = args.precision == "bf16"
    teacher = OpenCLIPTeacher(model, preprocess, tokenizer, name=args.model)

    def timed(fn):
        """(the last call's result, the median seconds) of ``--repeats`` timed calls of ``fn``."""
        timings = interleaved_times({"run": fn}, repeats=args.repeats)
        return timings.results["run"], statistics.median(timings.seconds["run"])

    # -- CLIP_benchmark --------------------------------------------------------------------------------------
    # CLIP_benchmark autocasts when amp=True; with the weights already in bf16 both sides run bf16 matmuls.
    cb_clf, cb_build = timed(lambda: cb.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=amp))
    loader = torch.utils.data.DataLoader(
        ListDataset(images, labels, classnames, transform=preprocess),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    (cb_logits, cb_true), cb_images = timed(lambda: cb.run_classification(model, cb_clf, loader, "cpu", amp=amp))
    cb_pred = cb_logits.topk(5, dim=1).indices
    cb_acc1 = float((cb_pred[:, 0] == cb_true).float().mean())
    cb_acc5 = float((cb_pred == cb_true[:, None]).any(dim=1).float().mean())

    # -- mmkd ------------------------------------------------------------------------------------------------
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def build():
        with autocast():
            return zero_shot_classifier(teacher, classnames, templates, batch_size=256)

    def run(clf):
        with autocast():
            return evaluate_zeroshot(
                teacher, ListDataset(images, labels, classnames), classifier=clf, batch_size=args.batch_size,
                num_workers=args.num_workers, progress=False, return_predictions=True,
            )

    mm_clf, mm_build = timed(build)
    mm, mm_images = timed(lambda: run(mm_clf))
    mm_top1 = torch.as_tensor(mm["predictions"])
    same_preds = int((mm_top1 == cb_pred[:, 0]).sum())

    # -- mmkd through onnxruntime (the model exported with mmkd export --format onnx; fp32, then int8) -----------
    onnx = {}
    if not args.no_onnx:
        import tempfile

        from mmkd.eval.encoders import load_encoder
        from mmkd.interop.to_onnx import export_onnx

        folder = Path(tempfile.mkdtemp(prefix="mmkd-zs-onnx-")) / "onnx"
        export_onnx(teacher.to_transformers(), folder, processor=teacher.transformers_processor(), int8=True,
                    measure=False)  # timed here, not by the export
        for backend in ("onnxruntime", "onnxruntime-int8"):
            encoder = load_encoder(str(folder), backend=backend)
            clf, seconds_build = timed(lambda encoder=encoder: zero_shot_classifier(encoder, classnames, templates,
                                                                                   batch_size=256))
            result, seconds = timed(lambda encoder=encoder, clf=clf: evaluate_zeroshot(
                encoder, ListDataset(images, labels, classnames), classifier=clf, batch_size=args.batch_size,
                num_workers=args.num_workers, progress=False, return_predictions=True))
            top1 = torch.as_tensor(result["predictions"])
            onnx[backend] = {
                "classifier_build_s": round(seconds_build, 3),
                "image_pass_s": round(seconds, 3),
                "images_per_s": round(args.images / seconds, 2),
                "x_clip_benchmark": round(cb_images / seconds, 3),
                "acc1": result["acc1"],
                "acc5": result["acc5"],
                "same_top1_as_clip_benchmark": f"{int((top1 == cb_pred[:, 0]).sum())}/{args.images}",
            }

    figures = {
        "model": args.model,
        "precision": args.precision,
        "images": args.images,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "clip_benchmark": {
            "classifier_build_s": round(cb_build, 3),
            "image_pass_s": round(cb_images, 3),
            "images_per_s": round(args.images / cb_images, 2),
            "acc1": cb_acc1,
            "acc5": cb_acc5,
        },
        "mmkd": {
            "classifier_build_s": round(mm_build, 3),
            "image_pass_s": round(mm_images, 3),
            "images_per_s": round(args.images / mm_images, 2),
            "acc1": mm["acc1"],
            "acc5": mm["acc5"],
        },
        "same_top1_predictions": f"{same_preds}/{args.images}",
        **onnx,
        "max_classifier_abs_diff": float((mm_clf.float() - cb_clf.float()).abs().max()),
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
