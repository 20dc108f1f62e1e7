"""
Train SR-ViT: one process (CPU or one GPU), or DDP under torchrun. Only rank 0 logs and saves.

    torchrun --nproc_per_node=8 train.py --depth 4            # the paper's setting: SR-ViT-S, R=4, DeiT's
                                                               # ImageNet recipe, from ./data/imagenet
    torchrun --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet --depth 4
    python train.py --data cifar10 --depth 2                   # classroom run: CIFAR-10 (downloaded), 32 px
    python train.py --data-path ~/data/cifar10 --depth 4       # a folder: train/<class>/, test/<class>/
    python train.py --data imagenet --data-path /data/imagenet --depth 4 \\
        --micro-batch 64 --grad-ckpt --save-every 2000         # one 24 GB GPU, same global batch

The recipe follows the data (--recipe overrides): DeiT's at 224 px for ImageNet and folders of
larger images, a short one for CIFAR and folders of images of <= 64 px; `--help` lists both.
Re-running the same command resumes from <out-dir>/last.pt; SIGTERM or Ctrl-C saves mid-epoch.

The file reads top to bottom, each function after the ones it calls: recipes and arguments, a
note on the data, model and optimizer, the training step and epoch, evaluation, and last `main`,
the epoch loop, after its set-up and end-of-epoch steps. Two files hold what a first reading
can skip: loaders.py (datasets, the seeded sampler, the three loaders, MixUp/CutMix) and runtime.py
(one-line errors, distributed set-up, the out-dir and its checkpoints, resuming, stopping).
"""

import argparse
import math
import os
import signal
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import srvit
from loaders import (build_dataset, build_loaders, cpu_decode_note, image_size, loader_name, loader_remedy,
                     mixup_cutmix, seed_for, train_dir)
from runtime import (ArgumentParser, Env, OutDir, StopRequest, Stopped, UserError, agree_on_progress,
                     amp_context, check_rules, cli, default_amp, fmt_time, init_distributed, mfu,
                     on_all_ranks, peak_flops, plural, read_checkpoint, restore, seed_device, stop_message)

# ----------------------------------------------------------------------------------------
# Recipes and arguments

# DeiT's ImageNet recipe, and a short one for images of <= 64 px (random crop with 4 px of reflect
# padding + flip, no MixUp/CutMix/RandAugment, a fan-in scaled init: a small model learns in a few
# epochs; results/cifar10-recipe measures each choice). An explicit flag always wins.
RECIPES = {
    "deit": dict(img_size=224, patch_size=16, epochs=300, batch_size=1024, warmup_epochs=5, min_lr=1e-5,
                 weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, randaug=9,
                 erasing=0.25, repeated_aug=3, hflip=0.5, crop_padding=0, pad_mode="zeros", init="timm",
                 schedule="deit"),
    "small-images": dict(img_size=32, patch_size=4, epochs=30, batch_size=128, lr=1e-3, warmup_epochs=1,
                         min_lr=1e-5, weight_decay=0.05, drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1,
                         randaug=0, erasing=0.0, repeated_aug=1, hflip=0.5, crop_padding=4,
                         pad_mode="reflect", init="torch", schedule="cosine"),
}
# The model when no --model is given: DeiT-S for the DeiT recipe; for small images a classroom
# model (D=192, 6 blocks, 3 heads). The presets have 12 blocks.
DEFAULT_MODEL = {"deit": dict(srvit.PRESETS["small"], num_layers=12),
                 "small-images": dict(embed_dim=192, num_layers=6, num_heads=3)}
# Ranges the numbers must lie in, kept next to their flags below (check=...).
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
FRACTION, PROBABILITY = (lambda v: 0 <= v < 1, "in [0, 1)"), (lambda v: 0 <= v <= 1, "in [0, 1]")
ALPHA = (lambda v: v == 0 or v >= 0.01, "0 (off) or >= 0.01 (a Beta distribution's alpha; DeiT: 0.8, 1.0)")
WORKERS, REPEATS = (lambda v: 0 <= v <= 256, "in 0..256"), (lambda v: 1 <= v <= 64, "in 1..64 (DeiT: 3)")
CHECKS = {}
# What may differ between a run and its resume; every other argument must be the same. (--model
# may: the model itself, width, blocks and heads included, is compared from its config; --amp may,
# as it follows the device: a run started on a GPU in bf16 resumes on a CPU in float32; --loader may,
# as each loader feeds the same images in the sampler's order with the same augmentations, drawn from
# its own streams, and auto follows the device too: the device loader on a GPU, PIL on a CPU. --epochs
# may, to extend a run or end it sooner: the schedule is that of the new --epochs from the resumed
# step on, so an extended run's learning rate rises to the new cosine's value there.)
MAY_CHANGE = {"workers", "device", "compile", "grad_ckpt", "micro_batch", "log_interval", "save_every",
              "resume", "out_dir", "data_path", "init_from", "model", "amp", "loader", "epochs",
              "from_recipe"}


