"""
Evaluate, benchmark and look inside SR-ViT; turn training runs into the depth curve.

    python eval.py --checkpoint runs/x/best.pt                    # top-1/5, loss, speed, cost
    python eval.py --checkpoint runs/x/best.pt --steps all --maps mix.png   # anytime table, SoftMoR maps
    python eval.py --bench --model small --depth 1 2 3 4 --amp bf16 --compile --batch-size 256
    python eval.py --curve runs/*/ --plot curve.png --paper       # Markdown table + PNG of top-1 vs depth
    python eval.py --bench-loader --data-path ~/data/cifar10 --depth 1 4   # in-memory vs PIL loader

The checkpoint remembers its data set and image size; --data / --data-path override them.
Pictures are drawn with Pillow (it comes with torchvision), so matplotlib is not needed.
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import srvit
import train
from train import UserError, amp_context

# The paper's ImageNet-1K numbers (abstract of arXiv 2607.00774): SR-ViT-S top-1 at R = 1 and 4,
# and DeiT-B for reference. Nothing else of the paper's curve is public.
PAPER = {"srvit_s": {1: 79.83, 4: 82.48}, "deit_b": 81.8}


# ----------------------------------------------------------------------------------------
# Evaluate a checkpoint

def load_checkpoint(path):
    """A train.py checkpoint -> (model in eval mode, checkpoint dict). One clear error otherwise."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): not a complete PyTorch checkpoint") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'config'); for DeiT/timm weights use "
                        f"train.py --init-from, or srvit.load_pretrained in Python")
    config = {**ckpt["config"], "grad_checkpointing": False}
    try:
        model = srvit.SRViT(srvit.SRViTConfig(**config))
        model.load_state_dict(srvit.clean_state_dict(ckpt["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not hold an SR-ViT of the configuration it names: {str(e).splitlines()[0]}") from None
    model.classes = ckpt.get("dataset", {}).get("classes")     # class names, where the checkpoint has them
    return model.eval(), ckpt


def load_model(path):
    """A train.py checkpoint -> the model, in eval mode; `model.classes` holds the class names."""
    return load_checkpoint(path)[0]


def preprocess(model, image):
    """A PIL image -> the (1, 3, S, S) tensor the model takes: training's evaluation transform."""
    size = model.config.img_size
    return train.transforms(argparse.Namespace(img_size=size), train=False)(image.convert("RGB"))[None]


@torch.no_grad()
def classify(model, image, k=5):
    """The k most likely classes of a PIL image: [(name, probability), ...], most likely first.

        model = load_model("runs/cifar10-D192-L6-H3-R2-soft-block-s0/best.pt")
        classify(model, Image.open("cat.png"))        # [('cat', 0.71), ('dog', 0.12), ...]
    """
    device = next(model.parameters()).device
    probs = model.eval()(preprocess(model, image).to(device)).softmax(-1)[0]     # (classes,)
    top = probs.topk(min(k, len(probs)))
    names = getattr(model, "classes", None) or [str(i) for i in range(len(probs))]
    return [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def run_split(model, loader, device, autocast, steps=None):
    """One pass over the split: accuracy, loss, and per mixer the mean weight of each step and
    the mean entropy of the weights over all tokens."""
    n = c1 = c5 = loss = 0.0
    w_sum, ent_sum, tokens = None, None, 0
    t0 = time.time()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, mix = model(x, steps=steps, return_mix=True)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        c1 += (top5[:, 0] == y).sum().item()
        c5 += (top5 == y[:, None]).any(1).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        if mix:
            w = torch.stack(mix)                                     # (mixers, B, T, k)
            ws, es = w.sum(dim=(1, 2)), -(w * w.clamp_min(1e-12).log()).sum(-1).sum(dim=(1, 2))
            w_sum, ent_sum = (ws, es) if w_sum is None else (w_sum + ws, ent_sum + es)
            tokens += w.shape[1] * w.shape[2]
    if n == 0:
        raise UserError("the validation split is empty")
    out = {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n, "images": int(n),
           "images_per_s": n / (time.time() - t0)}
    if w_sum is not None:
        out["step_weights"] = (w_sum / tokens).tolist()              # [mixer][step]
        out["entropy"] = (ent_sum / tokens).tolist()                 # [mixer], nats; uniform = log k
    return out


def evaluate_checkpoint(args):
    model, ckpt = load_checkpoint(args.checkpoint)
    cfg = model.config
    targs = argparse.Namespace(**{**ckpt.get("args", {}), "img_size": cfg.img_size})
    for key in ("data", "data_path", "val_subset"):
        if getattr(args, key) is not None:
            setattr(targs, key, getattr(args, key))
    if targs.data == "fake":
        targs.num_classes = cfg.num_classes
    if args.steps not in (None, "all") and not (args.steps.isdigit() and 1 <= int(args.steps) <= cfg.depth):
        raise UserError(f"--steps takes 'all' or a number of steps in 1..{cfg.depth} (this model's depth), got {args.steps!r}")
    if args.maps and cfg.depth == 1:
        raise UserError("--maps: a depth-1 model has no mixer, so there are no weights to draw")
    if args.maps and not -len(model.mixers) <= args.maps_mixer < len(model.mixers):
        raise UserError(f"--maps-mixer {args.maps_mixer}: this model has {len(model.mixers)} mixers, "
                        f"numbered 0..{len(model.mixers) - 1} (or -1 for the last)")
    val, classes = train.build_dataset(targs, "val", train.transforms(targs, train=False))
    if len(classes) != cfg.num_classes:
        raise UserError(f"the checkpoint classifies {cfg.num_classes} classes, the data at {targs.data_path} has {len(classes)}")
    device = torch.device(args.device or train.check_device(None))
    model.to(device)
    autocast = amp_context(device, args.amp)
    loader = torch.utils.data.DataLoader(val, args.batch_size or 256, num_workers=args.workers)

    print(f"{args.checkpoint}: SR-ViT D={cfg.embed_dim} L={cfg.num_layers} R={cfg.depth} mixer={cfg.mixer} "
          f"share={cfg.share}, trained {ckpt.get('epoch', '?')} epochs | {len(val):,} images of {targs.data} on {device}")
    params = srvit.count_params(model)
    steps = int(args.steps) if args.steps not in (None, "all") else None
    result = {"checkpoint": args.checkpoint, "params": params, "gmacs": srvit.forward_gmacs(model, steps=steps),
              "steps": steps or cfg.depth, **run_split(model, loader, device, autocast, steps=steps)}
    print(f"top-1 {result['top1']:.2f} | top-5 {result['top5']:.2f} | loss {result['loss']:.4f} | "
          f"{result['images_per_s']:,.0f} images/s (with data loading) | {params:,} params | {result['gmacs']:.3g} GMACs/image")
    if "step_weights" in result:
        print(f"\nMixture weights ({cfg.mixer}) over validation tokens: mean weight of each step, and entropy (uniform = "
              f"{math.log(cfg.depth):.3f} nats)")
        print("| mixer | " + " | ".join(f"step {r + 1}" for r in range(cfg.depth)) + " | entropy |")
        print("|---" * (cfg.depth + 2) + "|")
        for i, (w, e) in enumerate(zip(result["step_weights"], result["entropy"])):
            print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in w) + f" | {abs(e):.3f} |")

    if args.steps == "all":
        print("\nAnytime inference: the first k recursion steps of the same model")
        print("| steps k | top-1 | top-5 | GMACs |\n|---|---|---|---|")
        result["anytime"] = []
        for k in range(1, cfg.depth + 1):
            r = run_split(model, loader, device, autocast, steps=k) if k < cfg.depth else result
            row = {"steps": k, "top1": r["top1"], "top5": r["top5"], "gmacs": srvit.forward_gmacs(model, steps=k)}
            result["anytime"].append(row)
            print(f"| {k} | {row['top1']:.2f} | {row['top5']:.2f} | {row['gmacs']:.3g} |")
    if args.maps:
        picks = sorted({i * len(val) // args.maps_images for i in range(args.maps_images)})   # spread over the split
        draw_maps(model, torch.stack([val[i][0] for i in picks]), mixer=args.maps_mixer, relative=args.maps_relative).save(args.maps)
        print(f"\nwrote {args.maps}")
    if args.json:
        write_json(args.json, result)
    return result


def write_json(path, obj):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# Pictures (Pillow only)

# A viridis-like ramp: dark blue (weight 0) -> green -> yellow (weight 1).
RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def colour(v):
    v = min(max(v, 0.0), 1.0) * (len(RAMP) - 1)
    i = min(int(v), len(RAMP) - 2)
    t = v - i
    return tuple(round(a + (b - a) * t) for a, b in zip(RAMP[i], RAMP[i + 1]))


@torch.no_grad()
def draw_maps(model, images, mixer=-1, cell=112, relative=False):
    """A picture (PIL image): one row per image, the image, then one heat map per recursion
    step of the weight that mixer gives that step at each patch (0 dark, 1 yellow; the class
    token's weight above it). `images`: (n, 3, S, S), normalised as the model's input.
    relative=True stretches the colours from the smallest to the largest weight shown: after a
    short training the weights stay near 1/R, and on the 0..1 scale the maps look flat."""
    from PIL import Image, ImageDraw
    cfg = model.config
    if cfg.depth == 1:
        raise UserError("a depth-1 model has no mixer: nothing to draw")
    xs = images.to(next(model.parameters()).device)
    _, mix = model.eval()(xs, return_mix=True)
    weights = mix[mixer].float().cpu()                                 # (n, T, R)
    lo, hi = (weights.min().item(), max(weights.max().item(), weights.min().item() + 1e-6)) if relative else (0.0, 1.0)
    grid = cfg.img_size // cfg.patch_size
    mean, std = train.MEAN_STD["cifar" if cfg.img_size <= 64 else "imagenet"]
    pad, top, label_h, R = 6, 22, 15, cfg.depth
    row_h = label_h + cell + pad
    W, H = pad + (R + 1) * (cell + pad), top + len(xs) * row_h + 40
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    draw.font = font(12)
    which = f"mixer {mixer % len(mix) + 1} of {len(mix)}"
    draw.text((pad, 4), f"SoftMoR step weights per patch ({which}, {cfg.mixer}, share={cfg.share})", fill="black")
    for row, x in enumerate(xs.cpu()):
        y0 = top + row * row_h + label_h
        img = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
        img = Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).resize((cell, cell), Image.NEAREST)
        canvas.paste(img, (pad, y0))
        for r in range(R):
            w = weights[row, 1:, r].reshape(grid, grid)                # patch tokens, (grid, grid)
            heat = Image.new("RGB", (grid, grid))
            heat.putdata([colour((v - lo) / (hi - lo)) for v in w.flatten().tolist()])
            x0 = pad + (r + 1) * (cell + pad)
            canvas.paste(heat.resize((cell, cell), Image.NEAREST), (x0, y0))
            draw.text((x0, y0 - label_h), f"step {r + 1} · cls {weights[row, 0, r]:.2f}", fill="black")
    # colour bar
    y0, bar_w = H - 30, W - 2 * pad - 60
    for i in range(bar_w):
        draw.line([(pad + 30 + i, y0), (pad + 30 + i, y0 + 10)], fill=colour(i / (bar_w - 1)))
    draw.text((pad, y0), f"{lo:.2g}", fill="black")
    draw.text((pad + 36 + bar_w, y0), f"{hi:.2g}", fill="black")
    draw.text((pad + 30, y0 + 13), f"weight a (uniform = 1/{R} = {1 / R:.2f})", fill="black")
    return canvas


def font(size=13):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)   # scalable default font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def draw_lines(panel, series, title, xlabel, ylabel, xticks):
    """A line chart into a Pillow image: series = [(label, [(x, y), ...], colour, joined)]. A point
    may be (x, y, low, high): a whisker from low to high (the range over seeds) is drawn through it."""
    from PIL import ImageDraw
    draw = ImageDraw.Draw(panel)
    draw.font = font()
    W, H = panel.size
    right = 40 + 7 * max(len(label) for label, *_ in series)   # room for the legend
    left, top, bottom = 58, 30, 42
    ys = [y for _, pts, _, _ in series for _, *y_range in pts for y in y_range]
    lo, hi = min(ys), max(ys)
    span = max(hi - lo, 1.0)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    X = lambda x: left + (x - min(xticks)) / max(1, max(xticks) - min(xticks)) * (W - left - right)
    Y = lambda y: H - bottom - (y - lo) / (hi - lo) * (H - top - bottom)
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for x in xticks:
        draw.line([(X(x), H - bottom), (X(x), H - bottom + 4)], fill="black")
        draw.text((X(x) - 3, H - bottom + 6), str(x), fill="black")
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    step *= 5 if (hi - lo) / step > 20 else (2 if (hi - lo) / step > 8 else 1)
    y = math.ceil(lo / step) * step
    while y <= hi:
        draw.line([(left, Y(y)), (W - right, Y(y))], fill=(225, 225, 225))
        draw.text((6, Y(y) - 6), f"{y:.1f}", fill="black")
        y += step
    draw.text((left + (W - left - right) // 2 - 20, H - 18), xlabel, fill="black")
    draw.text((6, top - 16), ylabel, fill="black")
    for i, (label, pts, col, joined) in enumerate(series):
        pts = sorted(pts)
        if joined and len(pts) > 1:
            draw.line([(X(x), Y(y)) for x, y, *_ in pts], fill=col, width=2)
        for x, y, *y_range in pts:
            draw.ellipse([X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], fill=col)
            if y_range:          # the seeds' range, capped, a few pixels aside per series so bars do not overlap
                bar_x, low, high = X(x) + 7 * (i - (len(series) - 1) / 2), Y(y_range[0]), Y(y_range[1])
                draw.line([(bar_x, low), (bar_x, high)], fill=col, width=2)
                for end in (low, high):
                    draw.line([(bar_x - 3, end), (bar_x + 3, end)], fill=col, width=2)
        draw.line([(W - right + 10, top + 10 + 16 * i), (W - right + 30, top + 10 + 16 * i)], fill=col, width=3)
        draw.text((W - right + 34, top + 4 + 16 * i), label, fill="black")


# ----------------------------------------------------------------------------------------
# Depth curve from training runs

MIXER_COLOURS = {"soft": (214, 39, 40), "last": (31, 119, 180), "mean": (44, 160, 44)}


def run_settings(run):
    """The settings that can differ between runs of one sweep, besides depth, mixer, share, seed."""
    c, a = run["config"], run["args"]
    return {"L": c["num_layers"], "D": c["embed_dim"], "patch": c["patch_size"], "data": a["data"],
            "epochs": a["epochs"], "lr": a["lr"], "batch": a["batch_size"], "drop_path": a["drop_path"],
            "router_init": c.get("router_init", "uniform")}


def read_run(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    runs, epochs = [r for r in rows if r.get("type") == "run"], [r for r in rows if r.get("type") == "epoch"]
    if not runs or not epochs:
        return None
    run, last = runs[-1], epochs[-1]
    c = run["config"]
    return {"run": os.path.basename(os.path.normpath(folder)), "depth": c["depth"],
            "mixer": c["mixer"] if c["depth"] > 1 else "-", "share": c["share"] if c["depth"] > 1 else "-",
            "seed": run["args"]["seed"], "params": run["params"], "gmacs": run["gmacs"], "epochs": last["epoch"],
            "finished": last["epoch"] >= run["args"]["epochs"], "settings": run_settings(run),
            "best_top1": max(e["top1"] for e in epochs), "final_top1": last["top1"], "wall_s": last["elapsed"]}


def label_variants(rows):
    """Name each run's variant by the settings where it differs from most runs ('' = the main sweep)."""
    for key in rows[0]["settings"]:
        values = [str(r["settings"][key]) for r in rows]
        common = max(set(values), key=values.count)
        for r, v in zip(rows, values):
            if v != common:
                r.setdefault("diff", []).append(f"{key}={v}")
    for r in rows:
        r["variant"] = " ".join(r.pop("diff", []))


def curve(args):
    folders = [f for pattern in args.curve for f in sorted(glob.glob(pattern)) if os.path.isdir(f)]
    rows = [r for r in map(read_run, folders) if r]
    if not rows:
        raise UserError(f"no finished runs (metrics.jsonl with an epoch) in {' '.join(args.curve)}")
    label_variants(rows)
    rows.sort(key=lambda r: (r["variant"], r["depth"] > 1, r["mixer"], r["share"], r["depth"], r["seed"]))
    print("| run | R | mixer | share | differs from the main sweep | seed | params | GMACs | epochs | best top-1 | final top-1 | wall time |")
    print("|---" * 12 + "|")
    for r in rows:
        epochs = f"{r['epochs']}" if r["finished"] else f"{r['epochs']} of {r['settings']['epochs']} (unfinished)"
        print(f"| {r['run']} | {r['depth']} | {r['mixer']} | {r['share']} | {r['variant'] or '-'} | {r['seed']} | "
              f"{r['params']:,} | {r['gmacs']:.3g} | {epochs} | {r['best_top1']:.2f} | {r['final_top1']:.2f} | "
              f"{train.fmt_time(r['wall_s'])} |")
    groups = {}
    for r in rows:
        if r["finished"]:
            groups.setdefault((r["variant"], r["depth"], r["mixer"], r["share"]), []).append(r["final_top1"])
    print("\nFinal top-1 of finished runs by configuration (mean over seeds; range where there are several)")
    print("| R | mixer | share | differs from the main sweep | seeds | final top-1 |\n|---|---|---|---|---|---|")
    for (variant, depth, mixer, share), accs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3], kv[0][1])):
        spread = f" ({min(accs):.2f}-{max(accs):.2f})" if len(accs) > 1 else ""
        print(f"| {depth} | {mixer} | {share} | {variant or '-'} | {len(accs)} | {statistics.mean(accs):.2f}{spread} |")
    if args.plot:
        plot_curve(groups, args.plot, paper=args.paper)
        print(f"\nwrote {args.plot}")
    if args.json:
        write_json(args.json, rows)
    return rows


def plot_curve(groups, path=None, paper=False):
    """Left: our runs, one line per mixer from the shared R=1 point (other variants as points,
    in a lighter shade), with the range over seeds as a bar. Right, when asked: the paper's two
    public ImageNet points."""
    from PIL import Image
    point = lambda x, accs: (x, statistics.mean(accs)) + ((min(accs), max(accs)) if len(accs) > 1 else ())
    series = []
    for variant in sorted({v for v, _, _, _ in groups}):
        base = groups.get((variant, 1, "-", "-"))
        for mixer, col in MIXER_COLOURS.items():
            for share in ("block", "stack"):
                pts = [point(d, a) for (v, d, m, s), a in groups.items() if (v, m, s) == (variant, mixer, share)]
                if not pts:
                    continue
                pts += [(1, statistics.mean(base))] if base else []
                shade = col if not variant and share == "block" else tuple((c + 255) // 2 for c in col)
                label = mixer + (" stack" if share == "stack" else "") + (f" ({variant})" if variant else "")
                series.append((label, pts, shade, not variant))
        if base:                                  # R=1 once, with its own range over seeds
            series.append((f"R=1 ({variant})" if variant else "R=1", [point(1, base)],
                           (150, 150, 150) if variant else (0, 0, 0), False))
    depths = sorted({d for _, d, _, _ in groups})
    panels = [Image.new("RGB", (760, 380), "white")]
    draw_lines(panels[0], series, "Our runs: final top-1 (mean over seeds; bars: range)", "recursion depth R", "top-1 %",
               list(range(1, max(depths) + 1)))
    if paper:
        panels.append(Image.new("RGB", (520, 380), "white"))
        # Only R = 1 and R = 4 are public: points, not a line that would invent R = 2, 3.
        draw_lines(panels[1], [("SR-ViT-S", list(PAPER["srvit_s"].items()), MIXER_COLOURS["soft"], False),
                               ("DeiT-B", [(1, PAPER["deit_b"]), (4, PAPER["deit_b"])], (120, 120, 120), True)],
                   "The paper, ImageNet-1K top-1 (abstract)", "recursion depth R", "top-1 %", [1, 2, 3, 4])
    canvas = Image.new("RGB", (sum(p.width for p in panels), 380), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        canvas.save(path)
    return canvas


# ----------------------------------------------------------------------------------------
# Benchmark: speed against an unshared ViT of the same FLOPs, MFU against a measured ceiling

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters):
    for _ in range(2):                         # warm-up: compilation, lazy init, allocator
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_ceiling(device, dtype):
    """FLOP/s of a large square matmul on this device and dtype: what is achievable here,
    printed beside MFU (which is always of the datasheet peak, train.peak_flops)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(timed(lambda: a @ b, device, 10) for _ in range(3))


def bench_model(cfg, batch, device, amp, compile_, iters, backend="inductor"):
    torch.manual_seed(0)
    model = srvit.SRViT(cfg).to(device)
    gmacs = srvit.forward_gmacs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    graphs = []
    if compile_:
        # Each model compiles afresh: with one cache for all, Dynamo reaches its recompile limit
        # after a few models and runs the rest eagerly, against compiled baselines.
        torch._dynamo.reset()

        def counting(gm, example_inputs):          # counts the graphs actually handed to the compiler
            graphs.append(gm)
            return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
        fwd = torch.compile(model, backend=counting)
    else:
        fwd = model
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    autocast = amp_context(device, amp)

    def train_step():
        with autocast:
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), autocast:
            fwd(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t_train = timed(train_step, device, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    model.eval()
    t_infer = timed(infer_step, device, iters)
    return {"params": srvit.count_params(model), "gmacs": gmacs, "train_img_s": batch / t_train,
            "infer_img_s": batch / t_infer, "peak_mem_gib": peak, "compiled_graphs": len(graphs),
            "saved_mib": saved_activation_mib(model, x[:2]) * batch / 2}


def saved_activation_mib(model, x):
    """MiB of activations that one training forward pass keeps for the backward pass, each storage
    counted once (torch.autograd.graph.saved_tensors_hooks sees every tensor autograd saves; the
    weights, which some ops save too, are left out). Exact, and the same on every device for the
    same dtype: the CPU measures what --grad-ckpt saves on a GPU."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}   # kept anyway: not activations
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values()) / 2 ** 20


def bench(args):
    device = torch.device(args.device or train.check_device(None))
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    dtype = train.AMP_DTYPES[amp]
    batch = args.batch_size or (256 if device.type == "cuda" else 32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ceiling, peak = matmul_ceiling(device, dtype), train.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench on {name}, {amp}, batch {batch}, compile={args.compile}, grad-ckpt={args.grad_ckpt}; MFU is of the "
          f"datasheet dense bf16 peak ({f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown for this device'}); "
          f"achievable: a large {amp} matmul runs at {ceiling / 1e12:.3g} TFLOP/s here")
    overrides = model_overrides(args)
    results = []
    for depth in args.depth:
        try:
            cfg = srvit.srvit(args.model, depth=depth, mixer=args.mixer, share=args.share,
                              grad_checkpointing=args.grad_ckpt, **overrides).config
        except ValueError as e:
            raise UserError(str(e)) from None
        # The models measured against each other: the unshared ViT of the same block FLOPs (L x R
        # distinct blocks), and for a soft mixer the same SR-ViT with "last" (no mixer arithmetic),
        # which separates what weight sharing costs from what the routers cost.
        variants = {"srvit": cfg}
        if depth > 1:
            variants["unshared"] = srvit.SRViTConfig(**{**cfg.__dict__, "depth": 1, "num_layers": cfg.num_layers * depth})
            if cfg.mixer == "soft":
                variants["no_mixer"] = srvit.SRViTConfig(**{**cfg.__dict__, "mixer": "last"})
        # Alternate the models over rounds and keep each one's median: a shared, noisy machine
        # then slows them alike, and the ratios stay honest.
        rounds = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, c in variants.items():
                rounds[name].append(bench_model(c, batch, device, amp, args.compile, args.iters, args.compile_backend))
        m = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rounds.items()}
        row = {"depth": depth, **m["srvit"], "compiled_graphs_min": min(r["compiled_graphs"] for rs in rounds.values() for r in rs)}
        row["mfu"] = train.mfu(row["gmacs"], row["train_img_s"], peak) if peak else None
        row["of_achievable"] = train.mfu(row["gmacs"], row["train_img_s"], ceiling)
        if "unshared" in m:
            u = m["unshared"]
            row.update(unshared_params=u["params"], unshared_gmacs=u["gmacs"], unshared_train_img_s=u["train_img_s"],
                       train_ratio=row["train_img_s"] / u["train_img_s"], mixer_gmacs=row["gmacs"] - u["gmacs"])
        if "no_mixer" in m:
            row.update(no_mixer_train_img_s=m["no_mixer"]["train_img_s"],
                       sharing_ratio=m["no_mixer"]["train_img_s"] / m["unshared"]["train_img_s"],
                       mixer_time_share=1 - row["train_img_s"] / m["no_mixer"]["train_img_s"])
        results.append(row)
    print_bench(results)
    if args.json:
        write_json(args.json, {"device": name, "amp": amp, "batch": batch, "compile": args.compile, "grad_ckpt": args.grad_ckpt,
                               "peak_flops": peak, "matmul_ceiling_flops": ceiling, "results": results})
    return results


