"""The deep-regime study's reading, from the files `study.sh collect` leaves here.

    python results/cifar10-deep/summarize.py > results/cifar10-deep/summary.md
    python results/cifar10-deep/summarize.py --plot assets/epochs-deep.png   # top-1 per epoch

For each configuration (a run's name without its `-s<seed>`): finished seeds, final top-1 (mean and
range), final training loss. Then the comparisons the study is for, paired by seed: the difference
on each seed both runs finished, and whether one side wins on every seed by more than the seed spread
(the largest range over seeds of either configuration). Then the soft routers' learned weights.
The tables need the standard library only (metrics.jsonl and eval.py's `*-eval.json` files);
--plot draws with eval.py's line charts (Pillow).
"""
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EPOCHS = 15            # the study's budget (study.sh); a run with fewer epochs is unfinished
# (A, B): "A against B". Each line is a question of the study (README "Results: the deep regime").
COMPARISONS = [
    ("R4-soft", "R4-last", "does SoftMoR beat plain recursion?"),
    ("R4-soft", "R4-mean", "does the router beat the parameter-free mean?"),
    ("R4-last", "R1", "does plain recursion fall behind R=1 (the paper's premise)?"),
    ("R4-mean", "R4-last", "does mixing all steps equally help plain recursion?"),
    ("R4-soft", "R1", "does SoftMoR pass R=1?"),
    ("R4-softlast", "R4-last", "round 2: does the router started at `last` beat plain recursion?"),
    ("R4-softlast", "R4-soft", "round 2: does starting at `last` beat starting uniform?"),
    ("ViT24", "R4-last", "the unshared 24-block ViT against plain recursion"),
]


def last_row(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("type") == "epoch"]
    return rows[-1] if rows else None


def load_runs(folder):
    """{config: {seed: {"top1", "train_loss", "per_epoch", "weights", "entropy"}}} over the finished runs."""
    runs = {}
    for run_dir in sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").exists()):
        config, _, seed = run_dir.name.rpartition("-s")
        row = last_row(run_dir)
        if not row or row["epoch"] < EPOCHS:
            continue
        per_epoch = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        run = {"top1": row["top1"], "train_loss": row["train_loss"],
               "per_epoch": {r["epoch"]: r["top1"] for r in per_epoch if r.get("type") == "epoch"}}
        eval_json = folder / f"{run_dir.name}-eval.json"
        if eval_json.exists():
            ev = json.loads(eval_json.read_text())
            run.update(weights=ev.get("step_weights"), entropy=ev.get("entropy"))
        runs.setdefault(config, {})[int(seed)] = run
    return runs


def spread(seeds):
    values = [r["top1"] for r in seeds.values()]
    return max(values) - min(values)


def fmt_range(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def config_table(runs):
    print("| configuration | seeds finished | final top-1, mean (range) | final train loss, mean |")
    print("|---|---|---|---|")
    for config, seeds in runs.items():
        top1 = [r["top1"] for r in seeds.values()]
        loss = statistics.mean(r["train_loss"] for r in seeds.values())
        print(f"| {config} | {', '.join(map(str, sorted(seeds)))} | {fmt_range(top1)} | {loss:.3f} |")


def verdict(diffs, tolerance):
    if len(diffs) < 2:
        return "one seed: not settled"
    if all(d > tolerance for d in diffs):
        return "A wins on every seed by more than the spread"
    if all(d < -tolerance for d in diffs):
        return "B wins on every seed by more than the spread"
    return "within the seed spread"


def comparison_table(runs):
    print("| A | B | question | seeds | A - B per seed (points) | mean | seed spread | reading |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b, question in COMPARISONS:
        if a not in runs or b not in runs:
            continue
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if not seeds:
            continue
        diffs = [runs[a][s]["top1"] - runs[b][s]["top1"] for s in seeds]
        tolerance = max(spread(runs[a]), spread(runs[b]))
        per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in zip(seeds, diffs))
        print(f"| {a} | {b} | {question} | {len(seeds)} | {per_seed} | {statistics.mean(diffs):+.2f} | "
              f"{tolerance:.2f} | {verdict(diffs, tolerance)} |")


def weights_table(runs):
    """Mean weight of each step per block, averaged over the seeds of each soft configuration."""
    for config, seeds in runs.items():
        evaluated = [r for r in seeds.values() if r.get("weights")]
        if not evaluated:
            continue
        steps = len(evaluated[0]["weights"][0])
        print(f"\n{config}: mean weight of each step over the test tokens, averaged over {len(evaluated)} "
              f"seed(s) (uniform: {1 / steps:.2f} each); entropy in nats (uniform: {math.log(steps):.3f})\n")
        print("| block | " + " | ".join(f"step {k + 1}" for k in range(steps)) + " | entropy | heaviest step per seed |")
        print("|---" * (steps + 3) + "|")
        for block in range(len(evaluated[0]["weights"])):
            mean_w = [statistics.mean(r["weights"][block][k] for r in evaluated) for k in range(steps)]
            entropy = statistics.mean(r["entropy"][block] for r in evaluated)
            heaviest = ", ".join(str(1 + max(range(steps), key=r["weights"][block].__getitem__)) for r in evaluated)
            print(f"| {block + 1} | " + " | ".join(f"{w:.3f}" for w in mean_w) + f" | {entropy:.3f} | {heaviest} |")


COLOURS = {"R1": (0, 0, 0), "R4-last": (31, 119, 180), "R4-mean": (44, 160, 44), "R4-soft": (214, 39, 40),
           "R4-softlast": (240, 150, 150), "ViT24": (150, 150, 150)}


def plot_epochs(runs, path):
    """Left: top-1 after each epoch (mean over seeds). Right: the same minus R=1's, from epoch 2."""
    from PIL import Image
    sys.path.insert(0, str(HERE.parents[1]))
    from eval import draw_lines
    epochs = range(1, EPOCHS + 1)
    mean_curve = {c: {e: statistics.mean(r["per_epoch"][e] for r in seeds.values()) for e in epochs}
                  for c, seeds in runs.items()}
    label = lambda c: f"{c} ({len(runs[c])} seed{'s' * (len(runs[c]) > 1)})"
    left = [(label(c), list(curve.items()), COLOURS.get(c, (120, 120, 120)), True) for c, curve in mean_curve.items()]
    panels = [Image.new("RGB", (620, 380), "white"), Image.new("RGB", (620, 380), "white")]
    draw_lines(panels[0], left, "Top-1 after each epoch (mean over seeds)", "epoch", "top-1 %", list(epochs))
    if "R1" in mean_curve:
        base = mean_curve["R1"]
        right = [(label(c), [(e, curve[e] - base[e]) for e in epochs if e >= 2], COLOURS.get(c, (120, 120, 120)), True)
                 for c, curve in mean_curve.items() if c != "R1"]
        draw_lines(panels[1], right, "Top-1 minus R=1's, same epoch", "epoch", "points", list(epochs)[1:])
    canvas = Image.new("RGB", (1240, 380), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (620, 0))
    canvas.save(path)
    print(f"wrote {path}", file=sys.stderr)


def main(argv):
    runs = load_runs(HERE)
    if argv[:1] == ["--plot"]:
        return plot_epochs(runs, argv[1])
    print(f"Finished runs ({EPOCHS} epochs) by configuration\n")
    config_table(runs)
    print("\nPaired by seed (A - B in top-1 points, on the seeds both finished)\n")
    comparison_table(runs)
    weights_table(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
