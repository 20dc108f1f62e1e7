"""
Benchmarks of SR-ViT, beside their outputs: speed, memory and MFU against an unshared ViT of the
same FLOPs (--bench), what --grad-ckpt saves (--activations), the in-memory against the PIL
loader (--bench-loader), the loader workers' CPU time per image (--loader-cpu), and the device
path's ops and host-to-device copies per batch (--count-ops). Run from anywhere; it imports srvit,
train, loaders and runtime from the repository.

    python results/bench.py --bench --model small --depth 1 2 3 4 --amp bf16 --compile --batch-size 256
    python results/bench.py --activations --model small --depth 1 2 3 4 --json results/activations-small.json
    python results/bench.py --bench-loader --data-path ~/data/cifar10 --depth 1 4 --workers 0 --iters 20
    python results/bench.py --loader-cpu --bench-images 256 --json results/loader-cpu.json
    python results/bench.py --count-ops --json results/device-path-ops.json

The CPU tables here (bench-cpu*.md, bench-loader-cpu.md, activations-small.md) and the commands
that made them are in results/README.md, loader-cpu.md and compile-cpu.md carry their own;
--json FILE writes the numbers beside the table.
"""

import argparse
import inspect
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import loaders  # noqa: E402
import runtime  # noqa: E402
import srvit  # noqa: E402
import train  # noqa: E402
from runtime import UserError, check_at_least, check_rules, write_json  # noqa: E402


# ----------------------------------------------------------------------------------------
# Timing

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
    printed beside MFU (which is always of the datasheet peak, runtime.peak_flops)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(timed(lambda: a @ b, device, 10) for _ in range(3))


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


# ----------------------------------------------------------------------------------------
# --bench: speed against an unshared ViT of the same FLOPs, MFU against a measured ceiling

def compiled(model, backend, graphs):
    """train.py's --compile (each block's attention and MLP, train.compile_blocks) with a fresh Dynamo
    cache; each graph handed to the compiler lands in `graphs`. Each model compiles afresh: with one
    cache for all, Dynamo reaches its recompile limit after a few models and runs the rest eagerly."""
    torch._dynamo.reset()

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    train.compile_blocks(model, backend=counting)
    return model


def bench_model(cfg, batch, device, amp, compile_, iters, backend="inductor"):
    torch.manual_seed(0)
    model = srvit.SRViT(cfg).to(device)
    gmacs = srvit.forward_gmacs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    graphs = []
    fwd = compiled(model, backend, graphs) if compile_ else model
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    autocast = runtime.amp_context(device, amp)

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
    t0 = time.perf_counter()
    train_step()                               # the first step: compilation (with --compile) and lazy init
    sync(device)
    first_step_s = time.perf_counter() - t0
    t_train = timed(train_step, device, iters)
    on_gpu = device.type == "cuda"
    peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_gpu else float("nan")
    model.eval()
    t_infer = timed(infer_step, device, iters)
    return {"params": srvit.count_params(model), "gmacs": gmacs, "train_img_s": batch / t_train,
            "infer_img_s": batch / t_infer, "peak_mem_gib": peak_mem_gib, "compiled_graphs": len(graphs),
            "first_step_s": first_step_s, "step_s": t_train,
            "saved_mib": saved_activation_mib(model, x[:2]) * batch / 2}


def bench_variants(cfg, depth):
    """The models measured against each other: the unshared ViT of the same block FLOPs (L x R
    distinct blocks), and for a soft mixer the same SR-ViT with "last" (no mixer arithmetic),
    which separates what weight sharing costs from what the routers cost."""
    variants = {"srvit": cfg}
    if depth > 1:
        variants["unshared"] = srvit.SRViTConfig(**{**cfg.__dict__, "depth": 1,
                                                    "num_layers": cfg.num_layers * depth})
        if cfg.mixer == "soft":
            variants["no_mixer"] = srvit.SRViTConfig(**{**cfg.__dict__, "mixer": "last"})
    return variants


