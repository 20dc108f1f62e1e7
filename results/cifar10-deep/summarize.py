"""The deep-regime study's reading, from the files `study.sh collect` leaves here.

    python results/cifar10-deep/summarize.py > results/cifar10-deep/summary.md
    python results/cifar10-deep/summarize.py --plot assets/epochs-deep.png   # top-1 per epoch
    python results/cifar10-deep/summarize.py --runs results/cifar10-deep2     # the same study, new recipe

For each configuration (a run's name without its `-s<seed>`): finished seeds, final top-1 (mean and
range over seeds), final training loss. Then the comparisons the study is for, paired by seed: A - B
on each seed both finished, their mean, and a 95% t-interval of that mean (from the spread of the
paired differences; it needs two seeds and is wide with few). Then the soft routers' learned weights.
The tables need the standard library only (metrics.jsonl and eval.py's `*-eval.json` files);
--plot draws with eval.py's line charts (Pillow).
"""
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (A, B): "A against B". Each line is a question of the study (README "Results: the deep regime").
COMPARISONS = [
    ("R4-soft", "R4-last", "does SoftMoR beat plain recursion?"),
    ("R4-soft", "R4-mean", "does the router beat the parameter-free mean?"),
    ("R4-last", "R1", "does plain recursion fall behind R=1 (the paper's premise)?"),
    ("R4-mean", "R4-last", "does mixing all steps equally help plain recursion?"),
    ("R4-soft", "R1", "does SoftMoR pass R=1?"),
    ("R4-softlast", "R4-last", "round 2: does the router started at `last` beat plain recursion?"),
    ("R4-softlast", "R4-soft", "round 2: does starting at `last` beat starting uniform?"),
    ("R4-softscale", "R4-soft", "extra round: does a per-step scale on each update help SoftMoR?"),
    ("R4-softscale", "R1", "extra round: does SoftMoR with per-step scales pass R=1?"),
    ("ViT24", "R4-last", "the unshared 24-block ViT against plain recursion"),
    ("ViT24", "R1", "do 24 blocks of their own beat 6 blocks applied once, at this budget?"),
]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}   # two-sided 95% Student t, by degrees of freedom


def read_rows(path):
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:     # a line torn by a copy made mid-write: the run is unfinished anyway
            pass
    return rows


def load_runs(folder):
    """{config: {seed: {"top1", "train_loss", "per_epoch", "weights", "entropy"}}} over the finished runs:
    those whose metrics hold the last epoch of the budget in their own `run` row."""
    runs = {}
    for run_dir in sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").exists()):
        config, _, seed = run_dir.name.rpartition("-s")
        if not (config and seed.isdigit()):
            continue
        rows = read_rows(run_dir / "metrics.jsonl")
        budget = next((r["args"]["epochs"] for r in rows if r.get("type") == "run"), None)
        epochs = [r for r in rows if r.get("type") == "epoch"]
        if not epochs or epochs[-1]["epoch"] != budget:
            continue
        run = {"top1": epochs[-1]["top1"], "train_loss": epochs[-1]["train_loss"],
               "per_epoch": {r["epoch"]: r["top1"] for r in epochs}}
        eval_json = folder / f"{run_dir.name}-eval.json"
        if eval_json.exists():
            ev = json.loads(eval_json.read_text())
            run.update(weights=ev.get("step_weights"), entropy=ev.get("entropy"), anytime=ev.get("anytime"))
        runs.setdefault(config, {})[int(seed)] = run
    return runs


