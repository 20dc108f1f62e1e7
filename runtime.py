"""
What a training run needs around its loop, and a first reading of train.py can skip: one-line errors
and exit codes, the distributed set-up and the device's precision (--amp), the out-dir (checkpoints,
metrics.jsonl, the lock), resuming, and stopping on a signal. eval.py and results/bench.py use its
errors, `cli`, `check_device` and `amp_context` too; eval.py also its checkpoint reader.

What it guarantees (each has its test in test_srvit.py): bad input is one line and exit code 2 on
every rank; checkpoints are whole whatever kills the run; metrics.jsonl holds each finished epoch
once; a resume refuses another model, data or recipe; SIGTERM and Ctrl-C save mid-epoch; two runs
never share an out-dir; ranks that disagree where the run stands refuse instead of hanging.
"""

import argparse
import errno
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import srvit

try:
    import fcntl                      # the out-dir lock; POSIX only (elsewhere runs are not locked)
except ImportError:
    fcntl = None


# ----------------------------------------------------------------------------------------
# Errors: one line per rank, and the exit code

class UserError(Exception):
    """Bad input: printed as one line with what to do, exit code 2, no traceback. `shared`: every
    rank hits it alike, so rank 0 alone prints it; otherwise each failing rank says so."""

    def __init__(self, message, shared=False, agreed=False):
        super().__init__(message)
        self.shared = shared
        self.agreed = agreed      # the ranks exchanged it (on_all_ranks): rank 0 surely has it too


class Stopped(Exception):
    """The run stopped early on a signal: one line, and the exit code. `shared` as for UserError."""

    def __init__(self, message, code, shared=True):
        super().__init__(message)
        self.code, self.shared = code, shared


SHARED_ERROR_WAIT = 30         # seconds a rank other than 0 waits for rank 0 to print a shared error


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the project's one line (exit code 2, said once under torchrun), not the
    whole usage."""

    def error(self, message):
        raise UserError(f"{message} (python {self.prog} --help lists the options)", shared=True)


def cli(main_fn, argv=None,
        interrupted="interrupted; the last checkpoint is whole, re-run the same command to resume",
        out_of_memory="nothing half-written is left; re-run with a smaller --micro-batch (gradient "
                      "accumulation: the same --batch-size, so the same run, resumed from its last "
                      "checkpoint) or with --grad-ckpt"):
    """Run main_fn and turn the ways it can end into an exit code and at most one line per rank
    (eval.py and results/ scripts use it too, with their own lines for Ctrl-C and a batch too large for
    the GPU)."""
    try:
        rank, world, _, _ = launch_env()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        main_fn(argv)
        return 0
    except UserError as e:
        if not e.shared or rank == 0:
            where = f" (rank {rank})" if world > 1 and not e.shared else ""
            print(f"error{where}: {user_error_message(e)}", file=sys.stderr)
        elif world > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
            # Rank 0 says it. Had this rank exited first, torchrun would end rank 0 before it printed
            # (1 run in 6 with a bad flag); torchrun ends this one once rank 0 has exited. Should
            # rank 0 not have met the error (another node's disk), this rank says it after the wait.
            time.sleep(SHARED_ERROR_WAIT)
            if not e.agreed:
                print(f"error (rank {rank}): {user_error_message(e)}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:          # a batch too large for this GPU is a bad flag value
        where = f" (rank {rank})" if world > 1 else ""
        said = first_line(e).split(". ")        # "CUDA out of memory. Tried to allocate 2.00 GiB. ..."
        print(f"error{where}: out of GPU memory ({said[1] if len(said) > 1 else said[0]}); {out_of_memory}",
              file=sys.stderr)
        return 2
    except RuntimeError as e:
        if world == 1 or not peer_gone(e):
            raise
        # another rank stopped (its own one line, or a crash) and took the collective with it
        print(f"error (rank {rank}): stopped because another rank ended the run ({first_line(e)[:100]}); "
              f"that rank's message says why", file=sys.stderr)
        return 2
    except Stopped as e:
        if not e.shared or rank == 0:
            print(f"(rank {rank}) {e}" if not e.shared and world > 1 else str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted, file=sys.stderr)
        return 130
    # loader workers ignore SIGTERM (loaders.ignore_signals): the interpreter's exit could not end any left
    finally:
        import multiprocessing
        if multiprocessing.active_children() and hasattr(signal, "SIGCHLD"):
            quiet_worker_deaths()
            for worker in multiprocessing.active_children():
                worker.kill()


# How gloo and NCCL report a rank that has gone: what every other rank meets in its next collective.
# (Not a failure to start or to reach the others: that is this rank's own, and keeps its traceback.)
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe",
             "communicator was aborted")


def peer_gone(e):
    return dist.is_available() and dist.is_initialized() and any(s in str(e).lower() for s in PEER_GONE)


def user_error_message(e):
    # An error raised in a data-loading worker arrives wrapped in the worker's traceback text,
    # ending in "UserError: <our message>"; the message is what the user needs.
    last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return last.split("UserError: ", 1)[-1]


def first_line(e):
    """An exception's first line for a one-line message; its type where it has no message. A first line
    that only announces a list ("Error(s) in loading state_dict for SRViT:") comes with the list's first
    entry, cut at 200 characters (the list may name every key of a model)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    said = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return said if len(said) <= 200 else said[:197] + "..."