def choose_recipe(args):
    """--recipe, else --img-size (<= 64 px: small-images), else the data: CIFAR is small, ImageNet
    and fake data are not, and a folder tells by the size of its training images (image_size)."""
    if args.recipe != "auto":
        return args.recipe
    if args.img_size is not None:
        return "small-images" if args.img_size <= 64 else "deit"
    if args.data in ("cifar10", "cifar100"):
        return "small-images"
    if args.data in ("fake", "imagenet"):
        return "deit"
    return "small-images" if max(image_size(train_dir(args))) <= 64 else "deit"


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


def model_config(args, num_classes):
    """The model the flags ask for, its own checks (image by patch, width by heads) said in one line."""
    try:
        return srvit.SRViTConfig(
            img_size=args.img_size, patch_size=args.patch_size, num_classes=num_classes,
            embed_dim=args.embed_dim, num_layers=args.num_layers, num_heads=args.num_heads, depth=args.depth,
            mixer=args.mixer, share=args.share, router_init=args.router_init, init=args.init,
            step_scale=args.step_scale, loop_scale=args.loop_scale, drop_path_rate=args.drop_path,
            grad_checkpointing=args.grad_ckpt)
    except ValueError as e:
        raise UserError(f"cannot build the model: {e}", shared=True) from None


def check_args(args):
    check_rules(args, shared=True, **CHECKS)
    if args.min_lr > args.lr and "min_lr" not in args.from_recipe:   # (a recipe's may be, as DeiT's is)
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine would rise; lower "
                        f"it", shared=True)
    if (args.data == "fake" and args.data_path) or (args.data != "fake" and args.num_classes):
        raise UserError("--data fake makes up its images and takes --num-classes; a folder's classes are its "
                        "class folders: drop the flag that does not fit", shared=True)
    if args.warmup_epochs >= args.epochs:
        raise UserError(f"--warmup-epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: "
                        f"lower it (the learning rate would never leave the warm-up)", shared=True)
    if args.resume not in ("auto", "no") and not os.path.isfile(args.resume):   # before the data is read
        what = ("is a folder: pass the checkpoint in it, e.g. its last.pt" if os.path.isdir(args.resume)
                else "no such file")
        raise UserError(f"--resume {args.resume}: {what}", shared=True)
    if args.resume not in ("auto", "no") and not zipfile.is_zipfile(args.resume):   # a JPEG, a cut-short file
        read_checkpoint(args.resume, shared=True)        # says so now, not after the data is read
    model_config(args, num_classes=1)                    # and so does a model that cannot be built
    if args.crop_padding >= args.img_size:       # a crop of padding alone; reflect cannot pad that much
        raise UserError(f"--crop-padding {args.crop_padding} is not below --img-size {args.img_size}: "
                        f"set --crop-padding lower (CIFAR's is 4 at 32 px)", shared=True)
    if args.loader == "memory" and (args.img_size > 64 or args.randaug or args.erasing):
        raise UserError("--loader memory is for images of <= 64 px with crop and flip only; drop "
                        "--randaug/--erasing or use --loader pil", shared=True)
    if args.loader == "device" and (args.img_size <= 64 or args.data not in ("folder", "imagenet")):
        raise UserError("--loader device is DeiT's recipe from image files (> 64 px, --data folder or "
                        "imagenet); use --loader memory for small images, pil for --data fake", shared=True)


