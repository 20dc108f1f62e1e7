"""
How images reach the model, for train.py and eval.py: the datasets (ImageNet or any class-per-folder
tree, CIFAR, fake data), the per-image transforms of both recipes, the seeded sampler, the three
training loaders, and MixUp/CutMix.

    memory   small images (<= 64 px): the split decoded once into a uint8 tensor on the device,
             cropped and flipped there a batch at a time (MemoryLoader)
    pil      loader workers decode and augment each image with PIL (a DataLoader of SeededAugment;
             CPUs, --data fake)
    device   loader workers read files and draw each sample's augmentation; the device decodes
             (nvJPEG) and augments whole batches (DeviceLoader; DeiT's recipe on GPUs)

Validation uses MemoryLoader for small images, else a plain DataLoader of PIL workers. Every
random draw follows from (seed, epoch, rank, position), so a resumed run draws the same batches,
and the pil and device paths draw the same crops, flips and ops for the same sample.
"""

import hashlib
import itertools
import math
import os
import re
import shutil
import signal
import socket
import stat
import time

import torch
import torch.nn.functional as F

from runtime import UserError, launch_env, plural

MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


# ----------------------------------------------------------------------------------------
# Datasets and the per-image transforms (the PIL path)

def check_data_path(args):
    """A mistyped --data-path is named as missing (and nothing is created or downloaded there)."""
    if args.data_path and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path {args.data_path} does not exist; point it at a folder with train/ and "
                        f"val/ (or test/)",
                        shared=True)


def train_dir(args):
    check_data_path(args)
    root = args.data_path or os.path.join("data", "imagenet")
    if not os.path.isdir(os.path.join(root, "train")):
        hint = ("expected train/ and val/ (or test/) inside, one folder per class" if args.data_path
                else "pass --data-path with the ImageNet folder, or --data cifar10 for a small run")
        raise UserError(f"no training images: {os.path.join(root, 'train')} not found; {hint}", shared=True)
    return os.path.join(root, "train")


def image_size(folder, probe=16):
    """(width, height) of a class-per-folder tree's images: the most common size among the first `probe`
    readable ones, taken across the classes (one odd file first, a 1 x 1 icon or a 12000 px scan, does
    not decide the run's size and recipe alone)."""
    from collections import Counter
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    def is_picture(path):
        return has_file_allowed_extension(path, IMG_EXTENSIONS)
    classes, _ = class_entries(folder)
    # (the pictures the dataset will list: in sub-folders of a class too)
    walls = split_walls(folder, classes)
    per_class = [pictures_in(os.path.join(folder, c), is_picture, walls=walls) for c in classes]
    # in turns over the classes: the first picture of each class, then the second of each, ...
    in_turns = itertools.chain.from_iterable(itertools.zip_longest(*per_class))
    sizes = Counter()
    for path in (p for p in in_turns if p is not None):
        try:
            with open_file(path) as f, Image.open(f) as im:
                sizes[im.size] += 1
        except Exception:                      # not an image, unreadable, a decompression bomb: not counted
            continue
        if sum(sizes.values()) == probe:
            break
    if not sizes:
        raise UserError(f"no images in {folder}: expected {folder}/<class>/<image>.jpg", shared=True)
    return sizes.most_common(1)[0][0]


def listed(folder):
    """os.listdir, a folder that cannot be read named in one line (not a PermissionError's traceback)."""
    try:
        return os.listdir(folder)
    except OSError as e:
        raise unreadable_folder(folder, e) from None


def class_entries(directory):
    """The class folders of a split (their names, sorted) and the paths of the other entries beside them,
    which are in no class; hidden entries are neither. An entry that cannot be looked at is refused: a
    link to a class folder on a disk not mounted would make the class vanish, and the run would train on
    the others without a word."""
    classes, loose = [], []
    for name in sorted(n for n in listed(directory) if not n.startswith(".")):
        path = os.path.join(directory, name)
        try:
            mode = os.stat(path).st_mode                             # (through links)
        except OSError as e:
            if os.path.islink(path) and isinstance(e, FileNotFoundError):
                raise UserError(f"{path} is a link to {os.readlink(path)}, which does not exist (a disk not "
                                f"mounted?): mount it, or remove the link", shared=True) from None
            if isinstance(e, PermissionError) and os.path.islink(path):      # the link's target is closed
                raise UserError(f"cannot look at {path}, a link to {os.readlink(path)} ({e.strerror}): give "
                                f"this user access to it, or remove the link", shared=True) from None
            if isinstance(e, PermissionError):
                raise unreadable_folder(directory, e) from None
            raise UserError(f"cannot look at {path} ({e.strerror or type(e).__name__}): repair or remove "
                            f"it (were it a class folder, its class would be left out)",
                            shared=True) from None
        if stat.S_ISDIR(mode):
            classes.append(name)
        else:
            loose.append(path)
    return classes, loose


def split_walls(directory, classes):
    """The real paths a class folder's walk must not enter: the split's folder and those above it, and
    the class folders (a link to one of them would list other classes' pictures under this class)."""
    real = os.path.realpath(directory)
    return ({real} | set(ancestors(real))
            | {os.path.realpath(os.path.join(directory, name)) for name in classes})


def ancestors(real):
    """The folders above a real path, up to the filesystem's root."""
    up = []
    while os.path.dirname(real) != real:
        real = os.path.dirname(real)
        up.append(real)
    return up


def unreadable_folder(folder, e):
    return UserError(f"cannot read the folder {folder} ({e.strerror or type(e).__name__}): give this user "
                     f"read access to it (chmod -R u+rX {folder})", shared=True)


def build_dataset(args, split, transform, loader=None):
    """The 'train' or 'val' split named by --data / --data-path, and its class names."""
    import torchvision.datasets as tvd
    train = split == "train"
    if args.data == "fake":
        n_cls = args.num_classes or 1000
        size = (args.subset or 10_000) if train else (args.val_subset or 1_000)
        data = tvd.FakeData(size, (3, args.img_size, args.img_size), n_cls, transform,
                            random_offset=0 if train else 10**7)
        return data, [f"class {i}" for i in range(n_cls)]
    check_data_path(args)
    root = args.data_path or "data"
    if args.data in ("cifar10", "cifar100") and not os.path.isdir(os.path.join(root, "train")):
        try:
            cifar = tvd.CIFAR10 if args.data == "cifar10" else tvd.CIFAR100
            data = cifar(root, train, transform, download=True)
        except Exception as e:
            raise UserError(f"could not find or download {args.data} into {root} ({type(e).__name__}). "
                            f"Offline? Point --data-path at a folder with train/<class>/ and test/<class>/ "
                            f"images") from None
    else:
        root = os.path.dirname(train_dir(args))
        split_dir = next((os.path.join(root, d) for d in (["train"] if train else ["val", "test"])
                          if os.path.isdir(os.path.join(root, d))), None)
        if split_dir is None:
            raise UserError(f"{root} has train/ but no val/ or test/ folder for validation")
        try:
            data = ClassFolders(split_dir, transform=transform, loader=loader or read_image)
        except UserError:
            raise
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"no images in {split_dir}: {e}. Expected "
                            f"{split_dir}/<class>/<image>.jpg") from None
    classes, keep = list(data.classes), args.subset if train else args.val_subset
    if len(classes) < 2:                    # (a loss of 0 and top-1 100% from the first step, silently)
        raise UserError(f"the {split} split has one class ({classes[0]}): a classifier needs two or more "
                        f"class folders", shared=True)
    if keep:   # the same subset on every rank and in every run
        g = torch.Generator().manual_seed(1234 if train else 4321)
        data = torch.utils.data.Subset(data, torch.randperm(len(data), generator=g)[:keep].tolist())
    return data, classes


