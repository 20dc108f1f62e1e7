"""
Train SR-ViT: one process (CPU or one GPU), or DDP under torchrun. Only rank 0 logs and saves.

    torchrun --nproc_per_node=8 train.py --depth 4            # the paper's setting: SR-ViT-S, R=4, DeiT's
                                                               # ImageNet recipe, from ./data/imagenet
    torchrun --nproc_per_node=8 train.py --data-path /data/imagenet --depth 4
    python train.py --data cifar10 --depth 2                   # classroom run: CIFAR-10 (downloaded), 32 px
    python train.py --data-path ~/data/cifar10 --depth 4       # a folder: train/<class>/, test/<class>/
    python train.py --data-path /data/imagenet --depth 4 \\
        --micro-batch 64 --grad-ckpt --save-every 2000         # one 24 GB GPU, same global batch

The recipe follows the data (--recipe overrides): DeiT's at 224 px for ImageNet and folders of
larger images, a short one for CIFAR and folders of images of <= 64 px; `--help` lists both.
Re-running the same command resumes from <out-dir>/last.pt; SIGTERM or Ctrl-C saves mid-epoch.

The file reads top to bottom: recipes and arguments, data, MixUp/CutMix, model and optimizer,
the training step and epoch, evaluation, then `main` with the epoch loop. Below it, the
plumbing a first reading can skip: the out-dir (checkpoints, metrics, lock), resuming,
stopping on a signal, distributed set-up and the one-line errors.
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
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import srvit

try:
    import fcntl                      # the out-dir lock; POSIX only (elsewhere runs are not locked)
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------------------
# Recipes and arguments

# DeiT's ImageNet recipe, and a short one for images of <= 64 px (random crop with 4 px of reflect
# padding + flip, no MixUp/CutMix/RandAugment, a fan-in scaled init: a small model learns in a few
# epochs; results/cifar10-recipe measures each choice). An explicit flag always wins.
RECIPES = {
    "deit": dict(img_size=224, patch_size=16, epochs=300, batch_size=1024, warmup_epochs=5, min_lr=1e-5,
                 weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, randaug=9, erasing=0.25,
                 repeated_aug=3, hflip=0.5, crop_padding=0, pad_mode="zeros", init="timm", schedule="deit"),
    "small-images": dict(img_size=32, patch_size=4, epochs=30, batch_size=128, lr=1e-3, warmup_epochs=1, min_lr=1e-5,
                         weight_decay=0.05, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, randaug=0,
                         erasing=0.0, repeated_aug=1, hflip=0.5, crop_padding=4, pad_mode="reflect", init="torch",
                         schedule="cosine"),
}
# The model when no --model is given: DeiT-S for the DeiT recipe; for small images a classroom
# model (D=192, 6 blocks, 3 heads). The presets have 12 blocks.
DEFAULT_MODEL = {"deit": dict(srvit.PRESETS["small"], num_layers=12),
                 "small-images": dict(embed_dim=192, num_layers=6, num_heads=3)}
MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}
# Ranges the numbers must lie in, kept next to their flags below (check=...).
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
FRACTION, PROBABILITY = (lambda v: 0 <= v < 1, "in [0, 1)"), (lambda v: 0 <= v <= 1, "in [0, 1]")
CHECKS = {}
# What may differ between a run and its resume; every other argument must be the same.
MAY_CHANGE = {"workers", "device", "compile", "grad_ckpt", "micro_batch", "log_interval", "save_every", "resume",
              "out_dir", "data_path", "init_from"}


class UserError(Exception):
    """Bad input: printed as one line with what to do, exit code 2, no traceback. `shared`: every
    rank hits it alike, so rank 0 alone prints it; otherwise each failing rank says so."""

    def __init__(self, message, shared=False):
        super().__init__(message)
        self.shared = shared


class Stopped(Exception):
    """The run stopped early on a signal: one line, and the exit code. `shared` as for UserError."""

    def __init__(self, message, code, shared=True):
        super().__init__(message)
        self.code, self.shared = code, shared


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def a(name, check=None, **kw):
        key = name[2:].replace("-", "_")
        if key in RECIPES["deit"] or key == "lr":      # say what each recipe puts there
            d, s = RECIPES["deit"].get(key, "5e-4 x batch / 512"), RECIPES["small-images"].get(key)
            kw["help"] = f"{kw.get('help', '')} [deit: {d}; small-images: {s}]".lstrip()
        if check:
            CHECKS[key] = check
        p.add_argument(name, **kw)
    a("--data", default=None, choices=["imagenet", "cifar10", "cifar100", "folder", "fake"],
      help="default: folder when --data-path is given, else imagenet (from ./data/imagenet)")
    a("--data-path", default=None, help="folder with train/ and val/ (or test/), one folder per class inside")
    a("--recipe", default="auto", choices=["auto", *RECIPES], help="auto: deit for images > 64 px, else small-images")
    a("--subset", type=int, check=POSITIVE, help="use only this many training images (quick runs)")
    a("--val-subset", type=int, check=POSITIVE, help="use only this many validation images")
    a("--num-classes", type=int, check=POSITIVE, help="for --data fake (default 1000)")
    a("--loader", default="auto", choices=["auto", "memory", "pil", "device"],
      help="memory: small images decoded once, augmented on the device (auto for <= 64 px); pil: workers decode "
           "and augment (auto on CPUs); device: workers read files, the device decodes and augments (auto on GPUs)")
    a("--model", default=None, choices=list(srvit.PRESETS), help="a DeiT preset (12 blocks); other flags override it")
    a("--embed-dim", type=int, check=POSITIVE, help="[deit: 384 (DeiT-S); small-images: 192]")
    a("--num-layers", type=int, check=POSITIVE, help="[deit: 12; small-images: 6]")
    a("--num-heads", type=int, check=POSITIVE, help="[deit: 6; small-images: 3]")
    a("--img-size", type=int, check=POSITIVE, help="small-images from a folder: its images' size")
    a("--patch-size", type=int, check=POSITIVE)
    a("--depth", type=int, default=2, check=POSITIVE, help="recursion steps R")
    a("--mixer", default="soft", choices=srvit.MIXERS)
    a("--share", default="block", choices=srvit.SHARES)
    a("--router-init", default="uniform", choices=["uniform", "last"], help="fresh soft mixer: uniform, or 0.9 on the last step")
    a("--init", choices=srvit.INITS, help="weights: timm (DeiT's std 0.02) or torch (fan-in scaled)")
    a("--epochs", type=int, check=POSITIVE)
    a("--batch-size", type=int, check=POSITIVE, help="global batch, over all ranks and accumulation steps")
    a("--micro-batch", type=int, check=POSITIVE, help="per-device batch; accumulate gradients up to --batch-size")
    a("--lr", type=float, check=POSITIVE, help="peak lr")
    a("--min-lr", type=float, check=NON_NEGATIVE)
    a("--warmup-epochs", type=float, check=NON_NEGATIVE)
    a("--schedule", choices=["deit", "cosine"], help="deit: DeiT's per-epoch scheduler (one epoch late); cosine: "
                                                     "reaches --min-lr at the last step")
    a("--weight-decay", type=float, check=NON_NEGATIVE)
    a("--drop-path", type=float, check=FRACTION)
    a("--mixup", type=float, check=NON_NEGATIVE, help="MixUp alpha (0: off)")
    a("--cutmix", type=float, check=NON_NEGATIVE, help="CutMix alpha (0: off)")
    a("--smoothing", type=float, check=FRACTION)
    a("--clip-grad", type=float, check=POSITIVE, help="clip the gradient norm (DeiT: off)")
    a("--randaug", type=int, check=(lambda v: 0 <= v <= 10, "in 0..10 (timm's magnitude scale; DeiT uses 9)"),
      help="RandAugment magnitude 0..10, 2 ops (0: off)")
    a("--erasing", type=float, check=PROBABILITY, help="random erasing probability")
    a("--hflip", type=float, check=PROBABILITY, help="horizontal flip probability (0 for digits, text, signs)")
    a("--crop-padding", type=int, check=NON_NEGATIVE, help="small images: pixels of padding for the random crop (0: no crop)")
    a("--pad-mode", choices=["zeros", "reflect"], help="how --crop-padding pads")
    a("--repeated-aug", type=int, check=POSITIVE, help="DeiT's repeated augmentation: copies of each image")
    a("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on GPUs that have it, else fp16; none on CPU")
    a("--compile", action="store_true", help="torch.compile each block (compiles once, whatever the depth)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing of every block application and mixer")
    a("--init-from", default=None, help="DeiT/timm/SR-ViT checkpoint to warm-start the blocks from")
    a("--out-dir", default=None, help="default runs/<data>-<model>-R<depth>-<mixer>-<share>-s<seed>")
    a("--resume", default="auto", help="checkpoint to resume from; 'auto': <out-dir>/last.pt if it exists; 'no'")
    a("--save-every", type=int, check=POSITIVE, help="also save last.pt every N optimizer steps (long epochs)")
    a("--seed", type=int, default=0)
    a("--workers", type=int, check=NON_NEGATIVE, help="data-loading processes per rank (default: this node's cores / its ranks, <= 8)")
    a("--log-interval", type=int, check=POSITIVE, help="steps between progress lines (default: 10 per epoch)")
    a("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)

    args.data = args.data or ("folder" if args.data_path else "imagenet")
    args.recipe = choose_recipe(args)
    own_size = args.img_size is None and args.recipe == "small-images" and args.data in ("folder", "imagenet")
    if own_size:                                             # the folder's own size (at most 64 px): no resizing
        args.img_size = min(*image_size(train_dir(args)), 64)
    for key, value in {**RECIPES[args.recipe], **model_dims(args)}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if own_size:                                             # ...rounded down to a multiple of the patch
        args.img_size = max(args.patch_size, args.img_size // args.patch_size * args.patch_size)
    if args.lr is None:           # (not `or`: --lr 0 must reach the check below, not become the default)
        args.lr = 5e-4 * args.batch_size / 512
    check_args(args)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", f"{args.data}-{model_name(args)}-R{args.depth}-{args.mixer}-{args.share}-s{args.seed}")
    return args


def choose_recipe(args):
    """--recipe, else --img-size (<= 64 px: small-images), else the data: CIFAR is small, ImageNet
    and fake data are not, and a folder tells by the size of its first training image."""
    if args.recipe != "auto":
        return args.recipe
    if args.img_size is not None:
        return "small-images" if args.img_size <= 64 else "deit"
    if args.data in ("cifar10", "cifar100"):
        return "small-images"
    if args.data in ("fake", "imagenet"):
        return "deit"
    return "small-images" if max(image_size(train_dir(args))) <= 64 else "deit"


def train_dir(args):
    root = args.data_path or os.path.join("data", "imagenet")
    if not os.path.isdir(os.path.join(root, "train")):
        hint = "pass --data-path with the ImageNet folder, or --data cifar10 for a small run" if not args.data_path else \
               "expected train/ and val/ (or test/) inside, one folder per class"
        raise UserError(f"no training images: {os.path.join(root, 'train')} not found; {hint}", shared=True)
    return os.path.join(root, "train")


def image_size(folder):
    """(width, height) of the first image in a class-per-folder tree."""
    from PIL import Image
    for cls in sorted(os.listdir(folder)):
        for name in sorted(os.listdir(os.path.join(folder, cls)) if os.path.isdir(os.path.join(folder, cls)) else []):
            try:
                with Image.open(os.path.join(folder, cls, name)) as im:
                    return im.size
            except OSError:
                continue
    raise UserError(f"no images in {folder}: expected {folder}/<class>/<image>.jpg", shared=True)


def model_dims(args):
    """Width, blocks and heads of --model's preset, or of the recipe's default model."""
    return DEFAULT_MODEL[args.recipe] if args.model is None else dict(srvit.PRESETS[args.model], num_layers=12)


def model_name(args):
    """What was built: the preset's name when the model is one, else its width, blocks and heads."""
    dims = {k: getattr(args, k) for k in ("embed_dim", "num_layers", "num_heads")}
    preset = next((name for name, p in srvit.PRESETS.items() if dict(p, num_layers=12) == dims), None)
    return preset or f"D{args.embed_dim}-L{args.num_layers}-H{args.num_heads}"


