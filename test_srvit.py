"""Tests for SR-ViT: python -m pytest -q test_srvit.py  (a few minutes on a 2-core CPU)."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import srvit
from srvit import SRViT, load_pretrained, srvit_base, srvit_small, srvit_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR = os.path.join(HERE, "..", "shared", "data", "cifar10")
# A minimal 32 px model: 17 tokens, width 32. Tests build it with different depths/mixers.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_layers=2, num_heads=2, num_classes=10)


def tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return SRViT(**{**TINY, **kw})


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# The model: sizes, names, shapes, errors

@pytest.mark.parametrize("build, depth, expected", [
    (srvit_tiny, 1, 5_717_416), (srvit_small, 1, 22_050_664), (srvit_base, 1, 86_567_656),
    (srvit_small, 4, 23_838_628)])
def test_parameter_counts_match_deit(build, depth, expected):
    with torch.device("meta"):
        model = build(depth=depth)
    assert srvit.count_params(model) == expected


def test_soft_mixer_adds_148997_parameters_per_block_at_depth_4():
    with torch.device("meta"):
        small4 = srvit_small(depth=4)
        stack4 = srvit_small(depth=4, share="stack")
        mean4 = srvit_small(depth=4, mixer="mean")
    assert [srvit.count_params(m) for m in small4.mixers] == [148_997] * 12
    assert srvit.count_params(stack4) == 22_050_664 + 148_997
    assert srvit.count_params(mean4) == 22_050_664


def test_parameter_names_are_timms():
    names = set(srvit_tiny(depth=3).state_dict())
    block = {f"blocks.0.{n}.{w}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for w in ("weight", "bias")}
    top = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert block | top <= names
    assert {n for n in names if not n.startswith(("blocks.", "mixers."))} == top
    assert "mixers.11.router.fc2.weight" in names and "mixers.0.step_bias" in names
    assert not any(n.startswith("mixers.") for n in srvit_tiny(depth=1).state_dict())


@pytest.mark.parametrize("share, n_mixers", [("block", 2), ("stack", 1)])
def test_output_and_mixture_shapes(share, n_mixers):
    model = tiny(depth=3, share=share)
    logits, mix = model(images(4), return_mix=True)
    assert logits.shape == (4, 10)
    assert len(mix) == n_mixers and all(m.shape == (4, 17, 3) for m in mix)
    _, mix2 = model(images(4), steps=2, return_mix=True)
    assert all(m.shape == (4, 17, 2) for m in mix2)
    assert model(images(4), return_mix=True)[1] and tiny(depth=1)(images(4), return_mix=True)[1] == []


def test_steps_equal_depth_is_the_full_model_and_fewer_steps_differ():
    model = tiny(depth=3).eval()
    x = images()
    assert torch.equal(model(x), model(x, steps=3))
    assert not torch.allclose(model(x), model(x, steps=1))


@pytest.mark.parametrize("make, match", [
    (lambda: tiny(img_size=30), "not divisible by patch_size"),
    (lambda: tiny(depth=0), "depth"),
    (lambda: tiny(mixer="max"), "mixer must be one of"),
    (lambda: tiny(share="layer"), "share must be one of"),
    (lambda: tiny()(images(size=64)), r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"),
    (lambda: tiny()(images()[:, :1]), r"expected images of shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
    (lambda: tiny()(images()[0]), "expected images of shape"),
    (lambda: tiny(depth=2)(images(), steps=3), r"steps must be an integer in 1..2"),
    (lambda: tiny(depth=2)(images(), steps=0), r"steps must be an integer in 1..2"),
])
def test_bad_input_raises_clear_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_drop_path_rises_linearly_over_all_block_applications():
    model = tiny(depth=4, drop_path_rate=0.3)
    rates = model.drop_path_rates
    assert len(rates) == 2 * 4 and rates[0] == 0.0 and math.isclose(rates[-1], 0.3)
    assert all(b > a for a, b in zip(rates, rates[1:]))


# ----------------------------------------------------------------------------------------
# The math of recursion and the mixers, against computations written out here

def embed(model, x):
    t = model.patch_embed(x)
    return torch.cat([model.cls_token.expand(len(x), -1, -1), t], 1) + model.pos_embed


def head(model, x):
    return model.head(model.norm(x)[:, 0])


@pytest.mark.parametrize("mixer", ["mean", "last"])
def test_mean_and_last_mixers_by_hand(mixer):
    model = tiny(depth=3, mixer=mixer).eval()
    x = images()
    with torch.no_grad():
        h = embed(model, x)
        for block in model.blocks:          # block sharing: each block 3 times, then mix
            steps = [block(h)]
            for _ in range(2):
                steps.append(block(steps[-1]))
            h = sum(steps) / 3 if mixer == "mean" else steps[-1]
        torch.testing.assert_close(model(x), head(model, h))


def test_stack_sharing_by_hand():
    model = tiny(depth=2, mixer="mean", share="stack").eval()
    x = images()
    with torch.no_grad():
        h1 = model.blocks[1](model.blocks[0](embed(model, x)))
        h2 = model.blocks[1](model.blocks[0](h1))
        torch.testing.assert_close(model(x), head(model, (h1 + h2) / 2))


def test_fresh_soft_mixer_is_the_mean_and_weights_sum_to_one():
    soft, mean = tiny(depth=3, mixer="soft").eval(), tiny(depth=3, mixer="mean").eval()
    mean.load_state_dict(soft.state_dict(), strict=False)      # same blocks; mean has no mixer params
    x = images()
    logits, mix = soft(x, return_mix=True)
    torch.testing.assert_close(logits, mean(x))
    for w in mix:
        torch.testing.assert_close(w, torch.full_like(w, 1 / 3))


def test_router_init_last_starts_near_plain_recursion():
    model = tiny(depth=4, router_init="last")
    _, mix = model(images(), return_mix=True)
    torch.testing.assert_close(mix[0], torch.tensor([0.1 / 3] * 3 + [0.9]).expand(2, 17, 4))
    assert srvit.count_params(model) == srvit.count_params(tiny(depth=4))
    with pytest.raises(ValueError, match="router_init"):
        tiny(depth=4, router_init="first")


def test_soft_mixer_learns_token_dependent_weights():
    model = tiny(depth=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = images(8), torch.arange(8) % 10
    for i in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        router = model.mixers[0].router
        if i == 0:   # at init only the router's (zero) last layer gets gradient, then all of it
            assert router.fc2.weight.grad.abs().sum() > 0 and model.mixers[0].step_bias.grad.abs().sum() > 0
        if i == 1:
            assert router.fc1.weight.grad.abs().sum() > 0
        opt.step()
    _, mix = model(x, return_mix=True)
    for w in mix:
        torch.testing.assert_close(w.sum(-1), torch.ones(8, 17))
        assert (w - w.mean(dim=(0, 1))).abs().max() > 1e-4      # tokens no longer share one weighting


def test_block_and_stack_sharing_agree_with_one_block():
    a = tiny(depth=3, num_layers=1, share="block").eval()
    b = tiny(depth=3, num_layers=1, share="stack").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():           # make the router non-trivial first
        for p in a.mixers.parameters():
            p.normal_(0, 0.1)
        b.load_state_dict(a.state_dict())
    x = images()
    torch.testing.assert_close(a(x), b(x))


def plain_vit(state, x, num_heads):
    """A ViT forward written from the equations, independent of srvit.py's modules."""
    s = state
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=s["patch_embed.proj.weight"].shape[-1])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(len(x), -1, -1), t], 1) + s["pos_embed"]
    B, T, D = t.shape
    ln = lambda v, n: F.layer_norm(v, (D,), s[n + ".weight"], s[n + ".bias"], eps=1e-6)
    lin = lambda v, n: v @ s[n + ".weight"].T + s[n + ".bias"]
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = f"blocks.{i}."
        q, k, v = lin(ln(t, p + "norm1"), p + "attn.qkv").reshape(B, T, 3, num_heads, D // num_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))                      # (B, H, T, d)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // num_heads), -1) @ v
        t = t + lin(a.transpose(1, 2).reshape(B, T, D), p + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        i += 1
    return lin(ln(t, "norm")[:, 0], "head")


def test_depth_1_is_a_plain_vit():
    model = tiny(depth=1).eval()
    assert len(model.mixers) == 0
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_vit(model.state_dict(), x, num_heads=2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("share", ["block", "stack"])
def test_activation_checkpointing_changes_nothing(share):
    x, y = images(4), torch.arange(4)
    results = []
    for ckpt in (False, True):
        model = tiny(depth=3, share=share, drop_path_rate=0.3, grad_checkpointing=ckpt)
        torch.manual_seed(5)        # the same drop-path masks in both runs
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], msg=n)


def test_bf16_autocast_on_cpu():
    model = tiny(depth=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, mix = model(images(), return_mix=True)
    assert torch.isfinite(logits).all() and mix[0].dtype == torch.float32
    torch.testing.assert_close(mix[0].sum(-1), torch.ones(2, 17))


def test_torch_compile_matches_eager():
    model = tiny(depth=2).eval()
    compiled = torch.compile(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_forward_gmacs_grow_with_depth():
    with torch.device("meta"):
        g = [srvit.forward_gmacs(srvit_small(depth=r, mixer="mean")) for r in (1, 4)]
    assert 4.5 < g[0] < 4.7                        # ViT-S/16: 4.6 GMACs
    assert 3.9 < g[1] / g[0] < 4.0                 # blocks x4; the patch embedding and head once


# ----------------------------------------------------------------------------------------
# Warm start from a ViT checkpoint

def test_load_pretrained_into_deeper_model(tmp_path):
    vit = tiny(depth=1, seed=3)
    model = tiny(depth=3, seed=4)
    wrapped = {"model": {"module._orig_mod." + k: v for k, v in vit.state_dict().items()}}
    torch.save(wrapped, tmp_path / "vit.pth")
    result = load_pretrained(model, str(tmp_path / "vit.pth"), verbose=False)
    assert all(n.startswith("mixers.") for n in result["new"]) and result["new"] and not result["unused"]
    for name, value in vit.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # a fresh soft mixer is the mean, so the warm-started model is the ViT with each block repeated
    x = images()
    h = embed(vit, x)
    for block in vit.blocks:
        steps = [block(h)]
        steps += [block(steps[-1]), block(block(steps[-1]))]
        h = sum(steps) / 3
    torch.testing.assert_close(model.eval()(x), head(vit, h))


def test_load_pretrained_interpolates_positions_and_leaves_other_head_new():
    vit = tiny(depth=1, num_classes=1000)
    model = tiny(depth=2, img_size=64)
    result = load_pretrained(model, vit.state_dict(), verbose=False)
    assert "head.weight" in result["unused"] and "head.weight" in result["new"]
    assert model.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(model.pos_embed[:, 0], vit.pos_embed[:, 0])


@pytest.mark.parametrize("other, match", [
    (dict(embed_dim=64), "width 64, patch 8"), (dict(patch_size=4), "width 32, patch 4"),
    (dict(num_layers=3), "3 blocks")])
def test_load_pretrained_refuses_another_model(other, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(tiny(), tiny(**other).state_dict(), verbose=False)


def test_load_pretrained_refuses_non_vit_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        load_pretrained(tiny(), {"conv1.weight": torch.zeros(1)}, verbose=False)
    with pytest.raises(ValueError, match="not found"):
        load_pretrained(tiny(), str(tmp_path / "nope.pth"), verbose=False)


def test_cost_table_runs():
    out = subprocess.run([sys.executable, "srvit.py"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "23,838,628" in out.stdout and "22,050,664" in out.stdout and "+1,787,964" in out.stdout


# ----------------------------------------------------------------------------------------
# train.py

import train  # noqa: E402

# A tiny model and FakeData: 256 images, 8 steps of 32 per epoch.
FAST = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2",
        "--batch-size", "32", "--workers", "0", "--log-interval", "4"]
FAKE = ["--data", "fake", "--num-classes", "10", "--subset", "256", "--val-subset", "64"] + FAST


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_train(args, env=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=HERE)


def make_image_folder(root, splits=("train", "val"), classes=("cat", "dog"), n=12, size=32):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 80 * c).byte().numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.jpg"))
    return str(root)


def test_train_on_fake_data_writes_metrics_and_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    model = train.main(FAKE + ["--depth", "2", "--epochs", "2", "--out-dir", out])
    rows = read_metrics(out)
    assert rows[0]["type"] == "run" and rows[0]["params"] == srvit.count_params(model)
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_images"] == 64 for r in epochs)
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["top1"] <= r["top5"] <= 100 for r in epochs)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["depth"] == 2 and os.path.isfile(os.path.join(out, "best.pt"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value), name


def test_train_on_image_folder_with_accumulation_and_mixup(tmp_path):
    root = make_image_folder(tmp_path / "data")
    out = str(tmp_path / "run")
    train.main(["--data", "folder", "--data-path", root, "--micro-batch", "8", "--mixup", "0.8", "--cutmix", "1.0",
                "--epochs", "1", "--out-dir", out] + FAST[:-6] + ["--batch-size", "16", "--workers", "0"])
    rows = read_metrics(out)
    assert rows[1]["val_images"] == 24 and math.isfinite(rows[1]["train_loss"])
    assert rows[0]["config"]["num_classes"] == 2


def test_kill_and_resume_repeats_the_uninterrupted_run(tmp_path):
    args = FAKE + ["--depth", "2", "--epochs", "3", "--drop-path", "0.1", "--log-interval", "1"]
    whole = run_train(args + ["--out-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    cut = str(tmp_path / "cut")
    cmd = [sys.executable, "-u", os.path.join(HERE, "train.py"), *args, "--out-dir", cut]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:           # kill -9 in the middle of epoch 2, after epoch 1's checkpoint
        if line.startswith("epoch 2/3 | step 3/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert [r["epoch"] for r in read_metrics(cut) if r["type"] == "epoch"] == [1]
    resumed = run_train(args + ["--out-dir", cut])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    key = lambda rows: [(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows if r["type"] == "epoch"]
    assert key(read_metrics(cut)) == key(read_metrics(str(tmp_path / "whole")))


def test_torchrun_two_ranks_hold_identical_weights(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {HERE!r})
        import train
        model = train.main(sys.argv[1:])
        torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".pt"))
    """))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *FAKE, "--val-subset", "63", "--micro-batch", "8", "--depth", "2", "--epochs", "1", "--out-dir", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("val top-1") == 1                    # only rank 0 logs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    start = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    assert any(not torch.equal(start[k], train.srvit.srvit_tiny().state_dict().get(k, start[k])) for k in start)
    assert read_metrics(out)[1]["val_images"] == 63             # 63 images over 2 ranks, each counted once


def assert_user_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout[-500:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, res.stderr


def test_bad_inputs_give_one_clear_message(tmp_path):
    assert_user_error(run_train(["--data", "folder", "--data-path", str(tmp_path / "missing")]), "data folder not found")
    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "empty" / "val")
    assert_user_error(run_train(["--data", "folder", "--data-path", str(tmp_path / "empty")] + FAST), "no images in")
    assert_user_error(run_train(FAKE + ["--patch-size", "5"]), "not divisible by patch_size 5")
    assert_user_error(run_train(FAKE + ["--depth", "0"]), "--depth must be >= 1")
    assert_user_error(run_train(FAKE, env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}),
                      "--batch-size 32 is not divisible by the 3 processes")
    root = make_image_folder(tmp_path / "data", n=4)
    with open(os.path.join(root, "train", "cat", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    assert_user_error(run_train(["--data", "folder", "--data-path", root, "--epochs", "1"] + FAST[:-6] +
                                ["--batch-size", "3", "--workers", "1"]), "cannot read image", "broken.jpg")


def test_resume_refuses_another_models_checkpoint_and_nan_keeps_last_good(tmp_path):
    out = str(tmp_path / "run")
    ok = run_train(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", out])
    assert ok.returncode == 0, ok.stderr
    assert_user_error(run_train(FAKE + ["--depth", "2", "--epochs", "2", "--out-dir", out]),
                      "from another model", "depth: checkpoint 1 vs now 2")
    # Poison the weights of last.pt: the resumed run must stop at its first step, name it,
    # and leave the checkpoints on disk as they were.
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    torch.save(ckpt, last)
    before = open(last, "rb").read(), open(os.path.join(out, "best.pt"), "rb").read()
    assert_user_error(run_train(FAKE + ["--depth", "1", "--epochs", "2", "--out-dir", out]),
                      "loss became NaN or infinite at step 9 (epoch 2)")
    assert (open(last, "rb").read(), open(os.path.join(out, "best.pt"), "rb").read()) == before
    assert [r["epoch"] for r in read_metrics(out) if r["type"] == "epoch"] == [1]


@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR, "train")),
                    reason="../shared/data/cifar10 is not present (real-data check)")
def test_learns_real_cifar10_subset(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--data", "cifar10", "--data-path", CIFAR, "--subset", "4000", "--val-subset", "1000",
                "--epochs", "3", "--lr", "2e-3", "--depth", "2", "--out-dir", out] + FAST[:-6] + ["--batch-size", "64", "--workers", "0"])
    epochs = [r for r in read_metrics(out) if r["type"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 0.1
    assert epochs[-1]["top1"] > 25          # chance is 10%


# ----------------------------------------------------------------------------------------
# eval.py

import eval as srvit_eval  # noqa: E402


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two short runs on FakeData: R=1 and R=3 soft."""
    root = tmp_path_factory.mktemp("runs")
    for depth in (1, 3):
        train.main(FAKE + ["--depth", str(depth), "--epochs", "1", "--out-dir", str(root / f"R{depth}")])
    return root


def test_eval_checkpoint_anytime_table_and_maps(trained_runs, tmp_path):
    from PIL import Image
    ckpt = str(trained_runs / "R3" / "last.pt")
    res = srvit_eval.main(["--checkpoint", ckpt, "--steps", "all", "--maps", str(tmp_path / "maps.png"),
                           "--json", str(tmp_path / "eval.json"), "--workers", "0"])
    saved = read_metrics(str(trained_runs / "R3"))[-1]
    assert res["images"] == 64 and res["top1"] == pytest.approx(saved["top1"])     # same numbers as training's eval
    assert [r["steps"] for r in res["anytime"]] == [1, 2, 3] and res["anytime"][-1]["top1"] == res["top1"]
    g = [r["gmacs"] for r in res["anytime"]]
    assert g[0] < g[1] < g[2] == pytest.approx(res["gmacs"])
    assert len(res["step_weights"]) == 2 and all(sum(w) == pytest.approx(1, abs=1e-4) for w in res["step_weights"])
    assert all(0 <= e <= math.log(3) + 1e-5 for e in res["entropy"])
    with Image.open(tmp_path / "maps.png") as im:      # 4 rows of (label, image + 3 steps at 112 px)
        assert im.size == (6 + 4 * 118, 22 + 4 * (15 + 118) + 40)
        assert len(set(im.convert('RGB').tobytes())) > 10
    assert json.load(open(tmp_path / "eval.json"))["anytime"][0]["steps"] == 1


def test_eval_refuses_foreign_and_broken_checkpoints(trained_runs, tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "timm_style.pth")
    with open(trained_runs / "R3" / "last.pt", "rb") as f:
        (tmp_path / "half.pt").write_bytes(f.read()[:5000])      # a half-written file
    ckpt = torch.load(trained_runs / "R3" / "last.pt", weights_only=True)
    ckpt["config"]["depth"] = 2                                    # config and weights disagree
    torch.save(ckpt, tmp_path / "other.pt")
    script = os.path.join(HERE, "eval.py")
    for name, message in [("timm_style.pth", "not a train.py checkpoint"), ("half.pt", "cannot read"),
                          ("other.pt", "does not hold an SR-ViT"), ("missing.pt", "checkpoint not found")]:
        res = subprocess.run([sys.executable, script, "--checkpoint", str(tmp_path / name)], capture_output=True, text=True)
        assert_user_error(res, message)


def test_curve_table_and_plot(trained_runs, tmp_path, capsys):
    from PIL import Image
    rows = srvit_eval.main(["--curve", str(trained_runs / "*"), str(tmp_path / "not-a-run"),
                            "--plot", str(tmp_path / "curve.png"), "--paper"])
    assert [(r["depth"], r["mixer"]) for r in rows] == [(1, "-"), (3, "soft")]
    out = capsys.readouterr().out
    assert "| R3 | 3 | soft | block | - | 0 |" in out and "| R1 | 1 | - | - | - | 0 |" in out
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (760 + 520, 380)


def test_bench_numbers_are_finite_and_consistent(tmp_path):
    res = srvit_eval.main(["--bench", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--num-layers", "2",
                           "--num-heads", "2", "--num-classes", "10", "--depth", "1", "4", "--batch-size", "8",
                           "--iters", "2", "--rounds", "1", "--json", str(tmp_path / "bench.json")])
    r1, r4 = res
    for r in res:
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and 0 < r["mfu"] < 1.5
    assert 3.0 < (r4["gmacs"] - r4["mixer_gmacs"]) / r1["gmacs"] < 4.0       # 4x the blocks, 1x embed and head
    assert r4["unshared_gmacs"] + r4["mixer_gmacs"] == pytest.approx(r4["gmacs"])
    assert r4["unshared_params"] > r4["params"] and r4["train_ratio"] > 0
    assert r4["sharing_ratio"] > 0 and r4["mixer_time_share"] < 1 and "sharing_ratio" not in r1
    assert json.load(open(tmp_path / "bench.json"))["results"][1]["depth"] == 4