def parser():
    """The flags, in the order --help lists them; a flag left unset takes the recipe's value (get_args)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, check=None, **kw):
        """p.add_argument; the help gains each recipe's value (or the default); check_args runs `check`."""
        key = name[2:].replace("-", "_")
        deit, small = ({**RECIPES[recipe], **DEFAULT_MODEL[recipe]} for recipe in ("deit", "small-images"))
        if key in deit or key == "lr":                 # say what each recipe puts there
            kw["help"] = (f"{kw.get('help', '')} [deit: {deit.get(key, '5e-4 x batch / 512')}; small-images: "
                          f"{small[key]}]").lstrip()
        elif (kw.get("default") is not None and kw.get("action") != "store_true"
              and "default" not in kw.get("help", "")):
            kw["help"] = f"{kw.get('help', '')} (default: {kw['default']})".lstrip()
        if check:
            CHECKS[key] = check
        p.add_argument(name, **kw)
    flag("--data", default=None, choices=["imagenet", "cifar10", "cifar100", "folder", "fake"],
         help="default: folder when --data-path is given, else imagenet (from ./data/imagenet)")
    flag("--data-path", default=None, help="holds train/ and val/ (or test/), one folder per class")
    flag("--recipe", default="auto", choices=["auto", *RECIPES],
         help="auto: deit for images > 64 px, else small-images")
    flag("--subset", type=int, check=POSITIVE, help="use only this many training images (quick runs)")
    flag("--val-subset", type=int, check=POSITIVE, help="use only this many validation images")
    flag("--num-classes", type=int, check=POSITIVE, help="for --data fake (default 1000)")
    flag("--loader", default="auto", choices=["auto", "memory", "pil", "device"],
         help="memory: small images decoded once, augmented on the device (auto for <= 64 px); pil: "
              "workers decode and augment (auto on CPUs); device: workers read files, the device decodes "
              "and augments (auto on GPUs)")
    flag("--model", default=None, choices=list(srvit.PRESETS),
         help="a DeiT preset (12 blocks); other flags override it")
    flag("--embed-dim", type=int, check=POSITIVE, help="width")
    flag("--num-layers", type=int, check=POSITIVE, help="blocks")
    flag("--num-heads", type=int, check=POSITIVE, help="attention heads")
    flag("--img-size", type=int, check=POSITIVE, help="small-images from a folder: its images' size")
    flag("--patch-size", type=int, check=POSITIVE)
    flag("--depth", type=int, default=2, check=POSITIVE, help="recursion steps R")
    flag("--mixer", default="soft", choices=srvit.MIXERS)
    flag("--share", default="block", choices=srvit.SHARES)
    flag("--router-init", default="uniform", choices=["uniform", "last"],
         help="fresh soft mixer: uniform, or 0.9 on the last step")
    flag("--init", choices=srvit.INITS, help="weights: timm (DeiT's std 0.02) or torch (fan-in scaled)")
    flag("--step-scale", action="store_true",
         help="beyond our reading of the paper (README): a learned per-channel scale on each block "
              "application's update, 1 at the start")
    flag("--loop-scale", default="none", choices=srvit.LOOP_SCALES,
         help="beyond our reading of the paper (README): a looped block's residual branches times 1/R "
              "(fixed), or by learned per-channel scales starting at 1/R (learned)")
    flag("--epochs", type=int, check=POSITIVE)
    flag("--batch-size", type=int, check=POSITIVE, help="global batch, over all ranks and accumulation steps")
    flag("--micro-batch", type=int, check=POSITIVE, help="per-device batch (accumulates to --batch-size)")
    flag("--lr", type=float, check=POSITIVE, help="peak lr")
    flag("--min-lr", type=float, check=NON_NEGATIVE)
    flag("--warmup-epochs", type=float, check=NON_NEGATIVE)
    flag("--schedule", choices=["deit", "cosine"],
         help="deit: DeiT's per-epoch scheduler (one epoch late); cosine: reaches --min-lr at the last step")
    flag("--weight-decay", type=float, check=NON_NEGATIVE)
    flag("--drop-path", type=float, check=FRACTION)
    flag("--mixup", type=float, check=ALPHA, help="MixUp alpha (0: off)")
    flag("--cutmix", type=float, check=ALPHA, help="CutMix alpha (0: off)")
    flag("--smoothing", type=float, check=FRACTION)
    flag("--clip-grad", type=float, check=POSITIVE, help="clip the gradient norm (DeiT: off)")
    flag("--randaug", type=int, check=(lambda v: 0 <= v <= 10, "in 0..10 (timm's magnitudes; DeiT uses 9)"),
         help="RandAugment magnitude 0..10, 2 ops (0: off)")
    flag("--erasing", type=float, check=PROBABILITY, help="random erasing probability")
    flag("--hflip", type=float, check=PROBABILITY, help="horizontal flip probability (0 for digits, text)")
    flag("--crop-padding", type=int, check=NON_NEGATIVE,
         help="small images: pixels of padding for the random crop (0: no crop)")
    flag("--pad-mode", choices=["zeros", "reflect"], help="how --crop-padding pads")
    flag("--repeated-aug", type=int, check=REPEATS, help="DeiT's repeated augmentation: copies per image")
    flag("--amp", default=None, choices=["bf16", "fp16", "none"],
         help="default: bf16 on GPUs that have it, else fp16; none on CPU")
    flag("--compile", action="store_true", help="torch.compile each block (once, whatever the depth)")
    flag("--grad-ckpt", action="store_true",
         help="activation checkpointing of every block application and mixer")
    flag("--init-from", default=None, help="DeiT/timm/SR-ViT checkpoint to warm-start the blocks from")
    flag("--out-dir", default=None,
         help="default runs/<data>-<model>-R<depth>-<mixer>-<share>[-n<subset>][-v<val-subset>]-s<seed>")
    flag("--resume", default="auto",
         help="checkpoint to resume from; 'auto': <out-dir>/last.pt if it exists; 'no'")
    flag("--save-every", type=int, check=POSITIVE, help="also save last.pt every N steps (long epochs)")
    flag("--seed", type=int, default=0, check=(lambda v: abs(v) < 2**63, "within +-2^63 (torch's seeds)"))
    flag("--workers", type=int, check=WORKERS,
         help="data-loading processes per rank (default: this node's cores / its ranks, <= 8)")
    flag("--log-interval", type=int, check=POSITIVE, help="steps per progress line (default: 10 per epoch)")
    flag("--device", default=None, help="default: cuda if available, else cpu")
    return p