def plural(n, word):
    """'1 epoch', '2 epochs'."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def fmt_time(s):
    s = int(s) if s == s and s != float("inf") else 0
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------
# Distributed: ranks, device and the batch split from torchrun's environment

def launch_env():
    """(rank, world size, local rank, ranks on this node) from torchrun's environment variables, or one
    process's (0, 1, 0, 1) without them. Checked: a RANK left in a shell would otherwise make a run
    that logs and saves nothing (only rank 0 does), and a WORLD_SIZE one that waits for ranks that
    never come."""
    env, values = os.environ, {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        if name in env and not env[name].strip().isdecimal():
            raise UserError(f"{name}={env[name]!r} in the environment is not a whole number: torchrun "
                            f"sets it; unset it to run one process")
        values[name] = int(env[name]) if name in env else None
    world = 1 if values["WORLD_SIZE"] is None else values["WORLD_SIZE"]
    rank, local = values["RANK"] or 0, values["LOCAL_RANK"] or 0
    local_world = world if values["LOCAL_WORLD_SIZE"] is None else values["LOCAL_WORLD_SIZE"]
    if not (0 <= rank < world and 0 <= local < local_world):
        raise UserError(f"the environment says RANK={rank} (LOCAL_RANK={local}) of WORLD_SIZE={world} "
                        f"(LOCAL_WORLD_SIZE={local_world}): unset RANK, WORLD_SIZE, LOCAL_RANK and "
                        f"LOCAL_WORLD_SIZE to run one process, or start the ranks with torchrun")
    if world > 1 and "MASTER_ADDR" not in env:
        raise UserError(f"WORLD_SIZE={world} in the environment, but no MASTER_ADDR: start the ranks with "
                        f"torchrun (which sets both), or unset WORLD_SIZE to run one process")
    return rank, world, local, local_world


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

    def log(self, *args, **kwargs):
        """say, on rank 0."""
        if self.master:
            say(*args, **kwargs)


def say(*args, **kwargs):
    """print, for a console that may go: a closed pipe (`| head`) or a full disk under a log file ends the
    printing, not the program, which trains and saves (or evaluates and writes) as it would have."""
    try:
        print(*args, **kwargs)
        sys.stdout.flush()                # (a pipe buffers: its error would land on any later line)
    except OSError:                       # BrokenPipeError, ENOSPC
        sys.stdout = open(os.devnull, "w")
    except UnicodeEncodeError:            # a path that is not UTF-8, on a console that takes UTF-8 only
        say(*(str(a).encode("ascii", "backslashreplace").decode() for a in args), **kwargs)


def init_distributed(batch_size, micro_batch=None, device=None):
    """Rank, world size and device from torchrun's environment; one process without it. The global
    batch_size is split over the ranks, and over micro-batches of micro_batch if given."""
    rank, world, local, local_world = launch_env()
    # Batch bookkeeping: global batch = world x micro-batch x accumulation steps.
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {world} processes; choose "
                        f"a multiple of {world}", shared=True)
    micro = micro_batch or batch_size // world
    if (batch_size // world) % micro:
        raise UserError(f"--micro-batch {micro} does not divide the per-process batch "
                        f"{batch_size // world}", shared=True)
    cuda = check_device(device) == "cuda"
    if world > 1:
        # One GPU per rank, over NCCL. More ranks on a node than GPUs (a check on a one-GPU machine):
        # the ranks share the GPUs and talk over gloo, which NCCL does not allow; slow, but it runs.
        shared_gpus = cuda and torch.cuda.device_count() < local_world
        dist.init_process_group("nccl" if cuda and not shared_gpus else "gloo")
        device = use_device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
    else:
        device = use_device(device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cpu_group = dist.new_group(backend="gloo") if world > 1 and cuda else None
    return Env(rank, world, device, micro, batch_size // world // micro, cpu_group)


def use_device(name):
    """torch.device(name), made the current GPU where it names one: pinned memory and nvJPEG use the
    current GPU, so --device cuda:1 would also take memory on GPU 0."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def seed_device(seed, device):
    """Seed the CPU generator and this device's, only: torch.manual_seed seeds every visible GPU
    (and other accelerators, through a slow lazy path), at every step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def default_amp(device):
    """bf16 where the GPU computes it natively (compute capability 8+; V100 and T4 emulate it, slowly),
    else fp16 on a GPU, none on a CPU."""
    if device.type == "cpu":
        return "none"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


def amp_context(device, amp):
    """Autocast to the --amp dtype, or nothing for full precision."""
    return nullcontext() if amp in (None, "none") else torch.autocast(device.type, dtype=AMP_DTYPES[amp])


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against the device
# name, most specific first: an "H100 PCIe" is not an H100 SXM. The one MFU denominator, whatever --amp is.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("RTX 4090", 165e12),
             ("L4", 121e12)]


def peak_flops(device):
    """Datasheet dense bf16 peak of this GPU, in FLOP/s; None where unknown (CPU, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16 if key in name), None) if name else None


