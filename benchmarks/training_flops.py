"""FLOPs of one distillation sample, counted by torch, and the paper estimate of a full run built on them.

Counts, with ``torch.utils.flop_counter.FlopCounterMode`` on a batch of ``--batch-size`` samples, the floating-point
operations of what a training step does per sample: the frozen teacher's forward (image tower at 224 px, causal
text tower on ``--tokens`` positions, as mmkd runs it since it stopped padding to 77), the student's forward and
backward, and the batch-wide loss terms (negligible; counted with the rest of the step). The teacher is an open_clip
model with random weights (FLOPs do not depend on the weights), counted on its transformers twin, and the student
is its half-depth ``CLIPModel``, both with eager attention so that every matmul is counted.

The estimate then divides ``steps x global batch x FLOPs per sample`` by ``GPUs x peak x MFU``: peak is the GPU's
dense bf16 tensor throughput from its data sheet, MFU (the fraction of it a real step reaches) is an assumption
given on the command line, and so is the price per GPU-hour. Nothing here is a measurement of a GPU run.

    python benchmarks/training_flops.py                       # ViT-B-32 -> half, vit_b32_cc3m.yaml's budget
    python benchmarks/training_flops.py --model recipes/configs/tiny_openclip_vit.json --batch-size 2   # smoke
"""

from __future__ import annotations

import argparse
import json

import torch

# Dense bf16 tensor-core peak of each GPU's data sheet (TFLOP/s, without sparsity).
PEAK_TFLOPS = {"A100": 312.0, "H100 SXM": 989.0}


def count(model_name: str, batch_size: int, tokens: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from mmkd.losses.clip import affinity_distillation_loss, clip_contrastive_loss
    from mmkd.students import build_student
    from mmkd.teachers import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(model_name, pretrained=None)
    twin = teacher.to_transformers()  # the teacher as a CLIPModel: same architecture, same FLOPs
    student, _ = build_student(twin, strategy="every_other", seed=0)
    # Eager attention everywhere, so that every matmul is seen by the counter (open_clip's nn.MultiheadAttention
    # takes a fused fast path under no_grad, and fused SDPA kernels are not counted on every backend).
    for model in (twin, student):
        model.set_attn_implementation("eager")
    size = student.config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size)
    context = twin.config.text_config.max_position_embeddings
    if tokens > context:
        raise SystemExit(f"error: --tokens {tokens}: more than the teacher's context length {context}")
    student_ids = torch.randint(1, 49000, (batch_size, tokens))
    student_ids[:, tokens - 1] = twin.config.text_config.eos_token_id  # where the text tower pools

    with FlopCounterMode(display=False) as teacher_count, torch.no_grad():
        teacher_image = twin.get_image_features(pixel_values=pixels)
        teacher_text = twin.get_text_features(input_ids=student_ids)  # the longest caption, as mmkd runs it
        teacher_image, teacher_text = (getattr(x, "pooler_output", x) for x in (teacher_image, teacher_text))
    with FlopCounterMode(display=False) as student_count:
        image = student.get_image_features(pixel_values=pixels)
        text = student.get_text_features(input_ids=student_ids)
        image, text = (getattr(x, "pooler_output", x) for x in (image, text))
        loss = clip_contrastive_loss(image, text, student.logit_scale.exp()) + affinity_distillation_loss(
            image, text, teacher_image, teacher_text, 0.05
        )
        loss.backward()
    t, s = teacher_count.get_total_flops() / batch_size, student_count.get_total_flops() / batch_size
    return {"model": model_name, "batch_size": batch_size, "tokens": tokens,
            "teacher_forward_gflops": t / 1e9, "student_forward_backward_gflops": s / 1e9,
            "total_gflops": (t + s) / 1e9}


def estimate(flops: dict, steps: int, global_batch: int, gpus: int, mfu: float, price: float) -> list[dict]:
    samples = steps * global_batch
    total = samples * flops["total_gflops"] * 1e9
    rows = []
    for gpu, peak in PEAK_TFLOPS.items():
        hours = total / (gpus * peak * 1e12 * mfu) / 3600
        rows.append({"gpu": gpu, "gpus": gpus, "samples": samples, "total_pflop": total / 1e15, "mfu": mfu,
                     "wall_hours": hours, "gpu_hours": hours * gpus, "cost_usd": hours * gpus * price})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="teacher: open_clip model name or JSON model config")
    p.add_argument("--batch-size", type=int, default=8, help="samples counted (FLOPs are reported per sample)")
    p.add_argument("--tokens", type=int, default=20,
                   help="caption length in tokens with start/end (CC3M's captions: about 10 words)")
    p.add_argument("--steps", type=int, default=20000, help="vit_b32_cc3m.yaml: max_steps")
    p.add_argument("--global-batch", type=int, default=256 * 8, help="vit_b32_cc3m.yaml: 256 per GPU x 8 GPUs")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of peak a step reaches")
    p.add_argument("--price", type=float, default=2.0, help="assumed USD per GPU-hour")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"error: --mfu {args.mfu}: must be in (0, 1]")

    flops = count(args.model, args.batch_size, args.tokens)
    rows = estimate(flops, args.steps, args.global_batch, args.gpus, args.mfu, args.price)
    print(f"{args.model}: teacher forward {flops['teacher_forward_gflops']:.2f} GFLOP/sample, student forward + "
          f"backward {flops['student_forward_backward_gflops']:.2f}, total {flops['total_gflops']:.2f} "
          f"({args.tokens}-token captions)")
    print("| GPU | GPUs | samples | PFLOP | MFU (assumed) | wall hours | GPU-hours | USD at "
          f"${args.price:.2f}/GPU-h (assumed) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpu']} | {r['gpus']} | {r['samples']:,} | {r['total_pflop']:,.0f} | {r['mfu']:.0%} | "
              f"{r['wall_hours']:.1f} | {r['gpu_hours']:.0f} | {r['cost_usd']:,.0f} |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"flops": flops, "estimate": rows, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