def get_args(argv=None):
    """The flags, each unset one filled from the recipe (args.from_recipe names those), checked."""
    args = parser().parse_args(argv)
    args.data = args.data or ("folder" if args.data_path else "imagenet")
    args.recipe = choose_recipe(args)
    own_size = args.img_size is None and args.recipe == "small-images" and args.data in ("folder", "imagenet")
    if own_size:                                             # the folder's own size (<= 64 px): no resizing
        args.img_size = min(*image_size(train_dir(args)), 64)
    args.from_recipe = []                                    # what the recipe set (the start-up line says)
    for key, value in {**RECIPES[args.recipe], **model_dims(args)}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            args.from_recipe.append(key)
    if own_size:                                             # ...rounded down to a multiple of the patch
        args.img_size = max(args.patch_size, args.img_size // args.patch_size * args.patch_size)
    if args.lr is None:           # (not `or`: --lr 0 must reach the check below, not become the default)
        args.lr = 5e-4 * args.batch_size / 512
        args.from_recipe.append("lr")
    if args.warmup_epochs >= args.epochs > 0 and "warmup_epochs" in args.from_recipe:
        args.warmup_epochs = args.epochs / 5                 # the recipe's warm-up outlasts a short run
    check_args(args)
    if args.out_dir is None:      # named for what makes runs differ, so a quick --subset run is kept apart
        subset = f"-n{args.subset}" if args.subset else ""
        subset += f"-v{args.val_subset}" if args.val_subset else ""
        name = f"{args.data}-{model_name(args)}-R{args.depth}-{args.mixer}-{args.share}{subset}-s{args.seed}"
        args.out_dir = os.path.join("runs", name)
    return args


# ----------------------------------------------------------------------------------------
# Data (loaders.py): build_loaders(args, env) gives this rank's training and validation loaders.
# Small images are decoded once into memory on the device and cropped and flipped there; DeiT's
# recipe reads files in loader workers and decodes and augments on the GPU (PIL workers on a
# CPU). Every crop, flip and RandAugment op follows from (seed, epoch, rank, sample), so a run
# resumed at any step draws the same batches. MixUp/CutMix is applied per batch in train_step.


# ----------------------------------------------------------------------------------------
# Model, optimizer, schedule

def build_model(args, num_classes):
    torch.manual_seed(args.seed)         # identical initial weights on every rank
    try:
        return srvit.SRViT(model_config(args, num_classes))
    except (MemoryError, RuntimeError) as e:          # e.g. --img-size 8000000: its position table alone
        if isinstance(e, RuntimeError) and "alloc" not in str(e).lower():
            raise
        raise UserError(f"cannot build the model: out of memory ({str(e)[:80]}); check --img-size and the "
                        f"model's size", shared=True) from None


def param_groups(model, weight_decay):
    """timm's rule, as DeiT uses it: no weight decay on biases and norms (every tensor of <= 1
    dimension), nor on the class token, position embedding, step biases and step scales."""
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


def compile_blocks(model, backend="inductor"):
    """torch.compile each block's attention and MLP, not the whole model: the whole model unrolls
    L x R block applications into one graph (minutes to compile at R=2 on a CPU) and recompiles
    for each drop-path rate, a Python float per application. The sub-modules take tensors only,
    and modules of one shape share one compiled graph, so R=4 compiles in about the time of R=1."""
    for block in model.blocks:
        block.attn.compile(backend=backend)
        block.mlp.compile(backend=backend)


# ----------------------------------------------------------------------------------------
# Training: the progress of a run, its checkpoint, the progress line, one optimizer step, one epoch

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
    """What the loop needs: fixed for the run, except `progress` (and `model`, which main wraps in DDP
    and lets go of before the process group ends)."""
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
    saved_epochs: int = None               # --epochs of the checkpoint resumed from

    def __post_init__(self):
        self.raw_model = self.raw_model or self.model
        self.autocast = amp_context(self.env.device, self.args.amp)
        self.mixup_or_cutmix = self.args.mixup > 0 or self.args.cutmix > 0
        self.stop = self.stop or StopRequest()


@dataclass
class EpochClock:
    """What one epoch's loop measures and does not save: when it started, the training seconds before
    it, the step it started from (0, or a resume's), the seconds spent waiting for batches, and whether
    it said that the loader bounds the run."""
    elapsed_before: float = 0.0
    first_step: int = 0
    start: float = field(default_factory=time.time)
    data_wait: float = 0.0
    loader_told: bool = False

    def training_seconds(self):
        """Training seconds so far, this epoch's included."""
        return self.elapsed_before + time.time() - self.start


class LoaderGone(Exception):
    """A loader worker died while a signal was asking the run to stop (workers ignore SIGTERM and
    SIGINT, so something else killed it: the OOM killer, a SIGKILL)."""


def checkpoint(run):
    return {"model": run.raw_model.state_dict(), "config": asdict(run.raw_model.config),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            **asdict(run.progress), "metrics": (run.progress.records or [None])[-1], "args": vars(run.args),
            "dataset": {"train_images": run.n_train, "classes": run.classes}}


def save_last(run):
    if run.env.master:
        run.out.save(checkpoint(run), run.out.last)


def mean_over_ranks(t, env):
    if env.ddp:
        dist.all_reduce(t)
        t /= env.world
    return t


def kept_checkpoint(run):
    if run.out and os.path.exists(run.out.last):
        return f"the last good checkpoint is kept in {run.out.last}"
    return "no checkpoint had been written yet"


def check_finite(bad_step, epoch, run):
    if run.env.ddp:
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    if bad_step.item() >= 0:                            # checked before anything is saved
        raise UserError(f"loss became NaN or infinite at step {bad_step.item()} (epoch {epoch + 1}); "
                        f"stopped, {kept_checkpoint(run)}. Try a lower --lr, or --amp bf16/none",
                        shared=True, agreed=True)


def log_progress(run, epoch, loss_sum, log_from, clock):
    """One progress line: loss since the last line, lr, speed, MFU on known GPUs, eta."""
    args, env, step = run.args, run.env, run.progress.step
    t_log, steps_done, loss_done, wait_done = log_from
    ips = (step - steps_done) * args.batch_size / max(time.time() - t_log, 1e-9)
    waited = (clock.data_wait - wait_done) / max(time.time() - t_log, 1e-9)     # share of the time on data
    # said once, and not on an epoch's first line: that one includes the loader workers' start
    if waited > 0.25 and not clock.loader_told and steps_done != clock.first_step:
        clock.loader_told = True
        hint = loader_remedy(args, env.device)
        env.log(f"the loader bounds this run: {waited:.0%} of the time went to waiting for batches; the "
                f"model alone would take about {ips / (1 - min(waited, 0.99)):,.0f} img/s against the "
                f"{ips:,.0f} it gets ({hint})")
    left = (args.epochs - epoch) * run.steps_per_epoch - step
    util = f" | MFU {mfu(run.gmacs, ips / env.world, run.peak):.1%}" if run.peak else ""
    env.log(f"epoch {epoch + 1}/{args.epochs} | step {step}/{run.steps_per_epoch} | "
            f"loss {(loss_sum - loss_done) / max(step - steps_done, 1):.4f} | lr "
            f"{run.optimizer.param_groups[0]['lr']:.2e} | {ips:,.0f} img/s{util} | eta "
            f"{fmt_time(left * args.batch_size / max(ips, 1e-9))} (+ evaluation)")
    return time.time(), step, loss_sum, clock.data_wait


def train_step(run, batches, gstep, clock):
    """One optimizer step over env.accum micro-batches; returns the step's loss, a device scalar,
    and the first non-finite step as bad (or -1)."""
    args, env = run.args, run.env
    step_loss = torch.zeros((), device=env.device)
    bad = torch.full((), -1, device=env.device, dtype=torch.long)
    for micro_step in range(env.accum):
        t_wait = time.perf_counter()
        try:
            x, y = next(batches)
            clock.data_wait += time.perf_counter() - t_wait
        except Exception:
            if not run.stop.signum:
                raise
            raise LoaderGone() from None
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)   # (B, 3, S, S), (B,)
        if run.mixup_or_cutmix:
            x, y = mixup_cutmix(x, y, args, run.num_classes)            # y: (B, classes) soft targets
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