def bench_row(args, depth, batch, device, amp, peak, ceiling):
    try:
        cfg = srvit.srvit(args.model, depth=depth, mixer=args.mixer, share=args.share,
                          grad_checkpointing=args.grad_ckpt, **model_overrides(args)).config
    except ValueError as e:
        raise UserError(str(e)) from None
    variants = bench_variants(cfg, depth)
    # Alternate the models over rounds and keep each one's median: a shared, noisy machine
    # then slows them alike, and the ratios stay honest.
    rounds = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, config in variants.items():
            rounds[variant].append(bench_model(config, batch, device, amp, args.compile, args.iters,
                                               args.compile_backend))
    # medians[variant][measure]: the median over rounds
    medians = {variant: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
               for variant, runs in rounds.items()}
    row = {"depth": depth, **medians["srvit"],
           "compiled_graphs_min": min(run["compiled_graphs"] for runs in rounds.values() for run in runs)}
    row["mfu"] = runtime.mfu(row["gmacs"], row["train_img_s"], peak) if peak else None
    row["of_achievable"] = runtime.mfu(row["gmacs"], row["train_img_s"], ceiling)
    if "unshared" in medians:
        unshared = medians["unshared"]
        row.update(unshared_params=unshared["params"], unshared_gmacs=unshared["gmacs"],
                   unshared_train_img_s=unshared["train_img_s"],
                   train_ratio=row["train_img_s"] / unshared["train_img_s"],
                   mixer_gmacs=row["gmacs"] - unshared["gmacs"])
    if "no_mixer" in medians:
        no_mixer = medians["no_mixer"]
        row.update(no_mixer_train_img_s=no_mixer["train_img_s"],
                   sharing_ratio=no_mixer["train_img_s"] / medians["unshared"]["train_img_s"],
                   mixer_time_share=1 - row["train_img_s"] / no_mixer["train_img_s"])
    return row


def bench(args):
    device = torch.device(args.device or runtime.check_device(None))
    amp = args.amp or runtime.default_amp(device)          # as train.py: fp16 on GPUs without bf16
    batch = args.batch_size or (256 if device.type == "cuda" else 32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ceiling, peak = matmul_ceiling(device, runtime.AMP_DTYPES[amp]), runtime.peak_flops(device)
    cpu = f"CPU, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(f"bench on {name}, {amp}, batch {batch}, compile={args.compile}, grad-ckpt={args.grad_ckpt}; MFU "
          f"is of the datasheet dense bf16 peak "
          f"({f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown for this device'}); achievable: a large "
          f"{amp} matmul runs at {ceiling / 1e12:.3g} TFLOP/s here")
    results = [bench_row(args, depth, batch, device, amp, peak, ceiling) for depth in args.depth]
    print_bench(results)
    if args.json:
        write_json(args.json, {"device": name, "amp": amp, "batch": batch, "compile": args.compile,
                               "grad_ckpt": args.grad_ckpt, "peak_flops": peak,
                               "matmul_ceiling_flops": ceiling, "results": results})
    return results


def print_bench(results):
    print("\n| R | params | GMACs | mixer GMACs | train img/s | infer img/s | peak mem GiB | saved "
          "activations MiB (fp32) | MFU | of achievable | train vs unshared ViT (L x R blocks) | sharing "
          "alone (mixer 'last') vs unshared | mixers' share of train time | first step s (compiles with "
          "--compile) | compiled graphs |")
    print("|---" * 15 + "|")
    for r in results:
        mem = "-" if math.isnan(r["peak_mem_gib"]) else f"{r['peak_mem_gib']:.2f}"
        ratio = (f"{r['train_ratio']:.3f} (unshared: {r['unshared_params']:,} params, "
                 f"{r['unshared_train_img_s']:,.1f} img/s)"
                 if "train_ratio" in r else "-")
        sharing = f"{r['sharing_ratio']:.3f}" if "sharing_ratio" in r else "-"
        mixer_t = f"{r['mixer_time_share']:.1%}" if "mixer_time_share" in r else "-"
        util = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['depth']} | {r['params']:,} | {r['gmacs']:.3g} | {r.get('mixer_gmacs', 0):.3g} | "
              f"{r['train_img_s']:,.1f} | {r['infer_img_s']:,.1f} | {mem} | {r['saved_mib']:.1f} | {util} | "
              f"{r['of_achievable']:.1%} | {ratio} | {sharing} | {mixer_t} | {r['first_step_s']:.1f} | "
              f"{r['compiled_graphs_min']} |")


