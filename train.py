"""
Train SR-ViT: one process (CPU or one GPU), or DDP under torchrun. Only rank 0 logs and saves.

    python train.py                                          # classroom run: CIFAR-10, 32 px, R=2
    python train.py --data cifar10 --data-path ../shared/data/cifar10 --depth 4
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet --depth 4
    python train.py --data imagenet --data-path /data/imagenet --depth 4 \\
        --micro-batch 64 --grad-ckpt --amp bf16               # one 24 GB GPU, same global batch

The defaults are DeiT's ImageNet recipe at 224 px, and a short recipe for 32 px datasets (see
RECIPES and README.md). Re-running the same command resumes from <out-dir>/last.pt.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import srvit

# Defaults that depend on the image size: DeiT's recipe for ImageNet-sized images, a short
# one for 32 px datasets (random crop with 4 px padding + flip, no MixUp/CutMix/RandAugment,
# so a small model learns in a few epochs). An explicit flag always wins.
RECIPES = {
    "deit": dict(model="small", patch_size=16, epochs=300, batch_size=1024, warmup_epochs=5, min_lr=1e-5,
                 weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, randaug=9,
                 erasing=0.25, repeated_aug=3),
    "small-images": dict(model="tiny", embed_dim=192, num_layers=6, num_heads=3, patch_size=4, epochs=30,
                         batch_size=128, lr=1e-3, warmup_epochs=1, min_lr=1e-5, weight_decay=0.05,
                         drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, randaug=0, erasing=0.0,
                         repeated_aug=1),
}
MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


def amp_context(device, amp):
    """Autocast to the --amp dtype, or nothing for full precision."""
    return nullcontext() if amp in (None, "none") else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def mfu(gmacs, images_per_s, peak_flops):
    """Model FLOPs utilisation: training costs ~3 forward passes (forward + backward), 2 FLOPs per MAC."""
    return 3 * 2 * gmacs * 1e9 * images_per_s / peak_flops


class UserError(Exception):
    """Bad input: printed as one line with what to do, exit code 2, no traceback."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="cifar10", choices=["imagenet", "cifar10", "cifar100", "folder", "fake"])
    a("--data-path", default=None, help="ImageFolder root with train/ and val/ (or test/); default ./data")
    a("--subset", type=int, default=None, help="use only this many training images (quick runs)")
    a("--val-subset", type=int, default=None, help="use only this many validation images")
    a("--num-classes", type=int, default=None, help="for --data fake (default 1000)")
    a("--model", default=None, choices=list(srvit.PRESETS))
    a("--embed-dim", type=int, default=None)
    a("--num-layers", type=int, default=None)
    a("--num-heads", type=int, default=None)
    a("--img-size", type=int, default=None, help="default 32 for CIFAR, 224 otherwise")
    a("--patch-size", type=int, default=None)
    a("--depth", type=int, default=2, help="recursion steps R")
    a("--mixer", default="soft", choices=srvit.MIXERS)
    a("--share", default="block", choices=srvit.SHARES)
    a("--router-init", default="uniform", choices=["uniform", "last"], help="fresh soft mixer: uniform, or 0.9 on the last step")
    a("--epochs", type=int, default=None)
    a("--batch-size", type=int, default=None, help="global batch, over all ranks and accumulation steps")
    a("--micro-batch", type=int, default=None, help="per-device batch; accumulate gradients up to --batch-size")
    a("--lr", type=float, default=None, help="peak lr; default 5e-4 x batch-size / 512")
    a("--min-lr", type=float, default=None)
    a("--warmup-epochs", type=float, default=None)
    a("--weight-decay", type=float, default=None)
    a("--drop-path", type=float, default=None)
    a("--mixup", type=float, default=None, help="MixUp alpha (0: off)")
    a("--cutmix", type=float, default=None, help="CutMix alpha (0: off)")
    a("--smoothing", type=float, default=None)
    a("--clip-grad", type=float, default=None, help="clip the gradient norm (DeiT: off)")
    a("--randaug", type=int, default=None, help="RandAugment magnitude, 2 ops (0: off)")
    a("--erasing", type=float, default=None, help="random erasing probability")
    a("--repeated-aug", type=int, default=None, help="DeiT's repeated augmentation: copies of each image")
    a("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on GPUs that have it, else fp16; none on CPU")
    a("--compile", action="store_true")
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every block application")
    a("--init-from", default=None, help="DeiT/timm/SR-ViT checkpoint to warm-start the blocks from")
    a("--out-dir", default=None, help="default runs/<data>-<model>-R<depth>-<mixer>-<share>-s<seed>")
    a("--resume", default="auto", help="checkpoint to resume from; 'auto': <out-dir>/last.pt if it exists; 'no'")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=None, help="data-loading processes per rank")
    a("--log-interval", type=int, default=None, help="steps between progress lines (default: 10 per epoch)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)

    if args.img_size is None:
        args.img_size = 32 if args.data.startswith("cifar") else 224
    recipe = RECIPES["small-images" if args.img_size <= 64 else "deit"]
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 5e-4 * args.batch_size / 512
    if args.depth < 1:
        raise UserError(f"--depth must be >= 1 (the number of recursion steps), got {args.depth}")
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{args.data}-{args.model}-R{args.depth}-{args.mixer}-{args.share}-s{args.seed}")
    return args


# ----------------------------------------------------------------------------------------
# Data

def read_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file") from None


def transforms(args, train):
    from torchvision.transforms import v2
    mean, std = MEAN_STD["cifar" if args.img_size <= 64 else "imagenet"]
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if args.img_size <= 64:   # small images: pad-and-crop, flip
        aug = [v2.Resize(args.img_size), v2.RandomCrop(args.img_size, padding=args.img_size // 8), v2.RandomHorizontalFlip()]
        return v2.Compose((aug if train else [v2.Resize(args.img_size), v2.CenterCrop(args.img_size)]) + to_tensor)
    bicubic = v2.InterpolationMode.BICUBIC
    if not train:             # resize to 256/224 of the crop, centre crop
        return v2.Compose([v2.Resize(int(args.img_size / 0.875), interpolation=bicubic), v2.CenterCrop(args.img_size)] + to_tensor)
    aug = [v2.RandomResizedCrop(args.img_size, interpolation=bicubic), v2.RandomHorizontalFlip()]
    if args.randaug:
        aug.append(v2.RandAugment(num_ops=2, magnitude=args.randaug, interpolation=bicubic))
    post = [v2.RandomErasing(p=args.erasing, value=0)] if args.erasing else []
    return v2.Compose(aug + to_tensor + post)


def image_folder(root, transform):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(root, transform=transform, loader=read_image)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"no images in {root}: {e}. Expected {root}/<class>/<image>.jpg") from None


def build_dataset(args, split):
    """The 'train' or 'val' split named by --data / --data-path, and its number of classes."""
    import torchvision.datasets as tvd
    root, train = args.data_path or "./data", split == "train"
    tf = transforms(args, train)
    if args.data == "fake":
        n_cls = args.num_classes or 1000
        size = (args.subset or 10_000) if train else (args.val_subset or 1_000)
        return tvd.FakeData(size, (3, args.img_size, args.img_size), n_cls, tf, random_offset=0 if train else 10**7), n_cls
    has_folder = os.path.isdir(os.path.join(root, "train"))
    if args.data in ("cifar10", "cifar100") and not has_folder:
        cls = tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100
        try:
            data = cls(root, train, tf, download=True)
        except Exception as e:
            raise UserError(f"could not find or download {args.data} into {root} ({type(e).__name__}). Offline? "
                            f"Point --data-path at a folder with train/<class>/ and test/<class>/ images, "
                            f"e.g. --data-path ../shared/data/cifar10") from None
    else:
        if not os.path.isdir(root):
            raise UserError(f"data folder not found: {root}. Pass --data-path with train/ and val/ (or test/) inside")
        val_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
        if not has_folder or val_dir is None:
            raise UserError(f"{root} must hold train/ and val/ (or test/), each with one folder per class")
        data = image_folder(os.path.join(root, "train") if train else val_dir, tf)
    n_cls = len(data.classes)
    keep = args.subset if train else args.val_subset
    if keep:   # the same subset on every rank and in every run
        g = torch.Generator().manual_seed(1234 if train else 4321)
        data = torch.utils.data.Subset(data, torch.randperm(len(data), generator=g)[:keep].tolist())
    return data, n_cls


def build_datasets(args):
    (train, n_cls), (val, n_val) = build_dataset(args, "train"), build_dataset(args, "val")
    if n_cls != n_val:
        raise UserError(f"train and validation splits in {args.data_path} have {n_cls} and {n_val} classes")
    return train, val, n_cls


class RepeatedAugSampler(torch.utils.data.Sampler):
    """Shuffle, repeat each index `repeats` times (each copy augmented anew), split over ranks.
    With repeats=1 this is a plain distributed shuffle. An epoch keeps about len(dataset)
    samples in total, as DeiT's RASampler does. Seeded by (seed, epoch): resumable."""

    def __init__(self, n, rank, world, repeats, seed):
        self.n, self.rank, self.world, self.repeats, self.seed, self.epoch = n, rank, world, repeats, seed, 0
        self.per_rank = n // world if repeats == 1 else max(1, (n // 256 * 256 or n) // world)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        idx = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats).tolist()
        return iter(idx[self.rank::self.world][:self.per_rank])

    def __len__(self):
        return self.per_rank


# ----------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file, then renamed, so a kill never leaves half a file

def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def model_signature(cfg):
    return {k: v for k, v in asdict(cfg).items() if k not in ("drop_path_rate", "grad_checkpointing")}


def load_for_resume(path, model):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it or pass --resume no") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint; use --init-from for pretrained weights")
    defaults = asdict(srvit.SRViTConfig())      # for fields that older checkpoints do not name
    want = model_signature(model.config)
    have = {k: ckpt["config"].get(k, defaults[k]) for k in want}
    if want != have:
        diff = ", ".join(f"{k}: checkpoint {have[k]!r} vs now {want[k]!r}" for k in want if want[k] != have[k])
        raise UserError(f"{path} is from another model ({diff}); use another --out-dir or --resume no")
    return ckpt


# ----------------------------------------------------------------------------------------
# Training

def lr_at(step, total, warmup, args):
    """Linear warm-up from 1e-6, then cosine down to min_lr; per optimizer step."""
    if step < warmup:
        return 1e-6 + (args.lr - 1e-6) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, loader, device, autocast, steps=None):
    """Top-1, top-5 and loss over the whole split, each sample counted once over all ranks."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # correct@1, correct@5, loss, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x, steps=steps).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices         # (B, 5)
        sums += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                             F.cross_entropy(logits, y, reduction="sum"), torch.tensor(len(y), device=device)]).double()
    if dist.is_initialized():
        dist.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    model.train()
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "val_loss": loss / max(n, 1), "val_images": int(n)}


def peak_flops(device, amp):
    """Dense peak of the GPU at the training dtype, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
    peak = next((v for k, v in table.items() if k in name), None)
    return peak if peak is None or amp != "none" else peak / 2   # fp32 runs as TF32: half the bf16 rate


