"""VeLoRA against LoRA: bytes one training step keeps for backward, at several G.

For each G, VeLoRA (q and v, rank 8) is attached to a fresh random-init backbone and one
training step is measured with :func:`vpeft_viz.methods.velora.measure_memory`, the same
measurement every VeLoRA run records at its first step: the bytes autograd keeps for backward
(saved-tensor hooks, deduplicated by storage, the model's parameters excluded) with VeLoRA
and with plain LoRA on the same model and batch, and on CUDA the allocator peak of each
step (forward + backward). Byte counts are exact and do not depend on the machine's load;
only the CUDA peaks need a GPU. Nothing is downloaded (random init). Writes
``benchmarks/results/velora_memory.json`` (machine and versions) and prints a table.

    python benchmarks/velora_memory.py                       # ViT-B/16, 224 px, batch 8
    python benchmarks/velora_memory.py --device cuda --precision bf16 --batch 64
    python benchmarks/velora_memory.py --smoke --out velora_memory_smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _common import write_result  # noqa: E402
from torch import nn  # noqa: E402

from vpeft_viz.backbones import EMBEDDED_BACKBONE, create_backbone  # noqa: E402
from vpeft_viz.methods import attach_method, create_method  # noqa: E402
from vpeft_viz.methods.velora import measure_memory  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    rows = []
    for groups in args.groups:
        torch.manual_seed(0)
        model = create_backbone(args.backbone, num_classes=args.classes, pretrained=False)
        attach_method(model, create_method("velora", {"groups": groups}))
        model.to(device).train()
        size = int(model.patch_embed.img_size[0])
        g = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch, 3, size, size, generator=g).to(device)
        labels = (torch.arange(args.batch) % args.classes).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            rec = measure_memory(model, images, labels, nn.CrossEntropyLoss())
        row = {"groups": groups, "sub_token": model.embed_dim // groups,
               **{k: (v.item() if hasattr(v, "item") else str(v)) for k, v in rec.items()}}
        row["lora_inputs"] = row["saved_bytes_lora"] - row["saved_bytes_velora"] + row["z_bytes"]
        row["saving"] = 1 - row["saved_bytes_velora"] / row["saved_bytes_lora"]
        rows.append(row)
        print(f"G={groups:<4} VeLoRA {row['saved_bytes_velora'] / 2**20:8.1f} MiB  LoRA "
              f"{row['saved_bytes_lora'] / 2**20:8.1f} MiB  ({row['saving']:.1%} less)",
              file=sys.stderr, flush=True)
        del model
    return {"backbone": args.backbone, "img_size": size, "batch": args.batch,
            "device": device.type, "precision": args.precision, "rows": rows,
            "protocol": "one training step per G on a random-init backbone, VeLoRA q/v rank 8; "
                        "bytes autograd saves for backward (saved_tensors_hooks, deduplicated "
                        "by storage, parameters and buffers excluded) with VeLoRA and with LoRA "
                        "on the same model and batch; CUDA: allocator peak of forward + "
                        "backward after a warm-up step"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="embedded backbone (random init), batch 4, G 8/32/128: checks the script")
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--groups", type=int, nargs="+", default=[8, 32, 64, 768])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", default="velora_memory")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.batch, args.device = EMBEDDED_BACKBONE, 4, "cpu"
        args.groups = [8, 32, 128]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    result = run(args)
    path = write_result(args.out, result)
    print(f"\n{result['backbone']}, {result['img_size']} px, batch {result['batch']}, "
          f"{result['device']} {result['precision']}\n")
    print("| G | sub-token | VeLoRA saved | LoRA saved | less | inputs: VeLoRA / LoRA |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['groups']} | {r['sub_token']} | {r['saved_bytes_velora']:,} | "
              f"{r['saved_bytes_lora']:,} | {r['saving']:.1%} | "
              f"{r['z_bytes']:,} / {r['lora_inputs']:,} |")
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