def mfu(gmacs, images_per_s, peak):
    """Model FLOPs utilisation against `peak` FLOP/s: training costs ~3 forward passes (forward +
    backward), 2 FLOPs per MAC."""
    return 3 * 2 * gmacs * 1e9 * images_per_s / peak


def check_device(name):
    """'cuda' or 'cpu': what --device asks for (default: cuda where there is one)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdecimal())):
        raise UserError(f"--device {name}: use cpu, cuda or cuda:N", shared=True)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU that PyTorch can use; use --device "
                        f"cpu", shared=True)
    if index and int(index) >= torch.cuda.device_count():
        gpus = plural(torch.cuda.device_count(), "GPU")
        raise UserError(f"--device {name}: this machine has {gpus} (cuda:0..)", shared=True)
    return kind


def on_all_ranks(env, fn, *args, undo=None):
    """Run fn on every rank; if it fails on any, every rank raises that rank's error (so no
    rank waits forever for a collective that another rank never reaches). A rank where fn
    succeeded first calls undo(its result), if given."""
    result, error = None, None
    try:
        result = fn(*args)
    except UserError as e:
        error = str(e)
    if env.ddp:
        errors = [None] * env.world
        dist.all_gather_object(errors, error, group=env.cpu_group)     # gloo: a 30-minute timeout
        failed = next(((r, e) for r, e in enumerate(errors) if e), None)
        if failed:
            if undo and error is None:
                undo(result)
            where = f" (rank {failed[0]})" if failed[0] != env.rank or env.rank else ""
            raise UserError(failed[1] + where, shared=True, agreed=True)
    elif error:
        raise UserError(error, shared=True)
    return result


# ----------------------------------------------------------------------------------------
# The out-dir: checkpoints, metrics.jsonl and the lock
#
# What each way of stopping costs (README "Checkpoints and stopping"):
#   SIGTERM / Ctrl-C   nothing: the optimizer step in flight finishes, last.pt is saved mid-epoch.
#   kill -9, a crash   the steps since the last save (end of epoch, or --save-every).
#   a second run       refused while the first holds the out-dir's lock.
# Files are written to <name>.tmp and renamed, so last.pt and best.pt are always whole. At the end
# of an epoch best.pt is written first, then last.pt, then the metrics row; last.pt carries every
# epoch's row, so a resume puts back a row that a kill kept out of metrics.jsonl.

def what_to_free(e):
    """What a failed write asks of the user: space for a full disk (torch.save's own error has no
    errno), else what the error names."""
    if getattr(e, "errno", None) in (None, errno.ENOSPC, errno.EDQUOT):
        return "is the disk full? Free space"
    if e.errno == errno.EROFS:
        return "the filesystem is read-only: pass an --out-dir on a writable one"
    return "give this user write access to the file and its folder (or move aside what is in the way)"


# the temporary files a killed run of ours leaves in its out-dir (OutDir.save, open, write_rows)
KILLED_WRITE = re.compile(r"(last\.pt|best\.pt|metrics\.jsonl|write-test-\d+)\.tmp")


class OutDir:
    def __init__(self, path, master):
        self.path, self.master, self.lock_file = path, master, None
        self.last, self.best = os.path.join(path, "last.pt"), os.path.join(path, "best.pt")
        self.metrics = os.path.join(path, "metrics.jsonl")

    def open(self):
        """Create the folder, take its lock, and delete the *.tmp files a killed run left."""
        if not self.master:
            return self
        folders, folder = [], os.path.abspath(self.path)
        while not os.path.exists(folder):            # the out-dir and each parent folder it needs
            folders, folder = [folder] + folders, os.path.dirname(folder)
        self.made = folders + [p for p in (self.metrics, os.path.join(self.path, "train.lock"))
                               if not os.path.exists(p)]
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out-dir {self.path} ({e.strerror}); choose another "
                            f"folder") from None
        try:
            self.lock()
        except UserError as e:               # a failed start leaves no trace; another run's files stay
            self.close(failed=not e.shared)  # (shared: the out-dir is another run's, which may write now)
            raise
        try:                                 # a folder we may not write fails now, not after an epoch
            probe = os.path.join(self.path, f"write-test-{os.getpid()}.tmp")
            open(probe, "w").close()
            os.remove(probe)
            for name in os.listdir(self.path):           # what a killed run was writing, and only that:
                if KILLED_WRITE.fullmatch(name):         # the folder may hold the user's own *.tmp files
                    os.remove(os.path.join(self.path, name))
        except OSError as e:
            self.close(failed=True)
            raise UserError(f"cannot write in --out-dir {self.path} ({e.strerror}); choose a folder you can "
                            f"write to") from None
        return self

    def lock(self):
        # flock: the kernel drops the lock when the process dies, however it dies, so a killed run
        # never leaves a stale lock behind. The file names the holder for the refusal message.
        if fcntl is None:
            return
        try:
            self.lock_file = open(os.path.join(self.path, "train.lock"), "a+")
        except OSError as e:                  # a folder we may not write, a full disk
            raise UserError(f"cannot write in --out-dir {self.path} ({e.strerror}); choose a folder you can "
                            f"write to, or free space") from None
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.lock_file.seek(0)
            holder = self.lock_file.read().strip() or "another process"
            self.release()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # NFS without lockd, some Lustre mounts: no lock can be taken here, by any run
                raise UserError(f"cannot lock {self.path}: its filesystem does not support file locks "
                                f"({e.strerror}); put --out-dir on a local disk or a filesystem with locking "
                                f"(NFS with lockd, Lustre mounted with -o flock)") from None
            raise UserError(f"{self.path} is in use by a running train.py ({holder}); wait for it, stop it, "
                            f"or pass another --out-dir", shared=True) from None
        try:                                  # the holder's name, for another run's refusal
            self.lock_file.truncate(0)
            self.lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            self.lock_file.flush()
        except OSError as e:                  # a full disk
            self.release()
            raise UserError(f"cannot write in --out-dir {self.path} ({e.strerror}); free space, or choose "
                            f"another folder") from None

    def release(self):
        if self.lock_file:
            try:
                self.lock_file.close()      # closing drops the flock, even where flushing fails
            except OSError:
                pass
            self.lock_file = None

    def close(self, failed):
        """Release the lock. A run that failed before its first checkpoint takes away what it made: the
        lock, a metrics file it started (with only its start-up row), its folder and the parent folders
        it created, so a failed start leaves no trace. What was there before it started stays."""
        if failed and self.master and not any(map(os.path.exists, (self.last, self.best))):
            for path in reversed(getattr(self, "made", [])):
                try:
                    if os.path.isdir(path):
                        os.rmdir(path)
                    else:
                        os.remove(path)
                except OSError:             # a folder someone put files into meanwhile: kept
                    pass
        self.release()

    def save(self, ckpt, path):
        """Write to path.tmp, then rename: a kill leaves the old file or the new one, never half."""
        tmp = path + ".tmp"
        try:
            torch.save(ckpt, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:        # a full disk surfaces as either
            if os.path.exists(tmp):
                os.remove(tmp)
            raise UserError(f"could not write {path} ({first_line(e)[:120]}); {what_to_free(e)}. The "
                            f"previous checkpoint is kept; re-run the same command once it is done") from None

    def append_metrics(self, row):
        """One whole row or none: on a failed write (a full disk) the file is cut back to where it was; the
        checkpoint, saved before the row, puts the row back on resume (repair_metrics)."""
        data = (json.dumps(row) + "\n").encode()
        try:
            fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                try:
                    if os.write(fd, data) != len(data):      # (a full disk can take part of it)
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as e:
            raise UserError(f"could not write {self.metrics} ({e.strerror}); {what_to_free(e)}. The "
                            f"checkpoint is saved: re-run the same command once it is done, which puts the "
                            f"row back") from None

    def end_epoch(self, ckpt, is_best):
        """The end of an epoch, in the order that a kill at any point can be repaired from."""
        if is_best:
            self.save(ckpt, self.best)
        self.save(ckpt, self.last)
        self.append_metrics(ckpt["records"][-1])

    def repair_metrics(self, done, records):
        """After a resume with `done` epochs: metrics.jsonl holds each finished epoch exactly once.
        Rows a kill kept out are put back from the checkpoint's records; repeats and a half-written last
        line are dropped. Rows of epochs past it (a resume from an older checkpoint, best.pt) leave this
        run's file, which is first kept whole beside it as metrics-until-epoch-<last>.jsonl."""
        lines = read_lines(self.metrics)
        keep, seen, later = [], set(), []
        for line in lines:
            row = json_row(line) if line.endswith("\n") else None      # a half-written line: dropped
            if row is None:                                            # (blank or torn: dropped)
                continue
            if row.get("type") == "epoch":
                if not isinstance(row.get("epoch"), int):              # not a row train.py wrote
                    raise UserError(f"{self.metrics} holds an epoch row without its epoch number, which "
                                    f"train.py does not write: {line.strip()[:80]}; delete that line, or "
                                    f"resume into another --out-dir", shared=True)
                if row["epoch"] > done:                                # kept aside below
                    later.append(row["epoch"])
                    continue
                if row["epoch"] in seen:
                    continue
                seen.add(row["epoch"])
            keep.append(line)
        keep += [json.dumps(r) + "\n" for r in records if r["epoch"] <= done and r["epoch"] not in seen]
        if later:             # (-2, -3...: a second resume from best.pt to that epoch loses nothing either)
            stem = os.path.join(self.path, f"metrics-until-epoch-{max(later)}")
            names = (f"{stem}{f'-{n}' if n > 1 else ''}.jsonl" for n in itertools.count(1))
            aside = next(name for name in names if not os.path.exists(name))
            save_file(aside, lambda tmp: shutil.copyfile(self.metrics, tmp))
        if keep != lines:
            try:                             # to .tmp, then renamed: on a full disk the old file stays whole
                with open(self.metrics + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(self.metrics + ".tmp", self.metrics)
            except OSError as e:
                if os.path.exists(self.metrics + ".tmp"):
                    os.remove(self.metrics + ".tmp")
                raise UserError(f"could not rewrite {self.metrics} ({e.strerror}); is the disk full? Nothing "
                                f"is lost: free space and re-run the same command") from None


# ----------------------------------------------------------------------------------------
# Resuming: read the checkpoint, compare it with this run, restore it, agree over the ranks

def checkpoint_of(path):
    """A checkpoint file, or a run's folder: its best.pt (else last.pt), said on stderr."""
    if not os.path.isdir(path):
        return path
    found = [os.path.join(path, n) for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, n))]
    if not found:
        raise UserError(f"--checkpoint {path} is a folder without best.pt or last.pt; pass a checkpoint file "
                        f"train.py wrote")
    print(f"{path} is a run's folder: evaluating its {os.path.basename(found[0])}", file=sys.stderr)
    return found[0]


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