def train_one_epoch(run, epoch, clock=None):
    """Train epoch `epoch` from optimizer step run.progress.step on (0, or where a stopped run
    saved). Returns True if a signal asked to stop before the epoch's end."""
    args, env, prog = run.args, run.env, run.progress
    run.model.train()
    run.train_loader.set_epoch(epoch, start_batch=prog.step * env.accum)
    batches = iter(run.train_loader)
    loss_sum = torch.tensor(prog.loss_sum, device=env.device)       # sum of this epoch's step losses
    bad_step = torch.full((), -1, device=env.device, dtype=torch.long)
    clock = clock or EpochClock(prog.elapsed, prog.step)
    log_from = (time.time(), prog.step, prog.loss_sum, clock.data_wait)
    for step in range(prog.step, run.steps_per_epoch):
        # Every random draw of this step (MixUp, drop path) follows from (seed, epoch, rank,
        # step), and every augmentation from its sample's position: a run resumed at any step
        # repeats the uninterrupted run.
        seed_device(seed_for("step", args.seed, epoch, env.rank, step), env.device)
        gstep = epoch * run.steps_per_epoch + step
        for g in run.optimizer.param_groups:
            g["lr"] = lr_at(gstep, run.steps_per_epoch, args)
        try:
            step_loss, bad = train_step(run, batches, gstep, clock)
        except LoaderGone:                 # this step cannot finish: save the one before it
            if env.ddp:                    # ...unless other ranks are past it: they cannot agree on a step
                raise Stopped(f"stopped by {signal.Signals(run.stop.signum).name}; a loader worker of this "
                              f"rank died with it, before the ranks agreed where to stop: nothing saved, "
                              f"the last checkpoint is kept. Re-run the same command to resume", 143,
                              shared=False) from None
            run.optimizer.zero_grad(set_to_none=True)
            prog.loss_sum, prog.elapsed = loss_sum.item(), clock.training_seconds()
            save_last(run)
            return True
        loss_sum += step_loss
        bad_step = torch.where(bad_step < 0, bad, bad_step)
        prog.step = step + 1
        if prog.step % run.log_interval == 0 or prog.step == run.steps_per_epoch:
            check_finite(bad_step, epoch, run)
            log_from = log_progress(run, epoch, loss_sum.item(), log_from, clock)
        stop = run.stop.requested(env, prog.step)
        save_now = args.save_every and (gstep + 1) % args.save_every == 0 and prog.step < run.steps_per_epoch
        if stop or save_now:
            check_finite(bad_step, epoch, run)                           # never save a NaN model
            prog.loss_sum = mean_over_ranks(loss_sum.clone(), env).item()
            prog.elapsed = clock.training_seconds()
            save_last(run)
            if stop:
                return True
    prog.loss_sum = mean_over_ranks(loss_sum, env).item()          # the epoch's loss, averaged over ranks
    return False