def print_bench(results):
    print("\n| R | params | GMACs | mixer GMACs | train img/s | infer img/s | peak mem GiB | saved activations MiB (fp32) | MFU "
          "| of achievable | train vs unshared ViT (L x R blocks) | sharing alone (mixer 'last') vs unshared | mixers' share of train time |")
    print("|---" * 13 + "|")
    for r in results:
        mem = "-" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.2f}"
        ratio = (f"{r['train_ratio']:.3f} (unshared: {r['unshared_params']:,} params, {r['unshared_train_img_s']:,.1f} img/s)"
                 if "train_ratio" in r else "-")
        sharing = f"{r['sharing_ratio']:.3f}" if "sharing_ratio" in r else "-"
        mixer_t = f"{r['mixer_time_share']:.1%}" if "mixer_time_share" in r else "-"
        util = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['depth']} | {r['params']:,} | {r['gmacs']:.3g} | {r.get('mixer_gmacs', 0):.3g} | {r['train_img_s']:,.1f} | "
              f"{r['infer_img_s']:,.1f} | {mem} | {r['saved_mib']:.1f} | {util} | {r['of_achievable']:.1%} | {ratio} | "
              f"{sharing} | {mixer_t} |")


def model_overrides(args):
    """The model flags given on the command line, as keywords for srvit.srvit()."""
    return {k: getattr(args, k) for k in ("embed_dim", "num_layers", "num_heads", "img_size", "patch_size", "num_classes")
            if getattr(args, k) is not None}