def write_text(path, text):
    """save_file for a text: written whole, or one line that names the file."""
    def write(tmp):
        with open(tmp, "w") as f:        # closed before the rename: a full disk fails here, not after
            f.write(text)
    save_file(path, write)


def check_rules(args, shared=False, **rules):
    """Each named flag's value passes its rule, (ok, "in 0..256"), or one line; an infinite float fails
    (it passes "> 0"). train.py's flags, and those eval.py and results/bench.py share with it."""
    for name, (ok, rule) in rules.items():
        value = getattr(args, name)
        infinite = isinstance(value, float) and math.isinf(value)
        if value is not None and (infinite or not ok(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}", shared=shared)


def check_at_least(args, **least):
    """Each named flag at least its bound, or one line (eval.py's and results/bench.py's flags)."""
    for name, low in least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


# A run's own files in its out-dir (OutDir), which no table or picture may replace.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "train.lock")
PICTURES = (".png", ".jpg", ".jpeg", ".webp")


def check_output(flag, path, picture=False):
    """Refuse, before any work, an output path that would replace a checkpoint or a run's metrics, or a
    picture whose name says no picture format."""
    if path is None:
        return
    name = os.path.basename(path)
    if name in RUN_FILES or name.endswith(".pt") or os.path.isdir(path):
        what = "a folder" if os.path.isdir(path) else "a checkpoint or a run's own file"
        raise UserError(f"{flag} {path} is {what}, which this would replace: name a new file")
    if picture and os.path.splitext(name)[1].lower() not in PICTURES:
        raise UserError(f"{flag} {path}: name a picture file ({', '.join(PICTURES)})")


def save_file(path, write):
    """write(tmp), then rename it to path: a result written after the work is done (a table, a picture)
    fails in one line that names the file (a full disk, a folder that cannot be made), never half a file."""
    check_output("the output", path)
    tmp = f"{path}.tmp{os.path.splitext(path)[1]}"            # (Pillow picks the format by the extension)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path} ({first_line(e)}); choose another path or free "
                        f"space") from None
    say(f"wrote {path}")