def mean_std(img_size):
    """The normalisation of the model's input: CIFAR's statistics for small images, else ImageNet's."""
    return MEAN_STD["cifar" if img_size <= 64 else "imagenet"]


def class_folders():
    """torchvision's ImageFolder, without what is not a picture of a class: hidden folders as classes
    or inside them (.ipynb_checkpoints, .Trash), hidden files (macOS's ._x.jpg beside x.jpg, which
    torchvision takes for a JPEG), and a folder reached again through a link (a loop)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import has_file_allowed_extension

    class ClassFolders(ImageFolder):
        def find_classes(self, directory):
            classes, self.loose = class_entries(directory)     # loose: files beside the class folders
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory}")
            return classes, {name: i for i, name in enumerate(classes)}

        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                         allow_empty=False):
            is_picture = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
            self.skipped = {}                  # files of the class folders that are not pictures, by suffix
            self.not_walked = []               # links inside them to the split's own folders
            walls = split_walls(directory, list(class_to_idx))
            samples = [(path, index) for name, index in sorted(class_to_idx.items())
                       for path in pictures_in(os.path.join(directory, name), is_picture, self.skipped,
                                               walls, self.not_walked)]
            found = {index for _, index in samples}
            empty = sorted(name for name, index in class_to_idx.items() if index not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"no pictures in the class folder(s) {', '.join(empty)}")
            return samples
    return ClassFolders


def pictures_in(folder, is_picture, skipped=None, walls=(), not_walked=None):
    """The files under folder that is_picture accepts, in torchvision's order (by folder, then name),
    without hidden files and folders, each folder walked once however many links lead to it. The others
    are counted in `skipped` by suffix ({".heic": 3}), where it is given. A folder whose real path is above
    this one or in `walls` (split_walls: the split's folder, the other class folders), reached through a
    link or named by another class's link, is not walked, and its path is added to `not_walked` where it
    is given: through it the other classes' pictures would be listed under this class."""
    def cannot_read(e):                 # (os.walk would skip the folder, and its pictures, silently)
        raise unreadable_folder(e.filename, e)
    top = os.path.realpath(folder)
    walls = (set(walls) | set(ancestors(top))) - {top}   # (two class names for one folder: still walked)
    walked, seen = [], set()
    for root, dirs, files in os.walk(folder, onerror=cannot_read, followlinks=True):
        real = os.path.realpath(root)
        if real in walls:
            if not_walked is not None:
                not_walked.append(root)
            dirs[:] = []
            continue
        if real in seen:               # a link back to a folder already walked: no pictures twice, no loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))   # (so the first of two links wins)
        walked.append((root, sorted(f for f in files if not f.startswith("."))))
    paths = [os.path.join(root, f) for root, files in sorted(walked) for f in files]
    for path in itertools.filterfalse(is_picture, paths if skipped is not None else []):
        suffix = os.path.splitext(path)[1].lower() or "no suffix"
        skipped[suffix] = skipped.get(suffix, 0) + 1
    return [path for path in paths if is_picture(path)]


def ClassFolders(*args, **kwargs):   # (the class is made on first use: torchvision is imported lazily here)
    return class_folders()(*args, **kwargs)


def transforms(args, train):
    """The PIL path's per-image transforms, ending in a uint8 (3, S, S) tensor: every loader sends
    pixels as uint8 (a quarter of float32's bytes in shared memory and over the host-device link)
    and the device normalises them (Normalize). Small images: resize, centre crop, pad-and-crop,
    flip. ImageNet-sized: DeiT's RandomResizedCrop, flip, RandAugment; eval resize 256 / crop 224.
    DeiT's random erasing works on normalised pixels, so it is drawn apart (eraser) and applied
    on the device."""
    from torchvision.transforms import v2
    to_tensor = [v2.ToImage()]                                    # (3, S, S) uint8
    if args.img_size <= 64:
        fit = [v2.Resize(args.img_size), v2.CenterCrop(args.img_size)]
        if not train:
            return v2.Compose(fit + to_tensor)
        mode = "constant" if args.pad_mode == "zeros" else args.pad_mode
        crop = [v2.RandomCrop(args.img_size, padding=args.crop_padding,
                              padding_mode=mode)] if args.crop_padding else []
        return v2.Compose(fit + crop + [v2.RandomHorizontalFlip(args.hflip)] + to_tensor)
    bicubic = v2.InterpolationMode.BICUBIC
    if not train:             # resize to 256/224 of the crop, centre crop
        resize = v2.Resize(int(args.img_size / 0.875), interpolation=bicubic)
        return v2.Compose([resize, v2.CenterCrop(args.img_size)] + to_tensor)
    aug = [v2.RandomResizedCrop(args.img_size, interpolation=bicubic), v2.RandomHorizontalFlip(args.hflip)]
    aug += [randaugment_op(args.randaug,
                           mean_std(args.img_size)[0]) for _ in range(2)] if args.randaug else []
    return v2.Compose(aug + to_tensor)


def eraser(args):
    """DeiT's random erasing (per-pixel normal noise in normalised units), or None: its box drawn per
    sample after the other transforms (draw_erasing), its noise drawn and applied on the device
    (erasing_noise, erase)."""
    from torchvision.transforms import v2
    return v2.RandomErasing(p=args.erasing, value="random") if args.erasing and args.img_size > 64 else None


def draw_erasing(t, size):
    """The draws RandomErasing t makes for a (3, size, size) image, as its forward makes them (same
    calls, same order, so the same box), then a seed for the box's noise: (top, left, height, width,
    noise seed) or None. The noise itself is drawn on the device (erasing_noise): a float32 box of
    noise is 4 bytes a pixel through shared memory, where the seed is 8 bytes a box."""
    if t is None or torch.rand(1) >= t.p:
        return None
    e = t.make_params([torch.empty(3, 1, 1).expand(3, size, size)])   # a stand-in with the shape, no memory
    if e["v"] is None:                  # (its noise, drawn before the box's corner, is let go here)
        return None
    return e["i"], e["j"], e["h"], e["w"], int(torch.randint(2**62, ()))


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


def open_file(path):
    """open(path, "rb") for a picture, refusing what is not a regular file, before opening it: opening a
    named pipe named like an image waits for a writer forever, and reading a link to a device may
    never end."""
    mode = os.stat(path).st_mode              # (through links: a dangling one raises FileNotFoundError)
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise OSError(f"not a regular file but {kind}")
    return open(path, "rb")


def read_image(path):
    from PIL import Image
    try:
        with open_file(path) as f:
            return to_rgb(Image.open(f))
    except Exception as e:
        raise unreadable(path, e) from None


def to_rgb(im):
    """PIL's convert("RGB"), but 16-bit greyscale (PNG, TIFF) is scaled to 8 bits first: convert clips it
    at 255, which turns nearly every such picture white. Pillow opens 16-bit pictures as "I;16" (older
    versions: "I", which also holds 32-bit TIFFs): an "I" picture is taken as 16-bit when its values
    exceed 255, as 8-bit when they do not. Float pixels and 32-bit ranges have no agreed scale: refused
    (read_image names the file), where convert would make them black or white, silently."""
    if im.mode == "F" or im.mode.startswith("I"):
        import numpy as np
        from PIL import Image
        wide = np.asarray(im).astype(np.float64)
        top = wide.max(initial=0)
        if im.mode == "F" or top > 65535:
            raise ValueError(f"{im.mode} pixels up to {top:g}, not 8 or 16 bits: save it as an 8-bit image")
        if im.mode.startswith("I;16") or top > 255:                # 0..65535 -> 0..255
            wide = np.round(wide / 257)
        im = Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8))
    return im.convert("RGB")