def model_overrides(args):
    """The model flags given on the command line, as keywords for srvit.srvit()."""
    return {k: getattr(args, k) for k in ("embed_dim", "num_layers", "num_heads", "img_size", "patch_size",
                                          "num_classes")
            if getattr(args, k) is not None}


# ----------------------------------------------------------------------------------------
# --activations: what --grad-ckpt saves

def activations(args):
    """MiB kept for the backward pass per training image, counted exactly (saved_activation_mib) for
    each depth and mixer, without and with checkpointing. Counted in fp32 on the CPU; under bf16
    autocast most saved tensors are half that size."""
    overrides = model_overrides(args)
    batch = args.batch_size or 1
    x = torch.randn(batch, 3, *(2 * [overrides.get("img_size", 224)]))
    rows = []
    for depth in args.depth:
        row = {"depth": depth}
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = srvit.srvit(args.model, depth=depth, mixer=args.mixer, share=args.share,
                                grad_checkpointing=ckpt, **overrides)
            row["ckpt" if ckpt else "plain"] = saved_activation_mib(model, x) / batch
        rows.append(row)
    base = rows[0]["plain"]
    print(f"saved activations per training image (MiB, fp32), {args.model} {overrides or ''} "
          f"mixer={args.mixer}")
    print("| R | without --grad-ckpt | with --grad-ckpt | saved by checkpointing | with --grad-ckpt vs R=1 "
          "without |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['plain']:.1f} | {r['ckpt']:.1f} | {1 - r['ckpt'] / r['plain']:.0%} | "
              f"{r['ckpt'] / base:.2f}x |")
    if args.json:
        write_json(args.json, rows)
    return rows


# ----------------------------------------------------------------------------------------
# --bench-loader: the in-memory against the PIL loader

def loader_setups(args, depth, device):
    """For each loader: train.py's batches, model and optimizer of the same run, as train.py builds them."""
    flags = ["--data", args.data or "cifar10", "--subset", str(args.bench_images), "--val-subset", "10",
             "--workers", str(args.workers), "--batch-size", str(args.batch_size or 128), "--mixer",
             args.mixer, "--share", args.share]
    flags += [a for k in ("model", "data_path", "embed_dim", "num_layers", "num_heads", "patch_size",
                          "img_size")
              if getattr(args, k) is not None for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    setups = {}
    for loader in ("memory", "pil"):
        targs = train.get_args(flags + ["--loader", loader, "--depth", str(depth)])
        env = SimpleNamespace(rank=0, world=1, micro=targs.batch_size, device=device, log=lambda *a,
                              **k: None)
        batches, _, classes, _ = loaders.build_loaders(targs, env)
        model = train.build_model(targs, len(classes)).to(device)
        setups[loader] = (batches, model, torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3),
                          targs.batch_size)
    return setups


def bench_loader(args):
    """Whole training steps (fetch and augment a batch, forward, backward, AdamW) fed by the
    in-memory loader and by the PIL loader, alternated over rounds; medians. With --workers 0
    everything runs in this one process, so the ratio is the saving in CPU time per image; with
    workers the PIL path moves its decoding to other cores (on a GPU machine, the usual bound)."""
    device = torch.device(args.device or runtime.check_device(None))
    print(f"bench-loader on {device}, {torch.get_num_threads()} threads, --workers {args.workers}: "
          f"{args.iters} steps per measurement, {args.rounds} rounds, medians")
    results = []
    for depth in args.depth:
        setups = loader_setups(args, depth, device)
        times = {loader: [] for loader in setups}
        for r in range(args.rounds):
            for loader, (batches, model, opt, batch) in setups.items():
                batches.set_epoch(r)
                it = iter(batches)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    x, y = next(it)
                    F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
                times[loader].append((time.perf_counter() - t0) / (args.iters * batch))
                del it
        ms = {loader: 1e3 * statistics.median(t) for loader, t in times.items()}
        results.append({"depth": depth, "memory_ms_per_image": ms["memory"], "pil_ms_per_image": ms["pil"],
                        "speedup": ms["pil"] / ms["memory"]})
    print("\n| R | ms per image, in-memory loader | ms per image, PIL loader | speed-up of whole training "
          "steps |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['depth']} | {r['memory_ms_per_image']:.3f} | {r['pil_ms_per_image']:.3f} | "
              f"{r['speedup']:.2f}x |")
    if args.json:
        write_json(args.json, {"device": str(device), "threads": torch.get_num_threads(),
                               "workers": args.workers, "results": results})
    return results