def check_args(args):
    for name, (ok, rule) in CHECKS.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}", shared=True)
    if args.loader == "memory" and (args.img_size > 64 or args.randaug or args.erasing):
        raise UserError("--loader memory is for images of <= 64 px with crop and flip only; drop --randaug/--erasing "
                        "or use --loader pil", shared=True)
    if args.loader == "device" and (args.img_size <= 64 or args.data not in ("folder", "imagenet")):
        raise UserError("--loader device is DeiT's recipe from image files (> 64 px, --data folder or imagenet); "
                        "use --loader memory for small images, pil for --data fake", shared=True)


# ----------------------------------------------------------------------------------------
# Data: datasets, the seeded sampler, the PIL path (ImageNet) and the in-memory path (small images)

def unreadable(path, e):
    """The one-line error for an image file that does not decode (every loader path says the same)."""
    return UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file")


def numpy_rgb(data, path):
    """Encoded bytes, (n,) uint8, as PIL decodes them for the PIL path: (H, W, 3) uint8 RGB."""
    import io
    import numpy as np
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return np.array(im.convert("RGB"))
    except Exception as e:
        raise unreadable(path, e) from None


def read_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise unreadable(path, e) from None


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
        mode = "constant" if args.pad_mode == "zeros" else args.pad_mode
        crop = [v2.RandomCrop(args.img_size, padding=args.crop_padding, padding_mode=mode)] if args.crop_padding else []
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
    op = v2.RandAugment(num_ops=1, magnitude=magnitude, num_magnitude_bins=11,
                        interpolation=v2.InterpolationMode.BICUBIC, fill=[round(255 * m) for m in mean])
    return v2.RandomApply([op], p=0.5)