def check_headers(data):
    """Open every file of a (possibly subset) class-folder split far enough to read its header, so a
    broken validation image stops the run at start, not after its first training epoch. Headers only
    (a few KB a file, 16 threads: seconds for ImageNet's 50,000); a file whose pixels are cut off
    past its header is still found when it is decoded."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    indices = range(len(data))
    while isinstance(data, torch.utils.data.Subset):   # (--val-subset, then this rank's share)
        indices, data = [data.indices[i] for i in indices], data.dataset
    if not hasattr(data, "samples"):                   # CIFAR's arrays, fake data: nothing to open
        return
    paths = [data.samples[i][0] for i in indices]

    def header(path):
        try:
            with open_file(path) as f, Image.open(f) as im:
                im.size
        except Exception as e:                      # empty, not an image, a dangling link, a bomb
            return unreadable(path, e)
    with ThreadPoolExecutor(16) as pool:
        error = next((e for e in pool.map(header, paths) if e is not None), None)
    if error:
        raise error


def unreadable(path, e):
    """The one-line error for an image file that does not decode (every loader path says the same)."""
    return UserError(f"cannot read image {path} ({type(e).__name__}: {e}); replace it, or move it out of "
                     f"the data folder")


def numpy_rgb(data, path):
    """Encoded bytes, (n,) uint8, as PIL decodes them for the PIL path: (H, W, 3) uint8 RGB."""
    import io
    import numpy as np
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return np.array(to_rgb(im))
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
    """Wraps a dataset: item (index, seed) is the sample augmented from its own random stream, as
    (uint8 image (3, S, S), label, erasing draw or None): the erasing box is drawn from the same stream
    after the other transforms, as a Compose ending in RandomErasing would draw it (draw_erasing)."""

    def __init__(self, data, eraser=None, size=0):
        self.data, self.eraser, self.size = data, eraser, size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):    # leave the caller's stream untouched
            torch.default_generator.manual_seed(seed)
            image, label = self.data[index]
            return image, label, draw_erasing(self.eraser, self.size)


def collate_erased(batch):
    """Collate SeededAugment items: images (B, 3, S, S) uint8, labels (B,) and the erasing table
    (B, 5) int64; no floats cross shared memory."""
    images, labels, draws = zip(*batch)
    return torch.stack(images), torch.tensor(labels), erasing_table(draws)


def erasing_table(draws):
    """Erasing draws (each None or (top, left, h, w, noise seed)) -> (B, 5) int64: top, left, height,
    width (height 0: not erased), noise seed."""
    return torch.tensor([d if d is not None else (0,) * 5 for d in draws], dtype=torch.long).view(-1, 5)


def noise_size(table):
    """The number of noise values a batch's erasing table asks for: sum of 3 h w (on the CPU)."""
    return int((3 * table[:, 2] * table[:, 3]).sum())


def erasing_noise(table, n):
    """The batch's erasing noise, standard normal, every box's (3, h, w) in batch order, flat (n,), made
    where table (erasing_table's, (B, 5)) is, from n = noise_size(table) counted on the CPU (so no
    device sync). Value i of a box is a function of the box's seed and i alone, by a counter-based
    hash (splitmix64) made into two uniforms and then a normal (Box-Muller): a sample's noise does not
    depend on its batch or the device, and a resumed batch gets its noise again."""
    device = table.device
    if n == 0:                                     # nothing erased in this batch: no work on the device
        return torch.zeros(0, device=device)
    sizes = 3 * table[:, 2] * table[:, 3]                                       # (B,)
    box = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes, output_size=n)   # (n,)
    position = torch.arange(n, device=device) - (sizes.cumsum(0) - sizes)[box]   # within its box, (n,)
    state = table[box, 4] + (2 * position + 1) * GOLDEN                          # wraps, as int64 does
    u1 = 1.0 - uniform(splitmix64(state))                                        # (0, 1]
    u2 = uniform(splitmix64(state + GOLDEN))                                     # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)        # (n,) float32


# splitmix64's constants (0x9e3779b97f4a7c15, 0xbf58476d1ce4e5b9, 0x94d049bb133111eb) as int64
GOLDEN, MIX1, MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def splitmix64(x):
    """splitmix64's finaliser on an int64 tensor: products wrap as uint64's would, and each right shift
    is made logical by masking the sign's copies away."""
    x = (x ^ ((x >> 30) & (2**34 - 1))) * MIX1
    x = (x ^ ((x >> 27) & (2**37 - 1))) * MIX2
    return x ^ ((x >> 31) & (2**33 - 1))


def uniform(bits):
    """The top 24 bits of int64 hashes -> float32 in [0, 1)."""
    return ((bits >> 40) & (2**24 - 1)).float() * 2.0**-24


# ----------------------------------------------------------------------------------------
# The loaders: which one, and building them

