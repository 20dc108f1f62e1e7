"""
Train SR-ViT: one process (CPU or one GPU), or DDP under torchrun. Only rank 0 logs and saves.

    python train.py                                          # classroom run: CIFAR-10 (downloaded), 32 px, R=2
    python train.py --data-path ~/data/cifar10 --depth 4     # a local copy: train/<class>/, test/<class>/
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet --depth 4
    python train.py --data imagenet --data-path /data/imagenet --depth 4 \\
        --micro-batch 64 --grad-ckpt --amp bf16 --save-every 2000   # one 24 GB GPU, same global batch

The defaults are DeiT's ImageNet recipe at 224 px, and a short recipe for small images (see
RECIPES and README.md). Re-running the same command resumes from <out-dir>/last.pt; SIGTERM or
Ctrl-C saves a checkpoint mid-epoch first.

The file reads top to bottom: arguments, data, MixUp/CutMix, the out-dir (checkpoints, metrics,
lock), signals, the training step and epoch, then `main`, which only wires these together.
"""

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import srvit

try:
    import fcntl                      # the out-dir lock; POSIX only (elsewhere runs are not locked)
except ImportError:
    fcntl = None

# Defaults that depend on the image size: DeiT's recipe for ImageNet-sized images, a short one
# for images of 64 px or less (random crop with 4 px padding + flip, no MixUp/CutMix/RandAugment,
# so a small model learns in a few epochs). An explicit flag always wins.
RECIPES = {
    "deit": dict(patch_size=16, epochs=300, batch_size=1024, warmup_epochs=5, min_lr=1e-5, weight_decay=0.05,
                 drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, randaug=9, erasing=0.25, repeated_aug=3,
                 hflip=0.5, crop_padding=0),
    "small-images": dict(patch_size=4, epochs=30, batch_size=128, lr=1e-3, warmup_epochs=1, min_lr=1e-5,
                         weight_decay=0.05, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, randaug=0,
                         erasing=0.0, repeated_aug=1, hflip=0.5, crop_padding=4),
}
# The model when no --model is given: DeiT-S for ImageNet-sized images; for small images a
# classroom model (D=192, 6 blocks, 3 heads). The presets have 12 blocks.
DEFAULT_MODEL = {"deit": dict(srvit.PRESETS["small"], num_layers=12),
                 "small-images": dict(embed_dim=192, num_layers=6, num_heads=3)}
MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


class UserError(Exception):
    """Bad input: printed as one line with what to do, exit code 2, no traceback. `shared`: every
    rank hits it alike, so rank 0 alone prints it; otherwise each failing rank says so."""

    def __init__(self, message, shared=False):
        super().__init__(message)
        self.shared = shared


class Stopped(Exception):
    """The run stopped early on a signal, after saving: one line, and the exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------
# Arguments

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="cifar10", choices=["imagenet", "cifar10", "cifar100", "folder", "fake"])
    a("--data-path", default=None, help="ImageFolder root with train/ and val/ (or test/); default ./data")
    a("--subset", type=int, default=None, help="use only this many training images (quick runs)")
    a("--val-subset", type=int, default=None, help="use only this many validation images")
    a("--num-classes", type=int, default=None, help="for --data fake (default 1000)")
    a("--loader", default="auto", choices=["auto", "memory", "pil"],
      help="memory: small images decoded once and augmented on the device (auto for <= 64 px); pil: per-image workers")
    a("--model", default=None, choices=list(srvit.PRESETS), help="a DeiT preset (12 blocks); other flags override it")
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
    a("--randaug", type=int, default=None, help="RandAugment magnitude 0..10 (timm's scale), 2 ops (0: off)")
    a("--erasing", type=float, default=None, help="random erasing probability")
    a("--hflip", type=float, default=None, help="horizontal flip probability (0 for digits, text, signs)")
    a("--crop-padding", type=int, default=None, help="small images: pixels of padding for the random crop (0: no crop)")
    a("--repeated-aug", type=int, default=None, help="DeiT's repeated augmentation: copies of each image")
    a("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on GPUs that have it, else fp16; none on CPU")
    a("--compile", action="store_true")
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every block application and mixer")
    a("--init-from", default=None, help="DeiT/timm/SR-ViT checkpoint to warm-start the blocks from")
    a("--out-dir", default=None, help="default runs/<data>-<model>-R<depth>-<mixer>-<share>-s<seed>")
    a("--resume", default="auto", help="checkpoint to resume from; 'auto': <out-dir>/last.pt if it exists; 'no'")
    a("--save-every", type=int, default=None, help="also save last.pt every N optimizer steps (long epochs)")
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=None, help="data-loading processes per rank")
    a("--log-interval", type=int, default=None, help="steps between progress lines (default: 10 per epoch)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)

    if args.img_size is None:
        args.img_size = 32 if args.data.startswith("cifar") else 224
    args.recipe = "small-images" if args.img_size <= 64 else "deit"
    for key, value in {**RECIPES[args.recipe], **model_dims(args)}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = 5e-4 * args.batch_size / 512
    check_args(args)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{args.data}-{model_name(args)}-R{args.depth}-{args.mixer}-{args.share}-s{args.seed}")
    return args


def model_dims(args):
    """Width, blocks and heads of --model's preset, or of the recipe's default model."""
    if args.model is None:
        return DEFAULT_MODEL[args.recipe]
    return dict(srvit.PRESETS[args.model], num_layers=12)


def model_name(args):
    """What was built: the preset's name when the model is one, else its width, blocks and heads."""
    dims = {k: getattr(args, k) for k in ("embed_dim", "num_layers", "num_heads")}
    preset = next((name for name, p in srvit.PRESETS.items() if dict(p, num_layers=12) == dims), None)
    return preset or f"D{args.embed_dim}-L{args.num_layers}-H{args.num_heads}"


