"""
Evaluate and look inside SR-ViT; turn training runs into the depth curve.

    python eval.py --checkpoint runs/x/best.pt                    # top-1/5, loss, speed, cost
    python eval.py --checkpoint runs/x/best.pt --val-subset 1000  # the same on 1,000 validation images
    python eval.py --checkpoint runs/x/best.pt --steps all --maps mix.png   # anytime table, SoftMoR maps
    python eval.py --curve runs/*/ --plot curve.png --paper       # Markdown table + PNG of top-1 vs depth

The checkpoint remembers its data set and image size; --data / --data-path override them. Mixers
are numbered 1..L (block l's mixer is mixer l), -1 the last. Benchmarks: results/bench.py.
"""

import argparse
import glob
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import srvit
from loaders import (Normalize, OnDevice, build_dataset, mean_std, normalize_image, read_image, to_rgb,
                     transforms)
from runtime import (BEFORE_THE_FLAG, ArgumentParser, UserError, amp_context, changed, check_at_least,
                     check_device, check_output, check_rules, checkpoint_of, cli, first_line, fmt_time,
                     json_row, plural, read_checkpoint, read_lines, save_file, say, use_device, write_json)
from train import MAY_CHANGE, WORKERS, evaluate

# The paper's ImageNet-1K top-1, all that its abstract (arXiv 2607.00774) gives: SR-ViT-S at R = 1, 4; DeiT-B.
PAPER = {"srvit_s": {1: 79.83, 4: 82.48}, "deit_b": 81.8}


# ----------------------------------------------------------------------------------------
# Evaluate a checkpoint

