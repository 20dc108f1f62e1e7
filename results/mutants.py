"""
How the test suite was checked: plant one-line bugs, one at a time, in a copy of the repository, and see
whether the suite fails. A bug the suite lets pass marks a test that is missing or cannot fail.

    python results/mutants.py                      # every bug below; writes results/mutants.md
    python results/mutants.py --only softmor-pairs-weights-with-other-steps
    python results/mutants.py --list

Each bug is (name, file, the line as it is, the line as planted). The copy is made from the files git
tracks; the suite runs with -x (it stops at the first failing test) and, by default, without the
end-to-end tests marked slow (-k "not slow" matches the mark too), so a caught bug costs seconds to
minutes and a bug that survives costs the whole suite. The test that caught a bug in the last run (the
table in --out) runs alone first: where it fails, the bug is caught in seconds; where it passes, the
suite runs (--whole-suite: the suite for every bug). The page keeps its text after the table; with
--only, it keeps the other bugs' rows too, and gains or updates the rows of the bugs run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUGS = [
    # the five that passed the whole suite before the method's tests by value
    ("softmor-pairs-weights-with-other-steps", "srvit.py",
     "out = sum(a[..., r, None] * h for r, h in enumerate(hs))",
     "out = sum(a[..., (r + 1) % k, None] * h for r, h in enumerate(hs))"),
    ("anytime-takes-the-last-k-step-biases", "srvit.py",
     "scores = scores + self.step_bias[:k].float()", "scores = scores + self.step_bias[-k:].float()"),
    ("warm-start-transposes-the-position-grid", "srvit.py",
     "grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, D)",
     "grid = grid.permute(0, 3, 2, 1).reshape(1, new * new, D)"),
    ("resume-under-accumulation-restarts-at-the-wrong-batch", "train.py",
     "run.train_loader.set_epoch(epoch, start_batch=prog.step * env.accum)",
     "run.train_loader.set_epoch(epoch, start_batch=prog.step)"),
    ("drop-path-schedule-not-linear", "srvit.py",
     "self.drop_path_rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]",
     "self.drop_path_rates = [cfg.drop_path_rate * (i / max(n - 1, 1)) ** 2 for i in range(n)]"),
    # our own
    ("router-without-its-layernorm", "srvit.py",
     "hidden = self.router.act(self.router.fc1(self.norm(h)))",
     "hidden = self.router.act(self.router.fc1(h))"),
    ("attention-without-the-1/sqrt(d)-scale", "srvit.py",
     "x = F.scaled_dot_product_attention(query, key, value)",
     "x = F.scaled_dot_product_attention(query, key, value, scale=1.0)"),
    ("tanh-gelu", "srvit.py", "self.act = nn.GELU()", 'self.act = nn.GELU(approximate="tanh")'),
    ("layernorm-eps-1e-5", "srvit.py",
     "self.norm1 = nn.LayerNorm(dim, eps=1e-6)", "self.norm1 = nn.LayerNorm(dim, eps=1e-5)"),
    ("mean-mixer-divides-by-k-plus-1", "srvit.py",
     "return sum(hs) / k, hs[0].new_full((B, T, k), 1.0 / k, dtype=torch.float32)",
     "return sum(hs) / (k + 1), hs[0].new_full((B, T, k), 1.0 / k, dtype=torch.float32)"),
    ("step-scale-of-the-first-application-everywhere", "srvit.py",
     "out = h + self.step_scale[app] * (out - h)", "out = h + self.step_scale[0] * (out - h)"),
    ("loop-scale-by-blocks-not-steps", "srvit.py",
     "attn_scale = mlp_scale = 1.0 / self.config.depth",
     "attn_scale = mlp_scale = 1.0 / self.config.num_layers"),
    ("erasing-box-one-row-too-tall", "loaders.py",
     "rows = (r >= top[:, None]) & (r < (top + height)[:, None])",
     "rows = (r >= top[:, None]) & (r <= (top + height)[:, None])"),
    ("normalise-twice-by-255", "loaders.py",
     "return (x.float() - self.mean) / self.std", "return (x.float() / 255 - self.mean) / self.std"),
    ("mixup-partner-is-the-neighbour", "loaders.py", "partner = x.flip(0)", "partner = x.roll(1, 0)"),
    ("warm-up-starts-at-zero", "train.py",
     "return 1e-6 + (args.lr - 1e-6) * epoch / args.warmup_epochs",
     "return args.lr * epoch / args.warmup_epochs"),
    ("training-loss-without-label-smoothing", "train.py",
     "loss = F.cross_entropy(run.model(x), y, label_smoothing=args.smoothing)",
     "loss = F.cross_entropy(run.model(x), y)"),
    ("metrics-repair-drops-the-last-finished-epoch", "runtime.py",
     'if row["epoch"] > done:', 'if row["epoch"] >= done:'),
    ("failed-start-cleanup-ignores-the-checkpoints", "runtime.py",
     "if failed and self.master and not any(map(os.path.exists, (self.last, self.best))):",
     "if failed and self.master:"),
    ("a-rank-that-set-up-keeps-it-when-another-failed", "runtime.py",
     "            if undo and error is None:\n                undo(result)\n", ""),
    ("validation-headers-checked-on-the-device-path-only", "loaders.py",
     "if not memory:                   # (the memory path decodes every image now anyway)",
     "if on_device:"),
    # a second round, from a reading of the suite for bugs it could not see
    ("learned-loop-scale-swaps-its-branches", "srvit.py",
     "attn_scale, mlp_scale = self.loop_scale[app]", "mlp_scale, attn_scale = self.loop_scale[app]"),
    ("position-grid-resized-bilinear", "srvit.py",
     'mode="bicubic", align_corners=False', 'mode="bilinear", align_corners=False'),
    ("drop-path-keeps-without-rescaling", "srvit.py", "return x * keep / (1.0 - p)", "return x * keep"),
    ("lr-from-the-step-within-the-epoch", "train.py",
     'g["lr"] = lr_at(gstep, run.steps_per_epoch, args)', 'g["lr"] = lr_at(step, run.steps_per_epoch, args)'),
    ("sample-order-the-same-every-epoch", "loaders.py",
     'seed_for("order", self.seed, self.epoch)', 'seed_for("order", self.seed)'),
    ("step-draws-the-same-every-epoch", "train.py",
     'seed_for("step", args.seed, epoch, env.rank, step)', 'seed_for("step", args.seed, env.rank, step)'),
    ("top5-reports-top1", "train.py", '"top5": 100 * c5 / max(n, 1)', '"top5": 100 * c1 / max(n, 1)'),
    ("class-folders-read-hidden-files", "loaders.py",
     'walked.append((root, sorted(f for f in files if not f.startswith("."))))',
     "walked.append((root, sorted(files)))"),
    ("json-table-left-unclosed-its-flush-error-swallowed", "runtime.py",
     "        with open(tmp, \"w\") as f:        # closed before the rename: "
     "a full disk fails here, not after\n            f.write(text)",
     "        open(tmp, \"w\").write(text)"),
    # a reviewer's: the warm start, resume, sampler, schedule and model flags
    ("grad-ckpt-drops-the-loop-scale", "srvit.py",
     "out = checkpoint(block, h, drop_prob, attn_scale, mlp_scale, use_reentrant=False)",
     "out = checkpoint(block, h, drop_prob, use_reentrant=False)"),
    ("repeated-copies-share-one-augmentation", "loaders.py",
     'yield i, seed_for("aug", self.seed, self.epoch, self.rank, pos)',
     'yield i, seed_for("aug", self.seed, self.epoch, pos)'),
    ("warm-start-reloaded-on-a-mid-epoch-resume", "train.py",
     "if progress.epoch == 0 and progress.step == 0 and args.init_from:",
     "if progress.epoch == 0 and args.init_from:"),
    ("save-every-counts-steps-of-the-epoch", "train.py",
     "save_now = args.save_every and (gstep + 1) % args.save_every == 0",
     "save_now = args.save_every and prog.step % args.save_every == 0"),
    ("drop-path-flag-ignored", "train.py",
     "loop_scale=args.loop_scale, drop_path_rate=args.drop_path,", "loop_scale=args.loop_scale,"),
    ("router-init-flag-ignored", "train.py",
     "router_init=args.router_init, init=args.init,", "init=args.init,"),
    ("extended-run-reclips-its-warm-up", "train.py",
     "args.warmup_epochs = warmup if warmup < args.epochs else args.epochs / 5",
     "args.warmup_epochs = args.epochs / 5"),
    ("ranks-compared-by-epoch-only", "runtime.py",
     "if where[:2] != seen[0][:2]]", "if where[:1] != seen[0][:1]]"),
    ("resume-forgets-the-loss-scale", "runtime.py",
     '        scaler.load_state_dict(ckpt["scaler"])', "        pass"),
    ("walk-in-the-filesystem-s-order", "loaders.py",
     'dirs[:] = sorted(d for d in dirs if not d.startswith("."))',
     'dirs[:] = [d for d in dirs if not d.startswith(".")]'),
    ("evaluation-leaves-the-model-training", "train.py",
     "    model.train(was_training)", "    model.train()"),
    # the sixth run's: what the model, loaders and step report and draw, not only what they compute
    ("attention-drop-path-also-in-evaluation", "srvit.py",
     "x = x + drop_path(attn_scale * self.attn(self.norm1(x)), drop_prob, self.training)",
     "x = x + drop_path(attn_scale * self.attn(self.norm1(x)), drop_prob, True)"),
    ("plain-recursion-reports-step-1-s-weight", "srvit.py",
     "        weights[..., -1] = 1.0", "        weights[..., 0] = 1.0"),
    ("weight-map-shifted-by-the-class-token", "eval.py",
     "weights[row, 1:, r]", "weights[row, :-1, r]"),
    ("cutmix-always-wins-when-both-are-on", "loaders.py",
     "cutmix = args.cutmix > 0 and (args.mixup == 0 or torch.rand(()).item() < 0.5)",
     "cutmix = args.cutmix > 0"),
    ("cutmix-box-without-the-square-root", "loaders.py",
     "h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))",
     "h, w = int(H * (1 - lam)), int(W * (1 - lam))"),
    ("memory-crops-on-the-diagonal", "loaders.py",
     "cols = offset[1] + torch.arange(S, device=x.device)",
     "cols = offset[0] + torch.arange(S, device=x.device)"),
    ("one-flip-coin-per-batch", "loaders.py",
     "flip = torch.rand(B, generator=g, device=x.device) < hflip",
     "flip = torch.rand(1, generator=g, device=x.device) < hflip"),
    ("every-memory-batch-of-an-epoch-draws-alike", "loaders.py",
     "seed_for(\"aug\", self.seed, self.sampler.epoch, self.sampler.rank, b))",
     "seed_for(\"aug\", self.seed, self.sampler.epoch, self.sampler.rank))"),
    ("repeated-copies-on-one-rank", "loaders.py",
     "return idx[self.rank::self.world][:self.per_rank]",
     "return idx[self.rank * self.per_rank:][:self.per_rank]"),
    ("clip-by-value-not-norm", "train.py",
     "torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)",
     "torch.nn.utils.clip_grad_value_(run.model.parameters(), args.clip_grad)"),
    ("epoch-loss-carries-the-run-so-far", "train.py",
     "prog.epoch, prog.step, prog.loss_sum = epoch + 1, 0, 0.0",
     "prog.epoch, prog.step = epoch + 1, 0"),
    ("position-embedding-starts-10x-too-wide", "srvit.py",
     "nn.init.trunc_normal_(self.pos_embed, std=0.02)", "nn.init.trunc_normal_(self.pos_embed, std=0.2)"),
    ("a-dead-loader-worker-saves-without-the-epoch-loss", "train.py",
     "prog.loss_sum, prog.elapsed = loss_sum.item(), clock.training_seconds()",
     "prog.elapsed = clock.training_seconds()"),
    ("a-named-pipe-is-opened-as-a-picture", "loaders.py",
     "if not stat.S_ISREG(mode):", "if stat.S_ISDIR(mode):"),
    # the eighth run's: a reviewer's reading for bugs in what ranks draw, eval sums and curves read
    ("every-rank-draws-rank-0s-masks-and-mixes", "train.py",
     "seed_device(seed_for(\"step\", args.seed, epoch, env.rank, step), env.device)",
     "seed_device(seed_for(\"step\", args.seed, epoch, 0, step), env.device)"),
    ("mixture-weights-over-the-last-batch-only", "eval.py",
     "seen[\"tokens\"] += w.shape[1] * w.shape[2]", "seen[\"tokens\"] = w.shape[1] * w.shape[2]"),
    ("curve-best-is-the-last-epoch", "eval.py",
     "\"best_top1\": max(e[\"top1\"] for e in epochs)", "\"best_top1\": epochs[-1][\"top1\"]"),
    ("curve-reads-an-extended-run-by-its-first-leg", "eval.py",
     "run, last = runs[-1], epochs[-1]", "run, last = runs[0], epochs[-1]"),
    ("evaluation-resize-without-deits-crop-ratio", "loaders.py",
     "resize = v2.Resize(int(args.img_size / 0.875), interpolation=bicubic)",
     "resize = v2.Resize(args.img_size, interpolation=bicubic)"),
    # ninth run: found passing by a reviewer's reading
    ("progress-eta-one-epoch-short", "train.py",
     "left = (args.epochs - epoch) * run.steps_per_epoch - step",
     "left = (args.epochs - epoch - 1) * run.steps_per_epoch - step"),
    ("progress-loss-over-the-whole-epoch", "train.py",
     'f"loss {(loss_sum - loss_done) / max(step - steps_done, 1):.4f} | lr "',
     'f"loss {loss_sum / max(step, 1):.4f} | lr "'),
    ("epoch-speed-counts-the-evaluation", "train.py",
     "/ max(prog.elapsed - clock.elapsed_before, 1e-9)}", "/ seconds}"),
    ("resume-takes-the-files-fusing", "runtime.py",
     'optimizer.load_state_dict({**state, "param_groups": [{**g, **how} for g in state["param_groups"]]})',
     "optimizer.load_state_dict(state)"),
    ("a-start-deletes-every-tmp-file", "runtime.py",
     "if KILLED_WRITE.fullmatch(name):", 'if name.endswith(".tmp"):'),
]


def copy_tracked(dest):
    """The files git tracks, copied into dest."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for f in listed.stdout.split():
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        if os.path.isfile(os.path.join(ROOT, f)):
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def plant(bug, dest):
    """A copy of the tracked files in dest with the bug's line changed (it must occur exactly once)."""
    name, path, old, new = bug
    copy_tracked(dest)
    text = open(os.path.join(dest, path)).read()
    if text.count(old) != 1:
        raise SystemExit(f"{name}: the line to change occurs {text.count(old)} times in {path}, not once")
    open(os.path.join(dest, path), "w").write(text.replace(old, new))