def build_dataset(args, split, transform, loader=None):
    """The 'train' or 'val' split named by --data / --data-path, and its class names."""
    import torchvision.datasets as tvd
    train = split == "train"
    if args.data == "fake":
        n_cls = args.num_classes or 1000
        size = (args.subset or 10_000) if train else (args.val_subset or 1_000)
        data = tvd.FakeData(size, (3, args.img_size, args.img_size), n_cls, transform, random_offset=0 if train else 10**7)
        return data, [f"class {i}" for i in range(n_cls)]
    if args.data_path and not os.path.isdir(args.data_path):     # a typo: say so, create nothing
        raise UserError(f"--data-path {args.data_path} does not exist; point it at a folder with train/ and val/ (or test/)")
    root = args.data_path or "data"
    if args.data in ("cifar10", "cifar100") and not os.path.isdir(os.path.join(root, "train")):
        try:
            data = (tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100)(root, train, transform, download=True)
        except Exception as e:
            raise UserError(f"could not find or download {args.data} into {root} ({type(e).__name__}). Offline? "
                            f"Point --data-path at a folder with train/<class>/ and test/<class>/ images") from None
    else:
        root = os.path.dirname(train_dir(args))
        split_dir = next((os.path.join(root, d) for d in (["train"] if train else ["val", "test"])
                          if os.path.isdir(os.path.join(root, d))), None)
        if split_dir is None:
            raise UserError(f"{root} has train/ but no val/ or test/ folder for validation")
        from torchvision.datasets import ImageFolder
        try:
            data = ImageFolder(split_dir, transform=transform, loader=loader or read_image)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"no images in {split_dir}: {e}. Expected {split_dir}/<class>/<image>.jpg") from None
    classes, keep = list(data.classes), args.subset if train else args.val_subset
    if keep:   # the same subset on every rank and in every run
        g = torch.Generator().manual_seed(1234 if train else 4321)
        data = torch.utils.data.Subset(data, torch.randperm(len(data), generator=g)[:keep].tolist())
    return data, classes


def seed_for(*keys):
    """A 63-bit seed for one random stream, e.g. seed_for("aug", seed, epoch, rank, batch).
    Hashing the whole key keeps streams apart: an arithmetic mix such as seed*10000 + epoch*100
    + rank makes seed s at epoch 100 replay seed s+1 at epoch 0."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def seed_device(seed, device):
    """Seed the CPU generator and this device's, only: torch.manual_seed seeds every visible GPU
    (and other accelerators, through a slow lazy path), per step and per sample."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


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
            torch.default_generator.manual_seed(seed)
            return self.data[index]


class MemoryLoader:
    """The fast path for small images (CIFAR, folders of <= 64 px): the whole split decoded once
    into a uint8 tensor on the training device, (N, 3, S, S), and augmented there a batch at a
    time: pad-and-crop and flip, the small-image recipe's augmentation. Against the PIL path this
    removes JPEG decoding and per-image transforms from every epoch. Batch b of an epoch is a
    function of (seed, epoch, rank, b), so a resumed run draws the same batches."""

    def __init__(self, images, labels, batch_size, mean, std, device, sampler=None, train=False,
                 crop_padding=0, hflip=0.0, seed=0, pad_mode="zeros"):
        self.images, self.labels = images.to(device), labels.to(device)        # (N, 3, S, S) uint8, (N,)
        self.batch_size, self.sampler, self.train, self.device = batch_size, sampler, train, device
        self.pad, self.hflip, self.seed, self.pad_mode = crop_padding, hflip, seed, pad_mode
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
                x = pad_crop_flip(x, self.pad, self.hflip, g, self.pad_mode)
            yield (x.float() - self.mean) / self.std, self.labels[idx]           # (B, 3, S, S) float


def pad_crop_flip(x, pad, hflip, g, mode="zeros"):
    """torchvision's RandomCrop(S, padding=pad, padding_mode=mode) and RandomHorizontalFlip(hflip),
    for a whole batch (B, C, S, S) at once: every image gets its own offset and its own coin."""
    B, C, S, _ = x.shape
    if pad:
        if mode == "reflect":   # as F.pad's reflect (the edge pixel is not repeated), for any dtype
            i = (S - 1) - ((S - 1) - torch.arange(-pad, S + pad, device=x.device).abs()).abs()   # (S+2p,)
            x = x[:, :, i][:, :, :, i]                                          # (B, C, S+2p, S+2p)
        else:
            x = F.pad(x, (pad, pad, pad, pad))                                  # (B, C, S+2p, S+2p), zeros
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


# The device path (DeiT's recipe on GPUs): loader workers only read each file and draw its
# sample's augmentation; decoding (nvJPEG on a GPU) and every augmentation run on whole uint8
# batches on the training device. The draws are the PIL path's own: the same torchvision
# transforms, the same calls on the same per-sample seed, so both paths sample the same crops,
# flips, ops and erasing boxes, and a resumed run repeats them.

def read_encoded(path):
    """ImageFolder's loader for the device path: the file's bytes, (n,) uint8, and its path."""
    from torchvision.io import read_file
    return read_file(path), path