def main(argv=None):
    args = get_args(argv)
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process.
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    ddp, master = world > 1, rank == 0
    log = print if master else (lambda *a, **k: None)

    # Batch bookkeeping: global batch = world x micro-batch x accumulation steps.
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; choose a multiple of {world}")
    micro = args.micro_batch or args.batch_size // world
    if (args.batch_size // world) % micro:
        raise UserError(f"--micro-batch {micro} does not divide the per-process batch {args.batch_size // world}")
    accum = args.batch_size // world // micro

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.amp is None:
        args.amp = "none" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    autocast = amp_context(device, args.amp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data.
    train_set, val_set, num_classes = build_datasets(args)
    if len(train_set) < args.batch_size:
        raise UserError(f"only {len(train_set)} training images for a batch of {args.batch_size}; lower --batch-size")
    sampler = RepeatedAugSampler(len(train_set), rank, world, args.repeated_aug, args.seed)
    workers = args.workers if args.workers is not None else min(8, (os.cpu_count() or 2) // max(1, world))
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
    # (not persistent: workers started anew each epoch take their seeds from that epoch's RNG)
    train_loader = torch.utils.data.DataLoader(train_set, micro, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)),
                                             max(micro, 64), **loader_kw)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise UserError(f"an epoch has fewer than one step of {args.batch_size} images; lower --batch-size")
    mix = None
    if args.mixup > 0 or args.cutmix > 0:
        from torchvision.transforms import v2
        choices = [c for c in (args.mixup > 0 and v2.MixUp(alpha=args.mixup, num_classes=num_classes),
                               args.cutmix > 0 and v2.CutMix(alpha=args.cutmix, num_classes=num_classes)) if c]
        mix = v2.RandomChoice(choices)   # one of the two per batch

    # Model.
    torch.manual_seed(args.seed)         # identical initial weights on every rank
    overrides = {k: getattr(args, k) for k in ("embed_dim", "num_layers", "num_heads") if getattr(args, k) is not None}
    try:
        model = srvit.srvit(args.model, depth=args.depth, mixer=args.mixer, share=args.share, router_init=args.router_init,
                            num_classes=num_classes,
                            img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=args.drop_path,
                            grad_checkpointing=args.grad_ckpt, **overrides)
    except ValueError as e:
        raise UserError(f"cannot build the model: {e}") from None
    gmacs = srvit.forward_gmacs(model)
    n_params = srvit.count_params(model)
    model.to(device)

    decay, no_decay = [], []
    skip = model.no_weight_decay()
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 or name in skip else decay).append(prm)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # Resume (same command again), or warm start.
    start_epoch, best, elapsed = 0, 0.0, 0.0
    last_path, best_path = os.path.join(args.out_dir, "last.pt"), os.path.join(args.out_dir, "best.pt")
    resume = last_path if args.resume == "auto" else (None if args.resume == "no" else args.resume)
    if resume and (args.resume != "auto" or os.path.isfile(resume)):
        if not os.path.isfile(resume):
            raise UserError(f"--resume {resume}: file not found")
        ckpt = load_for_resume(resume, model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, elapsed = ckpt["epoch"], ckpt["best_top1"], ckpt["elapsed"]
        log(f"resumed from {resume}: {start_epoch} epochs done, best top-1 {best:.2f}")
    elif args.init_from:
        try:
            srvit.load_pretrained(model, args.init_from, verbose=master)
        except ValueError as e:
            raise UserError(f"--init-from {args.init_from}: {e}") from None

    raw_model = model                                  # plain module: what checkpoints hold
    if args.compile:
        model = torch.compile(model)
    eval_model = model                                 # no DDP: ranks hold different numbers of val batches
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    interval = args.log_interval or max(1, steps_per_epoch // 10)
    peak = peak_flops(device, args.amp)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"type": "run", "args": vars(args), "config": asdict(raw_model.config), "params": n_params,
                                "gmacs": gmacs, "world_size": world, "device": str(device), "start_epoch": start_epoch}) + "\n")
    c = raw_model.config
    log(f"SR-ViT D={c.embed_dim} L={c.num_layers} heads={c.num_heads} patch={c.patch_size} R={c.depth} mixer={c.mixer} "
        f"share={c.share}: {n_params:,} params, {gmacs:.3g} GMACs/image | {len(train_set):,} train / {len(val_set):,} val images, {num_classes} classes | "
        f"batch {args.batch_size} = {world} x {micro} x {accum} accum | {device} {args.amp} | {args.out_dir}")

    for epoch in range(start_epoch, args.epochs):
        # Every random draw of this epoch (order, augmentation, drop path, MixUp) follows from
        # (seed, epoch, rank), so a run resumed at an epoch boundary repeats it exactly.
        torch.manual_seed(args.seed * 10_000 + epoch * 100 + rank)
        sampler.set_epoch(epoch)
        model.train()
        t0 = t_log = time.time()
        log_sum, log_step = 0.0, 0
        loss_sum = torch.zeros((), device=device)
        bad_step = torch.full((), -1, device=device, dtype=torch.long)
        it = iter(train_loader)
        for step in range(steps_per_epoch):
            gstep = epoch * steps_per_epoch + step
            for g in optimizer.param_groups:
                g["lr"] = lr_at(gstep, total_steps, warmup_steps, args)
            for micro_step in range(accum):
                x, y = next(it)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mix is not None:
                    x, y = mix(x, y)                      # y becomes (B, classes) soft targets
                sync = micro_step == accum - 1
                with (nullcontext() if sync or not ddp else model.no_sync()), autocast:
                    loss = F.cross_entropy(model(x), y, label_smoothing=args.smoothing)
                scaler.scale(loss / accum).backward()
                loss = loss.detach()
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), gstep + 1, bad_step)
                loss_sum += loss / accum
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            if (step + 1) % interval == 0 or step + 1 == steps_per_epoch:
                if ddp:
                    dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                if bad_step.item() >= 0:                  # checked before anything is saved
                    raise UserError(f"loss became NaN or infinite at step {bad_step.item()} (epoch {epoch + 1}); stopped. "
                                    f"The last good checkpoint is kept in {args.out_dir}. Try a lower --lr, or --amp bf16/none")
                if master:
                    dt = time.time() - t_log
                    ips = interval * args.batch_size / dt if (step + 1) % interval == 0 else float("nan")
                    eta = (time.time() - t0) / ((step + 1) / steps_per_epoch) * (args.epochs - epoch - (step + 1) / steps_per_epoch)
                    util = f" | MFU {mfu(gmacs, ips / world, peak):.1%}" if peak and ips == ips else ""
                    log(f"epoch {epoch + 1}/{args.epochs} | step {step + 1}/{steps_per_epoch} | "
                        f"loss {(loss_sum.item() - log_sum) / (step + 1 - log_step):.4f} | "
                        f"lr {optimizer.param_groups[0]['lr']:.2e} | {ips:,.0f} img/s{util} | eta {fmt_time(eta)}")
                t_log, log_sum, log_step = time.time(), loss_sum.item(), step + 1
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        train_time = time.time() - t0
        elapsed += train_time
        metrics = evaluate(eval_model, val_loader, device, autocast)
        is_best = metrics["top1"] > best
        best = max(best, metrics["top1"])
        record = {"type": "epoch", "epoch": epoch + 1, "train_loss": loss_sum.item() / steps_per_epoch, **metrics,
                  "best_top1": best, "lr": optimizer.param_groups[0]["lr"], "epoch_time": train_time, "elapsed": elapsed,
                  "images_per_s": steps_per_epoch * args.batch_size / train_time}
        log(f"epoch {epoch + 1}/{args.epochs} | train loss {record['train_loss']:.4f} | val top-1 {metrics['top1']:.2f} "
            f"top-5 {metrics['top5']:.2f} loss {metrics['val_loss']:.4f} | best {best:.2f} | {fmt_time(train_time)}")
        if master:
            ckpt = {"model": raw_model.state_dict(), "config": asdict(raw_model.config), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "best_top1": best, "elapsed": elapsed,
                    "metrics": record, "args": vars(args)}
            save_atomic(ckpt, last_path)
            if is_best:
                save_atomic(ckpt, best_path)
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
    log(f"done: best top-1 {best:.2f}, {fmt_time(elapsed)} training time, checkpoints in {args.out_dir}")
    if ddp:
        dist.destroy_process_group()
    return raw_model


def fmt_time(s):
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def user_error_message(e):
    # An error raised in a data-loading worker arrives wrapped in the worker's traceback text;
    # the message we wrote is its last line.
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {user_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is whole, re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
