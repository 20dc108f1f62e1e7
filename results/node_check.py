"""
The node check: on a new machine, run this first. In a few minutes it says whether the GPU path of
train.py works on this node and how fast it is, and writes a report a lab can paste into a bug report:
node-check.md (a table per section, failures marked FAIL with what to do) and node-check.json.

    python results/node_check.py --out results/node-h100   # a GPU node: 5-10 minutes, the quick tests too
    python results/node_check.py --small --device cpu --compile-backend eager --out node-check-cpu
                                              # a CPU: small sizes (eager: no C++ build of compiled kernels)

Sections, each on whatever the machine has (on a CPU, the CPU stands in for the device):
  machine  torch, torchvision, CUDA and driver, GPUs, CPU cores, /dev/shm, NCCL; what each means
  decode   generated ImageNet-sized JPEGs decoded by the device path in batches and by the CPU path one
           by one: the largest pixel difference, alone and while other work runs on the GPU's stream
           (the nvJPEG stream race would show here: see loaders.gpu_decode); beyond tolerance: FAIL.
           A control decodes without the stream ordering, to show whether the race shows on this node;
           then each batch read on the training stream after it is dropped (record_stream's guard),
           and its control without record_stream.
           Then greyscale, progressive and CMYK JPEGs and a PNG named .JPEG in one batch, against PIL
  speed    images/s of the model alone (a synthetic batch on the device) and of loader + model, SR-ViT-S
           R=1 and R=4, bf16 (fp16 on GPUs before Ampere), with and without --compile, at one rank's
           share of DeiT's batch of 1024 (at most 256); the loader's share, MFU, 300 epochs' time
           (derived: every GPU as fast as this one)
  ddp      a torchrun run with a rank per GPU, at least 2 (gloo over one GPU if the node has one), on the
           paper's path (the generated JPEGs, the device loader, DeiT's recipe), that saves, is stopped
           with SIGTERM, resumes and ends with exit 0
  tests    the test suite on this machine: by default on a GPU node its quick part (the GPU tests and
           all but the end-to-end ones, and of those the ones that start ranks: QUICK_TESTS, a few
           minutes); --tests all, or none. They get what --time-limit (600 s for the whole check) leaves,
           at most 420 s (all: 900 s); tests that did not run or were cut short make the report INCOMPLETE
"""

import argparse
import contextlib
import gc
import itertools
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import loaders  # noqa: E402
import runtime  # noqa: E402
import srvit  # noqa: E402
import train  # noqa: E402
from bench import imagenet_like_folder, sync, timed  # noqa: E402

IMAGENET_TRAIN = 1_281_167          # ImageNet-1K training images: one epoch
DECODE_MEAN_TOLERANCE = 2.0         # mean pixel difference (0..255) nvJPEG vs libjpeg may show
DECODE_MAX_TOLERANCE = 64           # largest pixel difference: rounding shows at edges, a wrong decode beyond
DEIT_BATCH = 1024                   # DeiT's global batch: the paper's command splits it over the GPUs
# seconds for the test suite, at most: its quick part, and all of it (which takes longer)
TESTS_TIMEOUT = {"quick": 420, "all": 900}
# The quick part: all but the end-to-end tests (marked slow), and of those the ones that start ranks
# (torchrun, gloo over the CPU whatever the node has): on a GPU node they show that they name their device.
QUICK_TESTS = "not slow or torchrun or ddp or two_nodes or another_rank"
RED, PLAIN = ("\033[31m", "\033[0m") if sys.stdout.isatty() else ("", "")