# Every number a user can get wrong, with the range it must lie in: one table, one message each.
CHECKS = [(("lr", "batch_size", "epochs", "embed_dim", "num_layers", "num_heads", "img_size", "patch_size", "depth",
            "repeated_aug", "micro_batch", "subset", "val_subset", "num_classes", "log_interval", "save_every",
            "clip_grad"), lambda v: v > 0, "> 0"),
          (("min_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "workers", "crop_padding"), lambda v: v >= 0, ">= 0"),
          (("smoothing", "drop_path"), lambda v: 0 <= v < 1, "in [0, 1)"),
          (("erasing", "hflip"), lambda v: 0 <= v <= 1, "in [0, 1]"),
          (("randaug",), lambda v: 0 <= v <= 10, "in 0..10 (timm's magnitude scale; DeiT uses 9)")]


def check_args(args):
    for names, ok, rule in CHECKS:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}", shared=True)
    if args.loader == "memory" and (args.img_size > 64 or args.randaug or args.erasing):
        raise UserError("--loader memory is for images of <= 64 px with crop and flip only; drop --randaug/--erasing "
                        "or use --loader pil", shared=True)


# ----------------------------------------------------------------------------------------
# Data: datasets, the seeded sampler, the PIL path (ImageNet) and the in-memory path (small images)

def read_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file") from None


def transforms(args, train):
    """The PIL path's per-image transforms. Small images: resize, centre crop, pad-and-crop, flip.
    ImageNet-sized: DeiT's RandomResizedCrop, flip, RandAugment, erasing; eval resize 256 / crop 224."""
    from torchvision.transforms import v2
    mean, std = MEAN_STD["cifar" if args.img_size <= 64 else "imagenet"]
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if args.img_size <= 64:
        fit = [v2.Resize(args.img_size), v2.CenterCrop(args.img_size)]
        if not train:
            return v2.Compose(fit + to_tensor)
        crop = [v2.RandomCrop(args.img_size, padding=args.crop_padding)] if args.crop_padding else []
        return v2.Compose(fit + crop + [v2.RandomHorizontalFlip(args.hflip)] + to_tensor)
    bicubic = v2.InterpolationMode.BICUBIC
    if not train:             # resize to 256/224 of the crop, centre crop
        return v2.Compose([v2.Resize(int(args.img_size / 0.875), interpolation=bicubic), v2.CenterCrop(args.img_size)] + to_tensor)
    aug = [v2.RandomResizedCrop(args.img_size, interpolation=bicubic), v2.RandomHorizontalFlip(args.hflip)]
    aug += [randaugment_op(args.randaug, mean) for _ in range(2)] if args.randaug else []
    post = [v2.RandomErasing(p=args.erasing, value="random")] if args.erasing else []   # DeiT: per-pixel noise
    return v2.Compose(aug + to_tensor + post)


def randaugment_op(magnitude, mean):
    """One of DeiT's two RandAugment ops (timm's rand-m9-mstd0.5-inc1), as close as torchvision
    allows: 11 magnitude bins make magnitude 9 mean 90% of each op's range, as timm's scale of
    10 does (rotate 27 deg, shear 0.27, translate 41% of the image, colour factors 1 +/- 0.81);
    each op applies with probability 0.5; geometric ops fill with the mean colour. What still
    differs (the op list, posterize, the magnitude noise) is listed in README.md."""
    from torchvision.transforms import v2
    fill = [round(255 * m) for m in mean]
    op = v2.RandAugment(num_ops=1, magnitude=magnitude, num_magnitude_bins=11,
                        interpolation=v2.InterpolationMode.BICUBIC, fill=fill)
    return v2.RandomApply([op], p=0.5)


def image_folder(root, transform):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(root, transform=transform, loader=read_image)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"no images in {root}: {e}. Expected {root}/<class>/<image>.jpg") from None


def build_dataset(args, split, transform):
    """The 'train' or 'val' split named by --data / --data-path, and its class names."""
    import torchvision.datasets as tvd
    root, train = args.data_path or "./data", split == "train"
    if args.data == "fake":
        n_cls = args.num_classes or 1000
        size = (args.subset or 10_000) if train else (args.val_subset or 1_000)
        data = tvd.FakeData(size, (3, args.img_size, args.img_size), n_cls, transform, random_offset=0 if train else 10**7)
        return data, [f"class {i}" for i in range(n_cls)]
    has_folder = os.path.isdir(os.path.join(root, "train"))
    if args.data in ("cifar10", "cifar100") and not has_folder:
        cls = tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100
        try:
            data = cls(root, train, transform, download=True)
        except Exception as e:
            raise UserError(f"could not find or download {args.data} into {root} ({type(e).__name__}). Offline? "
                            f"Point --data-path at a folder with train/<class>/ and test/<class>/ images") from None
    else:
        if not os.path.isdir(root):
            raise UserError(f"data folder not found: {root}. Pass --data-path with train/ and val/ (or test/) inside")
        val_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
        if not has_folder or val_dir is None:
            raise UserError(f"{root} must hold train/ and val/ (or test/), each with one folder per class")
        data = image_folder(os.path.join(root, "train") if train else val_dir, transform)
    classes = list(data.classes)
    keep = args.subset if train else args.val_subset
    if keep:   # the same subset on every rank and in every run
        g = torch.Generator().manual_seed(1234 if train else 4321)
        data = torch.utils.data.Subset(data, torch.randperm(len(data), generator=g)[:keep].tolist())
    return data, classes