class DeviceAugment:
    """DeiT's training augmentation of the PIL path (`transforms(args, train=True)`), in two parts:
    draw(seed, height, width) in a loader worker, and __call__ on the device for a whole batch.
    It holds torchvision transforms and plain numbers only, so it pickles to spawned workers."""

    def __init__(self, args, device):
        from torchvision.transforms import v2
        self.size, self.device = args.img_size, device
        self.steps = transforms(args, train=True).transforms     # the PIL path's transforms, in order
        self.randaug = [t.transforms[0] for t in self.steps if isinstance(t, v2.RandomApply)]   # 2 ops, or none
        self.erasing = isinstance(self.steps[-1], v2.RandomErasing)
        self.mean, self.std = MEAN_STD["imagenet"]
        self.device_mean_std = None                                # made on the device at the first batch

    def to_device(self, t):
        """A CPU tensor on the device without waiting for the GPU's queue (a pageable copy would)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def draw(self, seed, height, width):
        """The draws the PIL path makes for this sample: [crop box, flip, op 1, op 2, erasing], each
        op (name, magnitude) or None (not drawn, or RandAugment off), erasing (i, j, h, w, noise) or
        None. The calls and their order are those of torchvision's Compose: same seed, same numbers."""
        from torchvision.transforms import v2
        draws = []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for t in self.steps:
                if isinstance(t, v2.RandomResizedCrop):      # stand-ins with the image's shape, no memory
                    box = t.make_params([torch.empty(3, 1, 1, dtype=torch.uint8).expand(3, height, width)])
                    draws.append((box["top"], box["left"], box["height"], box["width"]))
                elif isinstance(t, v2.RandomHorizontalFlip):  # (torchvision skips a transform on rand >= p)
                    draws.append(not torch.rand(1) >= t.p)
                elif isinstance(t, v2.RandomApply):          # RandAugment, one op with probability 0.5
                    draws.append(None if torch.rand(1) >= t.p else self.draw_op(t.transforms[0]))
                elif isinstance(t, v2.RandomErasing):
                    e = None if torch.rand(1) >= t.p else t.make_params([torch.empty(3, 1, 1).expand(3, self.size, self.size)])
                    draws.append(None if e is None or e["v"] is None else (e["i"], e["j"], e["h"], e["w"], e["v"]))
        if not self.randaug:
            draws[2:2] = [None, None]
        return draws if self.erasing else draws + [None]

    def draw_op(self, ra):
        """One op as v2.RandAugment.forward draws it, for an image of the crop's size."""
        name, (magnitudes_of, signed) = ra._get_random_item(ra._AUGMENTATION_SPACE)
        magnitudes = magnitudes_of(ra.num_magnitude_bins, self.size, self.size)
        if magnitudes is None:
            return name, 0.0
        magnitude = float(magnitudes[ra.magnitude])
        return name, -magnitude if signed and torch.rand(()) <= 0.5 else magnitude

    def decode(self, files, paths):
        """(3, H, W) uint8 images on the device: batched nvJPEG on a GPU, libjpeg/libpng on a CPU;
        greyscale and CMYK files become RGB, as PIL's convert("RGB") makes them."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        if self.device.type == "cuda" and all(f[:2].tolist() == [0xFF, 0xD8] for f in files):
            try:
                return decode_jpeg(list(files), mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:          # a JPEG nvJPEG does not take (e.g. CMYK): this batch on the CPU
                pass
        images = []
        for f, path in zip(files, paths):
            try:
                image = decode_image(f, mode=ImageReadMode.RGB)
            except RuntimeError:          # BMP, TIFF, PPM...: ImageFolder lists them, PIL reads them
                image = None
            if image is None or image.dtype != torch.uint8:           # (16-bit PNGs decode to uint16)
                image = torch.from_numpy(numpy_rgb(f, path)).permute(2, 0, 1)
            images.append(self.to_device(image))
        return images

    def __call__(self, images, draws):
        """images: B decoded (3, H, W) uint8; draws: B lists from draw(). Returns (B, 3, S, S) float."""
        from torchvision.transforms import v2
        S, dev = self.size, self.device
        x = torch.stack([v2.functional.resized_crop(im, *d[0], [S, S], interpolation=v2.InterpolationMode.BICUBIC,
                                                    antialias=True) for im, d in zip(images, draws)])   # (B, 3, S, S) uint8
        flip = self.to_device(torch.tensor([bool(d[1]) for d in draws]))
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for k, ra in enumerate(self.randaug, start=2):
            groups = {}                                   # torchvision's ops take one draw per call:
            for b, d in enumerate(draws):                 # apply each op to the samples that drew it
                if d[k] is not None:
                    groups.setdefault(tuple(d[k]), []).append(b)
            if not groups:
                continue
            members = self.to_device(torch.tensor([b for idx in groups.values() for b in idx]))   # one copy
            for ((name, magnitude), idx) in zip(groups, members.split([len(i) for i in groups.values()])):
                x[idx] = ra._apply_image_or_video_transform(x[idx], name, magnitude, fill=ra._fill,
                                                            interpolation=v2.InterpolationMode.BILINEAR)
        if self.device_mean_std is None:                  # (tensors rotate/shear bilinearly; PIL: bicubic)
            self.device_mean_std = [self.to_device(torch.tensor(v).view(1, 3, 1, 1)) for v in (self.mean, self.std)]
        mean, std = self.device_mean_std
        x = (x.float() / 255 - mean) / std                                    # (B, 3, S, S) float
        for b, d in enumerate(draws):
            if d[4] is not None:
                i, j, h, w, noise = d[4]                                      # noise: (3, h, w)
                x[b, :, i:i + h, j:j + w] = noise.to(dev)
        return x


class SeededDraws(torch.utils.data.Dataset):
    """The device path's worker side: item (index, seed) is (file bytes, label, draws, path)."""

    def __init__(self, data, augment):
        self.data, self.augment = data, augment

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        import io
        from PIL import Image
        index, seed = key
        (data, path), label = self.data[index]
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:   # reads the header only
                width, height = im.size
        except Exception as e:
            raise unreadable(path, e) from None
        return data, label, self.augment.draw(seed, height, width), path


def collate_files(batch):
    """Collate for the device path. Files and erasing noise differ in size, so each travels as one
    flat tensor (one shared-memory segment per batch, not one per file) with the sizes to split it."""
    files, labels, draws, paths = zip(*batch)
    noise = [d[4][4].flatten() for d in draws if d[4] is not None]                    # (3 h w,) each
    draws = [[*d[:4], d[4] and d[4][:4]] for d in draws]
    return (torch.cat(files), [len(f) for f in files], torch.tensor(labels), draws,
            torch.cat(noise) if noise else torch.zeros(0), list(paths))


class DeviceLoader:
    """The device path's training loader: workers yield files and draws, the device decodes and augments."""

    def __init__(self, loader, augment):
        self.loader, self.augment = loader, augment
        self.sampler, self.batch_size = loader.sampler, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self):
        for batch in self.loader:
            yield self.on_device(batch)

    def on_device(self, batch):
        """A batch of collate_files, decoded and augmented: (B, 3, S, S) float and (B,) labels."""
        aug, (files, sizes, labels, draws, noise, paths) = self.augment, batch
        noise, offset = aug.to_device(noise), 0            # (n,) all erasing boxes' noise, one copy
        for d in draws:                                    # each box's (3, h, w) view of it
            if d[4] is not None:
                i, j, h, w = d[4]
                d[4], offset = (i, j, h, w, noise[offset:offset + 3 * h * w].view(3, h, w)), offset + 3 * h * w
        return aug(aug.decode(torch.split(files, sizes), paths), draws), aug.to_device(labels)


def ignore_signals(worker_id):
    # Ctrl-C reaches every process of the terminal's group, and Slurm's SIGTERM every process of
    # the job: both are for the main process, which stops where all ranks agree and then ends its
    # workers itself. (A worker whose main process is gone notices and exits within seconds.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def use_memory(args):
    return args.loader == "memory" or (args.loader == "auto" and args.img_size <= 64 and not args.randaug and not args.erasing)


def use_device(args, device):
    """--loader device, or auto on a GPU for the DeiT recipe from image files (not --data fake)."""
    return args.loader == "device" or (args.loader == "auto" and device.type == "cuda" and args.img_size > 64
                                       and args.data in ("folder", "imagenet"))


def loader_name(args, device):
    return "in memory" if use_memory(args) else "device loader" if use_device(args, device) else "PIL loader"