def use_memory(args):
    small_and_plain = args.img_size <= 64 and not args.randaug and not args.erasing
    return args.loader == "memory" or (args.loader == "auto" and small_and_plain)


def use_device(args, device):
    """--loader device, or auto on a GPU for the DeiT recipe from image files (not --data fake)."""
    return args.loader == "device" or (args.loader == "auto" and device.type == "cuda" and args.img_size > 64
                                       and args.data in ("folder", "imagenet"))


def loader_name(args, device):
    if use_memory(args):
        return "in memory"
    return "device loader" if use_device(args, device) else "PIL loader"


def loader_remedy(args, device):
    """What can make the loader keep up, for the loader and device this run has."""
    if use_memory(args):
        return ("the in-memory loader crops and flips on the device: a larger --batch-size amortises its "
                "launches")
    if use_device(args, device):       # its workers only read files and draw the augmentation
        return ("decoding and augmentation run on the device, where more workers cannot help: if reading "
                "the files is slow (network storage), copy them to a local disk; a larger batch per rank "
                "amortises the per-batch launches")
    if device.type == "cuda" and args.data != "fake":
        return "--loader device moves decoding and augmentation to the GPU"
    return "more --workers would help, if this node has the cores"


def cpu_decode_note(loader, group=None):
    """', N images decoded on the CPU ...' when the device path sent files nvJPEG does not take to the
    CPU this epoch, summed over ranks (group: a gloo group where the ranks' default one is NCCL); else ''.
    Call it on every rank."""
    n = torch.tensor(getattr(getattr(loader, "augment", None), "cpu_decoded", 0))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n, group=group)
    return f" | {int(n):,} images decoded on the CPU (CMYK, PNG or others nvJPEG does not take)" if n else ""


def default_workers():
    """This node's cores (those this process may run on) shared by this node's ranks, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    rank, world, local_rank, ranks_on_node = launch_env()
    return max(1, min(8, cores // ranks_on_node))


def say_skipped(train_set, val_set, env):
    """One line naming what the datasets leave out, so that nothing is left out without a word: the files
    of the class folders that are not pictures torchvision reads (a phone's .heic, a .gif), the files
    beside the class folders (in no class), and the links inside class folders that are not followed
    (pictures_in)."""
    skipped, loose, not_walked = {}, [], []
    for data in (train_set, val_set):
        data = getattr(data, "dataset", data)
        for suffix, n in getattr(data, "skipped", {}).items():
            skipped[suffix] = skipped.get(suffix, 0) + n
        loose += getattr(data, "loose", [])
        not_walked += getattr(data, "not_walked", [])
    said, loose, not_walked = [], list(dict.fromkeys(loose)), list(dict.fromkeys(not_walked))
    if skipped:
        most_first = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        kinds = ", ".join(f"{n:,} {suffix}" for suffix, n in most_first)
        said.append(f"{plural(sum(skipped.values()), 'file')} of the class folders that are not pictures "
                    f"train.py reads ({kinds}); convert them to JPEG or PNG to use them")
    if loose:
        said.append(f"{plural(len(loose), 'file')} beside the class folders, in no class ({some(loose)}); "
                    f"move a picture into its class's folder to use it")
    if not_walked:
        said.append(f"{plural(len(not_walked), 'folder')} inside class folders that are also the split's "
                    f"folder, a folder above it or another class's ({some(not_walked)}), not walked: each "
                    f"would list other classes' pictures under its class")
    if said:
        env.log("left out " + ". Also left out ".join(said))


def some(paths, n=3):
    """The first n paths, and how many more."""
    return ", ".join(paths[:n]) + (f" and {len(paths) - n:,} more" if len(paths) > n else "")


def build_loaders(args, env):
    """This rank's training and validation loaders, the class names and the number of training images.
    Validation is split over ranks (each image counted once); training follows the seeded sampler. Every
    loader yields batches on env.device, normalised there: (B, 3, S, S) float and (B,) labels."""
    from torchvision.transforms import v2
    memory, on_device = use_memory(args), use_device(args, env.device)
    decode = v2.Compose([v2.Resize(args.img_size), v2.CenterCrop(args.img_size), v2.PILToTensor()])
    train_set, classes = (build_dataset(args, "train", None, loader=read_encoded) if on_device else
                          build_dataset(args, "train", decode if memory else transforms(args, train=True)))
    val_set, val_classes = build_dataset(args, "val", decode if memory else transforms(args, train=False))
    check_same_classes(classes, val_classes, args.data_path)
    say_skipped(train_set, val_set, env)
    if len(train_set) < args.batch_size:
        whose = f" (the {args.recipe} recipe's)" if "batch_size" in getattr(args, "from_recipe", ()) else ""
        raise UserError(f"only {plural(len(train_set), 'training image')} for a batch of {args.batch_size}"
                        f"{whose}; lower --batch-size")
    if len(val_set) < env.world:
        raise UserError(f"{plural(len(val_set), 'validation image')} for {env.world} ranks: each rank "
                        f"evaluates a share; give at least {env.world} (--val-subset)", shared=True)
    val_set = torch.utils.data.Subset(val_set, range(env.rank, len(val_set), env.world))
    if not memory:                   # (the memory path decodes every image now anyway)
        check_headers(val_set)
    sampler = RepeatedAugSampler(len(train_set), env.rank, env.world, args.repeated_aug, args.seed)
    workers = args.workers if args.workers is not None else default_workers()
    eval_batch = max(env.micro, 256 if memory else 64)
    normalize = Normalize(*mean_std(args.img_size), env.device)
    if not memory:
        check_shared_memory(workers, eval_batch, args.img_size, env)      # (eval_batch >= env.micro)
    if memory:
        env.log(f"decoding {len(train_set):,} + {len(val_set):,} images into memory on {env.device} (once "
                f"per run: CIFAR-10's take 12 s on an idle 2-core CPU, longer on a loaded one)")
        t0 = time.time()
        train = MemoryLoader(*decode_all(train_set, workers), env.micro, normalize, sampler, train=True,
                             crop_padding=args.crop_padding, hflip=args.hflip, seed=args.seed,
                             pad_mode=args.pad_mode)
        val = MemoryLoader(*decode_all(val_set, workers), eval_batch, normalize)
        env.log(f"decoded {len(train_set):,} + {len(val_set):,} images into memory on {env.device} "
                f"in {time.time() - t0:.0f} s")
        return train, val, classes, len(train_set)
    kw = dict(num_workers=workers, pin_memory=env.device.type == "cuda", persistent_workers=workers > 0,
              worker_init_fn=ignore_signals)
    val = OnDevice(torch.utils.data.DataLoader(val_set, eval_batch, **kw), normalize)
    if on_device:
        augment = DeviceAugment(args, env.device)
        files = torch.utils.data.DataLoader(SeededDraws(train_set, augment), env.micro, sampler=sampler,
                                            drop_last=True, collate_fn=augment.collate,
                                            # (DeviceLoader pins what it copies)
                                            **dict(kw, pin_memory=False))
        return DeviceLoader(files, augment), val, classes, len(train_set)
    data = SeededAugment(train_set, eraser(args), args.img_size)
    train = OnDevice(torch.utils.data.DataLoader(data, env.micro, sampler=sampler, drop_last=True,
                                                 collate_fn=collate_erased, **kw), normalize)
    return train, val, classes, len(train_set)


def check_same_classes(train_classes, val_classes, root):
    """The two splits must name the same classes in the same order (a label is an index into them)."""
    if train_classes == val_classes:
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    if not only_train and not only_val:
        differ = "the same classes in another order"
    else:
        differ = "; ".join(f"only in {split}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for split, names in (("train", only_train), ("validation", only_val)) if names)
    raise UserError(f"train and validation splits in {root} have different classes ({differ}): give both "
                    f"splits one folder per class, with the same names")


def shm_in_flight(workers, batch, img_size, ranks, prefetch=2):
    """Bytes of /dev/shm this node's loader workers hold: `prefetch` uint8 batches each (DataLoader's
    prefetch_factor), per rank."""
    return ranks * workers * prefetch * batch * 3 * img_size * img_size


def check_shared_memory(workers, batch, img_size, env):
    """Say so at start, before a worker dies of it with "bus error", when /dev/shm has less free space than
    the loader workers will hold (Docker gives a container 64 MB unless told otherwise)."""
    if not workers or not os.path.isdir("/dev/shm"):
        return
    rank, world, local_rank, ranks_on_node = launch_env()
    need = shm_in_flight(workers, batch, img_size, ranks_on_node)
    shm = shutil.disk_usage("/dev/shm")          # free space: other jobs of the node may already hold some
    if shm.free < need and local_rank == 0:      # said by each node's first rank: a node has its own
        say, node = (env.log, "") if rank == 0 else (print, f" on {socket.gethostname()} (rank {rank})")
        say(f"warning{node}: /dev/shm has {shm.free / 2**20:,.0f} MiB free (of {shm.total / 2**20:,.0f} "
            f"MiB), and the loader workers of this node will hold about {need / 2**20:,.0f} MiB in it: run "
            f"the container with --ipc=host or --shm-size=16g, free it, or lower --workers (loader workers "
            f"die with 'bus error' when it is full)")


def ignore_signals(worker_id):
    # Ctrl-C reaches every process of the terminal's group, and Slurm's SIGTERM every process of
    # the job: both are for the main process, which stops where all ranks agree and then ends its
    # workers itself. (A worker whose main process is gone notices and exits within seconds.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class OnDevice:
    """A DataLoader of uint8 batches, moved to the device and normalised there (as timm's
    PrefetchLoader does): (images, labels) from validation, or (images, labels, erasing table) from
    the PIL training path, which the device then erases. set_epoch(epoch, start_batch) picks the
    epoch and where a resumed run starts in it, as for every training loader."""

    def __init__(self, loader, normalize):
        self.loader, self.normalize, self.device = loader, normalize, normalize.device
        self.sampler, self.batch_size, self.dataset = loader.sampler, loader.batch_size, loader.dataset

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self):
        # The DataLoader's iterator now, not at the first batch: making it draws from the global
        # random stream, which by then is the first step's (seeded per step; a resume starts elsewhere).
        return self.on_device(iter(self.loader))

    def on_device(self, batches):
        for x, y, *erasing in batches:
            x, y = (t.to(self.device, non_blocking=True) for t in (x, y))          # pinned on a GPU
            x = self.normalize(x)                                                   # (B, 3, S, S) float
            if erasing:                                     # (B, 5): boxes and noise seeds
                n = noise_size(erasing[0])                  # on the CPU, before the copy
                table = erasing[0].to(self.device, non_blocking=True)
                x = erase(x, table[:, :4], erasing_noise(table, n))
            yield x, y


class Normalize:
    """uint8 pixels (B, 3, S, S) -> the model's input, (x - 255 mean) / (255 std), on the device."""

    def __init__(self, mean, std, device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255    # made once, not per batch
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x):
        return (x.float() - self.mean) / self.std