def seed_for(*keys):
    """A 63-bit seed for one random stream, e.g. seed_for("aug", seed, epoch, rank, batch).
    Hashing the whole key keeps streams apart: an arithmetic mix such as seed*10000 + epoch*100
    + rank makes seed s at epoch 100 replay seed s+1 at epoch 0."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RepeatedAugSampler(torch.utils.data.Sampler):
    """Shuffle, repeat each index `repeats` times (each copy augmented anew), split over ranks.
    With repeats=1 this is a plain distributed shuffle. An epoch keeps about len(dataset)
    samples in total, as DeiT's RASampler does. The order follows from (seed, epoch) alone;
    `start` skips the samples a resumed run has already seen this epoch."""

    def __init__(self, n, rank, world, repeats, seed):
        self.n, self.rank, self.world, self.repeats, self.seed = n, rank, world, repeats, seed
        self.epoch, self.start = 0, 0
        self.per_rank = n // world if repeats == 1 else max(1, (n // 256 * 256 or n) // world)

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        g = torch.Generator().manual_seed(seed_for("order", self.seed, self.epoch))
        idx = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)
        return idx[self.rank::self.world][:self.per_rank]           # this rank's share, (per_rank,)

    def __iter__(self):
        # Each sample carries the seed of its augmentation, (seed, epoch, rank, position): the
        # crops and flips then do not depend on which loader worker draws them, or on a resume.
        for pos, i in enumerate(self.indices()[self.start:].tolist(), start=self.start):
            yield i, seed_for("aug", self.seed, self.epoch, self.rank, pos)

    def __len__(self):
        return self.per_rank - self.start


class SeededAugment(torch.utils.data.Dataset):
    """Wraps a dataset: item (index, seed) is the sample augmented from its own random stream."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):    # leave the caller's stream untouched
            torch.manual_seed(seed)
            return self.data[index]


class MemoryLoader:
    """The fast path for small images (CIFAR, folders of <= 64 px): the whole split decoded once
    into a uint8 tensor on the training device, (N, 3, S, S), and augmented there a batch at a
    time: pad-and-crop and flip, the small-image recipe's augmentation. Against the PIL path this
    removes JPEG decoding and per-image transforms from every epoch. Batch b of an epoch is a
    function of (seed, epoch, rank, b), so a resumed run draws the same batches."""

    def __init__(self, images, labels, batch_size, mean, std, device, sampler=None, train=False,
                 crop_padding=0, hflip=0.0, seed=0):
        self.images, self.labels = images.to(device), labels.to(device)        # (N, 3, S, S) uint8, (N,)
        self.batch_size, self.sampler, self.train, self.device = batch_size, sampler, train, device
        self.pad, self.hflip, self.seed = crop_padding, hflip, seed
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.start = 0

    def __len__(self):       # batches per epoch; training drops the last partial batch
        n = self.sampler.per_rank if self.sampler else len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        self.start = start_batch

    def __iter__(self):
        order = self.sampler.indices().to(self.device) if self.sampler else torch.arange(len(self.labels), device=self.device)
        for b in range(self.start if self.train else 0, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]                                                 # (B, 3, S, S) uint8
            if self.train:
                g = torch.Generator(self.device).manual_seed(
                    seed_for("aug", self.seed, self.sampler.epoch, self.sampler.rank, b))
                x = pad_crop_flip(x, self.pad, self.hflip, g)
            yield (x.float() - self.mean) / self.std, self.labels[idx]           # (B, 3, S, S) float


def pad_crop_flip(x, pad, hflip, g):
    """torchvision's RandomCrop(S, padding=pad) and RandomHorizontalFlip(hflip), for a whole
    batch (B, C, S, S) at once: every image gets its own offset and its own coin."""
    B, C, S, _ = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))                                      # (B, C, S+2p, S+2p), zeros
        offset = torch.randint(0, 2 * pad + 1, (2, B, 1), generator=g, device=x.device)
        rows = offset[0] + torch.arange(S, device=x.device)                      # (B, S)
        cols = offset[1] + torch.arange(S, device=x.device)                      # (B, S)
        batch = torch.arange(B, device=x.device)[:, None, None]
        x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)   # (B, S, S, C) -> (B, C, S, S)
    if hflip:
        flip = torch.rand(B, generator=g, device=x.device) < hflip
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class PILLoader(torch.utils.data.DataLoader):
    """The PIL path (ImageNet): loader workers decode and augment each image. Like MemoryLoader,
    set_epoch(epoch, start_batch) picks the epoch and where a resumed run starts in it."""

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)


def ignore_signals(worker_id):
    # Ctrl-C reaches every process of the terminal's group; it is for the main process, which
    # finishes its step first. (SIGTERM stays: the loader itself uses it to end its workers.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def use_memory(args):
    return args.loader == "memory" or (args.loader == "auto" and args.img_size <= 64 and not args.randaug and not args.erasing)