def default_workers(env):
    """This node's cores (those this process may run on) shared by this node's ranks, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", env.world))))


def build_loaders(args, env):
    """This rank's training and validation loaders, the class names and the number of training images. Validation is
    split over ranks (each image counted once); training follows the seeded sampler."""
    from torchvision.transforms import v2
    memory, on_device = use_memory(args), use_device(args, env.device)
    decode = v2.Compose([v2.Resize(args.img_size), v2.CenterCrop(args.img_size), v2.PILToTensor()])
    train_set, classes = (build_dataset(args, "train", None, loader=read_encoded) if on_device else
                          build_dataset(args, "train", decode if memory else transforms(args, train=True)))
    val_set, val_classes = build_dataset(args, "val", decode if memory else transforms(args, train=False))
    if classes != val_classes:
        raise UserError(f"train and validation splits in {args.data_path} have different classes "
                        f"({len(classes)} and {len(val_classes)})")
    if len(train_set) < args.batch_size:
        raise UserError(f"only {len(train_set)} training images for a batch of {args.batch_size}; lower --batch-size")
    val_set = torch.utils.data.Subset(val_set, range(env.rank, len(val_set), env.world))
    sampler = RepeatedAugSampler(len(train_set), env.rank, env.world, args.repeated_aug, args.seed)
    workers = args.workers if args.workers is not None else default_workers(env)
    eval_batch = max(env.micro, 256 if memory else 64)
    if memory:
        t0, (mean, std) = time.time(), MEAN_STD["cifar"]
        train = MemoryLoader(*decode_all(train_set, workers), env.micro, mean, std, env.device, sampler, train=True,
                             crop_padding=args.crop_padding, hflip=args.hflip, seed=args.seed, pad_mode=args.pad_mode)
        val = MemoryLoader(*decode_all(val_set, workers), eval_batch, mean, std, env.device)
        env.log(f"decoded {len(train_set):,} + {len(val_set):,} images into memory on {env.device} in {time.time() - t0:.0f} s")
        return train, val, classes, len(train_set)
    kw = dict(num_workers=workers, pin_memory=env.device.type == "cuda", persistent_workers=workers > 0)
    val = torch.utils.data.DataLoader(val_set, eval_batch, worker_init_fn=ignore_signals, **kw)
    if on_device:
        augment = DeviceAugment(args, env.device)
        train = torch.utils.data.DataLoader(SeededDraws(train_set, augment), env.micro, sampler=sampler, drop_last=True,
                                            collate_fn=collate_files, worker_init_fn=ignore_signals,
                                            **dict(kw, pin_memory=False))   # (DeviceLoader pins what it copies)
        return DeviceLoader(train, augment), val, classes, len(train_set)
    train = PILLoader(SeededAugment(train_set), env.micro, sampler=sampler, drop_last=True, worker_init_fn=ignore_signals, **kw)
    return train, val, classes, len(train_set)


def decode_all(dataset, workers):
    """Every image of a (resize + crop + PILToTensor) dataset: (N, 3, S, S) uint8 and (N,) labels."""
    xs, ys = zip(*torch.utils.data.DataLoader(dataset, 500, num_workers=workers))
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
# Model, optimizer, schedule

def build_model(args, num_classes):
    torch.manual_seed(args.seed)         # identical initial weights on every rank
    try:
        return srvit.SRViT(srvit.SRViTConfig(
            img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes, embed_dim=args.embed_dim,
            num_layers=args.num_layers, num_heads=args.num_heads, depth=args.depth, mixer=args.mixer, share=args.share,
            router_init=args.router_init, init=args.init, drop_path_rate=args.drop_path, grad_checkpointing=args.grad_ckpt))
    except ValueError as e:
        raise UserError(f"cannot build the model: {e}", shared=True) from None


def param_groups(model, weight_decay):
    """timm's rule, as DeiT uses it: no weight decay on biases and norms (every tensor of <= 1
    dimension), nor on the class token, position embedding and step biases."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if prm.ndim <= 1 or name in skip else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, steps_per_epoch, args):
    """Linear warm-up from 1e-6 over --warmup-epochs, then a cosine down to min_lr, per optimizer step.
    --schedule deit is DeiT's: timm counts the warm-up epochs in the cosine, and DeiT's loop steps
    the scheduler after each epoch, so its epoch e runs at the scheduler's value for e - 1 (within
    2% of DeiT's numbers at every epoch's first step after warm-up; tested). Over 300 epochs that
    is harmless; over 5 it leaves the last epoch at 10x the floor, so --schedule cosine (the small
    images' recipe) runs the cosine over the epochs after warm-up and ends at min_lr."""
    epoch = step / steps_per_epoch                         # fractional epoch
    if epoch < args.warmup_epochs:
        return 1e-6 + (args.lr - 1e-6) * epoch / args.warmup_epochs
    if args.schedule == "deit":
        t = max(epoch - 1, 0) / args.epochs
    else:
        t = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-9)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))


def amp_context(device, amp):
    """Autocast to the --amp dtype, or nothing for full precision."""
    return nullcontext() if amp in (None, "none") else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def compile_blocks(model, backend="inductor"):
    """torch.compile each block's attention and MLP, not the whole model: the whole model unrolls
    L x R block applications into one graph (minutes to compile at R=2 on a CPU) and recompiles
    for each drop-path rate, a Python float per application. The sub-modules take tensors only,
    and modules of one shape share one compiled graph, so R=4 compiles in about the time of R=1."""
    for block in model.blocks:
        block.attn.compile(backend=backend)
        block.mlp.compile(backend=backend)


# ----------------------------------------------------------------------------------------
# Training: the progress of a run, one optimizer step, one epoch

@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, and what a resume starts from."""
    epoch: int = 0           # epochs finished
    step: int = 0            # optimizer steps finished in the current epoch
    loss_sum: float = 0.0    # sum of the current epoch's step losses (mean over ranks when saved)
    best_top1: float = 0.0
    elapsed: float = 0.0     # training seconds, evaluation excluded
    records: list = field(default_factory=list)   # one row per finished epoch, as in metrics.jsonl


@dataclass
class Run:
    """What the loop needs: fixed for the run, except `progress`."""
    args: argparse.Namespace
    env: "Env"
    model: torch.nn.Module                 # what trains: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: object
    steps_per_epoch: int
    num_classes: int
    raw_model: torch.nn.Module = None      # the bare SRViT: what is evaluated and saved
    val_loader: object = None
    classes: list = None
    n_train: int = 0
    out: "OutDir" = None
    progress: Progress = field(default_factory=Progress)
    stop: "StopRequest" = None
    log_interval: int = 100
    gmacs: float = 0.0
    peak: float = None
    t_epoch: float = 0.0                   # when this epoch started (for the training clock)
    data_wait: float = 0.0                 # seconds spent waiting for batches (the loader's share)
    loader_told: bool = False              # the loader-bound line is printed once
    epoch_start: int = 0                   # the step this epoch's loop started from (0, or a resume's)

    def __post_init__(self):
        self.raw_model = self.raw_model or self.model
        self.autocast = amp_context(self.env.device, self.args.amp)
        self.mixing = self.args.mixup > 0 or self.args.cutmix > 0
        self.stop = self.stop or StopRequest()
        self.elapsed0 = self.progress.elapsed

    def clock(self):
        """Training seconds so far, this epoch's included."""
        return self.elapsed0 + time.time() - self.t_epoch


class LoaderGone(Exception):
    """A loader worker died while a signal was asking the run to stop (workers ignore SIGTERM and
    SIGINT, so something else killed it: the OOM killer, a SIGKILL)."""


def train_step(run, batches, gstep):
    """One optimizer step over env.accum micro-batches; returns the step's loss, a device scalar,
    and the first non-finite step as bad (or -1)."""
    args, env = run.args, run.env
    step_loss, bad = torch.zeros((), device=env.device), torch.full((), -1, device=env.device, dtype=torch.long)
    for micro_step in range(env.accum):
        t_wait = time.perf_counter()
        try:
            x, y = next(batches)
            run.data_wait += time.perf_counter() - t_wait
        except Exception:
            if not run.stop.signum:
                raise
            raise LoaderGone() from None
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)   # (B, 3, S, S), (B,)
        if run.mixing:
            x, y = mix_batch(x, y, args, run.num_classes)               # y: (B, classes) soft targets
        # DDP averages gradients over ranks on backward; skip that on all but the last micro-step
        sync = micro_step == env.accum - 1 or not env.ddp
        with (nullcontext() if sync else run.model.no_sync()), run.autocast:
            loss = F.cross_entropy(run.model(x), y, label_smoothing=args.smoothing)
        run.scaler.scale(loss / env.accum).backward()    # scale the loss to account for gradient accumulation
        loss = loss.detach()
        bad = torch.where((bad < 0) & ~torch.isfinite(loss), gstep + 1, bad)
        step_loss += loss / env.accum
    if args.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, bad