def normalize_image(x, img_size):
    """One uint8 image (3, S, S) or batch (B, 3, S, S) -> the model's input, same shape (eval.py, the
    notebook)."""
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) * 255 for v in mean_std(img_size))
    return (x.float() - mean) / std


def erase(x, boxes, noise):
    """DeiT's random erasing for a whole batch at once: x (B, 3, S, S) normalised, boxes (B, 4) top,
    left, height, width (height 0: not erased), noise (n,) every box's (3, h, w) noise in batch order.
    One masked copy writes all boxes: the mask's elements, in memory order, run over sample, channel,
    row, column, the order in which each box's noise is laid out."""
    if noise.numel() == 0:              # (no box in this batch)
        return x
    S = x.shape[-1]
    r = torch.arange(S, device=x.device)
    top, left, height, width = boxes.unbind(1)                                    # (B,) each
    rows = (r >= top[:, None]) & (r < (top + height)[:, None])                    # (B, S)
    cols = (r >= left[:, None]) & (r < (left + width)[:, None])                   # (B, S)
    mask = (rows[:, :, None] & cols[:, None, :])[:, None].expand_as(x)          # (B, 3, S, S)
    return x.masked_scatter(mask, noise)


# ----------------------------------------------------------------------------------------
# The in-memory path (small images)

class MemoryLoader:
    """The fast path for small images (CIFAR, folders of <= 64 px): the whole split decoded once
    into a uint8 tensor on the training device, (N, 3, S, S), and augmented there a batch at a
    time: pad-and-crop and flip, the small-image recipe's augmentation. Against the PIL path this
    removes JPEG decoding and per-image transforms from every epoch. Batch b of an epoch is a
    function of (seed, epoch, rank, b), so a resumed run draws the same batches."""

    def __init__(self, images, labels, batch_size, normalize, sampler=None, train=False,
                 crop_padding=0, hflip=0.0, seed=0, pad_mode="zeros"):
        device = normalize.device
        self.images, self.labels = images.to(device), labels.to(device)        # (N, 3, S, S) uint8, (N,)
        self.batch_size, self.sampler, self.train, self.device = batch_size, sampler, train, device
        self.pad, self.hflip, self.seed, self.pad_mode = crop_padding, hflip, seed, pad_mode
        self.normalize, self.start = normalize, 0

    def __len__(self):       # batches per epoch; training drops the last partial batch
        n = self.sampler.per_rank if self.sampler else len(self.labels)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        self.start = start_batch

    def __iter__(self):
        if self.sampler:
            order = self.sampler.indices().to(self.device)
        else:
            order = torch.arange(len(self.labels), device=self.device)
        for b in range(self.start if self.train else 0, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]                                                 # (B, 3, S, S) uint8
            if self.train:
                g = torch.Generator(self.device).manual_seed(
                    seed_for("aug", self.seed, self.sampler.epoch, self.sampler.rank, b))
                x = pad_crop_flip(x, self.pad, self.hflip, g, self.pad_mode)
            yield self.normalize(x), self.labels[idx]                            # (B, 3, S, S) float


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
        # (B, S, S, C) -> (B, C, S, S)
        x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
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
    try:
        with open_file(path) as f:
            data = f.read()
    except OSError as e:                  # a dangling link, an unreadable file, a named pipe
        raise unreadable(path, e) from None
    if not data:
        raise unreadable(path, ValueError("the file is empty"))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), path