def build_loaders(args, env):
    """This rank's training and validation loaders, the class names and the number of training images. Validation is
    split over ranks (each image counted once); training follows the seeded sampler."""
    from torchvision.transforms import v2
    memory = use_memory(args)
    decode = v2.Compose([v2.Resize(args.img_size), v2.CenterCrop(args.img_size), v2.PILToTensor()])
    (train_set, classes), (val_set, val_classes) = (build_dataset(args, split, decode if memory else transforms(args, split == "train"))
                                                    for split in ("train", "val"))
    if classes != val_classes:
        raise UserError(f"train and validation splits in {args.data_path} have different classes "
                        f"({len(classes)} and {len(val_classes)})")
    if len(train_set) < args.batch_size:
        raise UserError(f"only {len(train_set)} training images for a batch of {args.batch_size}; lower --batch-size")
    val_set = torch.utils.data.Subset(val_set, range(env.rank, len(val_set), env.world))
    sampler = RepeatedAugSampler(len(train_set), env.rank, env.world, args.repeated_aug, args.seed)
    workers = args.workers if args.workers is not None else min(8, (os.cpu_count() or 2) // env.world)
    eval_batch = max(env.micro, 256 if memory else 64)
    if memory:
        t0 = time.time()
        mean, std = MEAN_STD["cifar"]
        train = MemoryLoader(*decode_all(train_set, workers), env.micro, mean, std, env.device, sampler, train=True,
                             crop_padding=args.crop_padding, hflip=args.hflip, seed=args.seed)
        val = MemoryLoader(*decode_all(val_set, workers), eval_batch, mean, std, env.device)
        env.log(f"decoded {len(train_set):,} + {len(val_set):,} images into memory on {env.device} in {time.time() - t0:.0f} s")
        return train, val, classes, len(train_set)
    kw = dict(num_workers=workers, pin_memory=env.device.type == "cuda", persistent_workers=workers > 0)
    train = PILLoader(SeededAugment(train_set), env.micro, sampler=sampler, drop_last=True, worker_init_fn=ignore_signals, **kw)
    val = torch.utils.data.DataLoader(val_set, eval_batch, **kw)
    return train, val, classes, len(train_set)


def decode_all(dataset, workers):
    """Every image of a (resize + crop + PILToTensor) dataset: (N, 3, S, S) uint8 and (N,) labels."""
    loader = torch.utils.data.DataLoader(dataset, 500, num_workers=workers)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.as_tensor(torch.cat(ys))


# ----------------------------------------------------------------------------------------
# MixUp / CutMix, as timm's Mixup does it for DeiT

def mix_batch(x, y, args, num_classes):
    """Per batch, MixUp (alpha 0.8) or CutMix (alpha 1.0) with equal chance; the partner of image
    i is image B-1-i (the batch reversed, as in timm). Returns images and soft targets (B, classes).
    (torchvision's MixUp pairs i with i-1; the repeated-augmentation sampler puts the copies of an
    image next to each other, so on one GPU most images would be mixed with a copy of themselves.)"""
    cutmix = args.cutmix > 0 and (args.mixup == 0 or torch.rand(()).item() < 0.5)
    alpha = args.cutmix if cutmix else args.mixup
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    partner = x.flip(0)
    if cutmix:   # paste a box of area (1 - lam) from the partner; lam becomes the area kept
        H, W = x.shape[-2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * partner
    target = F.one_hot(y, num_classes).float()                     # (B, classes)
    return x, lam * target + (1 - lam) * target.flip(0)


# ----------------------------------------------------------------------------------------
# The out-dir: checkpoints, metrics.jsonl and the lock, in one place.
#
# What each way of stopping costs (README "Checkpoints and stopping"):
#   SIGTERM / Ctrl-C   nothing: the optimizer step in flight finishes, last.pt is saved mid-epoch.
#   kill -9, a crash   the steps since the last save (end of epoch, or --save-every).
#   a second run       refused while the first holds the out-dir's lock.
# Files are written to <name>.tmp and renamed, so last.pt and best.pt are always whole. At the end
# of an epoch best.pt is written first, then last.pt, then the metrics row; last.pt carries every
# epoch's row, so a resume puts back a row that a kill kept out of metrics.jsonl.

class OutDir:
    def __init__(self, path, master):
        self.path, self.master, self.lock_file = path, master, None
        self.last, self.best = os.path.join(path, "last.pt"), os.path.join(path, "best.pt")
        self.metrics = os.path.join(path, "metrics.jsonl")

    def open(self):
        """Create the folder, take its lock, and delete the *.tmp files a killed run left."""
        if not self.master:
            return self
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out-dir {self.path} ({e.strerror}); choose another folder") from None
        self.lock()
        for name in os.listdir(self.path):
            if name.endswith(".tmp"):
                os.remove(os.path.join(self.path, name))
        return self

    def lock(self):
        # flock: the kernel drops the lock when the process dies, however it dies, so a killed run
        # never leaves a stale lock behind. The file names the holder for the refusal message.
        if fcntl is None:
            return
        self.lock_file = open(os.path.join(self.path, "train.lock"), "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock_file.seek(0)
            holder = self.lock_file.read().strip() or "another process"
            raise UserError(f"{self.path} is in use by a running train.py ({holder}); wait for it, stop it, "
                            f"or pass another --out-dir", shared=True) from None
        self.lock_file.truncate(0)
        self.lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.lock_file.flush()

    def release(self):
        if self.lock_file:
            self.lock_file.close()          # closing drops the flock
            self.lock_file = None

    def save(self, ckpt, path):
        """Write to path.tmp, then rename: a kill leaves the old file or the new one, never half."""
        tmp = path + ".tmp"
        try:
            torch.save(ckpt, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:        # a full disk surfaces as either
            if os.path.exists(tmp):
                os.remove(tmp)
            raise UserError(f"could not write {path} ({str(e).splitlines()[0][:120]}); is the disk full? "
                            f"The previous checkpoint is kept; free space and re-run the same command") from None

    def append_metrics(self, row):
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def end_epoch(self, ckpt, is_best):
        """The end of an epoch, in the order that a kill at any point can be repaired from."""
        if is_best:
            self.save(ckpt, self.best)
        self.save(ckpt, self.last)
        self.append_metrics(ckpt["records"][-1])

    def repair_metrics(self, done, records):
        """After a resume with `done` epochs: metrics.jsonl holds each finished epoch exactly once.
        Rows a kill kept out are put back from the checkpoint's records; rows of epochs past it (a
        resume from an older checkpoint), repeats and a half-written last line are dropped."""
        lines = open(self.metrics).read().splitlines(keepends=True) if os.path.exists(self.metrics) else []
        torn = bool(lines) and not lines[-1].endswith("\n")
        keep, seen = [], set()
        for line in lines[:-1] if torn else lines:
            row = json.loads(line)
            if row.get("type") == "epoch":
                if row["epoch"] > done or row["epoch"] in seen:
                    continue
                seen.add(row["epoch"])
            keep.append(line)
        keep += [json.dumps(r) + "\n" for r in records if r["epoch"] <= done and r["epoch"] not in seen]
        if keep != lines:
            with open(self.metrics + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.metrics + ".tmp", self.metrics)


# What a checkpoint must share with the command that resumes it. The data must be the same; so
# must the recipe, or the resumed run would follow a schedule and randomness no run ever had.
SAME_DATA = ("data", "subset", "num_classes", "img_size", "train_images")
SAME_RECIPE = ("lr", "min_lr", "warmup_epochs", "weight_decay", "batch_size", "epochs", "seed", "amp", "drop_path",
               "mixup", "cutmix", "smoothing", "randaug", "erasing", "repeated_aug", "hflip", "crop_padding", "clip_grad")


def load_checkpoint(path, model):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it or pass another --out-dir") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint; use --init-from for pretrained weights")
    return ckpt


def check_same_run(path, ckpt, model, args, n_train):
    """Refuse to resume another model, other data or another recipe, naming each value that changed
    (keys an older checkpoint does not hold are not compared)."""
    model_keys = [k for k in asdict(model.config) if k not in ("drop_path_rate", "grad_checkpointing")]
    saved = {**asdict(srvit.SRViTConfig()), **ckpt["config"]}, {**ckpt.get("args", {}), **ckpt.get("dataset", {})}
    now = asdict(model.config), {**vars(args), "train_images": n_train}
    for keys, have, want, what in ((model_keys, saved[0], now[0], "model"), (SAME_DATA, saved[1], now[1], "data"),
                                   (SAME_RECIPE, saved[1], now[1], "recipe")):
        diff = [f"{k}: {have[k]!r} then, {want[k]!r} now" for k in keys if k in have and have[k] != want.get(k)]
        if diff:
            raise UserError(f"{path} was trained with another {what} ({'; '.join(diff)}). Resume with the same "
                            f"command, or start afresh in another --out-dir", shared=True)


def restore(args, out, model, optimizer, scaler, n_train):
    """The progress to start from: a fresh run, or what --resume points at (default last.pt)."""
    state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "best_top1": 0.0, "elapsed": 0.0, "records": []}
    path = out.last if args.resume in ("auto", "no") else args.resume
    if args.resume == "no":
        if os.path.exists(out.last):
            raise UserError(f"--resume no, but {out.path} holds a checkpoint; delete {out.last} or pass another --out-dir "
                            f"(nothing is overwritten)", shared=True)
        return state
    if not os.path.isfile(path):
        if args.resume != "auto":
            raise UserError(f"--resume {path}: file not found", shared=True)
        return state
    ckpt = load_checkpoint(path, model)
    check_same_run(path, ckpt, model, args, n_train)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    for key in state:
        state[key] = ckpt.get(key, state[key])
    if os.path.exists(out.best):   # a kill between best.pt and last.pt: best.pt is ahead of last.pt's record
        best = torch.load(out.best, map_location="cpu", weights_only=True, mmap=True)
        state["best_top1"] = max(state["best_top1"], best.get("metrics", {}).get("top1", 0.0))
    return state


# ----------------------------------------------------------------------------------------
# Signals: SIGTERM (Slurm, Kubernetes, torchrun) and Ctrl-C ask the run to stop after the
# optimizer step in flight; `main` then saves and exits with one line. A second Ctrl-C stops at once.

class StopRequest:
    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            if sig != getattr(signal, "SIGCHLD", None):     # (stopping: dead workers must stay quiet)
                signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # Slurm signals the whole job step, loader workers too. The loader's SIGCHLD handler would
        # raise their deaths wherever this process is, the checkpoint write included; without it,
        # the loader reports them at its next batch, where train_one_epoch expects them.
        if hasattr(signal, "SIGCHLD"):
            self.previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def requested(self, env):
        """Whether any rank got a signal: every rank must stop after the same step."""
        if not env.ddp:
            return self.signum != 0
        flag = torch.tensor(self.signum)              # on the CPU, over gloo: no GPU sync per step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=env.cpu_group)
        self.signum = self.signum or int(flag.item())
        return self.signum != 0


# ----------------------------------------------------------------------------------------
# Training: schedule, optimizer groups, one epoch, evaluation

def lr_at(step, steps_per_epoch, args):
    """DeiT's schedule, per optimizer step: linear warm-up from 1e-6 over --warmup-epochs, then
    cosine down to min_lr over all --epochs (timm counts the warm-up epochs in the cosine). One
    detail is DeiT's own: its loop steps the scheduler after each epoch, so its epoch e runs at
    the scheduler's value for e - 1; we follow that, which keeps the two within 2% at every
    epoch's first step after warm-up (tested against DeiT's numbers from epoch 6 on)."""
    epoch = step / steps_per_epoch                         # fractional epoch
    if epoch < args.warmup_epochs:
        return 1e-6 + (args.lr - 1e-6) * epoch / args.warmup_epochs
    t = max(epoch - 1, 0) / args.epochs
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model, weight_decay):
    """timm's rule, as DeiT uses it: no weight decay on biases and norms (every tensor of <= 1
    dimension), nor on the class token, position embedding and step biases."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 or name in skip else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def amp_context(device, amp):
    """Autocast to the --amp dtype, or nothing for full precision."""
    return nullcontext() if amp in (None, "none") else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def train_one_epoch(model, loader, optimizer, scaler, epoch, state, ctx):
    """Train epoch `epoch` from optimizer step state["step"] on (0, or where a stopped run
    saved). Returns True if a signal asked to stop before the epoch's end. `ctx` holds the run's
    fixed settings (args, env, number of classes, steps per epoch, ...)."""
    args, env, accum = ctx.args, ctx.env, ctx.env.accum
    model.train()
    loader.set_epoch(epoch, start_batch=state["step"] * accum)
    batches = iter(loader)
    loss_sum = torch.tensor(state["loss_sum"], device=env.device)     # sum of this epoch's step losses
    bad_step = torch.full((), -1, device=env.device, dtype=torch.long)
    t_log, log_from = time.time(), (state["step"], state["loss_sum"])
    for step in range(state["step"], ctx.steps_per_epoch):
        # Every random draw of this step (MixUp, drop path) follows from (seed, epoch, rank,
        # step), and every augmentation from its sample's position: a run resumed at any step
        # repeats the uninterrupted run.
        torch.manual_seed(seed_for("step", args.seed, epoch, env.rank, step))
        gstep = epoch * ctx.steps_per_epoch + step
        for g in optimizer.param_groups:
            g["lr"] = lr_at(gstep, ctx.steps_per_epoch, args)
        step_loss = torch.zeros((), device=env.device)
        for micro_step in range(accum):
            try:
                x, y = next(batches)
            except Exception:
                if not ctx.stop.signum:
                    raise
                # The signal went to the whole process group (as Slurm sends it) and took the
                # loader workers with it: this step cannot finish, so save the one before it.
                optimizer.zero_grad(set_to_none=True)
                state["loss_sum"], state["elapsed"] = loss_sum.item(), ctx.clock()
                ctx.save_last()
                return True
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if ctx.mixing:
                x, y = mix_batch(x, y, args, ctx.num_classes)          # y: (B, classes) soft targets
            # DDP averages gradients over ranks on backward; skip that on all but the last micro-step
            sync = micro_step == accum - 1 or not env.ddp
            with (nullcontext() if sync else model.no_sync()), ctx.autocast:
                loss = F.cross_entropy(model(x), y, label_smoothing=args.smoothing)
            scaler.scale(loss / accum).backward()    # scale the loss to account for gradient accumulation
            loss = loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), gstep + 1, bad_step)
            step_loss += loss / accum
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += step_loss
        state["step"] = step + 1

        if state["step"] % ctx.log_interval == 0 or state["step"] == ctx.steps_per_epoch:
            check_finite(bad_step, epoch, ctx)
            log_progress(ctx, epoch, state["step"], loss_sum.item(), log_from, t_log, optimizer)
            t_log, log_from = time.time(), (state["step"], loss_sum.item())
        stop = ctx.stop.requested(env)
        if stop or (args.save_every and (gstep + 1) % args.save_every == 0 and state["step"] < ctx.steps_per_epoch):
            check_finite(bad_step, epoch, ctx)                           # never save a NaN model
            partial = loss_sum.clone()
            if env.ddp:                  # every rank resumes from the mean of the ranks' partial sums
                dist.all_reduce(partial)
                partial /= env.world
            state["loss_sum"], state["elapsed"] = partial.item(), ctx.clock()
            ctx.save_last()
            if stop:
                return True
    if env.ddp:                         # the epoch's loss, averaged over ranks
        dist.all_reduce(loss_sum)
        loss_sum /= env.world
    state["loss_sum"] = loss_sum.item()
    return False


def check_finite(bad_step, epoch, ctx):
    if ctx.env.ddp:
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    if bad_step.item() >= 0:                            # checked before anything is saved
        kept = (f"the last good checkpoint is kept in {ctx.out.last}" if os.path.exists(ctx.out.last)
                else "no checkpoint had been written yet")
        raise UserError(f"loss became NaN or infinite at step {bad_step.item()} (epoch {epoch + 1}); stopped, {kept}. "
                        f"Try a lower --lr, or --amp bf16/none", shared=True)


def log_progress(ctx, epoch, step, loss_sum, log_from, t_log, optimizer):
    args, env = ctx.args, ctx.env
    if not env.master:
        return
    steps_done, loss_done = log_from
    dt = time.time() - t_log
    ips = (step - steps_done) * args.batch_size / max(dt, 1e-9)
    left = (args.epochs - epoch) * ctx.steps_per_epoch - step
    util = f" | MFU {mfu(ctx.gmacs, ips / env.world, ctx.peak):.1%}" if ctx.peak else ""
    env.log(f"epoch {epoch + 1}/{args.epochs} | step {step}/{ctx.steps_per_epoch} | "
            f"loss {(loss_sum - loss_done) / max(step - steps_done, 1):.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
            f"{ips:,.0f} img/s{util} | eta {fmt_time(left * args.batch_size / max(ips, 1e-9))} (+ evaluation)")


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


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against the
# device name, most specific first: an "H100 PCIe" is not an H100 SXM. The one MFU denominator
# here and in eval.py, whatever --amp is.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("RTX 4090", 165e12), ("L4", 121e12)]


def peak_flops(device):
    """Datasheet dense bf16 peak of this GPU, in FLOP/s; None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def mfu(gmacs, images_per_s, peak_flops):
    """Model FLOPs utilisation: training costs ~3 forward passes (forward + backward), 2 FLOPs per MAC."""
    return 3 * 2 * gmacs * 1e9 * images_per_s / peak_flops


# ----------------------------------------------------------------------------------------
# main: set up, then epochs of train -> evaluate -> save

def init_distributed(args):
    """Rank, world size and device from torchrun's environment; one process without it."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    # Batch bookkeeping: global batch = world x micro-batch x accumulation steps.
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; choose a multiple of {world}", shared=True)
    micro = args.micro_batch or args.batch_size // world
    if (args.batch_size // world) % micro:
        raise UserError(f"--micro-batch {micro} does not divide the per-process batch {args.batch_size // world}", shared=True)
    cuda = check_device(args.device) == "cuda"
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if args.amp is None:
        args.amp = "none" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cpu_group = dist.new_group(backend="gloo") if world > 1 and cuda else None    # small CPU-side flags
    return SimpleNamespace(rank=rank, world=world, ddp=world > 1, master=rank == 0, device=device, micro=micro, cpu_group=cpu_group,
                           accum=args.batch_size // world // micro, log=print if rank == 0 else (lambda *a, **k: None))


def check_device(name):
    """'cuda' or 'cpu': what --device asks for (default: cuda where there is one)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise UserError(f"--device {name}: use cpu, cuda or cuda:N", shared=True)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; use --device cpu", shared=True)
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs (cuda:0..)", shared=True)
    return kind


def on_all_ranks(env, fn, *a):
    """Run fn on every rank; if it fails on any, every rank raises that rank's error (so no
    rank waits forever for a collective that another rank never reaches)."""
    result, error = None, None
    try:
        result = fn(*a)
    except UserError as e:
        error = str(e)
    if env.ddp:
        errors = [None] * env.world
        dist.all_gather_object(errors, error, group=env.cpu_group)     # gloo: a 30-minute timeout
        failed = next(((r, e) for r, e in enumerate(errors) if e), None)
        if failed:
            where = f" (rank {failed[0]})" if failed[0] != env.rank or env.rank else ""
            raise UserError(failed[1] + where, shared=True)
    elif error:
        raise UserError(error, shared=True)
    return result


def build_model(args, num_classes):
    torch.manual_seed(args.seed)         # identical initial weights on every rank
    try:
        return srvit.SRViT(srvit.SRViTConfig(
            img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes, embed_dim=args.embed_dim,
            num_layers=args.num_layers, num_heads=args.num_heads, depth=args.depth, mixer=args.mixer, share=args.share,
            router_init=args.router_init, drop_path_rate=args.drop_path, grad_checkpointing=args.grad_ckpt))
    except ValueError as e:
        raise UserError(f"cannot build the model: {e}", shared=True) from None


def setup(args, env):
    """Data, model, optimizer, out-dir and the progress to start from, on this rank."""
    train_loader, val_loader, classes, n_train = build_loaders(args, env)
    if len(train_loader) // env.accum == 0:
        raise UserError(f"an epoch has fewer than one step of {args.batch_size} images; lower --batch-size", shared=True)
    model = build_model(args, len(classes)).to(env.device)    # on the device first: the optimizer state follows it
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp == "fp16")
    out = OutDir(args.out_dir, env.master).open()
    try:
        state = restore(args, out, model, optimizer, scaler, n_train)
        if state["epoch"] == 0 and state["step"] == 0 and args.init_from:
            try:
                srvit.load_pretrained(model, args.init_from, verbose=env.master)
            except ValueError as e:
                raise UserError(f"--init-from {args.init_from}: {e}", shared=True) from None
    except BaseException:
        out.release()               # now, not when the traceback's frames are collected
        raise
    data = SimpleNamespace(train=train_loader, val=val_loader, classes=classes, n_train=n_train)
    return data, model, optimizer, scaler, out, state