def train_one_epoch(run, epoch):
    """Train epoch `epoch` from optimizer step run.progress.step on (0, or where a stopped run
    saved). Returns True if a signal asked to stop before the epoch's end."""
    args, env, prog = run.args, run.env, run.progress
    run.model.train()
    run.train_loader.set_epoch(epoch, start_batch=prog.step * env.accum)
    batches = iter(run.train_loader)
    loss_sum = torch.tensor(prog.loss_sum, device=env.device)       # sum of this epoch's step losses
    bad_step = torch.full((), -1, device=env.device, dtype=torch.long)
    log_from, run.epoch_start = (time.time(), prog.step, prog.loss_sum, run.data_wait), prog.step
    for step in range(prog.step, run.steps_per_epoch):
        # Every random draw of this step (MixUp, drop path) follows from (seed, epoch, rank,
        # step), and every augmentation from its sample's position: a run resumed at any step
        # repeats the uninterrupted run.
        seed_device(seed_for("step", args.seed, epoch, env.rank, step), env.device)
        gstep = epoch * run.steps_per_epoch + step
        for g in run.optimizer.param_groups:
            g["lr"] = lr_at(gstep, run.steps_per_epoch, args)
        try:
            step_loss, bad = train_step(run, batches, gstep)
        except LoaderGone:                 # this step cannot finish: save the one before it
            if env.ddp:                    # ...unless other ranks are past it: they cannot agree on a step
                raise Stopped(f"stopped by {signal.Signals(run.stop.signum).name}; a loader worker of this rank died "
                              f"with it, before the ranks agreed where to stop: nothing saved, the last checkpoint "
                              f"is kept. Re-run the same command to resume", 143, shared=False) from None
            run.optimizer.zero_grad(set_to_none=True)
            prog.loss_sum, prog.elapsed = loss_sum.item(), run.clock()
            save_last(run)
            return True
        loss_sum += step_loss
        bad_step = torch.where(bad_step < 0, bad, bad_step)
        prog.step = step + 1
        if prog.step % run.log_interval == 0 or prog.step == run.steps_per_epoch:
            check_finite(bad_step, epoch, run)
            log_from = log_progress(run, epoch, loss_sum.item(), log_from)
        stop = run.stop.requested(env, prog.step)
        if stop or (args.save_every and (gstep + 1) % args.save_every == 0 and prog.step < run.steps_per_epoch):
            check_finite(bad_step, epoch, run)                           # never save a NaN model
            prog.loss_sum, prog.elapsed = mean_over_ranks(loss_sum.clone(), env).item(), run.clock()
            save_last(run)
            if stop:
                return True
    prog.loss_sum = mean_over_ranks(loss_sum, env).item()          # the epoch's loss, averaged over ranks
    return False


def mean_over_ranks(t, env):
    if env.ddp:
        dist.all_reduce(t)
        t /= env.world
    return t


def check_finite(bad_step, epoch, run):
    if run.env.ddp:
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    if bad_step.item() >= 0:                            # checked before anything is saved
        kept = (f"the last good checkpoint is kept in {run.out.last}" if run.out and os.path.exists(run.out.last)
                else "no checkpoint had been written yet")
        raise UserError(f"loss became NaN or infinite at step {bad_step.item()} (epoch {epoch + 1}); stopped, {kept}. "
                        f"Try a lower --lr, or --amp bf16/none", shared=True)


def log_progress(run, epoch, loss_sum, log_from):
    """One progress line: loss since the last line, lr, speed, MFU on known GPUs, eta."""
    args, env, step = run.args, run.env, run.progress.step
    t_log, steps_done, loss_done, wait_done = log_from
    ips = (step - steps_done) * args.batch_size / max(time.time() - t_log, 1e-9)
    waited = (run.data_wait - wait_done) / max(time.time() - t_log, 1e-9)     # share of the time spent on data
    # (not on an epoch's first line: it includes the loader workers' start)
    if waited > 0.25 and not run.loader_told and steps_done != run.epoch_start:
        run.loader_told = True
        pil = not use_memory(args) and not use_device(args, env.device)
        hint = ("--loader device moves decoding and augmentation to the GPU" if env.device.type == "cuda" and pil and
                args.data != "fake" else "more --workers would help, if this node has the cores")
        env.log(f"the loader bounds this run: {waited:.0%} of the time went to waiting for batches; the model alone "
                f"would take about {ips / (1 - min(waited, 0.99)):,.0f} img/s against the {ips:,.0f} it gets ({hint})")
    left = (args.epochs - epoch) * run.steps_per_epoch - step
    util = f" | MFU {mfu(run.gmacs, ips / env.world, run.peak):.1%}" if run.peak else ""
    env.log(f"epoch {epoch + 1}/{args.epochs} | step {step}/{run.steps_per_epoch} | "
            f"loss {(loss_sum - loss_done) / max(step - steps_done, 1):.4f} | lr {run.optimizer.param_groups[0]['lr']:.2e} | "
            f"{ips:,.0f} img/s{util} | eta {fmt_time(left * args.batch_size / max(ips, 1e-9))} (+ evaluation)")
    return time.time(), step, loss_sum, run.data_wait


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against the device
# name, most specific first: an "H100 PCIe" is not an H100 SXM. The one MFU denominator, whatever --amp is.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("RTX 4090", 165e12), ("L4", 121e12)]


def peak_flops(device):
    """Datasheet dense bf16 peak of this GPU, in FLOP/s; None where unknown (CPU, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16 if key in name), None) if name else None


def mfu(gmacs, images_per_s, peak_flops):
    """Model FLOPs utilisation: training costs ~3 forward passes (forward + backward), 2 FLOPs per MAC."""
    return 3 * 2 * gmacs * 1e9 * images_per_s / peak_flops


# ----------------------------------------------------------------------------------------
# Evaluation: top-1, top-5 and loss (shared with eval.py)

def batch_metrics(logits, y):
    """(correct@1, correct@5, summed loss, count) of one batch, float64: (B, classes), (B,) -> (4,)."""
    logits = logits.float()
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices         # (B, 5)
    return torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                        F.cross_entropy(logits, y, reduction="sum"), torch.tensor(len(y), device=y.device)]).double()


def summarize_metrics(sums):
    c1, c5, loss, n = sums.tolist()
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "val_loss": loss / max(n, 1), "val_images": int(n)}


@torch.no_grad()
def evaluate(model, loader, device, autocast, steps=None, log=None):
    """Top-1, top-5 and loss over the whole split, each sample counted once over all ranks. With
    `log`, a progress line every 10 s: a CPU takes minutes over 10,000 images."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # correct@1, correct@5, loss, count
    t0 = t_log = time.time()
    for b, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            sums += batch_metrics(model(x, steps=steps), y)
        if log and time.time() - t_log > 10 and b < len(loader):
            t_log, rate = time.time(), b / (time.time() - t0)
            log(f"evaluating: batch {b}/{len(loader)} | eta {fmt_time((len(loader) - b) / rate)}")
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return summarize_metrics(sums)