def load_optimizer(optimizer, state):
    """The checkpoint's optimizer state, run the way this machine's optimizer was built. torch's
    load_state_dict takes each group's `fused` and `foreach` from the file too: a run resumed on a GPU
    from a CPU checkpoint would drop the fused AdamW, and under fp16 its GradScaler would hand the
    unfused step the scale it cannot take."""
    how = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable") if k in optimizer.defaults}
    optimizer.load_state_dict({**state, "param_groups": [{**g, **how} for g in state["param_groups"]]})


def read_checkpoint(path, shared=False):
    """A train.py checkpoint as a dict, for train.py's resume and eval.py: srvit.read_weights (the one
    reader of checkpoint files), its ValueError turned into a one-line UserError for a missing file, a
    file that is not whole, or one that train.py did not write. `shared`: every rank reads this file."""
    if not os.path.exists(path):           # (there but no file: read_weights names what it is)
        raise UserError(f"checkpoint not found: {path}", shared=shared)
    try:
        ckpt = srvit.read_weights(path)
    except ValueError as e:
        if isinstance(e.__cause__, PermissionError):   # there, but not readable: nothing known of its content
            raise UserError(str(e), shared=shared) from None
        best = os.path.join(os.path.dirname(path), "best.pt")
        keep = (f"; best.pt beside it may be whole: --resume {best} resumes from its epoch (the epochs "
                f"after it are trained again)"
                if os.path.basename(path) == "last.pt" and os.path.isfile(best) else "")
        said = str(e).rstrip(".")
        raise UserError(f"{said}. A train.py checkpoint is a run's last.pt or best.pt{keep}",
                        shared=shared) from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'config'); for DeiT/timm weights use "
                        f"train.py --init-from, or srvit.load_pretrained in Python", shared=shared)
    return ckpt