def main(argv=None):
    args = get_args(argv)
    env = init_distributed(args)
    out = None
    try:
        if env.ddp and args.data.startswith("cifar"):    # one download, not one per rank into the same folder
            on_all_ranks(env, lambda: env.master and build_dataset(args, "train", None))
        data, raw_model, optimizer, scaler, out, state = on_all_ranks(env, setup, args, env)
        # Checkpoints hold raw_model. Compile DDP(model), not the other way round: Dynamo then splits
        # the graph at DDP's buckets, so gradient all-reduce overlaps the backward pass. Evaluation
        # skips DDP (ranks hold different numbers of val batches).
        model = DDP(raw_model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.ddp else raw_model
        model = torch.compile(model) if args.compile else model
        eval_model = (torch.compile(raw_model) if env.ddp else model) if args.compile else raw_model
        steps = len(data.train) // env.accum
        ctx = SimpleNamespace(args=args, env=env, out=out, data=data, num_classes=len(data.classes),
                              autocast=amp_context(env.device, args.amp), mixing=args.mixup > 0 or args.cutmix > 0,
                              steps_per_epoch=steps,
                              log_interval=args.log_interval or max(1, steps // 10),
                              gmacs=srvit.forward_gmacs(raw_model), peak=peak_flops(env.device))
        ctx.checkpoint = lambda: {"model": raw_model.state_dict(), "config": asdict(raw_model.config),
                                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), **state,
                                  "metrics": (state["records"] or [None])[-1], "args": vars(args),
                                  "dataset": {"train_images": data.n_train, "classes": data.classes}}
        ctx.save_last = lambda: env.master and out.save(ctx.checkpoint(), out.last)
        if env.master:
            out.repair_metrics(state["epoch"], state["records"])
            out.append_metrics({"type": "run", "args": vars(args), "config": asdict(raw_model.config),
                                "params": srvit.count_params(raw_model), "gmacs": ctx.gmacs, "world_size": env.world,
                                "device": str(env.device), "start_epoch": state["epoch"], "start_step": state["step"]})
        describe(ctx, raw_model, state)
        with StopRequest() as ctx.stop:
            fit(model, eval_model, optimizer, scaler, state, ctx)
        env.log(f"done: best top-1 {state['best_top1']:.2f}, {fmt_time(state['elapsed'])} training time, checkpoints in {args.out_dir}")
        if env.ddp:
            del model                    # DDP's reducer holds gloo/NCCL work objects: free them first
            dist.barrier()               # no rank tears down while another still talks to it
            dist.destroy_process_group()
        raw_model.classes = data.classes
        return raw_model
    finally:
        if out:
            out.release()


def fit(model, eval_model, optimizer, scaler, state, ctx):
    """Epochs of train -> evaluate -> save, from where `state` says the run is."""
    args, env, out = ctx.args, ctx.env, ctx.out
    for epoch in range(state["epoch"], args.epochs):
        t0, elapsed0, start_step = time.time(), state["elapsed"], state["step"]
        ctx.clock = lambda: elapsed0 + time.time() - t0              # training time, this epoch's included
        stopped = train_one_epoch(model, ctx.data.train, optimizer, scaler, epoch, state, ctx)
        if stopped:
            raise stop_message(ctx, f"at epoch {epoch + 1}, step {state['step']}/{ctx.steps_per_epoch}")
        state["elapsed"] = ctx.clock()
        metrics = evaluate(eval_model, ctx.data.val, env.device, ctx.autocast)
        is_best = metrics["top1"] > state["best_top1"]
        state["best_top1"] = max(state["best_top1"], metrics["top1"])
        record = {"type": "epoch", "epoch": epoch + 1, "train_loss": state["loss_sum"] / ctx.steps_per_epoch, **metrics,
                  "best_top1": state["best_top1"], "lr": optimizer.param_groups[0]["lr"], "epoch_time": time.time() - t0,
                  "elapsed": state["elapsed"], "images_per_s": (ctx.steps_per_epoch - start_step) * args.batch_size / (time.time() - t0)}
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, records=state["records"] + [record])
        env.log(f"epoch {epoch + 1}/{args.epochs} | train loss {record['train_loss']:.4f} | val top-1 {metrics['top1']:.2f} "
                f"top-5 {metrics['top5']:.2f} loss {metrics['val_loss']:.4f} | best {state['best_top1']:.2f} | "
                f"{fmt_time(record['epoch_time'])}")
        if env.master:
            out.end_epoch(ctx.checkpoint(), is_best)
        if ctx.stop.requested(env) and epoch + 1 < args.epochs:
            raise stop_message(ctx, f"after epoch {epoch + 1}")