AFFINE_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def op_order(op):
    """Where a sample goes in its slot's order: affine ops first, then the others by op, no op last."""
    if op is None:
        return 2, "", 0.0
    return (0, "", 0.0) if op[0] in AFFINE_OPS else (1, *op)


def affine_theta(name, magnitude, size):
    """The (2, 3) inverse affine matrix torchvision's tensor op builds for RandAugment's op `name` on
    a size x size image, already divided by the half-size as its grid needs (torchvision's
    _affine_grid); computed in a loader worker, so the device gets one table instead of a tensor
    from Python numbers per op."""
    from torchvision.transforms.functional import _get_inverse_affine_matrix
    centre, shear, translate, angle = [-0.5 * size, -0.5 * size], [0.0, 0.0], [0.0, 0.0], 0.0
    if name in ("ShearX", "ShearY"):                      # shear about the top-left corner, as torchvision
        shear[name == "ShearY"] = math.degrees(math.atan(magnitude))
    elif name in ("TranslateX", "TranslateY"):
        centre, translate[name == "TranslateY"] = [0.0, 0.0], float(int(magnitude))
    else:                                                 # Rotate: about the centre, the other way round
        centre, angle = [0.0, 0.0], -(magnitude % 360)
    m = _get_inverse_affine_matrix(centre, angle, translate, 1.0, shear)
    return [[m[0] / (0.5 * size), m[1] / (0.5 * size), m[2] / (0.5 * size)],
            [m[3] / (0.5 * size), m[4] / (0.5 * size), m[5] / (0.5 * size)]]