# ----------------------------------------------------------------------------------------
# main: set up, then epochs of train -> evaluate -> save

def main(argv=None):
    args = get_args(argv)
    env = init_distributed(args)
    run = None
    try:
        if env.ddp and args.data.startswith("cifar"):    # one download, not one per rank into the same folder
            on_all_ranks(env, lambda: env.master and build_dataset(args, "train", None))
        run = on_all_ranks(env, setup, args, env)
        agree_on_progress(run)
        start_metrics(run)
        describe(run)
        prog = run.progress
        with run.stop:
            for epoch in range(prog.epoch, args.epochs):
                run.t_epoch, run.elapsed0, start_step = time.time(), prog.elapsed, prog.step
                if train_one_epoch(run, epoch):
                    raise stop_message(run, f"at epoch {epoch + 1}, step {prog.step}/{run.steps_per_epoch}")
                prog.elapsed = run.clock()
                metrics = evaluate(run.raw_model, run.val_loader, env.device, run.autocast, log=env.log)
                end_epoch(run, epoch, metrics, start_step)
                if run.stop.requested(env) and epoch + 1 < args.epochs:
                    raise stop_message(run, f"after epoch {epoch + 1}")
        env.log(f"done: best top-1 {prog.best_top1:.2f}, {fmt_time(prog.elapsed)} training time, checkpoints in {args.out_dir}")
        if env.ddp:
            run.model = None             # DDP's reducer holds gloo/NCCL work objects: free them first
            dist.barrier()               # no rank tears down while another still talks to it
            dist.destroy_process_group()
        run.raw_model.classes = run.classes
        return run.raw_model
    finally:
        if run and run.out:
            run.out.release()


