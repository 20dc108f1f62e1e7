"""
How images reach the model, for train.py and eval.py: the datasets (ImageNet or any class-per-folder
tree, CIFAR, fake data), the per-image transforms of both recipes, the seeded sampler, the three
training loaders, and MixUp/CutMix.

    memory   small images (<= 64 px): the split decoded once into a uint8 tensor on the device,
             cropped and flipped there a batch at a time (MemoryLoader)
    pil      loader workers decode and augment each image with PIL (PILLoader; CPUs, --data fake)
    device   loader workers read files and draw each sample's augmentation; the device decodes
             (nvJPEG) and augments whole batches (DeviceLoader; DeiT's recipe on GPUs)

Validation uses MemoryLoader for small images, else a plain DataLoader of PIL workers. Every
random draw follows from (seed, epoch, rank, position), so a resumed run draws the same batches,
and the pil and device paths draw the same crops, flips and ops for the same sample.
"""

import hashlib
import math
import os
import signal
import time

import torch
import torch.nn.functional as F

from plumbing import UserError

MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


# ----------------------------------------------------------------------------------------
# Datasets and the per-image transforms (the PIL path)

def check_data_path(args):
    """A mistyped --data-path is named as missing (and nothing is created or downloaded there)."""
    if args.data_path and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} does not exist; point it at a folder with train/ and val/ (or test/)",
                        shared=True)


def train_dir(args):
    check_data_path(args)
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


def build_dataset(args, split, transform, loader=None):
    """The 'train' or 'val' split named by --data / --data-path, and its class names."""
    import torchvision.datasets as tvd
    train = split == "train"
    if args.data == "fake":
        n_cls = args.num_classes or 1000
        size = (args.subset or 10_000) if train else (args.val_subset or 1_000)
        data = tvd.FakeData(size, (3, args.img_size, args.img_size), n_cls, transform, random_offset=0 if train else 10**7)
        return data, [f"class {i}" for i in range(n_cls)]
    check_data_path(args)
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


def read_image(path):
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise unreadable(path, e) from None


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


# ----------------------------------------------------------------------------------------
# The seeded sampler: the order and each sample's augmentation follow from the seed

def seed_for(*keys):
    """A 63-bit seed for one random stream, e.g. seed_for("aug", seed, epoch, rank, batch).
    Hashing the whole key keeps streams apart: an arithmetic mix such as seed*10000 + epoch*100
    + rank makes seed s at epoch 100 replay seed s+1 at epoch 0."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


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


# ----------------------------------------------------------------------------------------
# The loaders: which one, and building them

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


def ignore_signals(worker_id):
    # Ctrl-C reaches every process of the terminal's group, and Slurm's SIGTERM every process of
    # the job: both are for the main process, which stops where all ranks agree and then ends its
    # workers itself. (A worker whose main process is gone notices and exits within seconds.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PILLoader(torch.utils.data.DataLoader):
    """The PIL path (ImageNet): loader workers decode and augment each image. Like MemoryLoader,
    set_epoch(epoch, start_batch) picks the epoch and where a resumed run starts in it."""

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)


# ----------------------------------------------------------------------------------------
# The in-memory path (small images)

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


def decode_all(dataset, workers):
    """Every image of a (resize + crop + PILToTensor) dataset: (N, 3, S, S) uint8 and (N,) labels."""
    xs, ys = zip(*torch.utils.data.DataLoader(dataset, 500, num_workers=workers))
    return torch.cat(xs), torch.as_tensor(torch.cat(ys))


# ----------------------------------------------------------------------------------------
# The device path (DeiT's recipe on GPUs)
#
# Loader workers only read each file and draw its sample's augmentation; decoding (nvJPEG on a
# GPU) and every augmentation run on whole uint8 batches on the training device. The draws are the
# PIL path's own: the same torchvision transforms, the same calls on the same per-sample seed, so
# both paths sample the same crops, flips, ops and erasing boxes, and a resumed run repeats them.

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