def activations(args):
    """What --grad-ckpt saves: MiB kept for the backward pass per training image, counted exactly
    (saved_activation_mib) for each depth and mixer, without and with checkpointing. Counted in
    fp32 on the CPU; under bf16 autocast most saved tensors are half that size."""
    overrides = model_overrides(args)
    batch = args.batch_size or 1
    x = torch.randn(batch, 3, *(2 * [overrides.get("img_size", 224)]))
    rows = []
    for depth in args.depth:
        row = {"depth": depth}
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = srvit.srvit(args.model, depth=depth, mixer=args.mixer, share=args.share, grad_checkpointing=ckpt, **overrides)
            row["ckpt" if ckpt else "plain"] = saved_activation_mib(model, x) / batch
        rows.append(row)
    base = rows[0]["plain"]
    print(f"saved activations per training image (MiB, fp32), {args.model} {overrides or ''} mixer={args.mixer}")
    print("| R | without --grad-ckpt | with --grad-ckpt | saved by checkpointing | with --grad-ckpt vs R=1 without |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['plain']:.1f} | {r['ckpt']:.1f} | {1 - r['ckpt'] / r['plain']:.0%} | {r['ckpt'] / base:.2f}x |")
    if args.json:
        write_json(args.json, rows)
    return rows


def bench_loader(args):
    """Whole training steps (fetch and augment a batch, forward, backward, AdamW) fed by the
    in-memory loader and by the PIL loader, alternated over rounds; medians. With --workers 0
    everything runs in this one process, so the ratio is the saving in CPU time per image; with
    workers the PIL path moves its decoding to other cores (on a GPU machine, the usual bound)."""
    from types import SimpleNamespace
    device = torch.device(args.device or train.check_device(None))
    flags = ["--data", args.data or "cifar10", "--subset", str(args.bench_images), "--val-subset", "10",
             "--workers", str(args.workers), "--batch-size", str(args.batch_size or 128), "--mixer", args.mixer]
    flags += [a for k in ("data_path", "embed_dim", "num_layers", "num_heads", "patch_size")
              if getattr(args, k) is not None for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    print(f"bench-loader on {device}, {torch.get_num_threads()} threads, --workers {args.workers}: "
          f"{args.iters} steps per measurement, {args.rounds} rounds, medians")
    results = []
    for depth in args.depth:
        setups = {}
        for loader in ("memory", "pil"):
            targs = train.get_args(flags + ["--loader", loader, "--depth", str(depth)])
            env = SimpleNamespace(rank=0, world=1, micro=targs.batch_size, device=device, log=lambda *a, **k: None)
            batches, _, classes, _ = train.build_loaders(targs, env)
            model = train.build_model(targs, len(classes)).to(device)
            opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3)
            setups[loader] = (batches, model, opt, targs)
        times = {loader: [] for loader in setups}
        for r in range(args.rounds):
            for loader, (batches, model, opt, targs) in setups.items():
                batches.set_epoch(r)
                it = iter(batches)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    x, y = next(it)
                    loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
                times[loader].append((time.perf_counter() - t0) / (args.iters * targs.batch_size))
                del it
        ms = {loader: 1e3 * statistics.median(t) for loader, t in times.items()}
        results.append({"depth": depth, "memory_ms_per_image": ms["memory"], "pil_ms_per_image": ms["pil"],
                        "speedup": ms["pil"] / ms["memory"]})
    print("\n| R | ms per image, in-memory loader | ms per image, PIL loader | speed-up of whole training steps |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['depth']} | {r['memory_ms_per_image']:.3f} | {r['pil_ms_per_image']:.3f} | {r['speedup']:.2f}x |")
    if args.json:
        write_json(args.json, {"device": str(device), "threads": torch.get_num_threads(), "workers": args.workers,
                               "results": results})
    return results