class Report:
    """The report's sections as markdown tables, and the same numbers as JSON."""

    def __init__(self, out):
        self.out, self.lines, self.data, self.failures, self.widths = out, [], {}, [], {}
        self.interrupted = None             # where a Ctrl-C stopped the check: "in the decode section"
        self.incomplete = []                # what did not run to its end, and why (not a failure of the node)

    def section(self, name, title, header):
        self.lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        self.data[name], self.widths[name] = [], len(header)
        print(f"\n{title}")

    def attempt(self, name, check, *a):
        """Run one section and return what it returns; an error in it becomes the section's FAIL row (its
        traceback on stderr) and the next section still runs, so one broken part never hides the others."""
        try:
            return check(self, *a)
        except KeyboardInterrupt:
            self.interrupted = f"in the {name} section"
            raise
        except Exception as e:                  # any failure of the node's software is what we report
            traceback.print_exc()
            if name not in self.data:
                self.section(name, name.capitalize(), ["result", "error"])
            fix = ("out of memory: see what else holds the GPU (nvidia-smi); for the speed section, re-run "
                   "with a smaller --batch" if "out of memory" in str(e) else
                   "the traceback is on stderr; report it with this file")
            cells = ["the section stopped"] + ["-"] * (self.widths[name] - 2)
            self.row(name, *cells, f"{type(e).__name__}: {runtime.first_line(e)[:200]}", ok=False, fix=fix)

    def row(self, name, *cells, ok=True, fix=""):
        cells = [f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells]
        if not ok:
            cells[-1] = f"FAIL: {cells[-1]}. {fix}".strip()
            self.failures.append(f"{name}: {cells[-1]}")
        self.lines.append("| " + " | ".join(cells) + " |")
        self.data[name].append(cells)
        print(("  " if ok else f"  {RED}") + " | ".join(cells) + ("" if ok else PLAIN))

    def write(self, device):
        os.makedirs(self.out, exist_ok=True)
        verdict = ("every check passed" if not self.failures else
                   f"{len(self.failures)} check(s) FAILED:\n" + "\n".join(f"- {f}" for f in self.failures))
        if self.incomplete:
            verdict = (f"INCOMPLETE ({'; '.join(self.incomplete)}); "
                       + verdict.replace("every check passed", "every check that ran passed"))
        if self.interrupted:
            verdict = f"INTERRUPTED {self.interrupted} (the sections after it did not run); {verdict}"
        head = [f"# Node check: {device}", "", f"`python results/node_check.py {' '.join(sys.argv[1:])}`, "
                f"{time.strftime('%Y-%m-%d %H:%M')}. Result: {verdict}"]
        runtime.write_text(os.path.join(self.out, "node-check.md"), "\n".join(head + self.lines) + "\n")
        runtime.write_json(os.path.join(self.out, "node-check.json"),
                           {"device": device, "failures": self.failures, "incomplete": self.incomplete,
                            "sections": self.data})
        print(f"\nwrote {self.out}/node-check.md and node-check.json: {verdict}")


# ----------------------------------------------------------------------------------------
# machine