def stop_message(ctx, where):
    if ctx.env.ddp:
        dist.barrier()               # no rank exits (and gets torchrun's SIGKILL) while rank 0 still saves
    name = signal.Signals(ctx.stop.signum).name
    return Stopped(f"stopped by {name} {where}; saved {ctx.out.last}. Re-run the same command to resume",
                   130 if ctx.stop.signum == signal.SIGINT else 143)


def describe(ctx, model, state):
    args, env, c = ctx.args, ctx.env, model.config
    if state["epoch"] or state["step"]:
        steps = f" and {state['step']} steps" if state["step"] else ""
        env.log(f"resumed from {ctx.out.last if args.resume == 'auto' else args.resume}: {state['epoch']} epochs{steps} done, "
                f"best top-1 {state['best_top1']:.2f}")
    env.log(f"SR-ViT D={c.embed_dim} L={c.num_layers} heads={c.num_heads} patch={c.patch_size} R={c.depth} mixer={c.mixer} "
            f"share={c.share}: {srvit.count_params(model):,} params, {ctx.gmacs:.3g} GMACs/image | {ctx.data.n_train:,} train "
            f"images, {ctx.num_classes} classes, {'in memory' if use_memory(args) else 'PIL loader'} | batch {args.batch_size} = "
            f"{env.world} x {env.micro} x {env.accum} accum | {env.device} {args.amp} | {args.out_dir}")
    if state["epoch"] >= args.epochs:
        env.log(f"all {args.epochs} epochs are done already; nothing to train")


def fmt_time(s):
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def user_error_message(e):
    # An error raised in a data-loading worker arrives wrapped in the worker's traceback text,
    # ending in "UserError: <our message>"; the message is what the user needs.
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.split("UserError: ", 1)[-1]


def cli(main_fn, argv=None):
    """Run main_fn and turn the ways it can end into an exit code and at most one line per rank."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        main_fn(argv)
        return 0
    except UserError as e:
        if not e.shared or rank == 0:
            where = f" (rank {rank})" if world > 1 and not e.shared else ""
            print(f"error{where}: {user_error_message(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        if rank == 0:
            print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted; the last checkpoint is whole, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = cli(main)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # Under torchrun, leave without the interpreter's teardown: freeing the process group's
        # C++ threads there aborts now and then ("terminate called without an active exception",
        # 2 of 12 two-process runs here, even after barrier + destroy_process_group), which
        # turned finished runs into failures. Everything is saved and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