# What a run trained before these flags existed did: the value its checkpoint and metrics lack.
BEFORE_THE_FLAG = {"schedule": "deit", "pad_mode": "zeros", "init": "timm"}


def check_same_run(path, ckpt, model, settings, dataset, may_change):
    """Refuse to resume another model, other data or another recipe, naming each value that changed:
    every setting (the run's flags, a dict) but `may_change` (train.MAY_CHANGE) is compared, and the
    dataset's size and class names (keys an older checkpoint does not hold are not)."""
    saved_cfg = {**asdict(srvit.SRViTConfig()), **ckpt["config"]}
    saved = {**BEFORE_THE_FLAG, **ckpt.get("args", {}), **ckpt.get("dataset", {})}
    now = {**settings, **dataset}
    model_keys = [k for k in asdict(model.config) if k not in ("drop_path_rate", "grad_checkpointing")]
    data_keys = ["data", "subset", "val_subset", "img_size", "train_images", "classes"]
    data_keys += ["num_classes"] if settings["data"] == "fake" else []   # (elsewhere the classes count)
    recipe_keys = [k for k in now if k not in may_change and k not in data_keys]
    for keys, have, want, what in ((model_keys, saved_cfg, asdict(model.config), "model"),
                                   (data_keys, saved, now, "data"), (recipe_keys, saved, now, "recipe")):
        diff = [changed(k, have[k], want.get(k)) for k in keys if k in have and have[k] != want.get(k)]
        if diff:
            raise UserError(f"{path} was trained with another {what} ({'; '.join(diff)}). Resume with the "
                            f"same command, or start afresh in another --out-dir", shared=True)


