"""The small-images recipe's ablation table, from the runs' metrics.jsonl (stdlib only).

    python results/cifar10-recipe/table.py > results/cifar10-recipe/table.md
"""
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["old", "init", "reflect", "cosine", "init+reflect", "new"]
WHAT = {"old": "the old recipe: timm init, zero padding, DeiT schedule", "init": "init torch only",
        "reflect": "reflect padding only", "cosine": "cosine schedule only",
        "init+reflect": "init torch + reflect",
        "new": "all three (the new recipe)"}


def read(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    run = next(r for r in rows if r["type"] == "run")["args"]
    epochs = {r["epoch"]: r for r in rows if r["type"] == "epoch"}
    return run, epochs


def main():
    runs = {}
    for folder in sorted(glob.glob(os.path.join(HERE, "*-s*/"))):
        name = os.path.basename(folder.rstrip("/"))
        config, seed = name.rsplit("-s", 1)
        args, epochs = read(folder)
        if 5 in epochs:
            runs.setdefault(config, {})[int(seed)] = (args, epochs[5])
    print("R=1, 6 blocks of width 64, 4 heads, patch 8, CIFAR-10, 5 epochs, batch 128, AdamW lr 1e-3; "
          "test top-1 after epoch 5 (10,000 test images)\n")
    print("| run | init | padding | schedule | top-1 seed 0 | top-1 seed 1 | mean | vs old (same seeds) "
          "| train loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    old = runs.get("old", {})
    for config in ORDER + sorted(set(runs) - set(ORDER)):
        if config not in runs:
            continue
        seeds = runs[config]
        args = next(iter(seeds.values()))[0]
        top1 = {s: r["top1"] for s, (_, r) in seeds.items()}
        paired = [top1[s] - old[s][1]["top1"] for s in top1 if s in old]
        cells = [f"{top1[s]:.2f}" if s in top1 else "-" for s in (0, 1)]
        gap = f"{statistics.mean(paired):+.2f}" if paired and config != "old" else "-"
        loss = statistics.mean(r["train_loss"] for _, r in seeds.values())
        print(f"| {WHAT.get(config, config)} | {args['init']} | {args['pad_mode']} | {args['schedule']} "
              f"| {cells[0]} | {cells[1]} | {statistics.mean(top1.values()):.2f} | {gap} | {loss:.3f} |")


if __name__ == "__main__":
    main()
