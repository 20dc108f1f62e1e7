"""Where recursion pays: the map study's reading, from the files `study.sh collect` leaves here and the
6-block runs of the deep2 study (the same recipe, model and budget; results/cifar10-deep2).

    python results/cifar10-map/summarize.py > results/cifar10-map/summary.md
    python results/cifar10-map/summarize.py --plot assets/map.png

Run names are L<blocks>-R<depth>-<mixer>[-<loop scale>][-<other>]-s<seed>; deep2's R1, R4-last, R4-soft
and R4-mean are L6-R1, L6-R4-last, L6-R4-soft and L6-R4-mean here. For each configuration: finished
seeds, final top-1 and training loss, and the gaps that decide the question, paired by seed: against
R=1 and against plain recursion (R=4, last) with the same number of blocks, with a 95% t-interval of
the mean difference where there are two seeds or more.
"""
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cifar10-deep"))
from summarize import fmt_range, interval, load_runs, paired, read_rows, reading  # noqa: E402

DEEP2 = {"R1": "L6-R1", "R4-last": "L6-R4-last", "R4-soft": "L6-R4-soft", "R4-mean": "L6-R4-mean"}
EPOCHS = 15                      # every run's budget (study.sh)
NAME = re.compile(r"L(\d+)-R(\d+)(?:-(.*))?$")


def all_runs():
    runs = load_runs(HERE)
    deep2 = load_runs(HERE.parent / "cifar10-deep2")
    for config, seeds in deep2.items():          # (this study's own seeds of a deep2 cell join them)
        if config in DEEP2:
            runs[DEEP2[config]] = {**seeds, **runs.get(DEEP2[config], {})}
    return dict(sorted(runs.items(), key=lambda kv: key_of(kv[0])))


def key_of(config):
    """(blocks, variant, depth) from a configuration's name; variant '' for R=1."""
    m = NAME.match(config)
    return (int(m[1]), m[3] or "", int(m[2])) if m else (99, config, 0)


def gap(runs, a, b):
    seeds, diffs = paired(runs, a, b)
    if not seeds:
        return "-"
    ci = interval(diffs)
    shown = f" ({ci[0]:+.2f} to {ci[1]:+.2f})" if ci else ""
    if len(seeds) == 1:
        return f"{diffs[0]:+.2f} (one seed: not settled)"
    return f"{statistics.mean(diffs):+.2f}{shown}, {len(seeds)} seeds: {reading(diffs, ci)}"


def table(runs):
    print("| configuration | blocks L | R | seeds | final top-1 | final train loss | vs R=1, same L | "
          "vs plain recursion (R=4 last), same L |")
    print("|---|---|---|---|---|---|---|---|")
    for config, seeds in runs.items():
        blocks, variant, depth = key_of(config)
        top1 = [r["top1"] for r in seeds.values()]
        loss = statistics.mean(r["train_loss"] for r in seeds.values())
        base, plain = f"L{blocks}-R1", f"L{blocks}-R4-last"
        print(f"| {config} | {blocks} | {depth} | {', '.join(map(str, sorted(seeds)))} | {fmt_range(top1)} | "
              f"{loss:.3f} | {gap(runs, config, base) if config != base else '-'} | "
              f"{gap(runs, config, plain) if config not in (base, plain) else '-'} |")