def changed(key, then, now):
    """'key: <then> then, <now> now'; for the class names, the first that differs (there may be 1000)."""
    if key != "classes" or not isinstance(then, list) or not isinstance(now, list):
        return f"{key}: {then!r} then, {now!r} now"
    i = next((i for i, (old, new) in enumerate(zip(then, now)) if old != new), min(len(then), len(now)))
    name = lambda names: repr(names[i]) if i < len(names) else "none"
    return f"class {i + 1}: {name(then)} then, {name(now)} now"


def restore(resume, settings, out, model, optimizer, scaler, dataset, may_change):
    """Load what --resume (`resume`) points at (auto: last.pt, if there is one; no: nothing) into the
    model, optimizer and scaler, after check_same_run compares the run's `settings` with the checkpoint's,
    and return the checkpoint (train.setup builds its Progress from it), its best_top1 raised to best.pt's
    where a kill left best.pt ahead; {} for a fresh run."""
    path = out.last if resume in ("auto", "no") else resume
    if resume == "no":
        if os.path.exists(out.last):
            raise UserError(f"--resume no, but {out.path} holds a checkpoint; pass another --out-dir for a "
                            f"new run (nothing is overwritten)", shared=True)
        check_no_rows(out)
        return {}
    if not os.path.exists(path):              # (one that is there but no file: read_checkpoint says so)
        if resume != "auto":
            raise UserError(f"--resume {path}: file not found", shared=True)
        check_no_rows(out)
        return {}
    ckpt = read_checkpoint(path, shared=True)
    if "optimizer" not in ckpt:
        raise UserError(f"{path} holds weights only, no optimizer state to resume from; use --init-from",
                        shared=True)
    check_same_run(path, ckpt, model, settings, dataset, may_change)
    try:        # (a config that does not match its own weights, or another version's parameter groups)
        model.load_state_dict(ckpt["model"])
        load_optimizer(optimizer, ckpt["optimizer"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, torch.OutOfMemoryError) or "CUDA" in str(e):     # the device's fault, not the file's
            raise
        raise UserError(f"{path} does not hold the weights and optimizer state of the model it names "
                        f"({first_line(e)}); resume from another of this run's checkpoints, or start "
                        f"afresh in another --out-dir", shared=True) from None
    if ckpt.get("scaler"):        # (empty from a run without fp16: a resume in fp16 starts a fresh scale)
        scaler.load_state_dict(ckpt["scaler"])
    if os.path.exists(out.best) and os.path.abspath(path) != os.path.abspath(out.best):
        # a kill between best.pt and last.pt: best.pt is ahead of last.pt's record
        try:
            best = srvit.read_weights(out.best)
            best_top1 = (best.get("metrics") or {}).get("top1", 0.0)
        except (ValueError, AttributeError) as e:
            raise UserError(f"cannot read {out.best} ({type(e).__name__}) beside a whole {path}: move it "
                            f"aside (mv {out.best} {out.best}.bad) and re-run; the next best epoch writes a "
                            f"new one",
                            shared=True) from None
        ckpt["best_top1"] = max(ckpt.get("best_top1", 0.0), best_top1)
    return ckpt


def check_no_rows(out):
    """A fresh start must not drop the epoch rows of an earlier run whose last.pt is gone."""
    rows = [row for row in map(json_row, read_lines(out.metrics)) if row and row.get("type") == "epoch"]
    if rows:
        hint = (f"--resume {out.best} resumes from its best epoch" if os.path.isfile(out.best)
                else "nothing to resume")
        raise UserError(f"{out.path} holds {plural(len(rows), 'epoch')} of metrics but no last.pt ({hint}); "
                        f"pass another --out-dir for a new run (the metrics are kept)", shared=True)


def read_lines(path):
    """A metrics.jsonl's lines ([] where there is none); a byte that is not UTF-8 spoils only its own
    line, which json_row then reads as torn."""
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):           # a named pipe would be waited on for ever
        raise UserError(f"{path} is not a file (a folder, a named pipe or a device): a run's metrics file, "
                        f"readable by this user, was expected there")
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines(keepends=True)
    except OSError as e:                   # a folder of that name, a file this user may not read
        raise UserError(f"cannot read {path} ({e.strerror}): a run's metrics file, readable by this user, "
                        f"was expected there") from None