def machine(report, device):
    report.section("machine", "Machine", ["what", "value", "what it means for a run"])
    present = torch.cuda.device_count()
    gpus = present if device.type == "cuda" else 0           # the GPUs this check's runs use
    report.row("machine", "torch / torchvision",
               f"{torch.__version__} / {__import__('torchvision').__version__}",
               "train.py needs torch >= 2.7")
    report.row("machine", "CUDA (torch) / driver", f"{torch.version.cuda} / {driver_version()}",
               "the driver must be at least the CUDA version torch was built for")
    names = sorted({torch.cuda.get_device_name(i) for i in range(present)}) if present else ["none"]
    peak = runtime.peak_flops(device)
    meaning = (f"datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s (MFU's denominator)" if peak else
               "no datasheet peak known: MFU is not reported")
    if present and not gpus:
        meaning = "not used: this check runs on the CPU (--device cpu)"
    report.row("machine", "GPUs", f"{present} x {', '.join(names)}", meaning)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_rank = max(1, min(8, cores // max(gpus, 1)))
    report.row("machine", "CPU cores", cores, f"{per_rank} loader workers per rank by default")
    ranks = max(gpus, 1)
    micro = DEIT_BATCH // ranks                     # train.py's validation batch: max(micro-batch, 64)
    need = loaders.shm_in_flight(per_rank, max(micro, 64), 224, ranks)     # what train.py's loaders hold
    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    have = shm and shm.free                                  # free, not total: other jobs may hold some
    size = f"{shm.free / 2**30:.1f} GiB free of {shm.total / 2**30:.1f} GiB" if shm else "none"
    report.row("machine", "/dev/shm", size,
               f"the loaders hold about {need / 2**30:.2f} GiB in flight on this node",
               ok=have is None or have >= need,
               fix="run the container with --ipc=host or --shm-size=16g, or lower --workers")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if gpus else "-"
    report.row("machine", "NCCL", nccl, "multi-GPU runs use NCCL" if gpus else "no GPU: ranks use gloo")
    return gpus


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split("\n")[0].strip() or "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


# ----------------------------------------------------------------------------------------
# decode

def decode_check(report, args, device, root):
    """The device path's batched decode against the CPU decoder (libjpeg and nvJPEG round differently:
    the mean difference is bounded), then again while other work is queued on the GPU's stream, which
    must give the same pixels and leave the other work's tensors whole (the stream race would not)."""
    report.section("decode", "Decode: the device path against the CPU decoder, and under load",
                   ["case", "images", "largest difference (0..255)", "mean difference", "result"])
    targs = train.get_args(["--data-path", root, "--recipe", "deit", "--loader", "device", "--workers", "0",
                            "--device", device.type])
    augment = loaders.DeviceAugment(targs, device)
    files = [loaders.read_encoded(os.path.join(d, f))[0]                   # (n,) uint8 bytes each
             for d, _, names in sorted(os.walk(os.path.join(root, "train"))) for f in sorted(names)]
    cpu = [loaders.cpu_decode(f, "generated") for f in files]
    alone, _ = decode_in_batches(augment, files, args.decode_batch, device, None)
    worst, mean = differences(alone, cpu)
    ok = mean <= DECODE_MEAN_TOLERANCE and worst <= DECODE_MAX_TOLERANCE
    passed = "ok" if device.type == "cuda" else "ok (no GPU: the device path decodes on the CPU here)"
    report.row("decode", "device path alone, against the CPU decoder", len(files), worst, mean,
               passed if ok else f"above {DECODE_MAX_TOLERANCE} (largest) or {DECODE_MEAN_TOLERANCE} (mean)",
               ok=ok,
               fix="the device path decodes unlike the CPU here: train with --loader pil, and report "
                   "the torch and torchvision versions")
    work = lambda dev, n: gpu_work(dev, n, alone[0].numel())                 # (pictures all of one size)
    loaded, corrupt = decode_in_batches(augment, files, args.decode_batch, device, work)
    worst, mean = differences(loaded, alone)
    ok = worst == 0 and not corrupt
    what = "corrupted the other work's tensors" if corrupt else "not the same pixels as alone"
    passed = "ok: the same pixels" if device.type == "cuda" else "ok (no GPU: no stream to race with)"
    report.row("decode", "while the GPU's stream runs other work, against alone", len(files), worst, mean,
               passed if ok else what, ok=ok,
               fix="the decode races with other work on this node: train with --loader pil, and report the "
                   "torch and torchvision versions")
    race_control(report, augment, files, args.decode_batch, device, work, alone)
    read_after_drop(report, augment, files, args.decode_batch, device, alone)
    odd_files(report, augment)


def read_after_drop(report, augment, files, batch, device, alone):
    """Each batch's pictures read by kernels queued on the training stream behind a wait, and dropped
    before the next batch decodes, as a training step drops its batch. Their memory must not go to the
    next decode before those reads have run: loaders.gpu_decode's record_stream sees to that, and
    without it the reads could see the next batch's pixels. The sums read must be those of the pictures
    decoded alone. A control decodes the same without record_stream: where the reuse shows there, the
    check is shown able to fail on this node (not a failure of the node either way)."""
    case = "read on the training stream after the batch is dropped, against alone"
    control = "the same, decoded without record_stream (a control, not a failure)"
    if device.type != "cuda":
        for name in (case, control):
            report.row("decode", name, "-", "-", "-", "ok (no GPU: no stream to race with)")
        return
    want = torch.tensor([int(image.sum(dtype=torch.int64)) for image in alone])         # (images,)
    guarded = lambda chunk: augment.decode(chunk, ["generated"] * len(chunk))
    wrong = reads_after_drop(files, batch, device, guarded, want)
    report.row("decode", case, len(files), "-", "-",
               "ok: every picture read as decoded" if not wrong else f"{wrong} pictures read changed",
               ok=not wrong,
               fix="a decode reuses memory the training stream still reads: train with --loader pil, and "
                   "report the torch and torchvision versions")
    stream = torch.cuda.Stream(device)
    try:
        raced = reads_after_drop(files, batch, device, lambda chunk: unguarded_decode(chunk, device, stream),
                                 want)
    except RuntimeError as e:           # (the row is a control: its failure is no failure of the node)
        report.row("decode", control, len(files), "-", "-",
                   f"the control could not run ({runtime.first_line(e)})")
        return
    report.row("decode", control, len(files), "-", "-",
               f"the reuse shows ({raced} pictures read changed): the check above can fail here" if raced
               else "the reuse did not show on this node: the check above proves less here")


def reads_after_drop(files, batch, device, decode, want):
    """How many pictures' sums, read on the current stream behind about 0.1 s of queued waiting after
    their batch is dropped, differ from `want`."""
    sums = []
    for start in range(0, len(files), batch):
        images = decode(files[start:start + batch])
        with torch.cuda.device(device):
            torch.cuda._sleep(200_000_000)         # ~0.1 s of GPU cycles ahead of the reads
        sums.append(torch.stack([image.sum(dtype=torch.int64) for image in images]))
        del images                                 # dropped while the reads are still queued
    return int((torch.cat(sums).cpu() != want).sum())


def unguarded_decode(files, device, stream):
    """loaders.gpu_decode without record_stream: the decoded pictures' memory goes back to `stream`'s
    pool as soon as they are dropped, whatever the training stream still has queued on them."""
    from torchvision.io import ImageReadMode, decode_jpeg
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(stream)
    return images


def race_control(report, augment, files, batch, device, work, alone):
    """The check above, with torchvision's decoder called as it comes (on the training stream, no
    ordering): where the race shows here, the check above is shown able to fail on this node. Not a
    failure of the node either way; where it does not show, the check above proves less."""
    case = "the same, decoded without the stream ordering (a control, not a failure)"
    if device.type != "cuda":
        report.row("decode", case, "-", "-", "-", "ok (no GPU: no stream to race with)")
        return
    from torchvision.io import ImageReadMode, decode_jpeg
    unordered = lambda chunk: decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
    try:
        raced, corrupt = decode_in_batches(augment, files, batch, device, work, decode=unordered)
    except RuntimeError as e:           # (the row is a control: its failure is no failure of the node)
        said = runtime.first_line(e)
        report.row("decode", case, len(files), "-", "-", f"the control could not run ({said})")
        return
    worst, mean = differences(raced, alone)
    shown = worst > 0 or corrupt
    report.row("decode", case, len(files), worst, mean,
               "the race shows: the check above can fail here" if shown else
               "the race did not show on this node: the check above proves less here")


def odd_files(report, augment):
    """Files a photo collection holds besides RGB JPEGs, in one batch through the device path, each against
    PIL's convert("RGB"): greyscale, progressive and CMYK JPEGs, a PNG named .JPEG. Only the CMYK file and
    the PNG may go to the CPU."""
    import io
    from PIL import Image
    g = np.random.default_rng(0)
    base = Image.fromarray(g.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((200, 150), Image.BICUBIC)
    cases = [("greyscale JPEG", base.convert("L"), {}), ("progressive JPEG", base, {"progressive": True}),
             ("CMYK JPEG", base.convert("CMYK"), {}), ("PNG named .JPEG", base, {"format": "PNG"})]
    files, want = [], []
    for _, image, options in cases:
        buffer = io.BytesIO()
        image.save(buffer, **{"format": "JPEG", "quality": 90, **options})
        files.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        pil = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        want.append(torch.from_numpy(pil).permute(2, 0, 1))
    # which files nvJPEG takes, as the loader's workers tell from each header
    takes = [loaders.SeededDraws([((f, name), 0)], augment)[0, 0][4] for f, (name, _, _) in zip(files, cases)]
    augment.cpu_decoded = 0
    got = [im.cpu() for im in augment.decode(files, [name for name, _, _ in cases], takes)]
    worst, mean = differences(got, want)
    ok = mean <= DECODE_MEAN_TOLERANCE and worst <= DECODE_MAX_TOLERANCE
    if augment.device.type != "cuda":
        said = "ok (no GPU: the device path decodes on the CPU here)"
    else:                        # 2 expected: the CMYK file and the PNG; 3 if nvJPEG refuses progressive ones
        said = f"ok: {augment.cpu_decoded} of {len(files)} decoded on the CPU (2 expected: CMYK and PNG)"
    report.row("decode", "greyscale, progressive and CMYK JPEGs and a PNG named .JPEG, against PIL",
               len(files), worst, mean, said if ok else "pixels unlike PIL's", ok=ok,
               fix="nvJPEG takes these files unlike PIL here: train with --loader pil, and report the torch "
                   "and torchvision versions")


def decode_in_batches(augment, files, batch, device, load, decode=None):
    """Every file through the device path's decode (or `decode`), in batches; with `load`, each batch
    while other work is queued. Returns (images on the CPU, whether the other work came out wrong)."""
    decode = decode or (lambda chunk: augment.decode(chunk, ["generated"] * len(chunk)))
    images, corrupt = [], False
    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        pending = load(device, len(chunk)) if load else None
        images += [im.cpu() for im in decode(chunk)]
        if pending:
            corrupt |= not pending()              # the other work's result, checked after the decode
    return images, corrupt


def differences(images, reference):
    """(largest, mean) absolute pixel difference between two lists of (3, H, W) uint8 images."""
    diffs = [(a.int() - b.int()).abs() for a, b in zip(images, reference)]
    mean = sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs)
    return max(int(d.max()) for d in diffs), mean


def gpu_work(device, n, image_bytes):
    """Queue work on the current stream that reads n tensors the size of a decoded picture, then free
    them: memory that queued work still reads. torchvision's decoder allocates its outputs on the
    current stream, so the caching allocator would hand it these blocks next (same stream, same pool:
    pictures under 1 MiB and these tensors both sit in the small-block pool) and nvJPEG would write
    them before the work read them. loaders.gpu_decode decodes under a stream of its own, whose blocks
    are apart: with it the check passes; without it, the work reads decoded pixels, or its fills
    overwrite the decoded pictures, and the check fails. Returns a check, called after the decode, that
    the work read what was written."""
    if device.type != "cuda":
        return None
    x = torch.full((4096, 4096), 1.0 / 4096, device=device)
    delay = x
    for _ in range(20):                      # ~20 matmuls queued ahead: milliseconds the decode may overlap
        delay = delay @ x
    held = [torch.full((image_bytes,), 7, dtype=torch.uint8, device=device) for _ in range(n)]
    total = torch.stack([t.sum() for t in held]).sum()          # read after the matmuls, on this stream
    del held                                 # back to the pool while the reads are still queued
    return lambda: total.item() == 7 * image_bytes * n


# ----------------------------------------------------------------------------------------
# speed

def speed(report, args, device, root):
    root = linked_copies(root, args.copies)
    model = ("a tiny model (--small: width 32, 2 blocks, patch 32; its speeds show that the code runs, they "
             "measure nothing)" if args.small else "SR-ViT-S")
    devices = torch.cuda.device_count() if device.type == "cuda" else 1   # the node's ranks, one per GPU
    report.section("speed", f"Speed: {model}, one device, batch {args.batch}",
                   ["R", "compile", "model alone img/s", "loader + model img/s", "loader's share", "MFU",
                    f"{args.epochs} ImageNet epochs on {runtime.plural(devices, 'device')}"])
    backend = "yes" if args.compile_backend == "inductor" else f"yes ({args.compile_backend} backend)"
    for depth in args.depth:
        for compiled in (False, True):
            compile_cell = backend if compiled else "no"
            try:
                cells = speed_row(args, device, root, depth, compiled, devices)
            except Exception as e:     # out of memory ends this row only: the others may fit
                # (compiling may wrap it in an error of its own: the message still says it)
                if not (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()):
                    raise
                cells = None
            gc.collect()            # the row's model, loader workers and cached blocks go before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if cells is None:
                report.row("speed", depth, compile_cell, "-", "-", "-", "-",
                           f"out of memory at batch {args.batch}", ok=False,
                           fix="pass a smaller --batch here; train.py: --micro-batch, --grad-ckpt")
            else:
                report.row("speed", depth, compile_cell, *cells)


def speed_row(args, device, root, depth, compiled, devices):
    """One row's cells: images/s of the model alone and of loader + model, the loader's share, MFU and
    the derived wall time of the run."""
    amp = runtime.default_amp(device)               # as train.py: bf16, or fp16 where a GPU emulates bf16
    flags = ["--data-path", root, "--recipe", "deit", "--depth", str(depth), "--batch-size", str(args.batch),
             "--workers", str(args.workers), "--amp", amp, "--device", str(device),
             "--subset", str(args.images * args.copies)]
    flags += SMALL_MODEL if args.small else ["--model", "small"]
    targs = train.get_args(flags)
    env = SimpleNamespace(rank=0, world=1, micro=args.batch, accum=1, device=device, log=lambda *a: None)
    loader = loaders.build_loaders(targs, env)[0]
    model = train.build_model(targs, 1000).to(device)
    if compiled:
        train.compile_blocks(model, backend=args.compile_backend)
    # train.py's step: its optimizer (fused on a GPU), its loss scaling under fp16 (off otherwise)
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    step = training_step(model, opt, runtime.amp_context(device, amp), scaler)
    x = torch.randn(args.batch, 3, targs.img_size, targs.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    alone = args.batch / timed(lambda: step(x, y), device, args.iters)
    full = loader_and_model(loader, step, device, args.loader_iters, args.batch)
    gmacs, peak = srvit.forward_gmacs(model), runtime.peak_flops(device)
    mfu = f"{runtime.mfu(gmacs, alone, peak):.1%}" if peak else "-"
    hours = args.epochs * IMAGENET_TRAIN / (min(alone, full) * devices) / 3600
    return (f"{alone:,.0f}", f"{full:,.0f}", f"{max(0.0, 1 - full / alone):.0%}", mfu,
            f"{hours:,.1f} h (derived)")


SMALL_MODEL = ["--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--patch-size", "32"]


def training_step(model, opt, autocast, scaler):
    def step(x, y):
        with autocast:
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def loader_and_model(loader, step, device, iters, batch):
    """img/s of whole training steps fed by train.py's loader, inside one epoch, as in a long run: the
    epoch's start (workers starting, the pipeline filling) is the warm-up and is not timed."""
    loader.set_epoch(0)
    stream, warmup = iter(loader), warmup_steps(iters)
    for _ in range(warmup):
        step(*next(stream))
    sync(device)
    t0, steps = time.perf_counter(), 0
    for x, y in itertools.islice(stream, iters):
        step(x, y)
        steps += 1
    sync(device)
    if steps < iters:
        raise RuntimeError(f"the epoch had {warmup + steps} batches, fewer than {warmup} to warm up and "
                           f"{iters} to time")
    return steps * batch / (time.perf_counter() - t0)


def warmup_steps(iters):
    return max(2, iters // 5)


def linked_copies(root, copies, val_copies=1):
    """root's folder with each training file there `copies` times and each validation file `val_copies`
    times (hard links, else symlinks): an epoch long enough to time the loader inside it, or a validation
    image for each rank, at no cost of generating more pictures."""
    if copies <= 1 and val_copies <= 1:
        return root
    linked = os.path.join(root, f"linked-{copies}x{val_copies}")
    for split, times in (("train", copies), ("val", val_copies)):
        for d, _, names in os.walk(os.path.join(root, split)):
            dest = os.path.join(linked, os.path.relpath(d, root))
            os.makedirs(dest, exist_ok=True)
            for name in names:
                for c in range(times):
                    try:
                        os.link(os.path.join(d, name), os.path.join(dest, f"{c}-{name}"))
                    except OSError:              # a filesystem without hard links
                        os.symlink(os.path.join(d, name), os.path.join(dest, f"{c}-{name}"))
    return linked


# ----------------------------------------------------------------------------------------
# ddp and tests

def ddp_check(report, args, device, tmp, root):
    """torchrun with a rank per GPU (at least 2) on the paper's path: the generated JPEGs through the device
    loader with DeiT's recipe (repeated augmentation, RandAugment, erasing, MixUp/CutMix). Save every step,
    SIGTERM once last.pt exists, resume, exit 0."""
    ranks = max(2, torch.cuda.device_count() if device.type == "cuda" else 0)
    report.section("ddp", f"DDP: {ranks} ranks, SIGTERM, resume", ["step", "exit code", "seconds", "result"])
    out = os.path.join(tmp, "ddp-run")
    train_py = os.path.join(ROOT, "train.py")
    # 64 steps an epoch on each rank, whatever the number of ranks: at least 256 training images (DeiT's
    # sampler rounds an epoch down to a multiple of 256), a validation image per rank
    copies = -(-256 // args.images)
    data = linked_copies(root, copies, val_copies=ranks)
    per_rank = loaders.RepeatedAugSampler(args.images * copies, 0, ranks, 3, seed=0).per_rank   # DeiT's 3
    micro = max(1, per_rank // 64)
    # --standalone: a free port on this machine (torchrun's default, 29500, may be taken)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           train_py, "--data-path", data, "--recipe", "deit", "--loader", "device", "--img-size", "96",
           "--patch-size", "32", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--depth", "2",
           "--batch-size", str(micro * ranks), "--epochs", "2", "--workers", str(min(args.workers, 2)),
           "--save-every", "1", "--out-dir", out, "--device", device.type]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    # 2 epochs of 64 steps: the signal lands long before the run's end, even on a fast node
    with job(cmd, env, os.path.join(tmp, "ddp-first.log")) as first:
        while not os.path.exists(os.path.join(out, "last.pt")) and first.poll() is None \
                and time.time() - t0 < 300:
            time.sleep(0.05)
        if first.poll() is None:                 # torchrun passes it on to its ranks (a Slurm preemption)
            os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=300)
    log, code = first.log(), first.returncode
    # Each rank exits 143 with one line; torchrun, signalled too, then exits 1 with its own SignalException.
    stopped = "stopped by SIGTERM" in log and os.path.exists(os.path.join(out, "last.pt"))
    report.row("ddp", "run, then SIGTERM to torchrun and its ranks once last.pt is written", code,
               round(time.time() - t0), "every rank stopped and saved" if stopped else tail(log), ok=stopped,
               fix="see the log above; a run on this node cannot be stopped and resumed safely")
    t0 = time.time()
    with job(cmd, env, os.path.join(tmp, "ddp-second.log")) as second:
        second.wait(timeout=600)
    log = second.log()
    resumed = (second.returncode == 0 and "resumed from" in log and "done: best top-1" in log
               and "Traceback" not in log)
    report.row("ddp", "the same command again: resume to the end", second.returncode, round(time.time() - t0),
               "resumed and finished" if resumed else tail(log), ok=resumed, fix="see the log above")


@contextlib.contextmanager
def job(cmd, env, log_path, cwd=None):
    """A subprocess (torchrun, pytest) in its own process group, its output in log_path (a file: a
    pipe nobody reads until the end fills up under NCCL_DEBUG=INFO and blocks the ranks), ended if it
    is still running when the block ends (a timeout, Ctrl-C) so that no rank holds a GPU while the
    next section runs.
    torchrun starts each rank in a session of its own: SIGTERM to torchrun, which ends its ranks
    (SIGKILL after 30 s), reaches them where a SIGKILL to torchrun would leave them running."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=cwd)
    proc.log = lambda: open(log_path).read()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tail(log):
    """What to show of a failed job's log: train.py's one-line errors, else its last two lines (torchrun's
    own report of a failed rank comes after the rank's error, and says less)."""
    lines = log.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return " / ".join(dict.fromkeys(errors) or lines[-2:])[-200:] or "no output"


def tests(report, args):
    """The test suite, in what --time-limit leaves of the check (at most TESTS_TIMEOUT)."""
    report.section("tests", "The test suite on this machine", ["command", "exit code", "seconds", "result"])
    t0 = time.time()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_srvit.py"]
    command += ["-k", QUICK_TESTS] if args.tests == "quick" else []
    shown = shlex.join(["python"] + command[1:])
    timeout = min(TESTS_TIMEOUT[args.tests], args.time_limit - (t0 - args.started))
    if timeout < 60:                   # (not a failure of the node: the tests did not run)
        report.row("tests", shown, "-", 0, f"not run: under a minute of --time-limit {args.time_limit:g} s "
                   f"was left; run the command alone, or give a longer --time-limit")
        report.incomplete.append("the tests did not run")
        return
    # bounded, in a process group of its own: a hung test, and the torchrun jobs it started, end with it
    with tempfile.TemporaryDirectory() as tmp, job(command, dict(os.environ), os.path.join(tmp, "tests.log"),
                                                   cwd=ROOT) as run:
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        code, log = run.poll(), run.log()
    last = (log.strip().splitlines() or ["no output"])[-1]
    cut_short = code is None and timeout < TESTS_TIMEOUT[args.tests]     # by the check's limit, not a hang
    if code is None:
        code, last = "-", (f"stopped after {timeout:.0f} s: what --time-limit {args.time_limit:g} s left; "
                           f"run the command alone" if cut_short else f"stopped after {timeout:.0f} s")
    if cut_short:
        report.incomplete.append("the tests were stopped by --time-limit")
    report.row("tests", shown, code, round(time.time() - t0), last, ok=code == 0 or cut_short,
               fix="the failing tests are named in the pytest output; a hung one shows with -v")


# ----------------------------------------------------------------------------------------

def get_args(argv=None):
    p = runtime.ArgumentParser(prog=os.path.relpath(__file__, ROOT), description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="node-check", help="folder for node-check.md and node-check.json")
    p.add_argument("--small", action="store_true", help="small sizes (a CPU): a tiny model, few images")
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "speed", "ddp"],
                   help="sections to leave out")
    p.add_argument("--tests", choices=["quick", "all", "none"], default=None,
                   help="the test suite: quick (all but the end-to-end tests that start no ranks; the "
                        "default on a GPU), all, or none (the default on a CPU, where CI runs it)")
    p.add_argument("--time-limit", type=float, default=600,
                   help="seconds for the whole check (default 600): the test suite gets what is left")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use 'eager')")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="the speed section's batch (default: 1024 over the GPUs, at most 256; --small: 4)")
    args = p.parse_args(argv)
    kind = runtime.check_device(args.device)           # a GPU that is not there: one line, before the report
    runtime.check_at_least(args, batch=1, time_limit=1)
    args.started = time.time()
    args.tests = args.tests or ("quick" if kind == "cuda" else "none")
    small = args.small
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = torch.cuda.device_count() if kind == "cuda" else 1                # this node's ranks
    args.images = 32 if small else 512             # generated JPEGs (500 x 375, about 100 KB)
    # one rank of the node: DeiT's 1024 over its GPUs, 256 at most where they are fewer than 4
    args.decode_batch, args.batch = (8, args.batch or 4) if small else (128, args.batch or
                                                                        min(256, DEIT_BATCH // gpus))
    args.iters, args.depth, args.epochs = (5 if small else 20), [1, 4], 300
    args.loader_iters = 2 if small else 40         # loader + model: steps timed inside one epoch
    # each picture linked this many times: an epoch of warm-up + timed steps, with 255 to spare (DeiT's
    # repeated-augmentation sampler rounds an epoch down to a multiple of 256): 12,800 at batch 256
    need = (args.loader_iters + warmup_steps(args.loader_iters)) * args.batch + 255
    args.copies = -(-need // args.images)
    args.workers = 0 if small else max(1, min(8, cores // gpus))     # train.py's default for each rank
    return args


def writable_folder(path):
    """Make the report's folder now, and write in it, so that a path it cannot use fails before the work."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise runtime.UserError(f"--out {path}: cannot write there ({e.strerror or type(e).__name__}); name "
                                f"a folder this user can write") from None


def main(argv=None):
    args = get_args(argv)
    writable_folder(args.out)                          # a report it could not write fails before the work
    device = torch.device(args.device or runtime.check_device(None))
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    sections = ["machine", *(s for s in ("decode", "speed", "ddp") if s not in args.skip)]
    sections += ["tests"] * (args.tests != "none")
    print(f"node check on {name}: sections {', '.join(sections)}")
    report = Report(args.out)
    try:                                   # the report is written however the check ends (Ctrl-C too)
        with tempfile.TemporaryDirectory() as tmp:
            report.attempt("machine", machine, device)
            root = None
            if {"decode", "speed", "ddp"} - set(args.skip):
                root = report.attempt("pictures", pictures, args, tmp)
            if "decode" not in args.skip and root:
                report.attempt("decode", decode_check, args, device, root)
            if "speed" not in args.skip and root:
                report.attempt("speed", speed, args, device, root)
            if "ddp" not in args.skip and root:
                report.attempt("ddp", ddp_check, args, device, tmp, root)
            if args.tests != "none":
                report.attempt("tests", tests, args)
    except KeyboardInterrupt:               # (between sections: attempt names the section it stopped)
        report.interrupted = report.interrupted or "between sections"
        raise
    finally:
        report.write(name)
    return report


def pictures(report, args, tmp):
    print(f"generating {args.images} ImageNet-sized JPEGs...")
    return imagenet_like_folder(tmp, args.images, torch.Generator().manual_seed(0))


def check_node(argv=None):
    """The command line: exit code 1 when a check failed, so that a script can tell. SIGTERM (a job's
    time limit, `timeout`) stops it as Ctrl-C does: the report is written, no torchrun job is left."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if main(argv).failures:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(runtime.cli(check_node, interrupted="interrupted", out_of_memory="use a smaller --batch"))