def plan_state():
    """Each run of plan.txt, in order, with its state: finished (and its top-1), the epochs it holds so
    far, or not started."""
    print("\n## The plan, run by run\n\n| run | flags | state |\n|---|---|---|")
    for line in (HERE / "plan.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, flags = line.split(None, 1)
        metrics = HERE / name / "metrics.jsonl"
        epochs = [r for r in read_rows(metrics) if r.get("type") == "epoch"] if metrics.exists() else []
        budget = EPOCHS
        if epochs and epochs[-1]["epoch"] == budget:
            state = f"finished: top-1 {epochs[-1]['top1']:.2f}"
        else:
            state = f"{epochs[-1]['epoch']} of {budget} epochs so far" if epochs else "not started"
        print(f"| {name} | `{flags.split('#')[0].strip()}` | {state} |")


COLOURS = {"last": (31, 119, 180), "soft": (214, 39, 40), "mean": (44, 160, 44), "soft-fixed": (255, 127, 14),
           "last-fixed": (23, 190, 207), "soft-learned": (148, 103, 189), "soft-fixed-stack": (140, 86, 75),
           "soft-halflr": (227, 119, 194)}


def r1_anchor(blocks, variant):
    """The R=1 run a variant's depth curve starts from: plain R=1, or R=1 with the same learning rate."""
    other = [part for part in variant.split("-")[1:] if part not in ("fixed", "learned", "stack")]
    return "-".join([f"L{blocks}-R1"] + other)


def depth_curves(runs, blocks, variants, colour):
    """Top-1 against R at one L: R=1 (black), and one line per variant from its R=1 run through every R
    it was run at (mean over seeds; whiskers from the lowest seed to the highest)."""
    def point(config, depth):
        top1 = [r["top1"] for r in runs[config].values()]
        return (depth, statistics.mean(top1)) + ((min(top1), max(top1)) if len(top1) > 1 else ())
    curves = []
    if f"L{blocks}-R1" in runs:
        curves.append(("R1", [point(f"L{blocks}-R1", 1)], (0, 0, 0), True))
    for variant in variants:
        configs = [(f"L{blocks}-R{depth}-{variant}", depth) for depth in (2, 3, 4)]
        deeper = [point(config, depth) for config, depth in configs if config in runs]
        anchor = r1_anchor(blocks, variant)
        if deeper and anchor in runs:
            start = point(anchor, 1)[:2]   # the R=1 run's whisker is drawn once, by its own series
            curves.append((variant, [start] + deeper, colour(variant), True))
    return curves


def plot(runs, path):
    """First row, against the number of blocks L: top-1 of R=1 and of each R=4 variant (mean over
    seeds, whiskers from the lowest seed to the highest); the gap to R=1 of the same L and seed, with
    its 95% interval; the final training loss. Second row, one panel per L: top-1 against R."""
    from PIL import Image
    sys.path.insert(0, str(HERE.parents[1]))
    from eval import draw_lines
    mean = lambda config, key="top1": statistics.mean(r[key] for r in runs[config].values())
    variants = sorted({key_of(c)[1] for c in runs} - {""}, key=lambda v: (v not in COLOURS, v))
    colour = lambda v: COLOURS.get(v, (120, 120, 120))
    blocks = sorted({key_of(c)[0] for c in runs if key_of(c)[0] < 99})

    def top1_points(config_of):   # [(L, mean top-1, lowest seed, highest seed)] where the run exists
        points = []
        for b in blocks:
            if config_of(b) in runs:
                top1 = [r["top1"] for r in runs[config_of(b)].values()]
                points.append((b, statistics.mean(top1)) + ((min(top1), max(top1)) if len(top1) > 1 else ()))
        return points
    curve = [("R1", top1_points(lambda b: f"L{b}-R1"), (0, 0, 0), True)]
    gaps, losses = [], []
    for variant in variants:
        r4 = top1_points(lambda b: f"L{b}-R4-{variant}")
        if r4:
            curve.append((f"R4 {variant}", r4, colour(variant), True))
        gap_points, loss_points = [], []
        for b in blocks:
            config = f"L{b}-R4-{variant}"
            if config in runs and f"L{b}-R1" in runs:
                _, diffs = paired(runs, config, f"L{b}-R1")
                if diffs:
                    ci = interval(diffs)
                    gap_points.append((b, statistics.mean(diffs)) + (ci if ci else ()))
            if config in runs:
                loss_points.append((b, mean(config, "train_loss")))
        if gap_points:
            gaps.append((f"R4 {variant}", gap_points, colour(variant), True))
        if loss_points:
            losses.append((f"R4 {variant}", loss_points, colour(variant), True))
    losses.append(("R1", [(b, mean(f"L{b}-R1", "train_loss")) for b in blocks if f"L{b}-R1" in runs],
                   (0, 0, 0), True))
    panels = [Image.new("RGB", (620, 400), "white") for _ in range(3)]
    draw_lines(panels[0], curve, "Top-1 at R=1 and R=4 (bars: lowest to highest seed)", "blocks L",
               "top-1 %", blocks)
    draw_lines(panels[1], gaps, "R=4 minus R=1, same L and seed (bars: 95% interval)", "blocks L", "points",
               blocks)
    draw_lines(panels[2], losses, "Final training loss", "blocks L", "loss", blocks)
    canvas = Image.new("RGB", (1860, 800), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (620 * i, 0))
    width = 1860 // len(blocks)
    for i, b in enumerate(blocks):     # the second row: top-1 against R, one panel per L
        panel = Image.new("RGB", (width, 400), "white")
        draw_lines(panel, depth_curves(runs, b, variants, colour), f"L={b}: top-1 against R",
                   "recursion depth R", "top-1 %", [1, 2, 3, 4])
        canvas.paste(panel, (width * i, 400))
    canvas.save(path)
    print(f"wrote {path}", file=sys.stderr)


def main(argv):
    runs = all_runs()
    if argv[:1] == ["--plot"]:
        return plot(runs, argv[1])
    print("Where recursion pays: CIFAR-10, width 64, 4 heads, patch 8, 15 epochs (the deep2 recipe); "
          "finished runs by configuration, gaps paired by seed\n")
    table(runs)
    plan_state()


if __name__ == "__main__":
    main(sys.argv[1:])