# ----------------------------------------------------------------------------------------
# --loader-cpu: CPU time per image in the loader workers, DeiT's recipe, the PIL path and --loader device

def imagenet_like_folder(root, n, g):
    """n JPEGs of 500 x 375 (ImageNet's most common size) at about 100 KB each: smooth colours plus
    grain, so that decoding and resampling cost what a photograph costs. Two classes, a val split."""
    from PIL import Image
    for split, count in (("train", n), ("val", 2)):
        for c in range(2):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(count // 2):
                colours = torch.rand(1, 3, 12, 16, generator=g) * 255
                smooth = F.interpolate(colours, (375, 500), mode="bicubic")
                pixels = (smooth[0] + 24 * torch.randn(3, 375, 500, generator=g)).clamp(0, 255).byte()
                path = os.path.join(root, split, f"c{c}", f"{i}.jpg")
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, quality=90)
    return root


LOADER_CPU_BATCH = 64          # --loader-cpu's batch without --batch-size


def loader_cpu(args):
    """time_loader_workers with one thread, as a loader worker has (DataLoader sets it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return time_loader_workers(args)
    finally:
        torch.set_num_threads(threads)


def time_loader_workers(args):
    """What one loader worker does per training image, in CPU seconds of this process (time.process_time),
    for DeiT's recipe at 224 px: the PIL path (read, decode, crop, flip, RandAugment, draw the erasing
    box, collate; normalising and erasing happen on the device) and --loader device's worker side
    (read the file, draw the augmentation, collate). The device side of --loader device (decode and
    augment a batch) is timed too: on a CPU it runs in the training process; on a GPU it runs there.
    Rounds alternate the paths; medians."""
    import tempfile
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_path or imagenet_like_folder(tmp, args.bench_images, g)
        env = SimpleNamespace(rank=0, world=1, micro=args.batch_size or LOADER_CPU_BATCH,
                              device=torch.device("cpu"), log=lambda *a: None)
        by_path = {}
        for loader in ("pil", "device"):
            targs = train.get_args(["--data-path", root, "--recipe", "deit", "--loader", loader, "--workers",
                                    "0", "--batch-size", str(env.micro)])
            by_path[loader] = loaders.build_loaders(targs, env)[0]
        collate = {"pil": loaders.collate_erased, "device": by_path["device"].augment.collate}
        datasets = {"pil": by_path["pil"].dataset, "device": by_path["device"].loader.dataset}
        keys = list(by_path["pil"].sampler)[:args.bench_images // env.micro * env.micro]
        train_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
        kb = statistics.mean(os.path.getsize(f) / 1e3 for f in train_files)
        print(f"loader-cpu: {len(keys)} training images of "
              f"{root if args.data_path else 'synthetic 500 x 375 JPEGs'} ({kb:.0f} KB on average), batches "
              f"of {env.micro}, {args.rounds} rounds, medians, one thread")
        times = {"pil": [], "device": [], "device_side": []}
        for _ in range(args.rounds):
            for name, data in datasets.items():
                t0 = time.process_time()
                batches = [collate[name]([data[k] for k in keys[b:b + env.micro]])
                           for b in range(0, len(keys), env.micro)]
                times[name].append((time.process_time() - t0) / len(keys))
            t0 = time.process_time()
            for batch in batches:                           # the device path's batches of this round
                by_path["device"].on_device(batch)
            times["device_side"].append((time.process_time() - t0) / len(keys))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    result = {"pil_worker_ms_per_image": ms["pil"], "device_worker_ms_per_image": ms["device"],
              "device_side_cpu_ms_per_image": ms["device_side"],
              "worker_time_ratio": ms["device"] / ms["pil"], "images": len(keys), "mean_kb": kb}
    print("\n| CPU ms per training image | PIL path (--loader pil) | --loader device |")
    print("|---|---|---|")
    print(f"| in a loader worker | {ms['pil']:.2f} | {ms['device']:.2f} ({ms['device'] / ms['pil']:.0%} of "
          f"the PIL path's) |")
    print(f"| in the training process (on a GPU machine: on the GPU) | normalise + erase (not timed) | "
          f"{ms['device_side']:.2f} (decode + augment) |")
    if args.json:
        write_json(args.json, {"device": "cpu", "threads": torch.get_num_threads(), **result})
    return result


# ----------------------------------------------------------------------------------------
# --count-ops: what the device path asks of the host per batch (DeiT's recipe, --loader device)

def count_ops(fn):
    """Run fn under a dispatch mode: (kernel-like ops, tensors made from Python data). Views are not
    counted (no kernel); a tensor from Python data (torch.tensor of a list) is a host-to-device copy on a
    GPU, blocking unless pinned."""
    from torch.utils._python_dispatch import TorchDispatchMode
    fresh = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    class Counter(TorchDispatchMode):
        ops = from_python = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in fresh:
                Counter.from_python += 1
            elif not func.is_view:
                Counter.ops += 1
            return func(*args, **(kwargs or {}))
    with Counter():
        fn()
    return Counter.ops, Counter.from_python


def device_path_counts(args):
    """Ops and tensors from Python data of one batch's decode + augmentation on the device (the loader
    workers' part is not counted: it runs on other cores), at --batch-size, twice and four times it;
    the differences give the cost of each extra sample. --code DIR measures that folder's loaders.py."""
    import copy
    import importlib
    import tempfile
    if args.code:
        sys.path.insert(0, os.path.abspath(args.code))
        for name in ("runtime", "plumbing", "srvit", "loaders", "train"):   # (older commits: plumbing)
            sys.modules.pop(name, None)
    mod_loaders, mod_train = importlib.import_module("loaders"), importlib.import_module("train")
    batch, rows = args.batch_size or 128, []
    with tempfile.TemporaryDirectory() as tmp:
        root = imagenet_like_folder(tmp, 4 * batch, torch.Generator().manual_seed(0))
        env = SimpleNamespace(rank=0, world=1, micro=batch, device=torch.device("cpu"), log=lambda *a: None)
        for n in (batch, 2 * batch, 4 * batch):
            targs = mod_train.get_args(["--data-path", root, "--recipe", "deit", "--loader", "device",
                                        "--workers", "0", "--batch-size", str(n)])
            env.micro = n
            loader = mod_loaders.build_loaders(targs, env)[0]
            items = [loader.loader.dataset[key] for key in list(loader.sampler)[:n]]
            collate = getattr(loader.augment, "collate", None) or mod_loaders.collate_files   # (older code)
            packed = collate(items)
            loader.on_device(copy.deepcopy(packed))                            # warm-up: lazy set-up
            packed = copy.deepcopy(packed)                                     # (older code edits its batch)
            files = torch.split(packed[0], packed[1])
            # (paths, and which files nvJPEG takes where this code's decode asks for them)
            asks = inspect.signature(loader.augment.decode).parameters
            arguments = packed[-2:] if "takes" in asks else packed[-1:]
            decode = count_ops(lambda: loader.augment.decode(files, *arguments))[0]
            ops, from_python = count_ops(lambda: loader.on_device(packed))
            ops -= decode            # one op per file on a CPU, one per batch on a GPU: counted apart
            x = torch.randn(n, 3, 8, 8)
            y = torch.randint(0, 10, (n,))
            mixup_cutmix = getattr(mod_loaders, "mixup_cutmix", None) or mod_loaders.mix_batch  # (older name)
            mix_ops, mix_python = count_ops(lambda: mixup_cutmix(x, y, targs, 10))
            rows.append({"batch": n, "ops": ops, "decode_ops": decode, "from_python": from_python,
                         "mix_ops": mix_ops, "mix_from_python": mix_python})
    slope = lambda a, b: (b["ops"] - a["ops"]) / (b["batch"] - a["batch"])
    per_sample, saturated = slope(rows[0], rows[1]), slope(rows[1], rows[2])
    print(f"count-ops: the device path's decode + augmentation of one batch of {batch} generated 500 x 375 "
          f"JPEGs (DeiT's recipe) on the CPU, under a dispatch mode, decoding apart; code: "
          f"{args.code or 'this tree'}\n")
    print("| batch | augmentation ops | decoding ops (CPU) | tensors from Python data | MixUp/CutMix ops | "
          "tensors from Python data |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ops']} | {r['decode_ops']} | {r['from_python']} | {r['mix_ops']} | "
              f"{r['mix_from_python']} |")
    print(f"\nops per extra sample: {per_sample:.2f} from {batch} to {2 * batch}, {saturated:.2f} from "
          f"{2 * batch} to {4 * batch} (where every op group is drawn in both)")
    result = {"rows": rows, "ops_per_extra_sample": per_sample, "ops_per_extra_sample_saturated": saturated,
              "code": args.code or "tree"}
    if args.json:
        write_json(args.json, result)
    return result