class DeviceAugment:
    """DeiT's training augmentation of the PIL path (`transforms(args, train=True)` and `eraser`), in
    three parts: draw(seed, height, width) and collate(items) in a loader worker, and apply() on the
    device for a whole batch. collate packs a batch's draws into one int64 table (the affine matrices'
    float32 bits among its columns), so the device gets one pinned non-blocking copy per batch, whatever
    the batch size.
    It holds torchvision transforms and plain numbers only, so it pickles to spawned workers."""

    # The columns of the int64 table: crop box, flip, erasing box, label, per RandAugment slot the samples
    # in the order of their op (affine ops first, then by op; see pack), then the affine matrices: per
    # slot a (2, 3) float32 matrix, 12 floats a sample held as the bits of 6 int64 (unpacked by a view).
    CROP, FLIP, ERASE, LABEL, ORDER, THETA = 0, 4, 5, 10, 11, 13     # ERASE: box (4) and noise seed

    def __init__(self, args, device):
        from torchvision.transforms import v2
        self.size, self.device = args.img_size, device
        self.pil_transforms = transforms(args, train=True).transforms[:-1]   # in order
        # 2 ops, or none
        self.randaug = [t.transforms[0] for t in self.pil_transforms if isinstance(t, v2.RandomApply)]
        self.eraser = eraser(args)
        self.mean, self.std = mean_std(args.img_size)
        self.on_device = None                                      # tensors made once, at the first batch
        self.decode_stream = None                                  # nvJPEG's output stream (decode)
        self.cpu_decoded = 0                                       # images nvJPEG did not take this epoch

    def to_device(self, t):
        """A CPU tensor on the device without waiting for the GPU's queue (a pageable copy would)."""
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    # -- in a loader worker: the draws, then the batch's table

    def draw(self, seed, height, width):
        """The draws the PIL path makes for this sample: [crop box, flip, op 1, op 2, erasing], each
        op (name, magnitude) or None (not drawn, or RandAugment off), erasing (i, j, h, w, noise seed)
        or None. The calls and their order are those of torchvision's Compose: same seed, same numbers."""
        from torchvision.transforms import v2
        draws = []
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for t in self.pil_transforms:
                if isinstance(t, v2.RandomResizedCrop):      # stand-ins with the image's shape, no memory
                    box = t.make_params([torch.empty(3, 1, 1, dtype=torch.uint8).expand(3, height, width)])
                    draws.append((box["top"], box["left"], box["height"], box["width"]))
                elif isinstance(t, v2.RandomHorizontalFlip):  # (torchvision skips a transform on rand >= p)
                    draws.append(not torch.rand(1) >= t.p)
                elif isinstance(t, v2.RandomApply):          # RandAugment, one op with probability 0.5
                    draws.append(None if torch.rand(1) >= t.p else self.draw_op(t.transforms[0]))
            if not self.randaug:
                draws += [None, None]
            draws.append(draw_erasing(self.eraser, self.size))
        return draws

    def draw_op(self, ra):
        """One op as v2.RandAugment.forward draws it, for an image of the crop's size."""
        name, (magnitudes_of, signed) = ra._get_random_item(ra._AUGMENTATION_SPACE)
        magnitudes = magnitudes_of(ra.num_magnitude_bins, self.size, self.size)
        if magnitudes is None:
            return name, 0.0
        magnitude = float(magnitudes[ra.magnitude])
        return name, -magnitude if signed and torch.rand(()) <= 0.5 else magnitude

    def pack(self, draws, labels):
        """A batch's draws -> (table (B, 19) int64, groups: per slot the (op or "affine", count) runs of
        `order`)."""
        B, groups = len(draws), []
        table = torch.zeros(B, self.THETA + 6, dtype=torch.long)
        theta = torch.zeros(B, 2, 2, 3, dtype=torch.float32)        # (B, slot, 2, 3)
        table[:, self.CROP:self.CROP + 4] = torch.tensor([d[0] for d in draws], dtype=torch.long).view(B, 4)
        table[:, self.FLIP] = torch.tensor([bool(d[1]) for d in draws])
        table[:, self.ERASE:self.ERASE + 5] = erasing_table([d[4] for d in draws])
        table[:, self.LABEL] = torch.as_tensor(labels)
        for slot in range(2):
            ops = [d[2 + slot] for d in draws]
            # affine ops first (one grid_sample for all of them), then each other op's samples together
            order = sorted(range(B), key=lambda b: op_order(ops[b]))
            table[:, self.ORDER + slot] = torch.tensor(order)
            runs = []                                     # [op or "affine", count] along `order`
            for b in order:
                kind = "affine" if ops[b] and ops[b][0] in AFFINE_OPS else ops[b]
                if runs and runs[-1][0] == kind:
                    runs[-1][1] += 1
                else:
                    runs.append([kind, 1])
                if kind == "affine":
                    theta[b, slot] = torch.tensor(affine_theta(*ops[b], self.size))
            groups.append([(kind, n) for kind, n in runs if kind is not None])
        table[:, self.THETA:] = theta.view(B, 12).view(torch.long)       # the bits, not the values
        return table, groups

    def thetas(self, table):
        """The affine matrices of pack's table, (B, 2, 2, 3) float32: a view of its bits, no copy."""
        return table[:, self.THETA:].view(torch.float32).view(-1, 2, 2, 3)

    def collate(self, batch):
        """collate_fn of the device path's workers: files differ in size, so they travel as one flat
        tensor (one shared-memory segment per batch, not one per file)."""
        files, labels, draws, paths, takes = zip(*batch)
        table, groups = self.pack(draws, labels)
        return torch.cat(files), [len(f) for f in files], table, groups, list(paths), list(takes)

    # -- on the device: decode, then augment the batch

    def decode(self, files, paths, takes=None):
        """(3, H, W) uint8 images on the device. On a GPU, batched nvJPEG for the files it takes (takes:
        per file, from its header as the worker read it: an RGB or greyscale JPEG); libjpeg/libpng on the
        CPU for the rest (CMYK, a PNG named .JPEG) and for any file nvJPEG refuses after all. Those are
        counted (cpu_decoded; train.py reports them once per epoch). Greyscale and CMYK files become RGB,
        as PIL's convert("RGB") makes them."""
        if takes is None:                                                   # JPEG's magic number
            takes = [f[:2].tolist() == [0xFF, 0xD8] for f in files]
        images = [None] * len(files)
        on_gpu = [i for i, ok in enumerate(takes) if ok] if self.device.type == "cuda" else []
        if on_gpu:                        # one file refused fails the whole call: then file by file
            decoded = (self.nvjpeg([files[i] for i in on_gpu])
                       or [(self.nvjpeg([files[i]]) or [None])[0] for i in on_gpu])
            for i, image in zip(on_gpu, decoded):
                images[i] = image
        for i, image in enumerate(images):
            if image is None:
                images[i] = self.to_device(cpu_decode(files[i], paths[i]))
                self.cpu_decoded += self.device.type == "cuda"
        return images

    def nvjpeg(self, files):
        """The files decoded by nvJPEG, or None where it refuses one of them."""
        try:
            return gpu_decode(files, self.device, self)
        except RuntimeError as e:
            if is_device_fault(e):        # out of memory or a failing device is not hidden
                raise
            return None

    def made_once(self):
        """The device tensors every batch uses: mean and std, the fill colour, the affine base grid."""
        if self.on_device is None:
            S, fill = self.size, (self.randaug[0]._fill["others"] if self.randaug else [0.0] * 3)
            line = torch.linspace((1.0 - S) * 0.5, (S - 1.0) * 0.5, steps=S)    # torchvision's _affine_grid
            rows, cols = line[:, None].expand(S, S), line.expand(S, S)
            base = torch.stack([cols, rows, torch.ones(S, S)], -1)                   # (S, S, 3): x, y, 1
            self.on_device = {
                "normalize": Normalize(self.mean, self.std, self.device),
                "fill": self.to_device(torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)),
                "grid": self.to_device(base.view(1, S * S, 3)),
                "blur": self.to_device(torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13)}
        return self.on_device

    def apply(self, images, crops, table, groups, n_noise):
        """images: B decoded (3, H, W) uint8 on the device; crops: their crop boxes (a list, on the CPU);
        table: collate's, on the device; groups: collate's; n_noise: noise_size of the table's erasing
        columns. Returns (B, 3, S, S) float, normalised and erased."""
        S, made, theta = self.size, self.made_once(), self.thetas(table)
        x = torch.cat([resized_crop(im, *box, S) for im, box in zip(images, crops)])
        x = x.round_().clamp_(0, 255).to(torch.uint8)                                # (B, 3, S, S)
        x = torch.where(table[:, self.FLIP, None, None, None].bool(), x.flip(3), x)
        for slot, ra in enumerate(self.randaug):
            order, start = table[:, self.ORDER + slot], 0
            for name, n in groups[slot]:
                idx = order[start:start + n]                       # the samples that drew this op, (n,)
                start += n
                if name == "affine":
                    x[idx] = affine(x[idx], theta[idx, slot], made["grid"], made["fill"])
                elif name[0] != "Identity":
                    x[idx] = colour_op(ra, x[idx], *name, made["blur"])
        x = made["normalize"](x)                                              # (B, 3, S, S) float
        erasing = table[:, self.ERASE:self.ERASE + 5]                         # (B, 5)
        return erase(x, erasing[:, :4], erasing_noise(erasing, n_noise))

    def __call__(self, images, draws):
        """Augment decoded images with their draw() lists, without a loader (tests, the node check)."""
        table, groups = self.pack(draws, [0] * len(draws))
        n = noise_size(table[:, self.ERASE:self.ERASE + 5])
        return self.apply(images, [d[0] for d in draws], self.to_device(table), groups, n)


def resized_crop(image, top, left, height, width, size):
    """torchvision's resized_crop of one (3, H, W) uint8 image: (1, 3, size, size) float, not rounded
    (the batch is rounded at once). Crops differ in size, so this is the one op per sample."""
    crop = image[None, :, top:top + height, left:left + width].float()
    # CUDA's antialiased bicubic holds each block's filter weights in shared memory, (32 iw + 33 ih) * 4
    # bytes with iw, ih = 1 + 2 ceil(2 crop / size): past about 47 x the output side that is more than a
    # block may have ("Too much shared memory required"), and the step fails. So a side over 32 x is first
    # averaged over whole blocks of k pixels (k per side, the least that leaves at most 32 x): a box inside
    # bicubic's far wider filter, so near the one-step resize (the CPU's, which has no such limit); up to
    # k - 1 pixels at the crop's far edge are dropped, under 1/32 of an output pixel.
    shrink = [math.ceil(n / (32 * size)) for n in (height, width)]
    if max(shrink) > 1:
        crop = F.avg_pool2d(crop, shrink)
    return F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def affine(x, theta, base_grid, fill):
    """torchvision's tensor affine (bilinear, fill colour outside) for n images at once, each with its
    own matrix: x (n, 3, S, S) uint8, theta (n, 2, 3) from affine_theta, base_grid (1, S*S, 3)."""
    n, _, S, _ = x.shape
    grid = base_grid.expand(n, -1, -1).bmm(theta.transpose(1, 2)).view(n, S, S, 2)   # (n, S, S, 2)
    image = torch.cat([x.float(), x.new_ones(n, 1, S, S, dtype=torch.float32)], 1)  # a channel marks inside
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image, inside = out[:, :3], out[:, 3:]
    return ((image - fill) * inside + fill).round_().to(torch.uint8)