def pytest_run(dest, selected, keyword, timeout):
    """(exit code or None where it timed out, the failed tests' names) of pytest -x on selected."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", selected]
    try:
        res = subprocess.run(cmd + (["-k", keyword] if keyword else []), cwd=dest, capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return None, []
    lines = res.stdout.splitlines()
    return res.returncode, [line.split()[1].split("::")[-1] for line in lines if line.startswith("FAILED ")]


def run_suite(dest, keyword, timeout, first=""):
    """(caught, seconds, first failing test or ''). first: a test run alone before the suite, the one that
    caught this bug last time; where it fails, the bug is caught (a test failed) without the suite. (A
    first test that passes, no longer exists or is deselected by keyword: the suite runs.)"""
    t0 = time.time()
    if first:
        _, failed = pytest_run(dest, f"test_srvit.py::{first}", keyword, timeout)
        if failed:
            return True, time.time() - t0, failed[0]
    code, failed = pytest_run(dest, "test_srvit.py", keyword, timeout)
    if code is None:
        return None, time.time() - t0, "timed out"
    return code != 0, time.time() - t0, (failed[0] if failed else "")


def earlier_rows(path):
    """{bug: (bug, file, result, first failing test, seconds)} from the table an earlier run wrote."""
    earlier = {}
    if os.path.isfile(path):
        for line in open(path).read().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 5 and cells[4].isdigit():
                earlier[cells[0]] = (cells[0], cells[1], cells[2], cells[3], float(cells[4]))
    return earlier


def merge_rows(path, rows):
    """rows of this run, in BUGS order, with the rows an earlier run wrote to path for the other bugs."""
    earlier = earlier_rows(path)
    now = {row[0]: row for row in rows}
    return [now.get(name) or earlier[name] for name, *_ in BUGS if name in now or name in earlier]


def text_after_the_table(path):
    """What path holds after its table (how the table was made), or ''."""
    if not os.path.isfile(path):
        return ""
    lines = open(path).read().splitlines(keepends=True)
    last = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
    return "".join(lines[last + 1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="names of the bugs to plant (default: all)")
    p.add_argument("--list", action="store_true", help="list the bugs and stop")
    p.add_argument("-k", dest="keyword", default="not slow", help="pytest -k expression ('' runs every test)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per suite run")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "mutants.md"))
    p.add_argument("--whole-suite", action="store_true",
                   help="run the suite for every bug, not first the test that caught it in --out's table")
    args = p.parse_args(argv)
    catchers = {} if args.whole_suite else {name: row[3] for name, row in earlier_rows(args.out).items()
                                            if row[2].startswith("caught") and row[3] != "-"}
    bugs = [b for b in BUGS if not args.only or b[0] in args.only]
    if args.list or not bugs:
        print("\n".join(f"{name}: {path}: {old!r} -> {new!r}" for name, path, old, new in BUGS))
        return 0
    if catchers:                  # a first test must pass on the unchanged code, alone, to count
        with tempfile.TemporaryDirectory() as dest:
            copy_tracked(dest)
            for test in sorted({catchers[name] for name, *_ in bugs if name in catchers}):
                if pytest_run(dest, f"test_srvit.py::{test}", args.keyword, args.timeout)[1]:
                    print(f"{test} fails on the unchanged code: not used as a first test", flush=True)
                    catchers = {name: t for name, t in catchers.items() if t != test}
    rows = []
    for i, bug in enumerate(bugs, 1):
        with tempfile.TemporaryDirectory() as dest:
            plant(bug, dest)
            caught, seconds, test = run_suite(dest, args.keyword, args.timeout, catchers.get(bug[0], ""))
        verdict = "caught" if caught else ("survived" if caught is False else "timed out")
        rows.append((bug[0], bug[1], verdict, test, seconds))
        print(f"[{i}/{len(bugs)}] {bug[0]}: {verdict} {test} ({seconds:.0f} s)", flush=True)
    after = text_after_the_table(args.out)        # the page's account of how the list grew
    if args.only:                 # the other bugs keep their rows from the last run
        rows = merge_rows(args.out, rows)
    caught = sum(r[2].startswith("caught") for r in rows)
    with open(args.out, "w") as f:
        f.write(f"# Planted bugs against the test suite\n\n`python results/mutants.py` (suite run with -x"
                f"{f' -k {args.keyword!r}' if args.keyword else ''}"
                f"{'' if args.whole_suite else ', after the test that caught each bug before, alone'}"
                f"{', the table merged from the runs below' if args.only else ''}): {caught} of {len(rows)} "
                f"planted bugs make the suite fail.\n\n")
        f.write("| bug | file | result | first failing test | seconds |\n|---|---|---|---|---|\n")
        for name, path, verdict, test, seconds in rows:
            f.write(f"| {name} | {path} | {verdict} | {test or '-'} | {seconds:.0f} |\n")
        f.write(after)
    print(f"{caught} of {len(rows)} caught; wrote {args.out}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