def setup(args, env):
    """Data, model, optimizer, out-dir and the progress to start from, on this rank."""
    train_loader, val_loader, classes, n_train = build_loaders(args, env)
    steps = len(train_loader) // env.accum
    if steps == 0:
        raise UserError(f"an epoch has fewer than one step of {args.batch_size} images; lower --batch-size", shared=True)
    model = build_model(args, len(classes)).to(env.device)    # on the device first: the optimizer state follows it
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp == "fp16")
    out = OutDir(args.out_dir, env.master).open()
    try:
        progress = restore(args, out, model, optimizer, scaler, n_train)
        if progress.epoch == 0 and progress.step == 0 and args.init_from:
            try:
                srvit.load_pretrained(model, args.init_from, verbose=env.master)
            except ValueError as e:
                raise UserError(f"--init-from {args.init_from}: {e}", shared=True) from None
    except BaseException:
        out.release()               # now, not when the traceback's frames are collected
        raise
    if args.compile:
        compile_blocks(model)
    wrapped = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.ddp else model
    run = Run(args, env, wrapped, optimizer, scaler, train_loader, steps, len(classes), raw_model=model,
              val_loader=val_loader, classes=classes, n_train=n_train, out=out, progress=progress,
              log_interval=args.log_interval or max(1, steps // 10), gmacs=srvit.forward_gmacs(model),
              peak=peak_flops(env.device))
    return run


def start_metrics(run):
    """Repair metrics.jsonl after a kill, then add this start's row (once the ranks agree)."""
    if run.env.master:
        prog, model = run.progress, run.raw_model
        run.out.repair_metrics(prog.epoch, prog.records)
        run.out.append_metrics({"type": "run", "args": vars(run.args), "config": asdict(model.config),
                                "params": srvit.count_params(model), "gmacs": run.gmacs, "world_size": run.env.world,
                                "device": str(run.env.device), "start_epoch": prog.epoch, "start_step": prog.step})


def end_epoch(run, epoch, metrics, start_step):
    """The epoch's row: logged, then saved in the order a kill can be repaired from (OutDir)."""
    args, prog, seconds = run.args, run.progress, time.time() - run.t_epoch
    is_best = metrics["top1"] > prog.best_top1
    prog.best_top1 = max(prog.best_top1, metrics["top1"])
    record = {"type": "epoch", "epoch": epoch + 1, "train_loss": prog.loss_sum / run.steps_per_epoch, **metrics,
              "best_top1": prog.best_top1, "lr": run.optimizer.param_groups[0]["lr"], "epoch_time": seconds,
              "elapsed": prog.elapsed, "images_per_s": (run.steps_per_epoch - start_step) * args.batch_size / seconds}
    prog.epoch, prog.step, prog.loss_sum, prog.records = epoch + 1, 0, 0.0, prog.records + [record]
    run.env.log(f"epoch {epoch + 1}/{args.epochs} | train loss {record['train_loss']:.4f} | val top-1 {metrics['top1']:.2f} "
                f"top-5 {metrics['top5']:.2f} loss {metrics['val_loss']:.4f} | best {prog.best_top1:.2f} | {fmt_time(seconds)}")
    if run.env.master:
        run.out.end_epoch(checkpoint(run), is_best)


def describe(run):
    """The start-up lines: where the run resumes, then what it trains, on what, with which recipe."""
    args, env, c, prog = run.args, run.env, run.raw_model.config, run.progress
    if prog.epoch or prog.step:
        steps = f" and {prog.step} steps" if prog.step else ""
        env.log(f"resumed from {run.out.last if args.resume == 'auto' else args.resume}: {prog.epoch} epochs{steps} done, "
                f"best top-1 {prog.best_top1:.2f}")
    where = f" from {args.data_path}" if args.data_path else ""
    env.log(f"data {args.data}{where}: {run.n_train:,} train images, {run.num_classes} classes, {args.img_size} px | "
            f"recipe {args.recipe}: {args.epochs} epochs, batch {args.batch_size} = {env.world} x {env.micro} x {env.accum} accum, "
            f"lr {args.lr:.3g}, init {args.init} | {loader_name(args, run.env.device)}")
    env.log(f"SR-ViT D={c.embed_dim} L={c.num_layers} heads={c.num_heads} patch={c.patch_size} R={c.depth} mixer={c.mixer} "
            f"share={c.share}: {srvit.count_params(run.raw_model):,} params, {run.gmacs:.3g} GMACs/image | "
            f"{env.device} {args.amp} | {args.out_dir}")
    if prog.epoch >= args.epochs:
        env.log(f"all {args.epochs} epochs are done already; nothing to train")


# ========================================================================================
# Plumbing a first reading can skip: the out-dir, resuming, signals, distributed, errors.
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
            raise UserError(f"could not write {path} ({first_line(e)[:120]}); is the disk full? "
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


def checkpoint(run):
    return {"model": run.raw_model.state_dict(), "config": asdict(run.raw_model.config), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), **asdict(run.progress), "metrics": (run.progress.records or [None])[-1],
            "args": vars(run.args), "dataset": {"train_images": run.n_train, "classes": run.classes}}


def save_last(run):
    if run.env.master:
        run.out.save(checkpoint(run), run.out.last)


def read_checkpoint(path):
    """A train.py checkpoint as a dict (the one reader, shared with eval.py): a one-line UserError
    for a missing file, a file that is not whole, or one that train.py did not write."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): not a complete PyTorch checkpoint; "
                        f"delete it or pass another file") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'config'); for DeiT/timm weights use "
                        f"train.py --init-from, or srvit.load_pretrained in Python")
    return ckpt


def check_same_run(path, ckpt, model, args, n_train):
    """Refuse to resume another model, other data or another recipe, naming each value that changed:
    every argument but MAY_CHANGE is compared (keys an older checkpoint does not hold are not)."""
    saved_cfg = {**asdict(srvit.SRViTConfig()), **ckpt["config"]}
    implied = {"schedule": "deit", "pad_mode": "zeros", "init": "timm"}    # what code before these flags did
    saved = {**implied, **ckpt.get("args", {}), **ckpt.get("dataset", {})}
    now = {**vars(args), "train_images": n_train}
    model_keys = [k for k in asdict(model.config) if k not in ("drop_path_rate", "grad_checkpointing")]
    data_keys = ("data", "subset", "val_subset", "num_classes", "img_size", "train_images")
    recipe_keys = [k for k in now if k not in MAY_CHANGE and k not in data_keys]
    for keys, have, want, what in ((model_keys, saved_cfg, asdict(model.config), "model"), (data_keys, saved, now, "data"),
                                   (recipe_keys, saved, now, "recipe")):
        diff = [f"{k}: {have[k]!r} then, {want[k]!r} now" for k in keys if k in have and have[k] != want.get(k)]
        if diff:
            raise UserError(f"{path} was trained with another {what} ({'; '.join(diff)}). Resume with the same "
                            f"command, or start afresh in another --out-dir", shared=True)


def restore(args, out, model, optimizer, scaler, n_train):
    """The progress to start from: a fresh run, or what --resume points at (default last.pt)."""
    path = out.last if args.resume in ("auto", "no") else args.resume
    if args.resume == "no":
        if os.path.exists(out.last):
            raise UserError(f"--resume no, but {out.path} holds a checkpoint; delete {out.last} or pass another --out-dir "
                            f"(nothing is overwritten)", shared=True)
        return Progress()
    if not os.path.isfile(path):
        if args.resume != "auto":
            raise UserError(f"--resume {path}: file not found", shared=True)
        return Progress()
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt:
        raise UserError(f"{path} holds weights only, no optimizer state to resume from; use --init-from", shared=True)
    check_same_run(path, ckpt, model, args, n_train)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(**{f.name: ckpt[f.name] for f in fields(Progress) if f.name in ckpt})
    if os.path.exists(out.best):   # a kill between best.pt and last.pt: best.pt is ahead of last.pt's record
        best = torch.load(out.best, map_location="cpu", weights_only=True, mmap=True)
        progress.best_top1 = max(progress.best_top1, best.get("metrics", {}).get("top1", 0.0))
    return progress


def agree_on_progress(run):
    """Every rank must start where rank 0 does. With node-local disks only the first node holds
    last.pt: the other nodes would start afresh, their AdamW state and step apart from rank 0's, and
    the run would drift, then hang when rank 0 finishes first. Refuse instead, on every rank."""
    if not run.env.ddp:
        return
    mine = (run.progress.epoch, run.progress.step, socket.gethostname())
    seen = [None] * run.env.world
    dist.all_gather_object(seen, mine, group=run.env.cpu_group)
    behind = [(r, s) for r, s in enumerate(seen) if s[:2] != seen[0][:2]]
    if behind:
        (r, (e, s, host)), (e0, s0, host0) = behind[0], seen[0]
        raise UserError(f"the ranks do not agree where the run stands: rank 0 ({host0}) resumes at epoch {e0} step {s0}, "
                        f"rank {r} ({host}) at epoch {e} step {s} from {run.args.out_dir}. Give every node the same "
                        f"--out-dir on a shared disk, or copy rank 0's out-dir to every node", shared=True)


class StopRequest:
    """SIGTERM (Slurm, Kubernetes, torchrun) and Ctrl-C ask the run to stop after the optimizer
    step in flight; main then saves and exits with one line. A second Ctrl-C stops at once."""
    EVERY = 10                        # under DDP, steps between the ranks' checks (one all-reduce each)

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
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self.previous:
            self.previous[signal.SIGCHLD] = quiet_worker_deaths()

    def requested(self, env, step=0):
        """Whether any rank got a signal: every rank must stop after the same step, so under DDP
        the ranks agree every EVERY steps (the same steps on every rank) and at each epoch's end."""
        if not env.ddp or step % self.EVERY:
            return self.signum != 0 and not env.ddp
        flag = torch.tensor(self.signum)              # on the CPU, over gloo: no GPU sync per step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=env.cpu_group)
        self.signum = self.signum or int(flag.item())
        return self.signum != 0


def quiet_worker_deaths():
    """Put back the default SIGCHLD handler, so that the loader's raises no worker's death from
    wherever this process is; returns the loader's handler. One try per worker whose death is
    pending: the loader's handler runs first and raises "DataLoader worker ... is killed"."""
    for _ in range(64):
        try:
            return signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except RuntimeError:
            continue


def stop_message(run, where):
    if run.env.ddp:
        dist.barrier()               # no rank exits (and gets torchrun's SIGKILL) while rank 0 still saves
    name = signal.Signals(run.stop.signum).name
    return Stopped(f"stopped by {name} {where}; saved {run.out.last}. Re-run the same command to resume",
                   130 if run.stop.signum == signal.SIGINT else 143)


@dataclass
class Env:
    """This process's place in the run: ranks, device and the batch split."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    micro: int = 1                   # images per forward pass on this rank
    accum: int = 1                   # micro-batches per optimizer step
    cpu_group: object = None         # gloo group for small CPU-side messages (stop flag, errors)

    ddp = property(lambda self: self.world > 1)
    master = property(lambda self: self.rank == 0)

    def log(self, *a, **k):
        if self.master:
            print(*a, **k)


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
    if args.amp is None:   # native bf16 only (compute capability 8+): V100 and T4 emulate it, slowly
        args.amp = "none" if device.type == "cpu" else ("bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cpu_group = dist.new_group(backend="gloo") if world > 1 and cuda else None
    return Env(rank, world, device, micro, args.batch_size // world // micro, cpu_group)


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


def fmt_time(s):
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def first_line(e):
    """An exception's first line for a one-line message; its type where it has no message."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def user_error_message(e):
    # An error raised in a data-loading worker arrives wrapped in the worker's traceback text,
    # ending in "UserError: <our message>"; the message is what the user needs.
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.split("UserError: ", 1)[-1]


def cli(main_fn, argv=None, interrupted="interrupted; the last checkpoint is whole, re-run the same command to resume"):
    """Run main_fn and turn the ways it can end into an exit code and at most one line per rank
    (eval.py and results/bench.py use it too, with their own line for Ctrl-C)."""
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
        if not e.shared or rank == 0:
            print(f"(rank {rank}) {e}" if not e.shared and world > 1 else str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted, file=sys.stderr)
        return 130
    finally:   # loader workers ignore SIGTERM (ignore_signals): the interpreter's exit could not end any left
        import multiprocessing
        if multiprocessing.active_children() and hasattr(signal, "SIGCHLD"):
            quiet_worker_deaths()
            for worker in multiprocessing.active_children():
                worker.kill()


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