def json_row(line):
    """A metrics.jsonl line as a dict; None for a blank or torn line (what a kill or a full disk leaves)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def agree_on_progress(env, progress, out_dir):
    """Every rank must start where rank 0 does. With node-local disks only the first node holds
    last.pt: the other nodes would start afresh, their AdamW state and step apart from rank 0's, and
    the run would drift, then hang when rank 0 finishes first. Refuse instead, on every rank."""
    if not env.ddp:
        return
    mine = (progress.epoch, progress.step, socket.gethostname())
    seen = [None] * env.world
    dist.all_gather_object(seen, mine, group=env.cpu_group)
    behind = [(rank, where) for rank, where in enumerate(seen) if where[:2] != seen[0][:2]]
    if behind:
        (rank, (epoch, step, host)), (epoch0, step0, host0) = behind[0], seen[0]
        raise UserError(f"the ranks do not agree where the run stands: rank 0 ({host0}) resumes at epoch "
                        f"{epoch0} step {step0}, rank {rank} ({host}) at epoch {epoch} step {step} from "
                        f"{out_dir}. Give every node the same --out-dir on a shared disk, or copy rank 0's "
                        f"out-dir to every node", shared=True, agreed=True)


# ----------------------------------------------------------------------------------------
# Stopping on a signal

class StopRequest:
    """SIGTERM (Slurm, Kubernetes, torchrun) and Ctrl-C ask the run to stop after the optimizer
    step in flight; train_one_epoch then saves, and main exits with one line. A second Ctrl-C stops
    at once."""
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
        # the loader reports them at its next batch, where train.train_one_epoch expects them.
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


def stop_message(env, signum, saved, where):
    """The Stopped error after a signal (signum) stopped the run `where`, with `saved` written."""
    if env.ddp:
        dist.barrier()               # no rank exits (and gets torchrun's SIGKILL) while rank 0 still saves
    name = signal.Signals(signum).name
    return Stopped(f"stopped by {name} {where}; saved {saved}. Re-run the same command to resume",
                   130 if signum == signal.SIGINT else 143)