# ----------------------------------------------------------------------------------------

def get_args(argv=None):
    p = runtime.ArgumentParser(prog=os.path.relpath(__file__, ROOT), description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = p.add_argument
    flag("--bench", action="store_true", help="benchmark speed, memory and MFU")
    flag("--activations", action="store_true",
         help="MiB saved for backward per image, without and with --grad-ckpt")
    flag("--bench-loader", action="store_true", help="training steps fed by the in-memory vs the PIL loader")
    flag("--loader-cpu", action="store_true",
         help="CPU time per image in the loader workers: PIL path vs --loader device")
    flag("--count-ops", action="store_true",
         help="ops and tensors from Python data per batch of the device path")
    flag("--code", default=None, help="--count-ops: a folder with another version of loaders.py and train.py")
    flag("--bench-images", type=int, default=5120, help="--bench-loader, --loader-cpu: images to load")
    flag("--data", default=None, choices=["imagenet", "cifar10", "cifar100", "folder", "fake"],
         help="--bench-loader's data")
    flag("--data-path", default=None)
    flag("--json", default=None, help="also write the numbers to this JSON file")
    flag("--model", default=None, choices=list(srvit.PRESETS),
         help="a DeiT preset (--bench, --activations: default small; --bench-loader: train.py's default "
              "for the data; --loader-cpu times loaders only)")
    flag("--depth", type=int, nargs="+", default=[1, 2, 3, 4])
    flag("--mixer", default="soft", choices=srvit.MIXERS)
    flag("--share", default="block", choices=srvit.SHARES)
    for name in ("--embed-dim", "--num-layers", "--num-heads", "--img-size", "--patch-size", "--num-classes"):
        flag(name, type=int, default=None)
    flag("--batch-size", type=int, default=None)
    flag("--amp", default=None, choices=["bf16", "fp16", "none"])
    flag("--compile", action="store_true")
    flag("--compile-backend", default="inductor", help="torch.compile backend (tests use 'eager')")
    flag("--grad-ckpt", action="store_true")
    flag("--iters", type=int, default=10, help="timed iterations per measurement")
    flag("--rounds", type=int, default=3, help="alternating measurement rounds (median kept)")
    flag("--device", default=None)
    flag("--workers", type=int, default=2)
    args = p.parse_args(argv)
    runtime.check_output("--json", args.json)          # before the work, not after it
    if sum((args.bench, args.bench_loader, args.activations, args.loader_cpu, args.count_ops)) != 1:
        raise UserError("give exactly one of --bench, --bench-loader, --activations, --loader-cpu, "
                        "--count-ops (python results/bench.py --help lists the options)")
    runtime.check_device(args.device)
    if min(args.depth) < 1:
        raise UserError(f"--depth takes recursion depths >= 1, got {args.depth}")
    check_at_least(args, batch_size=1, iters=1, rounds=1, bench_images=1, embed_dim=1, num_layers=1,
                   num_heads=1, img_size=1, patch_size=1, num_classes=1)
    check_rules(args, workers=train.WORKERS)                           # (said as train.py says it)
    batch = args.batch_size or LOADER_CPU_BATCH
    if args.loader_cpu and args.bench_images < batch:
        raise UserError(f"--bench-images {args.bench_images} is less than one batch (--batch-size {batch}): "
                        f"give at least {batch}, or a smaller --batch-size")
    if args.model is None and not args.bench_loader:
        args.model = "small"
    return args


def main(argv=None):
    args = get_args(argv)
    if args.loader_cpu:
        return loader_cpu(args)
    if args.count_ops:
        return device_path_counts(args)
    return bench(args) if args.bench else bench_loader(args) if args.bench_loader else activations(args)


if __name__ == "__main__":
    sys.exit(runtime.cli(main, interrupted="interrupted", out_of_memory="lower --batch-size"))  # bad input: 2