def load_checkpoint(path):
    """A train.py checkpoint -> (model in eval mode, checkpoint dict). One clear error otherwise."""
    ckpt = read_checkpoint(path)            # missing, half-written or foreign files: as a resume reads
    try:
        model = srvit.SRViT(srvit.SRViTConfig(**{**ckpt["config"], "grad_checkpointing": False}))
        model.load_state_dict(srvit.clean_state_dict(ckpt["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not hold an SR-ViT of the configuration it names: "
                        f"{first_line(e)}") from None
    model.classes = ckpt.get("dataset", {}).get("classes")     # class names, where the checkpoint has them
    return model.eval(), ckpt


def load_model(path):
    """A train.py checkpoint -> the model, in eval mode; `model.classes` holds the class names."""
    return load_checkpoint(path)[0]


def preprocess(model, image):
    """A PIL image -> the (1, 3, S, S) tensor the model takes: training's evaluation transform."""
    size = model.config.img_size
    return normalize_image(transforms(argparse.Namespace(img_size=size),
                                      train=False)(to_rgb(image))[None], size)


@torch.no_grad()
def classify(model, image, k=5):
    """The k most likely classes of an image (a path or a PIL image), most likely first, with
    probabilities to 4 decimals: classify(load_model("runs/x/best.pt"), "cat.png") -> [('cat', 0.71), ...]"""
    image = read_image(image) if isinstance(image, (str, os.PathLike)) else image     # (RGB, as training's)
    probs = model.eval()(preprocess(model, image).to(next(model.parameters()).device)).softmax(-1)[0]  # (C,)
    top = probs.topk(min(k, len(probs)))
    names = getattr(model, "classes", None) or [str(i) for i in range(len(probs))]
    return [(names[i], round(p, 4)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def run_split(model, loader, device, autocast, steps=None, label=None):
    """One pass of training's evaluation (train.evaluate): top-1, top-5, loss, and per mixer the mean weight
    of each step and the entropy over all tokens. label: what the progress on stderr (every ~10%) calls it."""
    seen = {"weights": 0, "entropy": 0, "tokens": 0}

    def watch(mix):
        if mix:
            w = torch.stack(mix).float()                                  # (mixers, B, T, k)
            seen["weights"] = seen["weights"] + w.sum(dim=(1, 2))         # (mixers, k)
            seen["entropy"] = seen["entropy"] - (w * w.clamp_min(1e-12).log()).sum(-1).sum(dim=(1, 2))
            seen["tokens"] += w.shape[1] * w.shape[2]
    progress = lambda line: print("  " + line.replace("evaluating", label, 1), file=sys.stderr)
    t0 = time.time()
    metrics = evaluate(model, loader, device, autocast, steps, log=progress if label else None,
                       every=max(1, len(loader) // 10), watch=watch)
    result = {"top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["val_loss"],
              "images": metrics["val_images"], "images_per_s": metrics["val_images"] / (time.time() - t0)}
    if seen["tokens"]:
        result["step_weights"] = (seen["weights"] / seen["tokens"]).tolist()    # [mixer - 1][step - 1]
        result["entropy"] = (seen["entropy"] / seen["tokens"]).tolist()         # [mixer - 1], nats
    return result


def validation_data(args, ckpt, cfg):
    """(the validation set, the arguments it was built from): the checkpoint's validation split, or the
    one --data, --data-path and --val-subset name."""
    overrides = {k: v for k in ("data", "data_path", "val_subset") if (v := getattr(args, k)) is not None}
    if args.data_path and not args.data and ckpt.get("args", {}).get("data") == "fake":
        overrides["data"] = "folder"                  # (fake data has no path: the path is a folder's)
    # read by loaders.build_dataset as train.py reads them: --val-subset N takes training's N images
    targs = argparse.Namespace(**{**ckpt.get("args", {}), **overrides, "img_size": cfg.img_size,
                                  "num_classes": cfg.num_classes})
    val, classes = build_dataset(targs, "val", transforms(targs, train=False))
    trained_on = ckpt.get("dataset", {}).get("classes")                       # (older checkpoints: no names)
    if len(classes) != cfg.num_classes or trained_on not in (None, classes):
        differ = (changed("classes", trained_on, classes) if trained_on and trained_on != classes
                  else f"{len(classes)} now")
        raise UserError(f"the checkpoint classifies {cfg.num_classes} classes, other than the data's at "
                        f"{targs.data_path} ({differ}): evaluate it on the data it was trained on")
    return val, targs


def evaluate_checkpoint(args):
    model, ckpt = load_checkpoint(args.checkpoint)
    cfg = model.config
    if args.steps not in (None, "all") and not (args.steps.isdecimal() and 1 <= int(args.steps) <= cfg.depth):
        raise UserError(f"--steps takes 'all' or a number of steps in 1..{cfg.depth} (this model's depth), "
                        f"got {args.steps!r}")
    steps = int(args.steps) if args.steps not in (None, "all") else None
    if args.maps:
        mixer_index(args.maps_mixer, len(model.mixers), "--maps-mixer ")
    val, targs = validation_data(args, ckpt, cfg)
    device = use_device(args.device or check_device(None))
    model.to(device)
    autocast = amp_context(device, args.amp)
    batches = torch.utils.data.DataLoader(val, args.batch_size, num_workers=args.workers,
                                          pin_memory=device.type == "cuda")
    loader = OnDevice(batches, Normalize(*mean_std(cfg.img_size), device))     # uint8 to the device
    trained = plural(ckpt.get("epoch", 0), "epoch")
    say(f"{args.checkpoint}: SR-ViT D={cfg.embed_dim} L={cfg.num_layers} R={cfg.depth} mixer={cfg.mixer} "
        f"share={cfg.share}, trained {trained} | {len(val):,} images of {targs.data} on {device}")
    result = {"checkpoint": args.checkpoint, "params": srvit.count_params(model),
              "gmacs": srvit.forward_gmacs(model, steps=steps), "steps": steps or cfg.depth,
              **run_split(model, loader, device, autocast, steps, label="evaluating")}
    say("top-1 {top1:.2f} | top-5 {top5:.2f} | loss {loss:.4f} | {images_per_s:,.0f} images/s (with data "
        "loading) | {params:,} params | {gmacs:.3g} GMACs/image".format(**result))
    if "step_weights" in result:       # (abs(entropy): a mixer sure of one step sums to -0.000)
        k = result["steps"]
        say(f"\nMixture weights ({cfg.mixer}), mean over validation tokens; entropy (uniform "
            f"{math.log(k):.3f} nats)\n| | {' | '.join(f'step {j + 1}' for j in range(k))} | entropy |\n"
            + "|---" * (k + 2) + "|")
        for i, (weights, entropy) in enumerate(zip(result["step_weights"], result["entropy"])):
            say(f"| mixer {i + 1} | " + " | ".join(f"{w:.3f}" for w in weights) + f" | {abs(entropy):.3f} |")
    if args.steps == "all":
        passes = [run_split(model, loader, device, autocast, k, label=f"steps {k}")
                  for k in range(1, cfg.depth)] + [result]
        result["anytime"] = [{"steps": k, "top1": split["top1"], "top5": split["top5"],
                              "gmacs": srvit.forward_gmacs(model, steps=k)}
                             for k, split in enumerate(passes, 1)]
        say("\nAnytime inference: the first k steps of the same model\n| steps k | top-1 | top-5 | GMACs |\n"
            "|---|---|---|---|")
        for row in result["anytime"]:
            say("| {steps} | {top1:.2f} | {top5:.2f} | {gmacs:.3g} |".format(**row))
    if args.maps:
        n = min(args.maps_images, len(val))                         # (--maps-images: 1..64, get_args)
        picks = sorted({i * len(val) // n for i in range(n)})                            # spread out
        images = normalize_image(torch.stack([val[i][0] for i in picks]), cfg.img_size)   # (n, 3, S, S)
        picture = draw_maps(model, images, mixer=args.maps_mixer, relative=args.maps_relative)
        say()
        save_file(args.maps, picture.save)
    if args.json:
        write_json(args.json, result)
    return result


# ----------------------------------------------------------------------------------------
# Pictures (Pillow only)

# viridis-like: weight 0 -> 1
RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(v):
    v = min(max(v, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(v), len(RAMP) - 2)
    return tuple(round(a + (b - a) * (v - i)) for a, b in zip(RAMP[i], RAMP[i + 1]))


def font(size=13):
    try:
        return ImageFont.load_default(size=size)   # scalable default font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def mixer_index(mixer, n, named_as="mixer="):
    """Mixer 1..n, or -1 for the last (-2 the one before) -> its index; named_as: how the user wrote it."""
    if not (1 <= mixer <= n or -n <= mixer <= -1):
        raise UserError(f"{named_as}{mixer}: this model has {plural(n, 'mixer')}, numbered 1..{n} (or -1 "
                        f"for the last)" if n else "a depth-1 model has no mixer, so no weights to draw")
    return mixer - 1 if mixer > 0 else n + mixer


@torch.no_grad()
def draw_maps(model, images, mixer=-1, cell=112, relative=False):
    """A picture (PIL image): per image (n, 3, S, S, normalised as the model's input) the image and one heat
    map per step of the weight that mixer (1..L, -1 the last) gives the step at each patch (0 dark, 1 yellow;
    the class token's above). relative: colours over the weights shown (near 1/R), a span of 0.05 at least."""
    cfg, R = model.config, model.config.depth
    _, mix = model.eval()(images.to(next(model.parameters()).device), return_mix=True)
    i = mixer_index(mixer, len(mix))
    weights = mix[i].float().cpu()                                     # (n, T, R)
    lo, hi, mid = weights.min().item(), weights.max().item(), weights.mean().item()
    # (short enough for the picture of R = 2, 360 px wide)
    title = f"Step weights, mixer {i + 1} of {len(mix)} ({cfg.mixer}, share={cfg.share})"
    title += ": weights uniform" if hi - lo < 0.01 else ""                           # all within 0.01
    lo, hi = (min(lo, mid - 0.025), max(hi, mid + 0.025)) if relative else (0.0, 1.0)
    grid, (mean, std) = cfg.img_size // cfg.patch_size, mean_std(cfg.img_size)
    pad, top, row_h = 6, 22, 15 + cell + 6                             # a row: labels, maps, padding
    canvas = Image.new("RGB", (pad + (R + 1) * (cell + pad), top + len(images) * row_h + 40), "white")
    canvas.info["title"] = title
    draw = ImageDraw.Draw(canvas)
    draw.font = font(12)
    draw.text((pad, 4), title, fill="black")
    for row, x in enumerate(images.cpu()):
        y0 = top + row * row_h + 15
        img = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)  # 3,S,S
        picture = Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy())
        canvas.paste(picture.resize((cell, cell), Image.NEAREST), (pad, y0))
        for r in range(R):
            x0, heat = pad + (r + 1) * (cell + pad), Image.new("RGB", (grid, grid))    # patch tokens only
            heat.putdata([colour((v - lo) / (hi - lo)) for v in weights[row, 1:, r].tolist()])
            canvas.paste(heat.resize((cell, cell), Image.NEAREST), (x0, y0))
            draw.text((x0, y0 - 15), f"step {r + 1} · cls {weights[row, 0, r]:.2f}", fill="black")
    y0, bar_w = canvas.height - 30, canvas.width - 2 * pad - 60          # the colour bar
    for b in range(bar_w):
        draw.line([(pad + 30 + b, y0), (pad + 30 + b, y0 + 10)], fill=colour(b / (bar_w - 1)))
    draw.text((pad, y0), f"{lo:.3g}", fill="black")
    draw.text((pad + 36 + bar_w, y0), f"{hi:.3g}", fill="black")
    draw.text((pad + 30, y0 + 13), f"weight a (uniform = 1/{R} = {1 / R:.2f})", fill="black")
    return canvas


def draw_lines(panel, series, title, xlabel, ylabel, xticks):
    """A line chart into a Pillow image: series = [(label, [(x, y), ...], colour, joined)]. A point may be
    (x, y, low, high): a whisker from low to high (the range over seeds) is drawn through it. x = None: a
    level that belongs to no x (one reference model): a short tick on the y axis, outside the frame."""
    draw, (W, H) = ImageDraw.Draw(panel), panel.size
    draw.font = font()
    fit = (W // 2 - 40) // 7                  # the legend takes half the panel at most: longer labels are cut
    head = (fit - 3) // 2                     # cut in the middle: a variant's last settings tell it apart
    series = [(label if len(label) <= fit else label[:head] + "..." + label[len(label) - (fit - 3 - head):],
               *rest) for label, *rest in series]
    left, top, bottom, right = 58, 30, 42, 40 + 7 * max(len(label) for label, *_ in series)   # right: legend
    ys = [y for _, pts, _, _ in series for _, *values in pts for y in values]       # points and whiskers
    span = max(max(ys) - min(ys), 1.0)
    lo, hi = min(ys) - 0.15 * span, max(ys) + 0.15 * span
    x_px = lambda x: left + (x - min(xticks)) / max(1, max(xticks) - min(xticks)) * (W - left - right)
    y_px = lambda y: H - bottom - (y - lo) / (hi - lo) * (H - top - bottom)
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for x in xticks:
        draw.line([(x_px(x), H - bottom), (x_px(x), H - bottom + 4)], fill="black")
        draw.text((x_px(x) - 3, H - bottom + 6), str(x), fill="black")
    grid = 10 ** math.floor(math.log10((hi - lo) / 4))           # gridlines 1, 2 or 5 x 10^n apart
    grid *= next(factor for limit, factor in ((20, 5), (8, 2), (0, 1)) if (hi - lo) / grid > limit)
    for y in (n * grid for n in range(math.ceil(lo / grid), math.floor(hi / grid) + 1)):
        draw.line([(left, y_px(y)), (W - right, y_px(y))], fill=(225, 225, 225))
        draw.text((6, y_px(y) - 6), f"{y:.1f}", fill="black")
    draw.text((left + (W - left - right) // 2 - 20, H - 18), xlabel, fill="black")
    draw.text((6, top - 16), ylabel, fill="black")
    for i, (label, pts, col, joined) in enumerate(series):
        if joined and len(pts) > 1:
            draw.line([(x_px(x), y_px(y)) for x, y, *_ in sorted(pts)], fill=col, width=2)
        for x, y, *y_range in pts:
            if x is None:
                draw.line([(left - 14, y_px(y)), (left - 2, y_px(y))], fill=col, width=3)
            else:
                draw.ellipse([x_px(x) - 4, y_px(y) - 4, x_px(x) + 4, y_px(y) + 4], fill=col)
            # the seeds' range, capped, a few pixels aside per series so bars do not overlap
            if y_range:
                bar_x = x_px(x) + 7 * (i - (len(series) - 1) / 2)
                low, high = y_px(y_range[0]), y_px(y_range[1])
                draw.line([(bar_x, low), (bar_x, high)], fill=col, width=2)
                for end in (low, high):
                    draw.line([(bar_x - 3, end), (bar_x + 3, end)], fill=col, width=2)
        draw.line([(W - right + 10, top + 10 + 16 * i), (W - right + 30, top + 10 + 16 * i)], fill=col,
                  width=3)
        draw.text((W - right + 34, top + 4 + 16 * i), label, fill="black")


# ----------------------------------------------------------------------------------------
# Depth curve from training runs

MIXER_COLOURS = {"soft": (214, 39, 40), "last": (31, 119, 180), "mean": (44, 160, 44)}
OTHER_COLOURS = [(255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207),
                 (188, 189, 34), (0, 0, 128), (128, 0, 0)]
GREY = (110, 110, 110)


def read_run(folder):
    """A run folder's metrics.jsonl -> one row of the curve table (None when it has no epoch yet)."""
    path = Path(folder, "metrics.jsonl")
    rows = [row for row in map(json_row, read_lines(path)) if row]
    runs, epochs = [r for r in rows if r.get("type") == "run"], [r for r in rows if r.get("type") == "epoch"]
    if not runs or not epochs:
        return None
    run, last = runs[-1], epochs[-1]           # (a run extended with --epochs: its last leg's settings)
    try:
        config, args = run["config"], run["args"]
        looped = config["depth"] > 1                          # (R=1 has no mixer and no sharing)
        return {"run": Path(folder).name, "depth": config["depth"], "seed": args["seed"],
                "mixer": config["mixer"] if looped else "-", "share": config["share"] if looped else "-",
                "params": run["params"], "gmacs": run["gmacs"], "settings": run_settings(config, args),
                "epochs": last["epoch"], "finished": last["epoch"] >= args["epochs"],
                "best_top1": max(e["top1"] for e in epochs), "final_top1": last["top1"],
                "wall_s": last["elapsed"]}
    except (KeyError, TypeError, ValueError) as e:       # another program's rows; "top1": null
        raise UserError(f"{path} holds a row train.py does not write ({type(e).__name__}: {first_line(e)}): "
                        f"leave that run out of --curve") from None


# Settings that do not change a run's result (train.MAY_CHANGE: workers, device, ...; not --epochs, which
# changes it, nor --init-from, named by its file), that the curve shows in columns of its own (R, mixer,
# sharing, seed), or that name nothing measured.
NOT_RESULT = (MAY_CHANGE - {"epochs", "init_from"}) | {"seed", "depth", "mixer", "share", "recipe",
                                                     "drop_path_rate", "grad_checkpointing"}
SHORT = {"num_layers": "L", "embed_dim": "D", "num_heads": "heads", "patch_size": "patch", "img_size": "px",
         "batch_size": "batch"}


def run_settings(config, args):
    """Every setting of a run that changes its result, beside R, mixer, sharing and seed: the model's
    config and every training argument but those in NOT_RESULT (where an older run lacks one, what the
    code did before the flag). The data folder counts by its name (the same data moves between
    machines)."""
    settings = {**BEFORE_THE_FLAG, **args, **asdict(srvit.SRViTConfig()), **config}
    settings = {SHORT.get(k, k): v for k, v in settings.items() if k not in NOT_RESULT}
    if args.get("data_path"):
        settings["data"] = f"{args['data']}:{Path(args['data_path']).name}"
    if args.get("init_from"):                      # a warm start is another run than one from scratch
        settings["init_from"] = Path(args["init_from"]).name
    if config["depth"] == 1:                       # no mixer: its settings change nothing
        settings.pop("router_init", None)
    return settings


def common_settings(rows):
    """Each setting's most common value over the runs (str, so that 1e-3 and 0.001 are one value)."""
    keys = sorted({key for r in rows for key in r["settings"]})
    return {key: statistics.mode(str(r["settings"][key]) for r in rows if key in r["settings"])
            for key in keys}


def curve(args):
    found = {a: [r for f in sorted(glob.glob(a)) if os.path.isdir(f) and (r := read_run(f))]
             for a in args.curve}                                     # each argument's runs
    rows, empty = [r for runs in found.values() for r in runs], [a for a in found if not found[a]]
    if not rows:
        raise UserError(f"no finished runs (metrics.jsonl with an epoch) in {' '.join(args.curve)}")
    if empty:
        print(f"warning: no run (metrics.jsonl with an epoch) in {' '.join(empty)}: skipped", file=sys.stderr)
    common = common_settings(rows)        # a run's variant: the settings where it differs from most runs
    for r in rows:
        mine = r["settings"]
        r["variant"] = " ".join(f"{k}={mine[k]}" for k in common if k in mine and str(mine[k]) != common[k])
    rows.sort(key=lambda r: (r["variant"], r["depth"] > 1, r["mixer"], r["share"], r["depth"], r["seed"]))
    say("| run | R | mixer | share | differs from the main sweep | seed | params | GMACs | epochs | best "
        "top-1 | final top-1 | wall time |\n" + "|---" * 12 + "|")
    for r in rows:
        epochs = str(r["epochs"]) + ("" if r["finished"] else f" of {r['settings']['epochs']} (unfinished)")
        say(f"| {r['run']} | {r['depth']} | {r['mixer']} | {r['share']} | {r['variant'] or '-'} | "
            f"{r['seed']} | {r['params']:,} | {r['gmacs']:.3g} | {epochs} | {r['best_top1']:.2f} | "
            f"{r['final_top1']:.2f} | {fmt_time(r['wall_s'])} |")
    runs_of = {}                                     # a seed run twice counts once: the mean of its runs
    for r in filter(lambda r: r["finished"], rows):
        key = (r["variant"], r["depth"], r["mixer"], r["share"])
        runs_of.setdefault(key, {}).setdefault(r["seed"], []).append(r["final_top1"])
    groups = {key: [statistics.mean(accs) for accs in by_seed.values()] for key, by_seed in runs_of.items()}
    main_sweep = " ".join(f"{k}={v}" for k, v in common.items())
    say("\nFinal top-1 of finished runs by configuration: runs are grouped by every setting that changes "
        "the result (not --amp or --loader: a run may resume on another device, precision or loader); the "
        f"main sweep is each setting's most common value: {main_sweep}. Mean over seeds; range where "
        "several.\n| R | mixer | share | differs from the main sweep | seeds | final top-1 |\n"
        "|---|---|---|---|---|---|")
    for key, accs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])):
        variant, depth, mixer, share = key
        spread = f" ({min(accs):.2f}-{max(accs):.2f})" if len(accs) > 1 else ""
        twice = [f"seed {seed} run {len(accs_of_seed)} times, counted once"
                 for seed, accs_of_seed in runs_of[key].items() if len(accs_of_seed) > 1]
        say(f"| {depth} | {mixer} | {share} | {variant or '-'} | {len(accs)}{'; ' if twice else ''}"
            f"{'; '.join(twice)} | {statistics.mean(accs):.2f}{spread} |")
    if args.json:
        write_json(args.json, rows)
    if args.plot and not groups:
        raise UserError(f"no finished run to plot in {' '.join(args.curve)} (the table above lists the "
                        f"unfinished ones): plot when one has finished")
    if args.plot:
        plot_curve(groups, args.plot, paper=args.paper)
    return rows


def curve_series(groups):
    """groups {(variant, R, mixer, share): [top-1 of each seed]} -> draw_lines series: a line per mixer
    of the main sweep from its R=1 point, other variants as points; each its own colour (past
    MIXER_COLOURS: OTHER_COLOURS, GREY)."""
    point = lambda x, accs: (x, statistics.mean(accs)) + ((min(accs), max(accs)) if len(accs) > 1 else ())
    others, series = iter(OTHER_COLOURS), []
    for variant in sorted({v for v, _, _, _ in groups}):
        base = groups.get((variant, 1, "-", "-"))
        for mixer, share in [(m, s) for m in MIXER_COLOURS for s in ("block", "stack")]:
            pts = [point(depth, accs) for (v, depth, m, s), accs in groups.items()
                   if (v, m, s) == (variant, mixer, share)]
            if pts:
                col = MIXER_COLOURS[mixer] if not variant and share == "block" else next(others, GREY)
                label = mixer + (" stack" if share == "stack" else "") + (f" ({variant})" if variant else "")
                series.append((label, pts + ([(1, statistics.mean(base))] if base else []), col, not variant))
        if base:                                  # R=1 once, with its own range over seeds
            col = next(others, GREY) if variant else (0, 0, 0)
            series.append((f"R=1 ({variant})" if variant else "R=1", [point(1, base)], col, False))
    return series


def plot_curve(groups, path=None, paper=False):
    """Left: our runs (curve_series). Right, when asked: the paper's ImageNet points, DeiT-B's level."""
    panels = [Image.new("RGB", (760, 380), "white")]
    if paper:
        panels.append(Image.new("RGB", (520, 380), "white"))
    several = any(len(accs) > 1 for accs in groups.values())
    seeds = "mean over seeds; bars: range over seeds" if several else "one run each"
    draw_lines(panels[0], curve_series(groups), f"Our runs: final top-1 ({seeds})", "recursion depth R",
               "top-1 %", list(range(1, max(d for _, d, _, _ in groups) + 1)))
    # R = 1 and 4 only: points, no invented line; DeiT-B is one model: a tick at its level, not a line
    if paper:
        paper_series = [("SR-ViT-S", list(PAPER["srvit_s"].items()), MIXER_COLOURS["soft"], False),
                        (f"DeiT-B (paper), one model: {PAPER['deit_b']}", [(None, PAPER["deit_b"])],
                         (120, 120, 120), False)]
        draw_lines(panels[1], paper_series,
                   "The paper, ImageNet-1K top-1 (abstract)", "recursion depth R", "top-1 %", [1, 2, 3, 4])
    canvas = Image.new("RGB", (sum(p.width for p in panels), 380), "white")
    for p, x in zip(panels, (0, 760)):
        canvas.paste(p, (x, 0))
    if path:
        save_file(path, canvas.save)
    return canvas


# ----------------------------------------------------------------------------------------

def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--checkpoint", help="train.py checkpoint to evaluate")
    add("--curve", nargs="+", help="run folders (with metrics.jsonl) for the depth-curve table")
    add("--data", default=None, choices=["imagenet", "cifar10", "cifar100", "folder", "fake"],
        help="default: the checkpoint's")
    add("--data-path", default=None, help="default: the checkpoint's")
    add("--val-subset", type=int, help="the first N validation images of train.py's fixed permutation")
    add("--steps", help="'all': the anytime table for k = 1..R; a number k: evaluate the first k steps only")
    add("--maps", default=None, help="PNG file for the SoftMoR weight maps")
    add("--maps-images", type=int, default=4, help="how many validation images the maps show")
    add("--maps-mixer", type=int, default=-1, help="the mixer to draw: 1..L (one per block), -1 the last")
    add("--maps-relative", action="store_true", help="colours span the weights shown, not 0..1")
    add("--plot", default=None, help="PNG file for the depth curve")
    add("--paper", action="store_true", help="add the paper's ImageNet points as a second panel")
    add("--json", default=None, help="also write the numbers to this JSON file")
    add("--batch-size", type=int, default=256)
    add("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: none, full precision")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where there is one)")
    add("--workers", type=int, default=2, help="loader processes")
    args, unknown = p.parse_known_args(argv)
    if unknown:                 # --bench, --activations and --bench-loader moved to results/bench.py
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (python eval.py --help lists the "
                        f"options; benchmarks: results/bench.py --help)")
    if bool(args.checkpoint) == bool(args.curve):
        raise UserError("give exactly one of --checkpoint, --curve (python eval.py --help lists the options)")
    check_device(args.device)
    check_at_least(args, batch_size=1, val_subset=1)
    check_rules(args, workers=WORKERS, maps_images=(lambda n: 1 <= n <= 64, "in 1..64"))
    if args.checkpoint:
        args.checkpoint = checkpoint_of(args.checkpoint)
    taken = {os.path.realpath(args.checkpoint): "the checkpoint it evaluates"} if args.checkpoint else {}
    for flag, path, picture in (("--json", args.json, False), ("--plot", args.plot, True),
                                ("--maps", args.maps, True)):
        check_output(flag, path, picture)
        real = path and os.path.realpath(path)                         # (a link: the file it names)
        rows = real and os.path.exists(real) and Path(real).match("metrics*.jsonl")  # a run's, kept aside too
        if real and (real in taken or rows):
            raise UserError(f"{flag} {path} is {taken.get(real, 'the metrics of a run')}, which this would "
                            f"replace: name a new file")
        taken[real] = f"the file {flag} writes"
    return args


def main(argv=None):
    args = get_args(argv)
    return curve(args) if args.curve else evaluate_checkpoint(args)


if __name__ == "__main__":
    sys.exit(cli(main, interrupted="interrupted", out_of_memory="lower --batch-size"))  # bad input: 2