# ----------------------------------------------------------------------------------------
# Evaluation: top-1, top-5 and loss (shared with eval.py)

def batch_metrics(logits, y):
    """(correct@1, correct@5, summed loss, count) of one batch, float64: (B, classes), (B,) -> (4,)."""
    logits = logits.float()
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices         # (B, 5)
    count = torch.full((), len(y), device=y.device)          # a fill on the device, not a host-to-device copy
    return torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                        F.cross_entropy(logits, y, reduction="sum"), count]).double()


def summarize_metrics(sums):
    c1, c5, loss, n = sums.tolist()
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1), "val_loss": loss / max(n, 1),
            "val_images": int(n)}


@torch.no_grad()
def evaluate(model, loader, device, autocast, steps=None, log=None, every=None, watch=None):
    """Top-1, top-5 and loss over the whole split, each sample counted once over all ranks (the one
    evaluation loop; eval.py uses it too). With `log`, a progress line every 10 s (a CPU takes minutes
    over 10,000 images), or every `every` batches; `watch(mix)` sees each batch's mixture weights.
    The model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # correct@1, correct@5, loss, count
    t0 = t_log = time.time()
    for b, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits, mix = model(x, steps=steps, return_mix=True)
        sums += batch_metrics(logits, y)
        if watch:
            watch(mix)
        due = (b % every == 0) if every else time.time() - t_log > 10
        if log and due and b < len(loader):
            t_log, rate = time.time(), b / (time.time() - t0)
            log(f"evaluating: batch {b}/{len(loader)}, {rate * len(y):,.0f} images/s | "
                f"eta {fmt_time((len(loader) - b) / rate)}")
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    return summarize_metrics(sums)


# ----------------------------------------------------------------------------------------
# main: set up, then epochs of train -> evaluate -> save

def setup(args, env):
    """Data, model, optimizer, out-dir and the progress to start from, on this rank."""
    train_loader, val_loader, classes, n_train = build_loaders(args, env)
    steps_per_epoch = len(train_loader) // env.accum
    if steps_per_epoch == 0:
        raise UserError(f"an epoch has fewer than one step of {args.batch_size} images; lower --batch-size",
                        shared=True)
    model = build_model(args, len(classes)).to(env.device)        # before the optimizer: its state follows
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                  fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp == "fp16")
    out = OutDir(args.out_dir, env.master).open()
    try:
        # A warm-up the recipe clipped to a short run stays as the run started it when --epochs grows.
        warmup_from_recipe = {"warmup_epochs"} & set(args.from_recipe)
        data_record = {"train_images": n_train, "classes": classes}      # what the checkpoint records
        saved = restore(args.resume, vars(args), out, model, optimizer, scaler, data_record,
                        MAY_CHANGE | warmup_from_recipe)
        if warmup_from_recipe and "args" in saved:
            warmup = saved["args"].get("warmup_epochs", args.warmup_epochs)
            args.warmup_epochs = warmup if warmup < args.epochs else args.epochs / 5   # (--epochs shrank)
        progress = Progress(**{f.name: saved[f.name] for f in fields(Progress) if f.name in saved})
        saved_epochs = saved.get("args", {}).get("epochs")
        del saved                   # the weights and AdamW state: not held through compile and DDP
        if progress.epoch == 0 and progress.step == 0 and args.init_from:
            try:
                srvit.load_pretrained(model, args.init_from, verbose=env.master)
            except ValueError as e:
                flags = " (train.py: --model, or --embed-dim, --patch-size)" if "of width" in str(e) else ""
                raise UserError(f"--init-from {args.init_from}: {e}{flags}", shared=True) from None
    except BaseException:
        out.close(failed=True)      # now, not when the traceback's frames are collected
        raise
    if args.compile:
        compile_blocks(model)
    return Run(args, env, model, optimizer, scaler, train_loader, steps_per_epoch, len(classes),
               raw_model=model, val_loader=val_loader, classes=classes, n_train=n_train, out=out,
               progress=progress, log_interval=args.log_interval or max(1, steps_per_epoch // 10),
               gmacs=srvit.forward_gmacs(model), peak=peak_flops(env.device), saved_epochs=saved_epochs)


def start_metrics(run):
    """Repair metrics.jsonl after a kill, then add this start's row (once the ranks agree)."""
    if run.env.master:
        prog, model = run.progress, run.raw_model
        run.out.repair_metrics(prog.epoch, prog.records)
        run.out.append_metrics({"type": "run", "args": vars(run.args), "config": asdict(model.config),
                                "params": srvit.count_params(model), "gmacs": run.gmacs,
                                "world_size": run.env.world, "device": str(run.env.device),
                                "start_epoch": prog.epoch, "start_step": prog.step})