# ----------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", help="train.py checkpoint to evaluate")
    a("--bench", action="store_true", help="benchmark speed, memory and MFU")
    a("--bench-loader", action="store_true", help="training steps fed by the in-memory vs the PIL loader")
    a("--activations", action="store_true", help="MiB saved for backward per image, without and with --grad-ckpt")
    a("--bench-images", type=int, default=5120, help="--bench-loader: training images to load")
    a("--curve", nargs="+", help="run folders (with metrics.jsonl) for the depth-curve table")
    a("--data", default=None, choices=["imagenet", "cifar10", "cifar100", "folder", "fake"])
    a("--data-path", default=None)
    a("--val-subset", type=int, default=None)
    a("--steps", default=None, help="'all': the anytime table for k = 1..R; a number k: evaluate the first k steps only")
    a("--maps", default=None, help="PNG file for the SoftMoR weight maps")
    a("--maps-images", type=int, default=4)
    a("--maps-mixer", type=int, default=-1, help="which mixer to draw (block sharing has one per block)")
    a("--maps-relative", action="store_true", help="colours from the smallest to the largest weight shown, not 0..1")
    a("--plot", default=None, help="PNG file for the depth curve")
    a("--paper", action="store_true", help="add the paper's ImageNet points as a second panel")
    a("--json", default=None, help="also write the numbers to this JSON file")
    a("--model", default="small", choices=list(srvit.PRESETS))
    a("--depth", type=int, nargs="+", default=[1, 2, 3, 4])
    a("--mixer", default="soft", choices=srvit.MIXERS)
    a("--share", default="block", choices=srvit.SHARES)
    for flag in ("--embed-dim", "--num-layers", "--num-heads", "--img-size", "--patch-size", "--num-classes"):
        a(flag, type=int, default=None)
    a("--batch-size", type=int, default=None)
    a("--amp", default=None, choices=["bf16", "fp16", "none"])
    a("--compile", action="store_true")
    a("--compile-backend", default="inductor", help="torch.compile backend for --bench (tests use 'eager')")
    a("--grad-ckpt", action="store_true")
    a("--iters", type=int, default=10, help="timed iterations per measurement")
    a("--rounds", type=int, default=3, help="alternating measurement rounds (median kept)")
    a("--device", default=None)
    a("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if sum(map(bool, (args.checkpoint, args.bench, args.bench_loader, args.activations, args.curve))) != 1:
        raise UserError("give exactly one of --checkpoint, --bench, --bench-loader, --activations, --curve "
                        "(python eval.py -h lists the options)")
    train.check_device(args.device)
    if min(args.depth) < 1:
        raise UserError(f"--depth takes recursion depths >= 1, got {args.depth}")
    for name in ("maps_images", "batch_size", "iters", "rounds", "val_subset", "bench_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.curve:
        return curve(args)
    if args.bench:
        return bench(args)
    if args.bench_loader:
        return bench_loader(args)
    if args.activations:
        return activations(args)
    return evaluate_checkpoint(args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {train.user_error_message(e)}", file=sys.stderr)
        sys.exit(2)