def fmt_range(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def config_table(runs):
    print("| configuration | seeds finished | final top-1, mean (range) | final train loss, mean |")
    print("|---|---|---|---|")
    for config, seeds in runs.items():
        top1 = [r["top1"] for r in seeds.values()]
        loss = statistics.mean(r["train_loss"] for r in seeds.values())
        print(f"| {config} | {', '.join(map(str, sorted(seeds)))} | {fmt_range(top1)} | {loss:.3f} |")


def paired(runs, a, b):
    """(seeds both finished, A - B on each)."""
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    return seeds, [runs[a][s]["top1"] - runs[b][s]["top1"] for s in seeds]


def interval(diffs):
    """95% t-interval of the mean paired difference, or None with fewer than two seeds."""
    if len(diffs) < 2:
        return None
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return statistics.mean(diffs) - half, statistics.mean(diffs) + half


def reading(diffs, ci):
    if ci is None:
        return "one seed: not settled"
    if ci[0] > 0:
        return "A ahead (interval above 0)"
    if ci[1] < 0:
        return "B ahead (interval below 0)"
    side = "A" if all(d > 0 for d in diffs) else "B" if all(d < 0 for d in diffs) else None
    return f"not separated ({side} ahead on every seed, interval spans 0)" if side else "not separated"


def comparison_table(runs):
    print("| A | B | question | A - B per seed (points) | mean | 95% interval | reading |")
    print("|---|---|---|---|---|---|---|")
    for a, b, question in COMPARISONS:
        seeds, diffs = paired(runs, a, b)
        if not seeds:
            continue
        ci = interval(diffs)
        per_seed = ", ".join(f"s{s}: {d:+.2f}" for s, d in zip(seeds, diffs))
        shown = f"{ci[0]:+.2f} to {ci[1]:+.2f}" if ci else "-"
        mean = statistics.mean(diffs)
        print(f"| {a} | {b} | {question} | {per_seed} | {mean:+.2f} | {shown} | {reading(diffs, ci)} |")


def weights_table(runs):
    """Mean weight of each step per block, averaged over the seeds of each soft configuration."""
    for config, seeds in runs.items():
        evaluated = [r for r in seeds.values() if r.get("weights")]
        if not evaluated:
            continue
        steps = len(evaluated[0]["weights"][0])
        print(f"\n{config}: mean weight of each step over the test tokens, averaged over {len(evaluated)} "
              f"seed(s) (uniform: {1 / steps:.2f} each); entropy in nats (uniform: {math.log(steps):.3f})\n")
        step_cols = " | ".join(f"step {k + 1}" for k in range(steps))
        print(f"| block | {step_cols} | entropy | heaviest step per seed |")
        print("|---" * (steps + 3) + "|")
        for block in range(len(evaluated[0]["weights"])):
            mean_w = [statistics.mean(r["weights"][block][k] for r in evaluated) for k in range(steps)]
            entropy = statistics.mean(r["entropy"][block] for r in evaluated)
            heaviest = ", ".join(str(1 + max(range(steps), key=r["weights"][block].__getitem__))
                                 for r in evaluated)
            cells = " | ".join(f"{w:.3f}" for w in mean_w)
            print(f"| {block + 1} | {cells} | {entropy:.3f} | {heaviest} |")


def anytime_table(runs):
    """Top-1 of the same trained model stopped after its first k recursion steps (eval.py --steps all)."""
    rows = {c: [r["anytime"] for r in seeds.values() if r.get("anytime")] for c, seeds in runs.items()}
    rows = {c: a for c, a in rows.items() if a}
    if not rows:
        return
    steps = len(next(iter(rows.values()))[0])
    print("\nAnytime: top-1 of the trained model run for its first k steps only (mean over seeds; the "
          "soft mixer then mixes the k steps it has)\n")
    print("| configuration | seeds | " + " | ".join(f"k={k + 1}" for k in range(steps)) + " |")
    print("|---" * (steps + 2) + "|")
    for c, per_seed in rows.items():
        top1 = [statistics.mean(a[k]["top1"] for a in per_seed) for k in range(steps)]
        print(f"| {c} | {len(per_seed)} | " + " | ".join(f"{t:.2f}" for t in top1) + " |")


COLOURS = {"R1": (0, 0, 0), "R4-last": (31, 119, 180), "R4-mean": (44, 160, 44), "R4-soft": (214, 39, 40),
           "R4-softlast": (240, 150, 150), "R4-softscale": (148, 103, 189), "ViT24": (150, 150, 150)}


def plot_epochs(runs, path):
    """Left: top-1 after each epoch (mean over seeds). Right: minus R=1's on the same seed and epoch,
    averaged over the seeds both finished."""
    from PIL import Image
    sys.path.insert(0, str(HERE.parents[1]))
    from eval import draw_lines
    epochs = range(1, 1 + min(len(r["per_epoch"]) for seeds in runs.values() for r in seeds.values()))
    colour = lambda c: COLOURS.get(c, (120, 120, 120))
    label = lambda c, n: f"{c} ({n} seed{'s' * (n > 1)})"
    def mean_curve(seeds):   # [(epoch, top-1 averaged over the seeds)]
        return [(e, statistics.mean(r["per_epoch"][e] for r in seeds.values())) for e in epochs]
    left = [(label(c, len(seeds)), mean_curve(seeds), colour(c), True) for c, seeds in runs.items()]
    right = []
    for c, seeds in runs.items():
        shared = sorted(set(seeds) & set(runs.get("R1", {}))) if c != "R1" else []
        if shared:
            gap = [(e, statistics.mean(seeds[s]["per_epoch"][e] - runs["R1"][s]["per_epoch"][e]
                                       for s in shared))
                   for e in epochs if e >= 2]
            right.append((label(c, len(shared)), gap, colour(c), True))
    panels = [Image.new("RGB", (620, 380), "white"), Image.new("RGB", (620, 380), "white")]
    draw_lines(panels[0], left, "Top-1 after each epoch (mean over seeds)", "epoch", "top-1 %", list(epochs))
    if right:
        draw_lines(panels[1], right, "Top-1 minus R=1's, same seed and epoch", "epoch", "points",
                   list(epochs)[1:])
    canvas = Image.new("RGB", (1240, 380), "white")
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (620, 0))
    canvas.save(path)
    print(f"wrote {path}", file=sys.stderr)


def main(argv):
    folder = HERE
    if argv[:1] == ["--runs"]:          # another study of the same plan (results/cifar10-deep2)
        folder, argv = Path(argv[1]), argv[2:]
    runs = load_runs(folder)
    if argv[:1] == ["--plot"]:
        return plot_epochs(runs, argv[1])
    print("Finished runs by configuration\n")
    config_table(runs)
    print("\nPaired by seed (A - B in top-1 points, on the seeds both finished)\n")
    comparison_table(runs)
    weights_table(runs)
    anytime_table(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