def describe(run):
    """The start-up lines: where the run resumes, then what it trains, on what, with which recipe."""
    args, env, cfg, prog = run.args, run.env, run.raw_model.config, run.progress
    if prog.epoch or prog.step:
        steps = f" and {plural(prog.step, 'step')}" if prog.step else ""
        best = f"best top-1 {prog.best_top1:.2f}" if prog.records else "not evaluated yet"
        env.log(f"resumed from {run.out.last if args.resume == 'auto' else args.resume}: "
                f"{plural(prog.epoch, 'epoch')}{steps} done, {best}")
        if run.saved_epochs not in (None, args.epochs):
            env.log(f"--epochs {args.epochs} (the run was started with {run.saved_epochs}): the learning "
                    f"rate follows the cosine over {plural(args.epochs, 'epoch')} from the resumed step on")
    where = f" from {args.data_path}" if args.data_path else ""
    env.log(f"data {args.data}{where}: {run.n_train:,} train images, {run.num_classes} classes, "
            f"{args.img_size} px | recipe {args.recipe}: {plural(args.epochs, 'epoch')}, batch "
            f"{args.batch_size} = {env.world} x {env.micro} x {env.accum} accum, lr {args.lr:.3g}, init "
            f"{args.init} | {loader_name(args, run.env.device)}")
    recipe_set = [k for k in args.from_recipe if k not in DEFAULT_MODEL[args.recipe]]  # (the model line's)
    recipe_warmup = RECIPES[args.recipe]["warmup_epochs"]
    said = {k: f"--{k.replace('_', '-')} {getattr(args, k)}" for k in recipe_set}
    if "warmup_epochs" in said and args.warmup_epochs != recipe_warmup:            # clipped to a short run
        said["warmup_epochs"] += (f" (its {plural(recipe_warmup, 'warm-up epoch')}, clipped to a fifth of "
                                  f"the run as it started)")
    if recipe_set:
        env.log(f"from the {args.recipe} recipe (flags override it): " + ", ".join(said.values()))
    # the options beyond our reading of the paper (README), named where they are on
    beyond = [f"loop-scale={cfg.loop_scale}"] if cfg.loop_scale != "none" else []
    beyond += ["step-scale"] if cfg.step_scale else []
    env.log(f"SR-ViT D={cfg.embed_dim} L={cfg.num_layers} heads={cfg.num_heads} patch={cfg.patch_size} "
            f"R={cfg.depth} mixer={cfg.mixer} share={cfg.share}{''.join(' ' + b for b in beyond)}: "
            f"{srvit.count_params(run.raw_model):,} params, {run.gmacs:.3g} GMACs/image | {env.device} "
            f"{args.amp} | {args.out_dir}")
    if prog.epoch >= args.epochs:
        env.log(f"epoch {args.epochs} of {args.epochs} is done already; a larger --epochs extends the run")