def colour_op(ra, x, name, magnitude, blur):
    """RandAugment's colour op `name` on uint8 images x (n, 3, S, S), as torchvision's tensor op. Two are
    our own, equal to torchvision's: its Sharpness makes its 3 x 3 kernel from Python numbers at every
    call (a blocking copy to a GPU; `blur` is made once), its AutoContrast assigns through a boolean
    mask (a host sync on a GPU)."""
    from torchvision.transforms import v2
    if name == "Sharpness":
        return sharpness(x, 1.0 + magnitude, blur)
    if name == "AutoContrast":
        return autocontrast(x)
    return ra._apply_image_or_video_transform(x, name, magnitude, fill=ra._fill,
                                              interpolation=v2.InterpolationMode.BILINEAR)


def sharpness(x, factor, blur):
    """torchvision's adjust_sharpness for uint8 x (n, 3, S, S): blend with a 3 x 3 blur, borders kept."""
    out = x.float()
    blurred = F.conv2d(out, blur.expand(3, 1, 3, 3), groups=3).round_()          # (n, 3, S-2, S-2)
    inner = out[..., 1:-1, 1:-1]
    inner.add_(blurred.sub_(inner), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def autocontrast(x):
    """torchvision's autocontrast for uint8 x (n, 3, S, S): each channel stretched to 0..255."""
    image = x.float()
    low, high = image.amin(dim=(-2, -1), keepdim=True), image.amax(dim=(-2, -1), keepdim=True)
    flat = high == low                                           # a constant channel stays as it is
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))                  # (as torchvision rounds it)
    return image.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


# Errors of the device itself (subclasses of RuntimeError), which a fallback must let through
DEVICE_FAULTS = tuple(e for e in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e)

# torchvision's "Failed to decode batch: <status>": nvJPEG's allocator (5), execution (6) and internal (8)
# failures are the device's; a bad or unsupported JPEG (3, 4) is the file's
NVJPEG_DEVICE_STATUS = re.compile(r"failed to [^:]*: [568]$")


def is_device_fault(e):
    """Whether an error of the batched decode is the device's, not the files'. torchvision re-raises
    every nvJPEG and CUDA error as a plain RuntimeError ("Error while decoding JPEG images: ..."), so
    the message tells them apart: out of memory, a CUDA error, nvJPEG's status for a device failure.
    torchvision 0.29's decoder (on torch's stable ABI) checks its CUDA calls with a macro that says only
    "... API call failed at <file>, line N", the cause (out of memory among them) dropped: a CUDA call
    failing is the device's, never a file's."""
    said = str(e).lower()
    return (isinstance(e, DEVICE_FAULTS) or NVJPEG_DEVICE_STATUS.search(said) is not None
            or any(sign in said for sign in ("out of memory", "cuda error", "cuda driver error",
                                             "failed to synchronize", "api call failed")))


def gpu_decode(files, device, augment):
    """Batched nvJPEG. torchvision's CUDA decoder allocates its outputs on the current stream but writes
    them from a private one that does not wait for it, so memory that queued kernels still read can be
    overwritten (torchvision pull request 9606). Decoding under a stream of its own gives the outputs
    memory that only decodes use; record_stream keeps each from being reused while the training
    stream may still read it. The node check (results/node_check.py) tests this on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    current = torch.cuda.current_stream(device)
    if augment.decode_stream is None:
        augment.decode_stream = torch.cuda.Stream(device)
    augment.decode_stream.wait_stream(current)
    with torch.cuda.stream(augment.decode_stream):
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(augment.decode_stream)
    for image in images:
        image.record_stream(current)
    return images


def cpu_decode(data, path):
    """One file's bytes -> (3, H, W) uint8 RGB on the CPU, as PIL's convert("RGB") gives it."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:          # BMP, TIFF, PPM...: ImageFolder lists them, PIL reads them
        image = None
    # (16-bit PNGs decode to uint16; an animated GIF to all its frames, where PIL reads the first)
    if image is None or image.dtype != torch.uint8 or image.ndim != 3:
        image = torch.from_numpy(numpy_rgb(data, path)).permute(2, 0, 1)
    return image


class SeededDraws(torch.utils.data.Dataset):
    """The device path's worker side: item (index, seed) is (file bytes, label, draws, path, takes)."""

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
                # (Pillow names a JPEG that carries more pictures, as cameras write them, MPO)
                takes = im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L")
        except Exception as e:
            raise unreadable(path, e) from None
        # takes: whether nvJPEG decodes it (an RGB or greyscale JPEG), known here at no cost
        return data, label, self.augment.draw(seed, height, width), path, takes


class DeviceLoader:
    """The device path's training loader: workers yield files and draws, the device decodes and augments."""

    def __init__(self, loader, augment):
        self.loader, self.augment = loader, augment
        self.sampler, self.batch_size = loader.sampler, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)
        self.augment.cpu_decoded = 0

    def __iter__(self):
        batches = iter(self.loader)         # now: making it draws from the global stream (OnDevice)
        return (self.on_device(batch) for batch in batches)

    def on_device(self, batch):
        """A batch of DeviceAugment.collate, decoded and augmented: (B, 3, S, S) float and (B,) labels."""
        aug, (files, sizes, table, groups, paths, takes) = self.augment, batch
        crops = table[:, aug.CROP:aug.CROP + 4].tolist()               # (on the CPU: no device sync)
        n_noise = noise_size(table[:, aug.ERASE:aug.ERASE + 5])        # (on the CPU: no device sync)
        table = aug.to_device(table)                                   # the batch's one copy
        x = aug.apply(aug.decode(torch.split(files, sizes), paths, takes), crops, table, groups, n_noise)
        return x, table[:, aug.LABEL]


# ----------------------------------------------------------------------------------------
# MixUp / CutMix, as timm's Mixup does it for DeiT

def mixup_cutmix(x, y, args, num_classes):
    """Per batch, MixUp (alpha --mixup, DeiT: 0.8) or CutMix (--cutmix, DeiT: 1.0) with equal chance,
    or only the one whose alpha is not 0; the partner of image i is image B-1-i (the batch reversed,
    as in timm). Returns images and soft targets (B, classes).
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