def end_epoch(run, epoch, metrics, clock):
    """The epoch's row: logged, then saved in the order a kill can be repaired from (OutDir)."""
    args, prog, seconds, start_step = run.args, run.progress, time.time() - clock.start, clock.first_step
    if not math.isfinite(metrics["val_loss"]):                  # (the same on every rank: summed over all)
        raise UserError(f"the validation loss is {metrics['val_loss']} at epoch {epoch + 1}; stopped before "
                        f"saving it, {kept_checkpoint(run)}. Try a lower --lr, or --amp bf16/none",
                        shared=True, agreed=True)
    is_best = metrics["top1"] > prog.best_top1
    prog.best_top1 = max(prog.best_top1, metrics["top1"])
    record = {"type": "epoch", "epoch": epoch + 1, "train_loss": prog.loss_sum / run.steps_per_epoch,
              **metrics, "best_top1": prog.best_top1, "lr": run.optimizer.param_groups[0]["lr"],
              "epoch_time": seconds, "elapsed": prog.elapsed,
              "train_images_per_s": (run.steps_per_epoch - start_step) * args.batch_size
              / max(prog.elapsed - clock.elapsed_before, 1e-9)}
    prog.epoch, prog.step, prog.loss_sum = epoch + 1, 0, 0.0           # the next epoch starts afresh
    prog.records = prog.records + [record]
    run.env.log(f"epoch {epoch + 1}/{args.epochs} | train loss {record['train_loss']:.4f} | "
                f"val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} loss "
                f"{metrics['val_loss']:.4f} | best {prog.best_top1:.2f} | "
                f"{fmt_time(seconds)}{cpu_decode_note(run.train_loader, run.env.cpu_group)}")
    if run.env.master:
        run.out.end_epoch(checkpoint(run), is_best)


def main(argv=None):
    args = get_args(argv)
    env = init_distributed(args.batch_size, args.micro_batch, args.device)
    args.amp = args.amp or default_amp(env.device)
    run, failed = None, True
    try:
        if env.ddp and args.data.startswith("cifar"):    # one download, not one per rank into the same folder
            on_all_ranks(env, lambda: env.master and build_dataset(args, "train", None))
        run = on_all_ranks(env, setup, args, env, undo=lambda ready: ready.out.close(failed=True))
        if env.ddp:          # only once every rank has set up: DDP's constructor talks to every rank
            run.model = DDP(run.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        agree_on_progress(env, run.progress, args.out_dir)
        on_all_ranks(env, start_metrics, run)           # (rank 0's full disk: every rank stops, none waits)
        describe(run)
        prog = run.progress
        with run.stop:
            for epoch in range(prog.epoch, args.epochs):
                clock = EpochClock(prog.elapsed, prog.step)
                if train_one_epoch(run, epoch, clock):
                    where = f"at epoch {epoch + 1}, step {prog.step}/{run.steps_per_epoch}"
                    raise stop_message(env, run.stop.signum, run.out.last, where)
                prog.elapsed = clock.training_seconds()
                metrics = evaluate(run.raw_model, run.val_loader, env.device, run.autocast, log=env.log)
                end_epoch(run, epoch, metrics, clock)
                if run.stop.requested(env) and epoch + 1 < args.epochs:
                    raise stop_message(env, run.stop.signum, run.out.last, f"after epoch {epoch + 1}")
        env.log(f"done: best top-1 {prog.best_top1:.2f}, {fmt_time(prog.elapsed)} training time, "
                f"checkpoints in {args.out_dir}")
        if env.ddp:
            run.model = None             # DDP's reducer holds gloo/NCCL work objects: free them first
            dist.barrier()               # no rank tears down while another still talks to it
            dist.destroy_process_group()
        run.raw_model.classes = run.classes
        failed = False
        return run.raw_model
    finally:
        if run and run.out:
            run.out.close(failed)


if __name__ == "__main__":
    code = cli(main)
    if os.environ.get("WORLD_SIZE", "1").strip() != "1":        # (a bad one was said by cli: no int())
        # Under torchrun, leave without the interpreter's teardown: freeing the process group's C++
        # threads there failed 2 of 12 finished two-process runs ("terminate called without an active
        # exception"), even after barrier + destroy_process_group. Everything is saved and flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
