"""Tests for SR-ViT: python -m pytest -q test_srvit.py  (a few minutes on a 2-core CPU)."""

import contextlib
import copy
import errno
import functools
import glob
import itertools
import inspect
import io
import json
import math
import os
import shutil
import re
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import srvit
from srvit import SRViT, load_pretrained, srvit_base, srvit_small, srvit_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
# The end-to-end tests (torchrun, subprocesses, compilation, the node check; about half the suite's
# time): `-m "not slow"` leaves them out for a quick loop; CI runs them all. (The suite has no
# configuration file to register its marks in, so pytest's warning about them is silenced here.)
warnings.filterwarnings("ignore", r"Unknown pytest\.mark\.(slow|default_device)",
                        pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow
# Real CIFAR-10 as JPEG folders, where the notebook looks for it: $SRVIT_DATA, else the
# repository's data/cifar10.
CIFAR = os.environ.get("SRVIT_DATA") or os.path.join(HERE, "data", "cifar10")
# A minimal 32 px model: 17 tokens, width 32. Tests build it with different depths/mixers.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_layers=2, num_heads=2, num_classes=10)


@pytest.fixture(autouse=True)
def nothing_is_written_into_the_repository():
    """Tests write under pytest's tmp_path only: a run's default out-dir (runs/), a download (data/) or a
    node check's default report folder made in the repository by a test fails that test."""
    names = ("runs", "data", "node-check")
    made = lambda: {name for name in names if os.path.exists(os.path.join(HERE, name))}
    before = made()
    yield
    assert made() <= before, f"this test wrote {sorted(made() - before)} into the repository"


@pytest.fixture(autouse=True)
def every_run_names_its_device(request, monkeypatch):
    """A run left to the default --device trains on cuda on a GPU machine (bf16, the GPU loaders), so a
    test that passes here could fail there: every run a test starts in-process names its device. The
    tests of the default itself are marked default_device. (Subprocesses see no GPU: see run_train.)"""
    if request.node.get_closest_marker("default_device"):
        return
    real = runtime.check_device

    def named_only(name):
        # (a get_args that checks an absent flag chooses no device)
        if name is None and sys._getframe(1).f_code.co_name != "get_args":
            pytest.fail("this test runs with the default --device: name it (--device cpu)")
        return real(name)
    monkeypatch.setattr(runtime, "check_device", named_only)
    monkeypatch.setattr(srvit_eval, "check_device", named_only)


def tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return SRViT(**{**TINY, **kw})


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def bench_script():
    """results/bench.py, the benchmarks (a script beside its outputs, not a package), as a module."""
    if "srvit_bench" not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location("srvit_bench",
                                                      os.path.join(HERE, "results", "bench.py"))
        sys.modules["srvit_bench"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["srvit_bench"])
    return sys.modules["srvit_bench"]


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
    torch.testing.assert_close(model(x), softmor_by_hand(model, x, 3)[0], atol=1e-5, rtol=1e-5)
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
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)], abs=1e-12)     # the formula, every value
    # ...and each application gets its own, in the order it runs
    seen = []
    for share in ("block", "stack"):
        model = tiny(depth=3, drop_path_rate=0.3, share=share).train()
        seen.clear()
        for block in model.blocks:
            block.forward = (lambda f: lambda x, p=0.0, *a: (seen.append(p), f(x, 0.0, *a))[1])(block.forward)
        model(images(1))
        assert seen == pytest.approx([0.3 * i / 5 for i in range(6)], abs=1e-12), share


# ----------------------------------------------------------------------------------------
# The math of recursion and the mixers, against computations written out here


def randomise_mixers(model, seed=5):
    """Router and step biases at random, asymmetric values: a fresh mixer weighs every step alike, so
    pairing a weight with the wrong step, or slicing the wrong biases, would not show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.mixers:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 if p is m.step_bias else 0.5))
    return model


def softmor_by_hand(model, x, k):
    """SR-ViT's forward with the first k steps, written from the README's equations:
    h_1 = f(x), h_r = f(h_{r-1}); s_{r,t} = g(LN(h_{r,t})) + b_r; a = softmax_r(s); x' = sum_r a_r h_r."""
    cfg = model.config

    def mix(mixer, hs):
        g = mixer.router
        normed = [F.layer_norm(h, h.shape[-1:], mixer.norm.weight, mixer.norm.bias, 1e-6) for h in hs]
        # k x (B, T, 1)
        scores = [g.fc2(F.gelu(g.fc1(n))) + mixer.step_bias[r] for r, n in enumerate(normed)]
        weights = torch.softmax(torch.cat(scores, -1), -1)                               # (B, T, k)
        return sum(weights[..., r:r + 1] * h for r, h in enumerate(hs)), weights
    t, mixes = embed(model, x), []
    if cfg.share == "block":
        for l, block in enumerate(model.blocks):
            hs = [block(t)]
            for _ in range(k - 1):
                hs.append(block(hs[-1]))
            t, w = mix(model.mixers[l], hs)
            mixes.append(w)
    else:
        hs, h = [], t
        for _ in range(k):
            for block in model.blocks:
                h = block(h)
            hs.append(h)
        t, w = mix(model.mixers[0], hs)
        mixes.append(w)
    return head(model, t), mixes


@pytest.mark.parametrize("share", ["block", "stack"])
def test_softmor_equations_by_value_at_every_number_of_steps(share):
    model = randomise_mixers(tiny(depth=4, share=share, init="torch").eval())
    x = images(2)
    for k in range(1, 5):
        want, want_mix = softmor_by_hand(model, x, k)
        got, got_mix = model(x, steps=k, return_mix=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_mix, want_mix, strict=True):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
        weights = got_mix[0]                                   # (B, T, k)
        if k > 1:                                              # per token, and far from uniform
            assert (weights[0, 0] - weights[0, 1]).abs().max() > 0.01
            assert (weights - 1 / k).abs().max() > 0.1
    assert (model(x) - model(x, steps=3)).abs().max() > 1e-3     # the steps matter at these weights


def test_a_plain_vit_forward_written_out_equals_r1_at_logits_of_order_one():
    # R = 1 is a DeiT: the forward pass written with torch.nn.functional only, on weights at a scale
    # where every activation matters (logits of order 1: a wrong GELU, norm eps or attention scale shows).
    model = tiny(depth=1, init="torch").eval()
    with torch.no_grad():
        model.head.weight.mul_(20)
    x = images(2)
    B, D, heads = 2, model.config.embed_dim, model.config.num_heads
    t = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                 stride=8).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(B, -1, -1), t], 1) + model.pos_embed               # (B, T, D)
    for blk in model.blocks:
        y = F.layer_norm(t, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(B, -1, 3, heads, D // heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        # (B, heads, T, T)
        att = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(D // heads), -1)
        heads_out = (att @ value).transpose(1, 2).reshape(B, -1, D)                            # (B, T, D)
        t = t + (heads_out @ blk.attn.proj.weight.T + blk.attn.proj.bias)
        y = F.layer_norm(t, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        # exact (erf) GELU
        y = F.gelu(y @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        t = t + (y @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    t = F.layer_norm(t, (D,), model.norm.weight, model.norm.bias, 1e-6)
    want = t[:, 0] @ model.head.weight.T + model.head.bias
    got = model(x)
    assert 0.5 < want.abs().max() < 50                                                         # order 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_timms_vit_gives_our_logits_when_timm_is_installed():
    timm = pytest.importorskip("timm",
                               reason="timm is not a dependency; this check runs where it is installed")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    ours = tiny(depth=1, init="torch").eval()       # weights where every activation matters (as above)
    with torch.no_grad():
        ours.head.weight.mul_(20)
    ref.load_state_dict(ours.state_dict(), strict=True)             # timm's names, every one of them
    x = images(2)
    assert 0.5 < ref(x).abs().max() < 50                                                       # order 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_resized_position_embedding_keeps_rows_as_rows():
    # A 4 x 4 grid: channel 0 = the row, channel 1 = the column (ramps). Resized to 8 x 8, channel 0
    # must still change down the rows only, channel 1 across the columns only.
    row, col = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    grid = torch.stack([row, col], -1).view(1, 16, 2)                                         # (1, 16, 2)
    # class token first
    pos = torch.cat([torch.full((1, 1, 2), 7.0), grid], 1)
    out = srvit.resize_pos_embed(pos, 64)                                                     # (1, 65, 2)
    assert out[0, 0].tolist() == [7.0, 7.0]
    new = out[0, 1:].view(8, 8, 2)
    torch.testing.assert_close(new[..., 0], new[..., 0][:, :1].expand(8, 8))        # constant along a row
    torch.testing.assert_close(new[..., 1], new[..., 1][:1, :].expand(8, 8))        # constant down a column
    assert (new[1:, 0, 0] > new[:-1, 0, 0]).all() and (new[0, 1:, 1] > new[0, :-1, 1]).all()


def bicubic_matrix(old, new, a=-0.75):
    """(new, old): the bicubic resize of one axis written out as PyTorch does it (and timm, through it,
    when the grid grows: timm's antialias=True changes only a shrink): Keys' cubic with a = -0.75 over
    the 4 nearest source pixels, half-pixel centres (align_corners=False), the edge pixels repeated."""
    def keys(d):
        d = abs(d)
        return ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    m = torch.zeros(new, old, dtype=torch.float64)
    for i in range(new):
        source = (i + 0.5) * old / new - 0.5                  # where output pixel i sits on the old grid
        base = math.floor(source)
        for offset in (-1, 0, 1, 2):
            m[i, min(max(base + offset, 0), old - 1)] += keys(source - (base + offset))
    return m


def test_a_resized_position_embedding_is_the_bicubic_resize_written_out():
    g = torch.Generator().manual_seed(0)
    for old, new in ((4, 7), (14, 24), (7, 4)):                 # larger, DeiT's 224 -> 384, smaller
        pos = torch.randn(1, 1 + old * old, 3, generator=g)
        out = srvit.resize_pos_embed(pos, new * new)                                   # (1, 1 + new^2, 3)
        m = bicubic_matrix(old, new)
        for c in range(3):
            want = m @ pos[0, 1:, c].double().view(old, old) @ m.T                      # (new, new)
            torch.testing.assert_close(out[0, 1:, c].view(new, new).double(), want, atol=1e-5, rtol=1e-5)


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones_by_1_over_keep():
    x = torch.randn(4000, 3, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = srvit.drop_path(x, 0.25, training=True)
    kept = (out != 0).flatten(1).any(1)                                                  # (B,)
    assert torch.equal(out[kept], x[kept] / 0.75) and torch.equal(out[~kept], torch.zeros_like(x[~kept]))
    assert 0.72 < kept.float().mean() < 0.78                                             # keep 0.75
    assert torch.equal(srvit.drop_path(x, 0.25, training=False), x)


def test_a_block_drops_its_branches_in_training_only():
    # DeiT's stochastic depth: a block in eval mode ignores its drop rate; in training each sample
    # drops each branch with chance 0.5, so about a quarter of the samples pass through unchanged.
    torch.manual_seed(0)
    block, x = srvit.Block(32, 2, 4.0).eval(), torch.randn(64, 5, 32)
    torch.testing.assert_close(block(x, drop_prob=0.5), block(x))
    unchanged = torch.equal(block(x)[0], x[0])
    block.train()
    both_dropped = (block(x, drop_prob=0.5) == x).flatten(1).all(1)              # (B,)
    assert not unchanged and 4 < both_dropped.sum() < 32


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
        _, mix = model(x, return_mix=True)
    # the weights the table and maps report: 1/3 each, or all on the last step
    want = torch.tensor([1 / 3] * 3 if mixer == "mean" else [0.0, 0.0, 1.0])
    for weights in mix:                                                          # (B, T, 3) each
        torch.testing.assert_close(weights, want.expand_as(weights))


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
    with pytest.raises(ValueError, match="router_init"):
        tiny(depth=4, router_init="first")


def test_step_scale_is_opt_in_and_a_fresh_one_changes_nothing():
    plain, scaled = tiny(depth=3), tiny(depth=3, step_scale=True)
    assert plain.step_scale is None and "step_scale" not in plain.state_dict()
    assert srvit.count_params(scaled) - srvit.count_params(plain) == 2 * 3 * 32    # L*R applications x D
    scaled_state = scaled.state_dict()
    # same seed, same weights
    assert all(torch.equal(v, scaled_state[k]) for k, v in plain.state_dict().items())
    # g = 1: h + (f(h) - h) = f(h)
    torch.testing.assert_close(scaled(images()), plain(images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("share", ["block", "stack"])
def test_step_scale_scales_each_applications_update(share):
    model = tiny(depth=3, share=share, step_scale=True).eval()
    L, R = 2, 3
    first_step = [l * R for l in range(L)] if share == "block" else list(range(L))   # applications of step 1
    with torch.no_grad():
        model.step_scale.zero_()
        model.step_scale[first_step] = 1.0           # steps 2..R make no update: every step repeats step 1
    steps = model.trace(images())["steps"]
    for hs in steps:
        for h in hs[1:]:
            torch.testing.assert_close(h, hs[0], atol=0, rtol=0)
    for k in (1, 2):        # fewer steps than R: still the scales of R-step indexing (the mix of equal steps)
        torch.testing.assert_close(model(images(), steps=k), model(images()), atol=1e-5, rtol=0)
    # step 2 of block 1 (block share), or block 1 in the stack's step 2
    i = 1 if share == "block" else L
    with torch.no_grad():
        model.step_scale[i] = 0.5
    h1, h2 = model.trace(images())["steps"][0][:2]
    f = model.blocks[0]
    # block share: h2 = f(h1) at half its update; stack share: step 2 = block 1 at half its update,
    # then block 2 with g = 0 (no update)
    torch.testing.assert_close(h2, h1 + 0.5 * (f(h1) - h1))


def test_loop_scale_leaves_r1_a_deit_and_is_opt_in():
    x = images()
    plain = tiny(depth=1).eval()
    for kind in ("fixed", "learned"):
        scaled = tiny(depth=1, loop_scale=kind).eval()
        scaled.load_state_dict(plain.state_dict(), strict=False)        # the same weights (learned: 1/1)
        assert torch.equal(scaled(x), plain(x)), kind
    assert tiny(depth=4).loop_scale is None and tiny(depth=4).config.loop_scale == "none"
    args = train.get_args(FAST + ["--data", "fake", "--depth", "4", "--loop-scale", "fixed"])
    assert train.build_model(args, 10).config.loop_scale == "fixed"


@pytest.mark.parametrize("share", ["block", "stack"])
def test_fixed_loop_scale_scales_each_looped_residual_branch_by_1_over_r(share):
    # Written out: x <- x + attn(LN1(x)) / R, then x <- x + mlp(LN2(x)) / R, at every application.
    R = 4
    model = randomise_mixers(tiny(depth=R, share=share, loop_scale="fixed", init="torch").eval())

    def scaled_block(block, h):
        h = h + block.attn(block.norm1(h)) / R
        return h + block.mlp(block.norm2(h)) / R
    want_model = copy.deepcopy(model)
    for b in want_model.blocks:
        b.forward = (lambda blk: lambda h, *a: scaled_block(blk, h))(b)
    want_model.config.loop_scale = "none"                                  # the by-hand blocks scale already
    x = images(2)
    for k in (1, 2, 4):
        torch.testing.assert_close(model(x, steps=k), softmor_by_hand(want_model, x, k)[0],
                                   atol=1e-5, rtol=1e-5)


def test_learned_loop_scale_starts_at_1_over_r_per_branch_and_is_not_decayed():
    fixed, learned = tiny(depth=4, loop_scale="fixed").eval(), tiny(depth=4, loop_scale="learned").eval()
    learned.load_state_dict(fixed.state_dict(), strict=False)
    assert learned.loop_scale.shape == (2 * 4, 2, 32) and torch.all(learned.loop_scale == 0.25)
    torch.testing.assert_close(learned(images()), fixed(images()), atol=0, rtol=0)
    with torch.no_grad():                              # application 1's MLP branch alone made 3x larger
        learned.loop_scale[1, 1] *= 3
    assert (learned(images()) - fixed(images())).abs().max() > 1e-4
    decay, no_decay = train.param_groups(learned, 0.05)
    assert any(p is learned.loop_scale for p in no_decay["params"])
    assert not any(p is learned.loop_scale for p in decay["params"])


@pytest.mark.parametrize("share", ["block", "stack"])
def test_learned_loop_scale_gives_each_branch_of_each_application_its_own_scale(share):
    # Application i (counted in the order the applications run): x <- x + s[i, 0] * attn(LN1(x)),
    # then x <- x + s[i, 1] * mlp(LN2(x)), per channel.
    R = 3
    model = randomise_mixers(tiny(depth=R, share=share, loop_scale="learned", init="torch").eval())
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        model.loop_scale.copy_(2 * torch.rand(model.loop_scale.shape, generator=g))
    scales, applied = model.loop_scale.detach(), []                                    # (L*R, 2, D)

    def scaled_block(block, h):
        attn_scale, mlp_scale = scales[len(applied)]
        applied.append(block)
        h = h + attn_scale * block.attn(block.norm1(h))
        return h + mlp_scale * block.mlp(block.norm2(h))
    want_model = copy.deepcopy(model)
    for b in want_model.blocks:
        b.forward = (lambda blk: lambda h, *a: scaled_block(blk, h))(b)
    x = images(2)
    want = softmor_by_hand(want_model, x, R)[0]
    blocks = list(want_model.blocks)
    assert applied == ([b for b in blocks for _ in range(R)] if share == "block" else blocks * R)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


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
    t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"],
                 stride=s["patch_embed.proj.weight"].shape[-1])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(len(x), -1, -1), t], 1) + s["pos_embed"]
    B, T, D = t.shape
    ln = lambda v, n: F.layer_norm(v, (D,), s[n + ".weight"], s[n + ".bias"], eps=1e-6)
    lin = lambda v, n: v @ s[n + ".weight"].T + s[n + ".bias"]
    i = 0
    while f"blocks.{i}.norm1.weight" in s:
        p = f"blocks.{i}."
        qkv = lin(ln(t, p + "norm1"), p + "attn.qkv")
        q, k, v = qkv.reshape(B, T, 3, num_heads, D // num_heads).unbind(2)
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
        torch.testing.assert_close(model(x), plain_vit(model.state_dict(), x, num_heads=2), atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("share, scales", [("block", {}), ("stack", {}), ("block", {"loop_scale": "fixed"}),
                                           ("block", {"loop_scale": "learned", "step_scale": True})])
def test_activation_checkpointing_changes_nothing(share, scales):
    x, y = images(4), torch.arange(4)
    results = []
    for ckpt in (False, True):
        model = tiny(depth=3, share=share, drop_path_rate=0.3, grad_checkpointing=ckpt, **scales)
        with torch.no_grad():           # scales away from their start, so a dropped one shows
            for name, p in model.named_parameters():
                if "scale" in name:
                    p.mul_(1.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(2)))
        torch.manual_seed(5)        # the same drop-path masks in both runs
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], msg=n)


def test_bf16_logits_are_within_tolerance_of_fp32():
    # Stated tolerance: bf16 keeps 8 bits of mantissa (relative error 2^-8 ~ 0.4% per rounding);
    # through 2 blocks x 2 steps the logits stay within 0.05 of fp32 (their scale is ~1).
    model = tiny(depth=2).eval()
    with torch.no_grad():
        for p in model.mixers.parameters():      # a non-trivial router
            p.normal_(0, 0.2)
        x = images(8)
        ref, ref_mix = model(x, return_mix=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, mix = model(x, return_mix=True)
    assert logits.dtype == torch.bfloat16 and mix[0].dtype == torch.float32
    torch.testing.assert_close(logits.float(), ref, atol=0.05, rtol=0)
    torch.testing.assert_close(mix[0], ref_mix[0], atol=0.01, rtol=0)


def test_soft_mixer_built_on_its_own_starts_uniform():
    torch.manual_seed(0)
    mixer = srvit.SoftMixer(16, 4)
    _, weights = mixer([torch.randn(2, 5, 16) for _ in range(4)])
    torch.testing.assert_close(weights, torch.full((2, 5, 4), 0.25))


def test_router_scores_and_softmax_are_fp32_under_bf16():
    # Scores of 4-8: rounded to bf16 (8 bits of mantissa) they are off by up to ~0.03, which the
    # softmax turns into ~3% errors in the weight ratios. In fp32 they stay within 1e-5.
    torch.manual_seed(0)
    mixer = srvit.SoftMixer(32, 3)
    with torch.no_grad():
        mixer.router.fc2.weight.normal_(0, 1.0)
        mixer.router.fc2.bias.fill_(6.0)
    hs = [torch.randn(4, 9, 32) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights = mixer(hs)
        # what bf16 gives fc2
        hidden = [mixer.router.act(mixer.router.fc1(mixer.norm(h))).float() for h in hs]
    fc2 = mixer.router.fc2
    scores = torch.stack([(h @ fc2.weight.T + fc2.bias).squeeze(-1) for h in hidden], -1)  # fp32 reference
    assert weights.dtype == torch.float32 and scores.abs().mean() > 3
    torch.testing.assert_close(weights, scores.softmax(-1), rtol=1e-5, atol=1e-6)


def saved_mib(**kw):
    """MiB kept for backward by one training forward (each storage once), D=384 at 224 px."""
    torch.manual_seed(0)
    model = SRViT(embed_dim=384, num_heads=6, num_layers=2, num_classes=10, **kw)
    return bench_script().saved_activation_mib(model, torch.randn(2, 3, 224, 224))


def test_grad_ckpt_also_checkpoints_the_routers():
    # With --grad-ckpt, R=4 soft kept 3x the activations of R=4 plain recursion (24.2 vs 8.1 MiB with
    # the weights counted), because the routers' LayerNorm/fc1/GELU outputs were stored per step.
    last = saved_mib(depth=4, mixer="last", grad_checkpointing=True)
    soft = saved_mib(depth=4, grad_checkpointing=True)
    assert soft / last < 1.25                     # 8.1 vs 6.9 MiB of activations
    assert soft < 0.15 * saved_mib(depth=4)       # vs 91 MiB without checkpointing


def test_saved_activations_are_activations_not_weights():
    torch.manual_seed(0)
    model = SRViT(embed_dim=64, num_heads=2, num_layers=2, num_classes=10, img_size=64, patch_size=16,
                  depth=2)
    one, two = (bench_script().saved_activation_mib(model, torch.randn(b, 3, 64, 64)) for b in (1, 2))
    # grows with the batch; the weights would not
    assert one > 0.1 and two == pytest.approx(2 * one, rel=0.02)


def test_clean_state_dict_strips_prefixes_only():
    state = {"module._orig_mod.blocks.0.attn.qkv.weight": 1, "_orig_mod.head.weight": 2,
             "blocks.0.module.fc": 3}
    assert srvit.clean_state_dict(state) == {"blocks.0.attn.qkv.weight": 1, "head.weight": 2,
                                             "blocks.0.module.fc": 3}


def test_trace_returns_every_step_and_the_anytime_logits():
    model = tiny(depth=3).eval()
    x = images()
    t = model.trace(x)
    assert len(t["steps"]) == 2 and [len(s) for s in t["steps"]] == [3, 3]
    assert t["steps"][0][0].shape == (2, 17, 32)
    assert len(t["anytime"]) == 3
    for k, logits in enumerate(t["anytime"], start=1):          # the equations with the first k steps
        torch.testing.assert_close(logits, softmor_by_hand(model, x, k)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["logits"], model(x))                 # the trace is the forward pass
    for got, want in zip(t["mix"], softmor_by_hand(model, x, 3)[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    first_block = model.blocks[0]
    h = embed(model, x)
    for r in range(3):                               # h_r = f_1(h_{r-1}), the block applied again
        h = first_block(h)
        torch.testing.assert_close(t["steps"][0][r], h)


@slow
def test_torch_compile_matches_eager():
    model = tiny(depth=2).eval()
    compiled = torch.compile(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


def test_compile_blocks_compiles_as_many_graphs_at_r4_as_at_r1():
    # --compile compiles each block's attention and MLP: a block applied 4 times reuses its graphs,
    # so R=4 hands the compiler what R=1 does (whole-model compile unrolls L x R applications).
    # Training mode with drop path, forward and backward, then evaluation: no recompiles.
    counts = {}
    for depth in (1, 4):
        torch._dynamo.reset()
        graphs = []
        model = tiny(depth=depth, drop_path_rate=0.1)
        eager = copy.deepcopy(model).eval()
        train.compile_blocks(model, backend=lambda gm, inputs: (graphs.append(gm), gm.forward)[1])
        x = images()
        model(x).sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), eager(x), atol=1e-5, rtol=1e-4)
        counts[depth] = len(graphs)
    torch._dynamo.reset()
    assert counts[1] == counts[4] > 0, counts


def test_ddp_with_compiled_blocks_and_grad_ckpt_trains_as_eager():
    # train.py's order: compile the blocks, then wrap in DDP; --grad-ckpt checkpoints each block
    # application around the compiled attention and MLP, so no checkpoint reaches Dynamo (where the
    # DDP optimizer rejected it: "Found a higher order op"). One gloo process is DDP enough.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        eager, model = tiny(depth=2, grad_checkpointing=True), tiny(depth=2, grad_checkpointing=True)
        train.compile_blocks(model, backend="eager")
        wrapped = DDP(model)
        x, y = images(4), torch.arange(4)
        for m in (eager, wrapped):
            F.cross_entropy(m(x), y).backward()
        for (name, p), q in zip(eager.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_forward_gmacs_grow_with_depth():
    with torch.device("meta"):
        g = [srvit.forward_gmacs(srvit_small(depth=r, mixer="mean")) for r in (1, 4)]
    assert 4.5 < g[0] < 4.7                        # ViT-S/16: 4.6 GMACs
    assert 3.9 < g[1] / g[0] < 4.0                 # blocks x4; the patch embedding and head once


def test_forward_gmacs_count_every_model_option():
    # The branch and step scales are elementwise: they add no multiply-accumulates that are counted.
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, num_layers=2, depth=3, num_classes=10)
    for share in ("block", "stack"):
        plain = srvit.forward_gmacs(SRViT(srvit.SRViTConfig(**cfg, share=share)))
        for option in (dict(loop_scale="fixed"), dict(loop_scale="learned"), dict(step_scale=True)):
            scaled = SRViT(srvit.SRViTConfig(**cfg, share=share, **option))
            assert srvit.forward_gmacs(scaled) == plain, (share, option)


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
    head_before = model.head.weight.detach().clone()
    result = load_pretrained(model, vit.state_dict(), verbose=False)
    assert "head.weight" in result["unused"] and "head.weight" in result["new"]
    torch.testing.assert_close(model.pos_embed, srvit.resize_pos_embed(vit.pos_embed, 64))  # (1, 65, 32)
    assert torch.equal(model.head.weight, head_before)                        # 10 classes: not the ViT's 1000


@pytest.mark.parametrize("other, match", [
    (dict(embed_dim=64), "width 64, patch 8"), (dict(patch_size=4), "width 32, patch 4"),
    (dict(num_layers=3), "3 blocks"),
    (dict(mlp_ratio=2.0), r"checkpoint's blocks.0.mlp.fc1.weight is \(64, 32\), this model's \(128, 32\)")])
def test_load_pretrained_refuses_another_model(other, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(tiny(), tiny(**other).state_dict(), verbose=False)


def test_load_pretrained_refuses_non_vit_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        load_pretrained(tiny(), {"conv1.weight": torch.zeros(1)}, verbose=False)
    with pytest.raises(ValueError, match="not found"):
        load_pretrained(tiny(), str(tmp_path / "nope.pth"), verbose=False)
    # a distilled DeiT: a class and a distillation token before its 4 x 4 patches, warm-starting 32 px x 8
    distilled = {**tiny(depth=1, img_size=32).state_dict(), "dist_token": torch.zeros(1, 1, 32),
                 "pos_embed": torch.zeros(1, 2 + 16, 32)}
    with pytest.raises(ValueError, match="18 tokens, not a class token and a square grid"):
        load_pretrained(tiny(img_size=64), distilled, verbose=False)


@slow
def test_cost_table_runs():
    out = subprocess.run([sys.executable, "srvit.py"], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "23,838,628" in out.stdout and "22,050,664" in out.stdout and "+1,787,964" in out.stdout


# ----------------------------------------------------------------------------------------
# train.py, loaders.py, runtime.py

import loaders  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work, and the
# device loader uses them (results/loader-cpu.md).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding "
                                        "capabilities:DeprecationWarning")

# A tiny model and FakeData: 256 images, 8 steps of 32 per epoch.
FAST = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2",
        "--batch-size", "32", "--workers", "0", "--log-interval", "4"]
# Every training test names its device: on a GPU machine the default would be cuda (bf16, GPU loaders).
FAKE = ["--data", "fake", "--num-classes", "10", "--subset", "256", "--val-subset", "64", "--device",
        "cpu"] + FAST


def sigterm_during_step(monkeypatch, step):
    """SIGTERM arrives during optimizer step `step` of the run (train.lr_at runs once per parameter
    group, two groups, at each step). Returns what takes the signal away again."""
    lr_at, calls = train.lr_at, []

    def lr_then_signal(*args):
        calls.append(1)
        if len(calls) == 2 * step:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(*args)
    monkeypatch.setattr(train, "lr_at", lr_then_signal)
    return lambda: monkeypatch.setattr(train, "lr_at", lr_at)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def epoch_rows(out_dir):
    return [(r["epoch"], r["train_loss"], r["val_loss"],
             r["top1"]) for r in read_metrics(out_dir) if r["type"] == "epoch"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_train(args, env=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           **(env or {})}
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


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


def user_error(argv, *fragments):
    """Run train.main in-process and return the UserError's message (the line the CLI prints)."""
    with pytest.raises(runtime.UserError) as e:
        train.main(argv)
    message = runtime.user_error_message(e.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_train_on_fake_data_writes_metrics_and_checkpoints(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    seeds, seed_device = [], train.seed_device
    monkeypatch.setattr(train, "seed_device", lambda seed, dev: (seeds.append(seed), seed_device(seed, dev)))
    step_losses, train_step = [], train.train_step

    def recorded_step(*step_args):
        step_loss, bad = train_step(*step_args)
        step_losses.append(step_loss.item())
        return step_loss, bad
    monkeypatch.setattr(train, "train_step", recorded_step)
    argv = FAKE + ["--depth", "2", "--epochs", "2", "--out-dir", out]
    model = train.main(argv)
    rows = read_metrics(out)
    args, steps = train.get_args(argv), 256 // 32
    for r in (r for r in rows if r["type"] == "epoch"):     # the lr of the epoch's last step, over all epochs
        assert r["lr"] == pytest.approx(train.lr_at(r["epoch"] * steps - 1, steps, args), rel=1e-9), r
    assert seeds == [loaders.seed_for("step", 0, epoch, 0, s) for epoch in range(2) for s in range(steps)]
    assert rows[0]["type"] == "run" and rows[0]["params"] == sum(p.numel() for p in model.parameters())
    epochs = [r for r in rows if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(r["val_images"] == 64 for r in epochs)
    for r in epochs:                           # the mean of the epoch's own step losses, not the run's so far
        own = step_losses[(r["epoch"] - 1) * steps:r["epoch"] * steps]
        assert r["train_loss"] == pytest.approx(sum(own) / steps, rel=1e-5), r
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["depth"] == 2
    assert os.path.isfile(os.path.join(out, "best.pt"))
    assert ckpt["records"] == epochs and ckpt["dataset"]["classes"][:2] == ["class 0", "class 1"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert_same_weights(ckpt["model"], model.state_dict())


def test_top1_top5_and_loss_of_a_batch_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0],          # label 0: first
                           [0.0, 1, 2, 3, 4, 5],          # label 1: fifth (in the top 5, not first)
                           [0.0, 5, 1, 1, 1, 1]])         # label 0: last (in neither)
    y = torch.tensor([0, 1, 0])
    loss = sum(torch.logsumexp(logits[i], 0) - logits[i, y[i]] for i in range(3)).item()
    got = train.summarize_metrics(train.batch_metrics(logits, y))
    assert got["top1"] == pytest.approx(100 / 3) and got["top5"] == pytest.approx(200 / 3)
    assert got["val_loss"] == pytest.approx(loss / 3) and got["val_images"] == 3


def test_evaluation_of_large_images_resizes_to_crop_over_0_875_then_takes_the_centre_as_deit():
    # DeiT evaluates 224 px by resizing the shorter side to 256 (224 / 0.875), bicubic, and cropping the
    # centre: at 96 px, 109 then 96. Written out with PIL on a 300 x 240 ramp.
    from PIL import Image
    rows, cols = np.meshgrid(np.arange(240), np.arange(300), indexing="ij")               # (240, 300)
    im = Image.fromarray(np.stack([rows, cols * 5 % 256, (rows + 2 * cols) % 256], -1).astype(np.uint8))
    got = loaders.transforms(SimpleNamespace(img_size=96), train=False)(im)                 # (3, 96, 96)
    resized = np.asarray(im.resize((int(300 * 109 / 240), 109), Image.BICUBIC))            # (109, 136, 3)
    top, left = round((109 - 96) / 2), round((136 - 96) / 2)
    want = torch.from_numpy(resized[top:top + 96, left:left + 96].copy()).permute(2, 0, 1)
    assert got.dtype == torch.uint8 and got.shape == (3, 96, 96)
    assert (got.int() - want.int()).abs().max() <= 1


def test_train_one_epoch_runs_on_its_own():
    # The loop is testable without main(): a model, a loader, an optimizer and the run's settings.
    # A loader that yields a fixed batch, and an optimizer with lr 0 except through lr_at.
    args = train.get_args(FAST + ["--data", "fake", "--depth", "2", "--epochs", "1", "--warmup-epochs", "0"])
    env = runtime.Env(device=torch.device("cpu"), accum=2, micro=4)
    model = tiny(depth=2)
    x, y = images(4), torch.arange(4)
    batches = type("Fixed", (), {"set_epoch": lambda self, e, start_batch=0: None,
                                 "__iter__": lambda self: iter([(x, y)] * 6)})()
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3)
    run = train.Run(args, env, model, opt, torch.amp.GradScaler("cpu", enabled=False), batches,
                    steps_per_epoch=3, num_classes=10)
    before = F.cross_entropy(model.eval()(x), y, label_smoothing=0.1).item()
    assert train.train_one_epoch(run, 0) is False
    state = asdict(run.progress)
    assert state["step"] == 3 and F.cross_entropy(model.eval()(x), y, label_smoothing=0.1).item() < before
    # per step the mean over its 2 micro-batches
    assert 0.8 * before < state["loss_sum"] / 3 < before + 0.05


def test_each_rank_draws_its_own_masks_and_mixes_from_seed_epoch_rank_and_step(monkeypatch):
    # Drop path and MixUp/CutMix draw from the step's seed: one seed for every rank would give each rank
    # the same masks and mixes, a batch of world x micro images with only micro draws.
    args = train.get_args(FAST + ["--data", "fake", "--depth", "1", "--epochs", "2", "--seed", "5"])
    seeds = []
    monkeypatch.setattr(train, "seed_device", lambda seed, device: seeds.append(seed))
    for rank in (0, 3):
        env = runtime.Env(rank=rank, device=torch.device("cpu"), micro=4)
        model = tiny(depth=1)
        batches = type("Fixed", (), {"set_epoch": lambda self, e, start_batch=0: None,
                                     "__iter__": lambda self: iter([(images(4), torch.arange(4))] * 2)})()
        run = train.Run(args, env, model, torch.optim.AdamW(model.parameters()),
                        torch.amp.GradScaler("cpu", enabled=False), batches, steps_per_epoch=2,
                        num_classes=10)
        train.train_one_epoch(run, 1)
    assert seeds == [loaders.seed_for("step", 5, 1, rank, step) for rank in (0, 3) for step in (0, 1)]
    assert len(set(seeds)) == 4


def test_a_training_step_takes_the_label_smoothed_loss_of_its_micro_batches_and_steps_adamw():
    # One step of 2 micro-batches, by value: the loss it reports is the mean of the two label-smoothed
    # cross entropies at the weights before the step, and the weights move as one AdamW step on their
    # mean gradient (drop path 0, fixed seed).
    args = train.get_args(FAST + ["--data", "fake", "--depth", "2", "--epochs", "1", "--smoothing", "0.3"])
    env = runtime.Env(device=torch.device("cpu"), accum=2, micro=4)
    model, twin = tiny(depth=2), tiny(depth=2)
    batches = [(images(4, seed=s), torch.arange(4) + s) for s in (1, 2)]
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3)
    run = train.Run(args, env, model, opt, torch.amp.GradScaler("cpu", enabled=False), None,
                    steps_per_epoch=1, num_classes=10)
    loss, bad = train.train_step(run, iter(batches), 0, train.EpochClock())
    losses = [F.cross_entropy(twin(x), y, label_smoothing=0.3) for x, y in batches]
    assert loss.item() == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)
    assert bad.item() == -1
    twin_opt = torch.optim.AdamW(train.param_groups(twin, 0.05), lr=1e-3)
    (sum(losses) / 2).backward()
    twin_opt.step()
    # The key biases' gradient is zero but for rounding (softmax ignores a shift shared by all keys), so
    # AdamW's step of that noise follows the summation order: not held to it. (qkv.bias holds q, k, v.)
    width = model.config.embed_dim
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name.endswith("qkv.bias"):
            a, b = (torch.cat([t[:width], t[2 * width:]]) for t in (a, b))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_clip_grad_scales_the_whole_gradient_to_its_norm():
    # --clip-grad as timm's: the gradient of all parameters together scaled to norm clip, its direction kept.
    args = train.get_args(FAST + ["--data", "fake", "--depth", "2", "--epochs", "1", "--clip-grad", "0.01"])
    env = runtime.Env(device=torch.device("cpu"), accum=1, micro=4)
    model, twin = tiny(depth=2), tiny(depth=2)
    batch = (images(4), torch.arange(4))
    opt = torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3)
    seen, adamw_step = [], opt.step
    def step(*a, **kw):           # the gradients AdamW is given
        seen.append([p.grad.clone() for p in model.parameters()])
        return adamw_step(*a, **kw)
    opt.step = step
    run = train.Run(args, env, model, opt, torch.amp.GradScaler("cpu", enabled=False), None,
                    steps_per_epoch=1, num_classes=10)
    train.train_step(run, iter([batch]), 0, train.EpochClock())
    F.cross_entropy(twin(batch[0]), batch[1], label_smoothing=args.smoothing).backward()
    grads = [p.grad for p in twin.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.1                                                   # so the clip acts
    for clipped, g in zip(seen[0], grads, strict=True):
        torch.testing.assert_close(clipped, g * 0.01 / norm, rtol=1e-4, atol=1e-9)


def test_a_lagging_loader_is_named_once_as_the_bound(monkeypatch):
    args = train.get_args(FAST + ["--data", "fake", "--depth", "1", "--epochs", "1"])
    x, y = images(4), torch.arange(4)
    now = [0.0]                       # a patched clock: a step takes 0.05 s, a slow batch 0.2 s to arrive
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0]))

    def slow():
        for _ in range(8):
            now[0] += 0.2
            yield x, y
    lines = []
    for loader, told in ((slow, True), (lambda: iter([(x, y)] * 8), False)):
        env = runtime.Env(device=torch.device("cpu"), micro=4)
        env.log = lines.append
        batches = type("Batches", (), {"set_epoch": lambda self, e, start_batch=0: None,
                                       "__iter__": lambda self: loader()})()
        model = tiny(depth=1)
        model.register_forward_hook(lambda *a: now.__setitem__(0, now[0] + 0.05))
        run = train.Run(args, env, model, torch.optim.AdamW(model.parameters()),
                        torch.amp.GradScaler("cpu", enabled=False), batches, steps_per_epoch=8,
                        num_classes=10, log_interval=2)
        train.train_one_epoch(run, 0, train.EpochClock(start=0.0))
        bound = [line for line in lines if line.startswith("the loader bounds this run")]
        assert len(bound) == (1 if told else 0), lines
        lines.clear()


def test_the_progress_line_and_the_epoch_row_say_what_the_clock_measured(monkeypatch):
    now = [2.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0]))
    lines = []
    weights = torch.nn.Parameter(torch.zeros(1))
    run = SimpleNamespace(args=SimpleNamespace(batch_size=4, epochs=3), steps_per_epoch=10, gmacs=1.0,
                          env=SimpleNamespace(log=lines.append, device=torch.device("cpu"), world=1,
                                              master=False, cpu_group=None),
                          progress=train.Progress(epoch=1, step=6, loss_sum=13.0, elapsed=50.0),
                          optimizer=torch.optim.SGD([weights], lr=1e-3), peak=None, train_loader=None)
    clock = train.EpochClock(elapsed_before=40.0, first_step=2, start=0.0)
    # steps 5 and 6 (loss 3.0 together) in the second since the last line, at batch 4: 8 img/s; 14 steps
    # of this epoch and the next one left: 56 images, 7 s
    log_from = train.log_progress(run, 1, 13.0, (1.0, 4, 10.0, 0.0), clock)
    assert lines == ["epoch 2/3 | step 6/10 | loss 1.5000 | lr 1.00e-03 | 8 img/s | eta 0:00:07 "
                     "(+ evaluation)"]
    assert log_from == (2.0, 6, 13.0, 0.0)
    # the epoch's row: 8 steps of 4 images in 10 training seconds (50 - 40); evaluation ran to t=12
    now[0] = 12.0
    train.end_epoch(run, 1, {"val_loss": 1.0, "top1": 50.0, "top5": 90.0}, clock)
    row = run.progress.records[-1]
    assert row["train_images_per_s"] == 3.2 and row["epoch_time"] == 12.0 and row["elapsed"] == 50.0


def test_memory_loader_matches_the_pil_path_without_augmentation(tmp_path):
    # Same images, same order, same normalisation: the fast path changes speed, not data.
    root = make_image_folder(tmp_path / "data", n=8)
    args = train.get_args(["--data", "folder", "--data-path", root, "--crop-padding", "0", "--hflip",
                           "0"] + FAST + ["--batch-size", "8"])
    env = SimpleNamespace(rank=0, world=1, micro=8, device=torch.device("cpu"), log=lambda *a: None)
    batches = {}
    for loader in ("memory", "pil"):
        args.loader = loader
        tr, _, classes, n = loaders.build_loaders(args, env)
        tr.set_epoch(3)
        batches[loader] = next(iter(tr))
    assert classes == ["cat", "dog"] and n == 16
    torch.testing.assert_close(batches["memory"][0], batches["pil"][0], atol=1e-6, rtol=0)
    assert torch.equal(batches["memory"][1], batches["pil"][1])


def test_fewer_validation_images_than_ranks_is_one_line_on_every_rank(tmp_path):
    # (an empty share on the memory path ended in a traceback on that rank, the others waiting)
    root = make_image_folder(tmp_path / "data", n=2)
    args = train.get_args(["--data-path", root, "--val-subset", "1", "--device", "cpu"] + FAST[:-6]
                          + ["--batch-size", "4", "--workers", "0"])
    for rank in (0, 1):
        env = SimpleNamespace(rank=rank, world=2, micro=4, device=torch.device("cpu"), log=lambda *a: None)
        with pytest.raises(runtime.UserError, match="1 validation image for 2 ranks") as e:
            loaders.build_loaders(args, env)
        assert e.value.shared


# The device path (--loader device): DeiT's augmentation on whole batches on the device, from the
# PIL path's own draws. Smooth test images (a bicubic blow-up of 6 x 8 random colours) stand for
# photographs; on noise every interpolation difference would show at full contrast.

def smooth_image(g, height, width, mode="RGB"):
    from PIL import Image
    colours = (torch.rand(6, 8, 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(colours).resize((width, height), Image.BICUBIC).convert(mode)


def deit_augment(size=96):
    args = train.get_args(["--data", "fake", "--recipe", "deit", "--img-size", str(size), "--patch-size",
                           "16"])
    return args, loaders.DeviceAugment(args, torch.device("cpu")), loaders.transforms(args, train=True)


def encoded(image, fmt="JPEG"):
    import io
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_device_ops_match_pil_on_fixed_draws():
    # Every RandAugment op at DeiT's magnitude (9 of 0..10), both signs: the tensor op the device
    # path runs against the PIL op the PIL path runs. Tolerance in 0..255 levels: colour ops round
    # differently (<= 0.5 on average); rotate and shear interpolate bilinearly on tensors where
    # PIL is bicubic, and differ most at the fill's edge (<= 1.5 on average).
    from torchvision.transforms import v2
    _, aug, _ = deit_augment()
    ra = aug.randaug[0]
    image = smooth_image(torch.Generator().manual_seed(0), 96, 96)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]                 # (1, 3, 96, 96) uint8
    assert len(ra._AUGMENTATION_SPACE) == 14
    for name, (magnitudes, signed) in ra._AUGMENTATION_SPACE.items():
        m = magnitudes(11, 96, 96)
        for sign in ((1, -1) if signed else (1,)):
            magnitude = sign * float(m[9]) if m is not None else 0.0
            want = torch.from_numpy(np.array(ra._apply_image_or_video_transform(
                image, name, magnitude, interpolation=v2.InterpolationMode.BICUBIC,
                fill=ra._fill))).permute(2, 0, 1)
            tv = ra._apply_image_or_video_transform(x, name, magnitude,
                                                     interpolation=v2.InterpolationMode.BILINEAR,
                                                     # torchvision's tensor op
                                                     fill=ra._fill)[0]
            made = aug.made_once()
            # the device path's own
            if name in loaders.AFFINE_OPS:
                theta = torch.tensor([loaders.affine_theta(name, magnitude, 96)])
                got = loaders.affine(x, theta, made["grid"], made["fill"])[0]
            else:
                got = loaders.colour_op(ra, x, name, magnitude, made["blur"])[0]
            # batched = torchvision's
            assert (got.int() - tv.int()).abs().max() <= 1, name
            diff = (want.int() - got.int()).abs().float()
            geometric = name in ("ShearX", "ShearY", "Rotate")
            assert diff.mean() <= (1.5 if geometric else 0.5), (name, magnitude, diff.mean())
            if name == "Brightness":
                assert not torch.equal(got, x[0])        # the op did something


@pytest.mark.parametrize("flags", [[], ["--randaug", "0"], ["--erasing", "0"], ["--hflip", "0"],
                                   ["--erasing", "1"]])
def test_device_path_draws_exactly_what_the_pil_path_draws(flags):
    # The PIL path's transforms, instrumented: each records the parameters it used when it ran.
    from torchvision.transforms import v2
    args = train.get_args(["--data", "fake", "--recipe", "deit", "--img-size", "96", "--patch-size", "16",
                           *flags])
    aug, pil = loaders.DeviceAugment(args, torch.device("cpu")), loaders.transforms(args, train=True)
    eraser, seen = loaders.eraser(args), {}

    def recording(key, fn, keep):
        return lambda *a, **k: (seen.__setitem__(key, keep(a, k, out := fn(*a, **k))), out)[1]
    for n, t in enumerate(pil.transforms):
        if isinstance(t, v2.RandomResizedCrop):
            t.make_params = recording("box", t.make_params,
                                      lambda a, k, p: (p["top"], p["left"], p["height"], p["width"]))
        elif isinstance(t, v2.RandomHorizontalFlip):
            t.transform = recording("flip", t.transform, lambda a, k, out: True)
        elif isinstance(t, v2.RandomApply):
            ra = t.transforms[0]
            ra._apply_image_or_video_transform = recording(n, ra._apply_image_or_video_transform, lambda a,
                                                           k, out: (a[1], a[2]))
    if eraser:
        eraser.make_params = recording("erase", eraser.make_params,
                                       lambda a, k, p: p["v"] is not None and (p["i"], p["j"], p["h"], p["w"],
                                                                               p["v"]))
    slots = [n for n, t in enumerate(pil.transforms) if isinstance(t, v2.RandomApply)]
    g = torch.Generator().manual_seed(3)
    for seed in range(40):
        image = smooth_image(g, int(torch.randint(60, 300, (1,), generator=g)),
                             int(torch.randint(60, 300, (1,), generator=g)))
        seen.clear()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            pil(image)
            loaders.draw_erasing(eraser, 96)           # the PIL path draws erasing next, from the same stream
        box, flip, op1, op2, erase = aug.draw(seed, image.height, image.width)
        assert box == seen["box"] and flip == seen.get("flip", False)
        assert [op1, op2] == [seen.get(n) for n in slots] + [None] * (2 - len(slots))
        want = seen.get("erase") or None
        assert (erase is None) == (want is None)
        assert erase is None or erase[:4] == want[:4]         # the box (its noise is drawn on the device)


def test_device_path_draws_and_augments_as_the_pil_path():
    # The same per-sample seed gives the same crop, flip, ops and erasing on both paths: every
    # sample within 2 levels on average (0..255), where another seed's draws differ by tens.
    args, aug, pil = deit_augment()
    std = torch.tensor(loaders.MEAN_STD["imagenet"][1]).view(3, 1, 1)
    g, diffs = torch.Generator().manual_seed(1), []
    for seed in range(24):
        image = smooth_image(g, int(torch.randint(100, 200, (1,), generator=g)),
                             int(torch.randint(100, 200, (1,), generator=g)))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            pixels, box = pil(image), loaders.draw_erasing(loaders.eraser(args), 96)   # as a PIL worker does
        # (3, 96, 96)
        table = loaders.erasing_table([box])
        want = loaders.erase(loaders.normalize_image(pixels[None], 96), table[:, :4],
                             loaders.erasing_noise(table, loaders.noise_size(table)))[0]
        got, other = (aug(aug.decode([encoded(image, "PNG")], ["x"]),
                          [aug.draw(s, image.height, image.width)])[0] for s in (seed, seed + 1000))
        diffs.append((((want - got) * std * 255).abs().mean().item(),
                      ((want - other) * std * 255).abs().mean().item()))
    assert max(d for d, _ in diffs) <= 2.0, diffs
    assert min(o for _, o in diffs) > 10, diffs
    draws = [aug.draw(s, 150, 120) for s in range(200)]
    assert 0.35 < sum(d[1] for d in draws) / 200 < 0.65                         # flips at p = 0.5
    ops = [d[k] for d in draws for k in (2, 3)]
    assert 0.4 < sum(op is None for op in ops) / 400 < 0.6                       # each op applies at p = 0.5
    assert len({op[0] for op in ops if op}) >= 12 and 0.1 < sum(d[4] is not None for d in draws) / 200 < 0.4


def test_loader_auto_is_the_device_path_on_gpus_for_image_files(tmp_path):
    root = make_image_folder(tmp_path / "data", n=2, size=100)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    args = train.get_args(["--data-path", root])
    assert args.recipe == "deit" and loaders.use_device(args, cuda) and not loaders.use_device(args, cpu)
    assert loaders.loader_name(args, cuda) == "device loader"
    assert loaders.loader_name(args, cpu) == "PIL loader"
    # no files to read
    assert not loaders.use_device(train.get_args(["--data", "fake"]), cuda)
    # small: in memory
    assert not loaders.use_device(train.get_args(["--data", "cifar10"]), cuda)


def test_device_augment_pickles_for_spawned_workers():
    import pickle
    _, aug, _ = deit_augment()
    again = pickle.loads(pickle.dumps(aug))
    assert again.draw(7, 150, 120)[:4] == aug.draw(7, 150, 120)[:4]


def test_the_device_decode_falls_back_to_the_cpu_for_a_file_not_for_a_device_fault(monkeypatch):
    _, aug, _ = deit_augment()
    aug.device = torch.device("cuda")                                # (nothing reaches the device here)
    monkeypatch.setattr(aug, "to_device", lambda x: x)
    jpeg = encoded(smooth_image(torch.Generator().manual_seed(2), 40, 50), "JPEG")
    # torchvision re-raises nvJPEG's and CUDA's errors as plain RuntimeErrors, with the cause in the text
    faults = [torch.cuda.OutOfMemoryError("CUDA out of memory"),
              RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2 GiB"),
              RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was "
                           "encountered"),
              RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5")]   # the allocator
    for fault in faults:
        monkeypatch.setattr(loaders, "gpu_decode", lambda *a: (_ for _ in ()).throw(fault))
        with pytest.raises(type(fault), match="CUDA|batch: 5"):
            aug.decode([jpeg], ["x.jpg"])
    assert aug.cpu_decoded == 0
    refused = RuntimeError("Error while decoding JPEG images: Failed to decode batch: 4")     # not supported
    monkeypatch.setattr(loaders, "gpu_decode", lambda *a: (_ for _ in ()).throw(refused))
    (image,) = aug.decode([jpeg], ["x.jpg"])                           # a file nvJPEG does not take: the CPU
    assert aug.cpu_decoded == 1 and torch.equal(image, loaders.cpu_decode(jpeg, "x.jpg"))


def test_device_path_decodes_greyscale_cmyk_and_png_as_pil_does():
    _, aug, _ = deit_augment()
    g = torch.Generator().manual_seed(2)
    import io
    from PIL import Image
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "JPEG"), ("RGB", "PNG")):
        data = encoded(smooth_image(g, 40, 50, mode), fmt)
        pil_rgb = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
        want = torch.from_numpy(np.array(pil_rgb)).permute(2, 0, 1)
        (got,) = aug.decode([data], ["x"])
        assert got.shape == (3, 40, 50) and (got.int() - want.int()).abs().max() <= 1, (mode, fmt)
    # what decode_image rejects
    for fmt, mode in (("BMP", "RGB"), ("TIFF", "RGB"), ("PPM", "RGB"), ("PNG", "I;16")):
        image = smooth_image(g, 30, 20)
        grey = torch.from_numpy(np.array(image.convert("L")))                       # (30, 20) uint8
        if mode == "I;16":                                          # the full 16-bit range: grey x 257
            image = Image.fromarray(grey.numpy().astype(np.uint16) * 257)
        data = encoded(image, fmt)
        pil_rgb = loaders.to_rgb(Image.open(io.BytesIO(data.numpy().tobytes())))
        want = torch.from_numpy(np.array(pil_rgb)).permute(2, 0, 1)
        (got,) = aug.decode([data], ["x"])
        assert got.dtype == torch.uint8 and torch.equal(got, want), fmt
        if mode == "I;16":                      # scaled to 8 bits, not clipped at 255 (a white picture)
            assert (got[0].int() - grey.int()).abs().max() <= 1
    with pytest.raises(runtime.UserError, match="cannot read image broken.jpg"):
        aug.decode([torch.tensor([0xFF, 0xD8, 1, 2], dtype=torch.uint8)], ["broken.jpg"])


def test_device_path_applies_each_sample_its_own_ops_and_a_resumed_epoch_repeats_its_batches(tmp_path):
    # A batch in which samples drew different ops equals each sample augmented alone; and the
    # loader started at batch 2 (a resume) yields the uninterrupted epoch's batches 2, 3.
    root = make_image_folder(tmp_path / "data", n=16, size=100)
    args = train.get_args(["--data-path", root, "--loader", "device", "--recipe", "deit", "--img-size", "96",
                           "--patch-size", "16", "--batch-size", "8", "--workers", "0"])
    env = SimpleNamespace(rank=0, world=1, micro=8, device=torch.device("cpu"), log=lambda *a: None)
    loader, _, classes, n = loaders.build_loaders(args, env)
    assert isinstance(loader, loaders.DeviceLoader) and classes == ["cat", "dog"]
    assert n == 32 and len(loader) == 4
    loader.set_epoch(1)
    whole = list(loader)
    loader.set_epoch(1, start_batch=2)
    resumed = list(loader)
    pairs = zip(resumed, whole[2:], strict=True)
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    args.workers = 2                                   # the same batches from loader worker processes
    loader_w = loaders.build_loaders(args, env)[0]
    loader_w.set_epoch(1)
    from_workers = list(loader_w)
    assert len(from_workers) == len(whole)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(from_workers, whole))
    items = [loader.loader.dataset[key] for key in list(loader.sampler)[:8]]
    # the samples drew different ops
    assert len({d[2] for _, _, d, *_ in items} | {d[3] for _, _, d, *_ in items}) > 2
    together, labels = loader.on_device(loader.augment.collate(items))
    assert labels.tolist() == [label for _, label, *_ in items]
    for b in range(8):
        alone, _ = loader.on_device(loader.augment.collate(items[b:b + 1]))
        torch.testing.assert_close(together[b:b + 1], alone, atol=1e-6, rtol=0)


def test_crop_padding_and_hflip_switch_off_and_flip_exactly():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(loaders.pad_crop_flip(x, 0, 0.0, g()), x)
    assert torch.equal(loaders.pad_crop_flip(x, 0, 1.0, g()), x.flip(3))
    cropped = loaders.pad_crop_flip(x, 2, 0.0, g())
    assert not torch.equal(cropped, x)
    for i in range(6):    # each image is a window of the zero-padded image
        padded = F.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(cropped[i], padded[:, r:r + 8, c:c + 8]) for r in range(5) for c in range(5))
    args = train.get_args(FAST + ["--hflip", "0", "--crop-padding", "0"])
    assert "RandomCrop" not in str(loaders.transforms(args, True))
    assert "p=0" in str(loaders.transforms(args, True))


def test_reflect_padding_crops_windows_of_the_mirrored_image():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    cropped = loaders.pad_crop_flip(x, 4, 0.0, torch.Generator().manual_seed(0), "reflect")
    assert cropped.dtype == torch.uint8 and not torch.equal(cropped, x)
    for i in range(6):    # each image is a window of the reflect-padded image (edge pixel not repeated)
        padded = F.pad(x[i].float(), (4, 4, 4, 4), mode="reflect").byte()
        assert any(torch.equal(cropped[i], padded[:, r:r + 8, c:c + 8]) for r in range(9) for c in range(9))
    args = train.get_args(FAST)
    assert args.pad_mode == "reflect" and "padding_mode=reflect" in str(loaders.transforms(args, True))


def position_image(n, size=32):
    """n copies of a (3, size, size) uint8 image whose channel 0 holds each pixel's row, channel 1 its
    column: a crop or flip can be read off any pixel."""
    ramp = torch.arange(size, dtype=torch.uint8)
    one = torch.stack([ramp[:, None].expand(size, size), ramp[None, :].expand(size, size),
                       torch.zeros(size, size, dtype=torch.uint8)])
    return one.expand(n, 3, size, size).contiguous()


def test_each_image_draws_its_own_row_offset_column_offset_and_flip():
    x, pad, mid = position_image(512), 4, 16
    out = loaders.pad_crop_flip(x, pad, 0.5, torch.Generator().manual_seed(0))
    flipped = out[:, 1, mid, mid + 1] < out[:, 1, mid, mid]                      # (B,)
    dy = out[:, 0, mid, mid].long() - mid                                        # (B,) in -pad..pad
    dx = out[~flipped, 1, mid, mid].long() - mid
    assert 0.4 < flipped.float().mean() < 0.6
    for offsets in (dy, dx):          # each of the 9 offsets about 1/9 of the time
        share = torch.bincount(offsets + pad, minlength=9).float() / len(offsets)
        assert len(share) == 9 and share.min() > 0.05 and share.max() < 0.18
    assert (dy[~flipped] == dx).float().mean() < 0.25                            # 1/9 if independent


def test_the_memory_loader_augments_each_batch_of_an_epoch_with_its_own_draws():
    # 64 copies of one image: batches can differ only by their crops and flips.
    normalize = loaders.Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    sampler = loaders.RepeatedAugSampler(64, 0, 1, 1, seed=0)
    loader = loaders.MemoryLoader(position_image(64), torch.zeros(64, dtype=torch.long), 16, normalize,
                                  sampler, train=True, crop_padding=4, hflip=0.5)
    loader.set_epoch(0)
    batches = [x for x, _ in loader]
    assert len(batches) == 4
    assert all(not torch.equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1:])


@pytest.mark.default_device
def test_bare_command_trains_the_papers_setting_or_names_the_missing_folder(tmp_path, monkeypatch):
    # The README's `torchrun --nproc_per_node=8 train.py --depth 4`: SR-ViT-S at R=4, DeiT's recipe, ImageNet.
    monkeypatch.chdir(tmp_path)
    message = user_error(["--depth", "4"], "data/imagenet/train not found", "--data-path", "--data cifar10")
    assert "\n" not in message
    assert not os.path.exists(tmp_path / "data") and not os.path.exists(tmp_path / "runs")
    make_image_folder(tmp_path / "data" / "imagenet", n=1, size=80)
    args = train.get_args(["--depth", "4"])
    assert (args.data, args.recipe, args.img_size, args.patch_size) == ("imagenet", "deit", 224, 16)
    assert (args.embed_dim, args.num_layers, args.num_heads, args.depth) == (384, 12, 6, 4)       # SR-ViT-S
    assert (args.epochs, args.batch_size, args.lr, args.init,
            args.schedule) == (300, 1024, 1e-3, "timm", "deit")


def test_the_recipe_follows_a_folders_image_size(tmp_path):
    big = make_image_folder(tmp_path / "big", n=1, size=300)
    small = make_image_folder(tmp_path / "small", n=1, size=28)
    args = train.get_args(["--data-path", big, "--depth", "4"])      # 300 px JPEGs: DeiT at 224, not 32 px
    assert (args.data, args.recipe, args.img_size, args.mixup,
            args.randaug) == ("folder", "deit", 224, 0.8, 9)
    args = train.get_args(["--data-path", small])                     # 28 px: small images, at their own size
    assert (args.recipe, args.img_size, args.patch_size, args.init) == ("small-images", 28, 4, "torch")
    odd = make_image_folder(tmp_path / "odd", n=1, size=30)          # 30 px: the largest size patch 4 divides
    assert train.get_args(["--data-path", odd]).img_size == 28
    assert train.get_args(["--data-path", big, "--img-size", "32"]).recipe == "small-images"


def test_a_mistyped_data_path_is_named_and_nothing_is_created(tmp_path):
    missing = tmp_path / "no-such-folder"
    cpu = ["--device", "cpu"]
    user_error(["--data", "cifar10", "--data-path", str(missing)] + FAST[2:] + cpu, "does not exist")
    for size in ([], FAST[:2]):   # a folder: the recipe looks at its images, or --img-size chose it
        user_error(["--data-path", str(missing)] + size + cpu, f"--data-path {missing} does not exist")
    assert not missing.exists()


def test_help_shows_each_recipes_defaults(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--epochs EPOCHS [deit: 300; small-images: 30]", "[deit: timm; small-images: torch]",
                     "[deit: zeros; small-images: reflect]",
                     "[deit: 5e-4 x batch / 512; small-images: 0.001]", "recursion steps R (default: 2)",
                     "(default: soft)", "--seed SEED (default: 0)"):
        assert fragment in text, fragment


def test_startup_line_names_data_size_recipe_epochs_and_batch(tmp_path, capsys):
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("data "))
    for fragment in ("data fake", "256 train images", "10 classes", "32 px", "recipe small-images",
                     "1 epoch,", "batch 32", "init torch"):
        assert fragment in line, (fragment, line)
    train.main(FAKE + ["--depth", "2", "--loop-scale", "fixed", "--step-scale", "--epochs", "1", "--out-dir",
                       str(tmp_path / "r2")])
    assert "R=2 mixer=soft share=block loop-scale=fixed step-scale:" in capsys.readouterr().out


def test_init_is_a_recipe_setting_and_deit_keeps_timms():
    timm, torch_init = tiny(init="timm"), tiny(init="torch")
    fc1 = lambda m: m.blocks[0].mlp.fc1                              # (128, 32): fan-in 32
    # trunc-normal 0.02
    assert 0.017 < fc1(timm).weight.std() < 0.021 and fc1(timm).bias.abs().max() == 0
    # U(+-1/sqrt(fan_in))
    assert abs(fc1(torch_init).weight.std() - 1 / math.sqrt(3 * 32)) < 0.01
    assert fc1(torch_init).bias.abs().max() > 0
    assert torch.equal(timm.pos_embed, tiny(init="timm").pos_embed)       # same seed, same weights
    for model in (timm, torch_init):                # the tokens start at trunc-normal(0.02) either way
        tokens = torch.cat([model.pos_embed.flatten(), model.cls_token.flatten()])     # (17 + 1) x 32 values
        assert 0.016 < tokens.std() < 0.024 and abs(tokens.mean()) < 0.004  # (standard errors 0.0006, 0.0008)
    assert srvit_small().config.init == "timm" and train.get_args(["--data", "imagenet"]).init == "timm"
    with pytest.raises(ValueError, match="init must be one of"):
        tiny(init="jax")


def test_step_scale_is_a_flag_kept_in_the_config_and_not_decayed():
    args = train.get_args(FAST + ["--depth", "2", "--step-scale"])
    model = train.build_model(args, 10)
    assert model.config.step_scale and model.step_scale.shape == (args.num_layers * 2, args.embed_dim)
    decay, no_decay = train.param_groups(model, 0.05)
    assert any(p is model.step_scale for p in no_decay["params"])
    assert not any(p is model.step_scale for p in decay["params"])
    assert not train.get_args(FAST + ["--depth", "2"]).step_scale


def test_cosine_schedule_ends_at_the_floor_and_deit_keeps_its_offset():
    args = train.get_args(FAST + ["--epochs", "5", "--warmup-epochs", "1"])
    assert args.schedule == "cosine" and args.lr == 1e-3
    lr = lambda epoch: train.lr_at(round(epoch * 100), 100, args)
    assert lr(1) == pytest.approx(1e-3) and lr(3) == pytest.approx((1e-3 + 1e-5) / 2)
    # the last epoch ends at the floor
    assert lr(5) == pytest.approx(1e-5) and lr(4.99) < 2e-5
    args.schedule = "deit"
    assert lr(4.99) > 1e-4                                                   # DeiT's offset: 10x the floor


@pytest.mark.parametrize("schedule", ["cosine", "deit"])
def test_lr_schedule_equals_its_formula_at_every_step(schedule):
    args = train.get_args(FAST + ["--epochs", "6", "--warmup-epochs", "1.5", "--lr", "2e-3", "--min-lr",
                                  "1e-5", "--schedule", schedule])
    for step in range(0, 600, 7):                                  # 100 steps per epoch
        e = step / 100
        if e < 1.5:
            want = 1e-6 + (2e-3 - 1e-6) * e / 1.5                   # linear warm-up from 1e-6
        else:
            t = max(e - 1, 0) / 6 if schedule == "deit" else (e - 1.5) / 4.5
            want = 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * t))
        assert train.lr_at(step, 100, args) == pytest.approx(want, rel=1e-12), step


def test_resume_compares_every_argument_but_the_ones_that_may_change(tmp_path):
    out = str(tmp_path / "run")
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", out])
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--pad-mode", "zeros", "--out-dir", out],
               "another recipe", "pad_mode: 'reflect' then, 'zeros' now")
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--init", "timm", "--out-dir", out], "another model",
               "init: 'torch'")
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--log-interval", "2", "--save-every", "5",
                       "--out-dir", out])
    # the same dims: the same model
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--model", "tiny", "--out-dir", out])
    for loader in ("memory", "pil"):   # the same augmentations in the same order, by another loader
        train.main(FAKE + ["--depth", "1", "--epochs", "1", "--loader", loader, "--out-dir", out])
    for amp in ("bf16", "fp16"):   # precision follows the device (fp16: a fresh loss scale)
        train.main(FAKE + ["--depth", "1", "--epochs", "1", "--amp", amp, "--out-dir", out])
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--model", "tiny", "--embed-dim", "48", "--out-dir",
                       out],
               "another model", "embed_dim: 32 then, 48 now")
    # A checkpoint from before --init/--pad-mode/--schedule holds none of them: it was timm, zeros, deit.
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    for key in ("init", "pad_mode", "schedule"):
        ckpt["args"].pop(key), ckpt["config"].pop(key, None)
    torch.save(ckpt, os.path.join(out, "last.pt"))
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--init", "timm", "--out-dir", out],
               "another recipe", "pad_mode: 'zeros' then, 'reflect' now",
               "schedule: 'deit' then, 'cosine' now")
    assert set(vars(train.get_args(FAKE))) - train.MAY_CHANGE >= {"pad_mode", "schedule", "init", "recipe"}


def test_evaluation_shows_progress_on_long_splits(monkeypatch):
    clock = itertools.count(0, 6)                       # every call to time.time() is 6 s later
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: next(clock)))    # train.py's clock only
    batches = [(images(64), torch.arange(64) % 10) for _ in range(5)]
    lines, model = [], tiny().eval()
    metrics = train.evaluate(model, batches, torch.device("cpu"), train.nullcontext(), log=lines.append)
    assert not model.training                          # left as it came (a notebook's model stays in eval)
    # a line once 10 s have passed since the last: at batch 2 (t = 12), 2 batches in 24 s, 3 to go
    assert metrics["val_images"] == 320 and lines == [
        "evaluating: batch 2/5, 5 images/s | eta 0:00:36", "evaluating: batch 3/5, 5 images/s | eta 0:00:28",
        "evaluating: batch 4/5, 4 images/s | eta 0:00:15"], lines


def test_every_model_flag_reaches_the_model():
    args = train.get_args(FAKE + ["--depth", "3", "--router-init", "last", "--drop-path", "0.2", "--mixer",
                                  "soft", "--share", "stack", "--loop-scale", "fixed", "--step-scale",
                                  "--init", "timm", "--grad-ckpt"])
    model = train.build_model(args, 10)
    cfg = model.config
    assert (cfg.depth, cfg.mixer, cfg.share, cfg.loop_scale, cfg.step_scale, cfg.init, cfg.grad_checkpointing,
            cfg.num_classes) == (3, "soft", "stack", "fixed", True, "timm", True, 10)
    assert model.drop_path_rates[-1] == pytest.approx(0.2) and model.drop_path_rates[0] == 0.0
    _, mix = model.eval()(images(2, size=args.img_size), return_mix=True)
    assert torch.allclose(mix[0][..., -1], torch.tensor(0.9), atol=1e-5)         # --router-init last


def test_explicit_model_flag_wins_and_names_say_what_was_built():
    # 32 px CIFAR: the recipe must not shrink it
    small = train.get_args(["--data", "cifar10", "--model", "small"])
    assert (small.embed_dim, small.num_layers, small.num_heads, small.patch_size) == (384, 12, 6, 4)
    assert "cifar10-small-R2" in small.out_dir
    default = train.get_args(["--data", "cifar10"])
    assert (default.embed_dim, default.num_layers, default.num_heads) == (192, 6, 3)
    assert "cifar10-D192-L6-H3-R2" in default.out_dir
    assert train.get_args(["--data", "cifar10", "--model", "small", "--embed-dim", "192"]).embed_dim == 192


def test_random_streams_of_seeds_epochs_and_ranks_never_collide():
    # The old scheme seed*10000 + epoch*100 + rank made seed 0 at epoch 100 replay seed 1 at epoch 0.
    keys = [(s, e, r) for s in range(4) for e in range(300) for r in range(8)]
    assert len({loaders.seed_for("step", s, e, r, 0) for s, e, r in keys}) == len(keys)
    order = lambda seed, epoch: (s := loaders.RepeatedAugSampler(1000, 0, 1, 1, seed), s.set_epoch(epoch),
                                 s.indices())[-1]
    assert not torch.equal(order(0, 100), order(1, 0)) and torch.equal(order(0, 100), order(0, 100))
    for epoch in range(3):                   # each epoch its own order, a permutation of all samples
        assert not torch.equal(order(0, epoch), order(0, epoch + 1)), epoch
        assert torch.equal(order(0, epoch).sort().values, torch.arange(1000))


def test_each_repeated_copy_of_an_image_is_augmented_from_its_own_seed_on_every_rank():
    # DeiT's repeated augmentation: the 3 copies of an image land on ranks r, r+1, r+2 at one position;
    # each must be augmented anew, so every (image, seed) of the epoch is its own draw.
    world, seeds_of = 8, {}
    for rank in range(world):
        for index, seed in loaders.RepeatedAugSampler(3 * 256, rank, world, 3, seed=0):
            seeds_of.setdefault(index, []).append(seed)
    assert sorted(map(len, seeds_of.values()))[0] >= 2 and max(map(len, seeds_of.values())) == 3
    assert all(len(set(seeds)) == len(seeds) for seeds in seeds_of.values())
    every = [seed for seeds in seeds_of.values() for seed in seeds]
    assert len(set(every)) == len(every) == 3 * 256 // world * world


def test_the_copies_of_an_image_go_to_different_ranks_as_in_deits_sampler():
    # DeiT's RASampler with 3 copies on 3 ranks: each rank sees every image of its share once, and the
    # three ranks see the same images (each its own copy), in the same order.
    shares = [loaders.RepeatedAugSampler(3 * 256, rank, 3, 3, seed=0).indices() for rank in range(3)]
    for share in shares:
        assert len(share) == len(set(share.tolist())) == 256
    assert torch.equal(shares[0], shares[1]) and torch.equal(shares[1], shares[2])


def test_mixup_partner_is_another_image_at_every_world_size():
    # Labels = image ids, so each mixed target row names the two images that were mixed.
    # Measured with torchvision's i-1 pairing: 65.6% (1 rank), 33.1% (2); timm's: ~2% / 0.5%.
    n, micro = 3 * 256, 64
    args = SimpleNamespace(mixup=0.8, cutmix=1.0)
    torch.manual_seed(0)
    for world in (1, 2, 4, 8):
        same = total = 0
        for rank in range(world):
            sampler = loaders.RepeatedAugSampler(n, rank, world, 3, seed=0)
            idx = sampler.indices()
            for b in range(len(idx) // micro):
                ids = idx[b * micro:(b + 1) * micro]
                _, target = loaders.mixup_cutmix(torch.zeros(micro, 3, 8, 8), ids, args, n)
                same += int(((target > 0).sum(1) == 1).sum())    # mixed with a copy of itself
                total += micro
        assert same / total < 0.04, (world, same / total)


def test_mixup_and_cutmix_follow_timm():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    mixed, target = loaders.mixup_cutmix(x, y, SimpleNamespace(mixup=0.8, cutmix=0.0), 8)
    lam = target[0, 0].item()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target, lam * F.one_hot(y, 8) + (1 - lam) * F.one_hot(y.flip(0), 8))
    mixed, target = loaders.mixup_cutmix(x, y, SimpleNamespace(mixup=0.0, cutmix=1.0), 8)
    from_partner = (mixed != x).any(1).float().mean().item()    # share of pixels pasted from the partner
    assert target[0, 7].item() == pytest.approx(from_partner, abs=1e-6)
    want = (1 - from_partner) * F.one_hot(y, 8) + from_partner * F.one_hot(y.flip(0), 8)
    torch.testing.assert_close(target, want)


def test_mixup_or_cutmix_is_drawn_with_equal_chance_and_the_cutmix_box_is_timms(monkeypatch):
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 100, 100).contiguous()   # image i: all i
    y, both = torch.arange(8), SimpleNamespace(mixup=0.8, cutmix=1.0)
    torch.manual_seed(0)
    cut = 0
    for _ in range(400):
        mixed, _ = loaders.mixup_cutmix(x, y, both, 8)
        cut += bool(((mixed[0] == 0) | (mixed[0] == 7)).all())     # pasted pixels, none blended
    assert 150 < cut < 250                                          # 200 expected, sd 10
    # timm's rand_bbox: a box of side sqrt(1 - lam) times the image's, clipped at the edges
    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self: torch.tensor(0.75))
    rows, cols = [], []
    for _ in range(50):
        mixed, target = loaders.mixup_cutmix(x, y, SimpleNamespace(mixup=0.0, cutmix=1.0), 8)
        pasted = mixed[0, 0] == 7                                                # (100, 100)
        rows.append(int(pasted.any(1).sum()))
        cols.append(int(pasted.any(0).sum()))
        assert target[0, 7].item() == pytest.approx(pasted.float().mean().item(), abs=1e-6)
    assert max(rows) == max(cols) == 50                             # int(100 * sqrt(0.25)), unclipped


def test_randaugment_and_erasing_match_deits_strength():
    from torchvision.transforms import v2
    args = train.get_args(["--data", "imagenet"])
    tf = loaders.transforms(args, train=True).transforms
    ops = [t for t in tf if isinstance(t, v2.RandomApply)]
    assert len(ops) == 2 and all(o.p == 0.5 for o in ops)             # 2 ops, each applied with p = 0.5
    ra = ops[0].transforms[0]
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (1, 9, 11)
    assert ra.fill == [124, 116, 104]                                  # timm's mean-colour fill
    at = lambda op: float(ra._AUGMENTATION_SPACE[op][0](11, 224, 224)[9])        # bin 9 of 0..10
    # timm rand-m9-mstd0.5-inc1 at magnitude 9 of 10: rotate 27 deg, shear 0.27, translate
    # 0.45 x 0.9 x 224 = 90.7 px, colour factors 1 +/- 0.81
    assert at("Rotate") == pytest.approx(27.0) and at("ShearX") == pytest.approx(0.27)
    assert at("TranslateX") == pytest.approx(90.7, rel=0.01)
    assert at("Brightness") == pytest.approx(0.81) and at("Color") == pytest.approx(0.81)
    erasing = loaders.eraser(args)
    # per-pixel noise
    assert isinstance(erasing, v2.RandomErasing) and erasing.p == 0.25 and erasing.value is None
    torch.manual_seed(0)
    erasing.p = 1.0                                # our pipeline's eraser, made to fire
    erased = erasing(torch.ones(3, 64, 64))
    assert (erased != 1).float().mean() > 0.01 and (erased == 0).float().mean() < 0.001   # noise, not zeros


def test_deit_224px_pil_path_runs_on_a_generated_folder(tmp_path):
    root = make_image_folder(tmp_path / "data", n=6, size=240)
    out = str(tmp_path / "run")
    train.main(["--data", "folder", "--data-path", root, "--device", "cpu", "--img-size", "224",
                "--patch-size", "32", "--embed-dim", "32",
                "--num-layers", "1", "--num-heads", "2", "--batch-size", "12", "--micro-batch", "6",
                "--epochs", "1", "--workers", "0", "--out-dir", out])
    run, epoch = read_metrics(out)
    a = run["args"]
    assert (a["randaug"], a["erasing"], a["mixup"], a["cutmix"], a["repeated_aug"],
            a["loader"]) == (9, 0.25, 0.8, 1.0, 3, "auto")
    assert epoch["val_images"] == 12
    # one step from timm's init, whose logits are near 0: the cross-entropy of any soft target (MixUp,
    # smoothing) against a near-uniform guess over the 2 classes is near ln 2
    assert abs(epoch["train_loss"] - math.log(2)) < 0.05 and abs(epoch["val_loss"] - math.log(2)) < 0.05


def test_lr_schedule_follows_deit():
    # DeiT (timm 0.3.2 CosineLRScheduler, stepped per epoch): batch 1024 -> lr 1e-3, 5 warm-up
    # epochs from 1e-6, cosine to 1e-5 over 300; its per-epoch values include 7.570e-4 at epoch
    # 100 and 1.011e-5 at epoch 299 (DeiT's epoch e runs at the scheduler's value for e - 1).
    args = train.get_args(["--data", "imagenet"])
    assert args.lr == pytest.approx(1e-3) and (args.epochs, args.warmup_epochs, args.min_lr) == (300, 5, 1e-5)
    per_epoch = 100
    lr = lambda step: train.lr_at(step, per_epoch, args)
    # end of warm-up
    assert lr(0) == pytest.approx(1e-6) and lr(5 * per_epoch) == pytest.approx(1e-3, rel=1e-3)
    deit = lambda e: 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (e - 1) / 300))
    assert lr(100 * per_epoch) == pytest.approx(7.570e-4, rel=1e-3)           # DeiT's own figures
    assert lr(299 * per_epoch) == pytest.approx(1.011e-5, rel=1e-3)
    for epoch in range(6, 300):      # DeiT holds one value per epoch; ours at the epoch's first step
        assert lr(epoch * per_epoch) == pytest.approx(deit(epoch), rel=1e-9), epoch
    assert lr(300 * per_epoch - 1) == pytest.approx(1e-5, rel=0.01)


def test_weight_decay_groups_follow_timm_for_deit_s():
    with torch.device("meta"):
        model = srvit_small(depth=1)
    decay, no_decay = train.param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert len(no_decay["params"]) == 102 and sum(p.numel() for p in no_decay["params"]) == 138_088
    assert sum(p.numel() for p in decay["params"]) == 22_050_664 - 138_088


def test_resume_under_gradient_accumulation_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    # 2 micro-batches of 16 per step of 32: a stop after step 3 resumes at micro-batch 6 of the epoch,
    # not at batch 3, and the finished run equals the uninterrupted one, weights and rows.
    args = FAKE + ["--depth", "2", "--epochs", "2", "--micro-batch", "16", "--drop-path", "0.1"]
    whole = train.main(args + ["--out-dir", str(tmp_path / "whole")])
    lr_at, calls = train.lr_at, []

    def signal_at_step_3(*a):                 # 2 param groups: lr_at is called twice per step
        calls.append(1)
        if len(calls) == 2 * 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(*a)
    monkeypatch.setattr(train, "lr_at", signal_at_step_3)
    cut = str(tmp_path / "cut")
    with pytest.raises(runtime.Stopped):
        train.main(args + ["--out-dir", cut])
    assert torch.load(os.path.join(cut, "last.pt"), weights_only=True)["step"] == 3
    monkeypatch.setattr(train, "lr_at", lr_at)
    resumed = train.main(args + ["--out-dir", cut])
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))
    assert_same_weights(resumed.state_dict(), whole.state_dict())


def test_a_warm_start_stopped_in_its_first_epoch_resumes_without_loading_the_weights_again(tmp_path,
                                                                                            monkeypatch):
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", str(tmp_path / "pretrained")])
    args = FAKE + ["--depth", "2", "--epochs", "2", "--init-from", str(tmp_path / "pretrained" / "last.pt")]
    whole = train.main(args + ["--out-dir", str(tmp_path / "whole")])
    no_signal = sigterm_during_step(monkeypatch, 3)
    cut = str(tmp_path / "cut")
    with pytest.raises(runtime.Stopped):
        train.main(args + ["--out-dir", cut])
    assert torch.load(os.path.join(cut, "last.pt"), weights_only=True)["step"] == 3
    no_signal()
    resumed = train.main(args + ["--out-dir", cut])        # three steps of training kept, not overwritten
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))
    assert_same_weights(resumed.state_dict(), whole.state_dict())


def test_resume_in_fp16_restores_the_loss_scale(tmp_path, monkeypatch):
    # The loss scale is training state: it sets which steps are skipped for overflowing gradients. A
    # scale that grows after every clean step (timm's and PyTorch's default waits 2000) overflows every
    # few steps here, so a resume that restarted from the initial scale would skip other steps.
    growing = functools.partial(torch.amp.GradScaler, init_scale=2.0**10, growth_interval=1)
    monkeypatch.setattr(torch.amp, "GradScaler", growing)
    args = FAKE + ["--depth", "2", "--epochs", "2", "--amp", "fp16"]
    whole = train.main(args + ["--out-dir", str(tmp_path / "whole")])
    no_signal = sigterm_during_step(monkeypatch, 5)
    cut = str(tmp_path / "cut")
    with pytest.raises(runtime.Stopped):
        train.main(args + ["--out-dir", cut])
    scale = torch.load(os.path.join(cut, "last.pt"), weights_only=True)["scaler"]["scale"]
    assert scale != 2.0**10                              # the scale moved before the stop
    no_signal()
    resumed = train.main(args + ["--out-dir", cut])
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))
    assert_same_weights(resumed.state_dict(), whole.state_dict())


@pytest.mark.parametrize("loader", ["memory", "pil"])
def test_sigterm_mid_epoch_saves_and_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch, loader):
    args = FAKE + ["--depth", "2", "--epochs", "2", "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0",
                   "--loader", loader, "--repeated-aug", "3" if loader == "pil" else "1"]
    whole = train.main(args + ["--out-dir", str(tmp_path / "whole")])
    lr_at, calls = train.lr_at, []

    def signal_at_step_5(*a):            # SIGTERM arrives during step 5 of epoch 1 (2 param groups)
        calls.append(1)
        if len(calls) == 2 * 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(*a)
    monkeypatch.setattr(train, "lr_at", signal_at_step_5)
    cut = str(tmp_path / "cut")
    with pytest.raises(runtime.Stopped) as stop:
        train.main(args + ["--out-dir", cut])
    assert stop.value.code == 143 and "stopped by SIGTERM at epoch 1, step 5/8" in str(stop.value)
    ckpt = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 5) and epoch_rows(cut) == []
    monkeypatch.setattr(train, "lr_at", lr_at)
    resumed = train.main(args + ["--out-dir", cut])
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))
    assert_same_weights(resumed.state_dict(), whole.state_dict())


def test_a_loader_worker_dying_with_the_signal_saves_the_step_before_and_resume_repeats_the_run(
        tmp_path, monkeypatch):
    args = FAKE + ["--depth", "2", "--epochs", "2"]
    whole = train.main(args + ["--out-dir", str(tmp_path / "whole")])
    batches_of, died = loaders.MemoryLoader.__iter__, []

    def worker_dies_at_batch_6(self):        # SIGTERM, and a loader worker dies with it (the OOM killer)
        for b, batch in enumerate(batches_of(self)):
            if self.train and b == 5 and not died:
                died.append(b)
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")
            yield batch
    monkeypatch.setattr(loaders.MemoryLoader, "__iter__", worker_dies_at_batch_6)
    cut = str(tmp_path / "cut")
    with pytest.raises(runtime.Stopped) as stop:
        train.main(args + ["--out-dir", cut])
    assert stop.value.code == 143 and died == [5]
    ckpt = torch.load(os.path.join(cut, "last.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 5) and epoch_rows(cut) == []   # step 6 cannot finish
    monkeypatch.setattr(loaders.MemoryLoader, "__iter__", batches_of)
    resumed = train.main(args + ["--out-dir", cut])
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))   # the epoch's loss too: its 5 steps kept
    assert_same_weights(resumed.state_dict(), whole.state_dict())


def test_save_every_writes_mid_epoch_checkpoints(tmp_path, monkeypatch):
    saved = []
    save = runtime.OutDir.save
    monkeypatch.setattr(runtime.OutDir, "save",
                        lambda self, ckpt, path: (saved.append((ckpt["epoch"], ckpt["step"])),
                                                  save(self, ckpt, path)))
    # every 5 optimizer steps of the run (8 an epoch), not of the epoch; and at each epoch's end
    train.main(FAKE + ["--depth", "1", "--epochs", "2", "--save-every", "5", "--out-dir",
                       str(tmp_path / "run")])
    assert [at for at in saved if at[1]] == [(0, 5), (1, 2), (1, 7)] and saved[-1] == (2, 0)


class Crash(BaseException):
    """Stands for a kill at one exact point: nothing after it runs."""


def test_kill_between_checkpoint_and_metrics_row_loses_nothing(tmp_path, monkeypatch):
    args = FAKE + ["--depth", "1", "--epochs", "3"]
    train.main(args + ["--out-dir", str(tmp_path / "whole")])
    cut = str(tmp_path / "cut")
    append = runtime.OutDir.append_metrics

    def crash_on_epoch_2(self, row):     # last.pt of epoch 2 is renamed into place; its row is not written
        if row.get("epoch") == 2:
            raise Crash
        append(self, row)
    monkeypatch.setattr(runtime.OutDir, "append_metrics", crash_on_epoch_2)
    with pytest.raises(Crash):
        train.main(args + ["--out-dir", cut])
    with open(os.path.join(cut, "last.pt.tmp"), "wb") as f:       # and a leftover from a kill mid-write
        f.write(b"half")
    monkeypatch.setattr(runtime.OutDir, "append_metrics", append)
    train.main(args + ["--out-dir", cut])
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))    # every epoch exactly once
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp")]


def test_a_resume_keeps_the_optimizer_this_machine_built_and_the_checkpoints_state():
    # a CPU run (unfused AdamW) resumed on a GPU (fused): the file's groups must not switch fusing off
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(3, device="cpu"))
    saved = torch.optim.AdamW([weights], lr=0.123, fused=False)
    weights.grad = torch.ones(3, device="cpu")
    saved.step()
    fused = torch.optim.AdamW([weights], lr=1.0, fused=True)
    runtime.load_optimizer(fused, saved.state_dict())
    group = fused.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None and group["lr"] == 0.123
    assert torch.equal(fused.state[weights]["exp_avg"], saved.state[weights]["exp_avg"])


def test_a_start_deletes_only_the_temporary_files_a_killed_run_leaves(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = ["last.pt.tmp", "best.pt.tmp", "metrics.jsonl.tmp", "write-test-123.tmp"]
    theirs = ["draft.tmp", "notes.pt.tmp", "last.pt.tmp.bak"]       # the user's files, in a shared folder
    for name in ours + theirs:
        (out / name).write_bytes(b"x")
    (out / "cache.tmp").mkdir()
    runtime.OutDir(str(out), master=True).open().close(failed=False)
    assert sorted(os.listdir(out)) == sorted(theirs + ["cache.tmp", "train.lock"])


def test_kill_between_best_and_last_keeps_the_best_model(tmp_path, monkeypatch):
    # The kill comes right after best.pt of epoch 2 is renamed into place, before last.pt of epoch
    # 2. The resumed run re-trains epoch 2 and scores lower there (as a GPU run, which does not
    # repeat bit for bit, can): best.pt must keep the killed run's epoch 2, the best score seen.
    scores = iter([10.0, 30.0, 15.0, 20.0])           # killed run: epochs 1, 2; resumed run: epochs 2, 3
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "top1": next(scores)})
    out, save = str(tmp_path / "run"), runtime.OutDir.save

    def crash_after_best_of_epoch_2(self, ckpt, path):
        save(self, ckpt, path)
        if ckpt["epoch"] == 2 and path == self.best:
            raise Crash
    monkeypatch.setattr(runtime.OutDir, "save", crash_after_best_of_epoch_2)
    args = FAKE + ["--depth", "1", "--epochs", "3", "--out-dir", out]
    with pytest.raises(Crash):
        train.main(args)
    # best.pt is ahead of it
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 1
    killed_best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    monkeypatch.setattr(runtime.OutDir, "save", save)
    train.main(args)
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert (best["epoch"], best["metrics"]["top1"]) == (2, 30.0)
    assert_same_weights(best["model"], killed_best["model"])
    assert [(r["epoch"], r["top1"], r["best_top1"]) for r in read_metrics(out) if r["type"] == "epoch"] == \
        [(1, 10.0, 10.0), (2, 15.0, 30.0), (3, 20.0, 30.0)]


def epochs_done(out):
    return len(epoch_rows(out)) if os.path.exists(os.path.join(out, "metrics.jsonl")) else 0


def test_metrics_repair_keeps_old_rows_and_drops_a_torn_line(tmp_path):
    out = runtime.OutDir(str(tmp_path), master=True)
    rows = [{"type": "run"}] + [{"type": "epoch", "epoch": e} for e in (1, 2, 2, 3)]
    with open(out.metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"type": "ep')                                 # killed mid-write
    out.repair_metrics(2, records=[])                          # an old checkpoint: no records, 2 epochs done
    assert [r.get("epoch") for r in read_metrics(str(tmp_path))] == [None, 1, 2]
    # epoch 3's row left the run's file (it is trained again), but it is not lost

    def epochs_in(name):          # the copy is the whole file, its torn last line too
        return [json.loads(line).get("epoch") for line in open(tmp_path / name) if line.endswith("\n")]
    assert epochs_in("metrics-until-epoch-3.jsonl") == [None, 1, 2, 2, 3]
    with open(out.metrics, "a") as f:                        # trained to epoch 3 again, resumed at 2 again
        f.write(json.dumps({"type": "epoch", "epoch": 3}) + "\n")
    out.repair_metrics(2, records=[])
    assert epochs_in("metrics-until-epoch-3.jsonl") == [None, 1, 2, 2, 3]             # the first copy kept
    assert epochs_in("metrics-until-epoch-3-2.jsonl") == [None, 1, 2, 3]
    out.repair_metrics(3, records=[{"type": "epoch", "epoch": e} for e in (1, 2, 3)])
    assert [r.get("epoch") for r in read_metrics(str(tmp_path))] == [None, 1, 2, 3]


def test_metrics_repair_refuses_an_epoch_row_without_its_number_and_a_pipe_in_its_place(tmp_path):
    out = runtime.OutDir(str(tmp_path), master=True)
    rows = '{"type": "run"}\n{"type": "epoch", "epoch": 1}\n{"type": "epoch", "note": "x"}\n'
    with open(out.metrics, "w") as f:
        f.write(rows)
    with pytest.raises(runtime.UserError, match="epoch row without its epoch number"):
        out.repair_metrics(1, records=[])
    assert open(out.metrics).read() == rows                         # nothing dropped
    os.remove(out.metrics)
    os.mkfifo(out.metrics)                                            # would block an open() for ever
    with pytest.raises(runtime.UserError, match="is not a file"):
        runtime.read_lines(out.metrics)


@slow
def test_second_run_is_refused_while_the_first_holds_the_out_dir(tmp_path):
    out = str(tmp_path / "run")
    # The first run uses the PIL loader with a worker process, and gets SIGTERM as Slurm sends it:
    # to the whole process group, loader worker included.
    first = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "train.py"), *FAKE, "--subset",
                              "2048", "--epochs", "50", "--loader", "pil", "--workers", "1", "--out-dir",
                              out], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=HERE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/50 | step"):
                break
        message = user_error(FAKE + ["--out-dir", out], "is in use by a running train.py", f"pid {first.pid}")
        assert "--out-dir" in message
        os.killpg(first.pid, signal.SIGTERM)     # preempted: saves the last whole step, one line, exit 143
        _, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 143 and err.strip().count("\n") == 0 and "stopped by SIGTERM" in err, err
    assert "Traceback" not in err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["epoch"] * 64 + ckpt["step"] > 0 and not os.path.exists(os.path.join(out, "last.pt.tmp"))


@slow
def test_kill_9_then_resume_repeats_the_uninterrupted_run_and_no_lock_is_left(tmp_path):
    args = FAKE + ["--depth", "2", "--epochs", "3", "--drop-path", "0.1", "--log-interval", "1"]
    train.main(args + ["--out-dir", str(tmp_path / "whole")])
    cut = str(tmp_path / "cut")
    # The run kills itself with SIGKILL at the start of epoch 2's step 4 (2 param groups: lr_at runs twice
    # per step), after epoch 1's checkpoint: an exact point, whatever the machine's speed.
    kill_at = 2 * (8 + 3) + 1
    script = ("import os, signal, sys, train, runtime\n"
              "real, calls = train.lr_at, []\n"
              "def lr_at(*a):\n"
              "    calls.append(1)\n"
              f"    if len(calls) == {kill_at}: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*a)\n"
              "train.lr_at = lr_at\n"
              "sys.exit(runtime.cli(train.main, sys.argv[1:]))\n")
    threads = str(torch.get_num_threads())     # as in this process, so the sums round alike
    proc = subprocess.run([sys.executable, "-c", script, *args, "--out-dir", cut], capture_output=True,
                          text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": threads}, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r[0] for r in epoch_rows(cut)] == [1] and os.path.exists(os.path.join(cut, "train.lock"))
    train.main(args + ["--out-dir", cut])            # the dead run's lock does not block
    assert epoch_rows(cut) == epoch_rows(str(tmp_path / "whole"))


def test_resume_refuses_other_data_or_recipe_and_never_overwrites(tmp_path):
    out = str(tmp_path / "run")
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", out])
    user_error(FAKE + ["--depth", "2", "--epochs", "1", "--out-dir", out], "another model",
               "depth: 1 then, 2 now")
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--subset", "128", "--out-dir", out],
               "another data", "train_images: 256 then, 128 now")
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--lr", "0.01", "--seed", "3", "--out-dir", out],
               "another recipe", "lr: 0.001 then, 0.01 now", "seed: 0 then, 3 now")
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--smoothing", "0", "--out-dir", out],
               "smoothing: 0.1 then, 0.0 now")
    before = open(os.path.join(out, "last.pt"), "rb").read()
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--resume", "no", "--out-dir", out], "--resume no",
               "nothing is overwritten")
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    # A checkpoint whose config does not match its own weights (R=2 named, R=1 held), or whose optimizer
    # holds other parameter groups: one line, no traceback, and the file untouched.
    for name, tamper in (("config", lambda c: (c["config"].update(depth=2), c["args"].update(depth=2))),
                         ("optimizer", lambda c: c["optimizer"]["param_groups"].pop())):
        ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
        tamper(ckpt)
        torch.save(ckpt, tmp_path / f"{name}.pt")
        saved = (tmp_path / f"{name}.pt").read_bytes()
        depth = "2" if name == "config" else "1"
        user_error(FAKE + ["--depth", depth, "--epochs", "1", "--resume", str(tmp_path / f"{name}.pt"),
                           "--out-dir", str(tmp_path / name)],
                   "does not hold the weights and optimizer state of the model it names")
        assert (tmp_path / f"{name}.pt").read_bytes() == saved


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", out])
    # Poison the weights of last.pt: the resumed run must stop at its first step, name it,
    # and leave the checkpoints on disk as they were.
    last = os.path.join(out, "last.pt")
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    ckpt["args"]["epochs"] = 2
    torch.save(ckpt, last)
    before = open(last, "rb").read(), open(os.path.join(out, "best.pt"), "rb").read()
    user_error(FAKE + ["--depth", "1", "--epochs", "2", "--out-dir", out],
               "loss became NaN or infinite at step 9 (epoch 2)", "the last good checkpoint is kept")
    assert (open(last, "rb").read(), open(os.path.join(out, "best.pt"), "rb").read()) == before
    assert [r[0] for r in epoch_rows(out)] == [1]
    fresh = str(tmp_path / "fresh")          # NaN before any checkpoint: no claim of one
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--lr", "1e30", "--warmup-epochs", "0", "--out-dir",
                       fresh],
               "no checkpoint had been written yet")


def test_full_disk_leaves_the_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    # A full disk surfaces in torch.save as "RuntimeError: [enforce fail ...] unexpected pos".
    # Saves here: last.pt at step 4 (--save-every), then best.pt and last.pt at the end of epoch 1.
    out, real_save, calls = str(tmp_path / "run"), torch.save, []

    def disk_full_on_third_save(obj, f):
        calls.append(f)
        real_save(obj, f)
        if len(calls) == 3:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4314")
    monkeypatch.setattr(torch, "save", disk_full_on_third_save)
    user_error(FAKE + ["--depth", "1", "--epochs", "2", "--save-every", "4", "--out-dir", out],
               "could not write", "disk full")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # the previous save, whole
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 4


def test_a_write_error_without_a_message_still_gives_one_line(tmp_path, monkeypatch):
    out = runtime.OutDir(str(tmp_path), master=True)
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError()))
    with pytest.raises(runtime.UserError, match=r"could not write .*last\.pt \(OSError\); is the disk full"):
        out.save({"x": 1}, os.path.join(str(tmp_path), "last.pt"))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-0.001"], "--lr must be > 0"), (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--batch-size", "-32"], "--batch-size must be > 0"), (["--micro-batch", "-8"],
                                                            "--micro-batch must be > 0"),
    (["--num-heads", "0"], "--num-heads must be > 0"), (["--patch-size", "0"], "--patch-size must be > 0"),
    (["--repeated-aug", "0"], "--repeated-aug must be in 1..64"),
    (["--workers", "-1"], "--workers must be in 0..256"),
    (["--epochs", "0"], "--epochs must be > 0"), (["--lr", "0"], "--lr must be > 0"),
    (["--hflip", "1.5"], "--hflip must be in [0, 1]"),
    (["--depth", "0"], "--depth must be > 0"), (["--patch-size", "5"], "not divisible by patch_size 5"),
    (["--randaug", "31"], "--randaug must be in 0..10"), (["--loader", "memory", "--randaug", "9"],
                                                          "--loader memory"),
    (["--loader", "device"], "--loader device is DeiT's recipe from image files"),
    (["--device", "gpu"], "use cpu, cuda or cuda:N"), (["--device", "cuda:abc"], "use cpu, cuda or cuda:N"),
    (["--crop-padding", "32"], "--crop-padding 32 is not below --img-size 32"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_bad_flags_give_one_clear_message(tmp_path, flags, message):
    user_error(FAKE + flags + ["--out-dir", str(tmp_path / "run")], message)


def test_out_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    user_error(FAKE + ["--out-dir", str(tmp_path / "file" / "run")], "cannot create --out-dir")


@slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    # The CLI's only job beyond main(): one line on stderr, exit code 2, no traceback, also for
    # an error raised inside a loader worker (a corrupt image under --workers 2).
    root = make_image_folder(tmp_path / "data", n=4)
    with open(os.path.join(root, "train", "cat", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    res = run_train(["--data", "folder", "--data-path", root, "--epochs", "1", "--loader", "pil"] +
                    FAST[:-6] + ["--batch-size", "3", "--workers", "2", "--out-dir", str(tmp_path / "run")])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: cannot read image") and "broken.jpg" in res.stderr
    assert res.stderr.count("\n") == 1


def test_a_batch_too_large_for_the_gpu_is_one_line_that_names_the_remedy(tmp_path, monkeypatch, capsys):
    real_step, out = train.train_step, str(tmp_path / "run")

    def out_of_memory_at_step_6(run, batches, gstep, clock):
        if gstep == 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.06 GiB is free.\nmore")
        return real_step(run, batches, gstep, clock)
    monkeypatch.setattr(train, "train_step", out_of_memory_at_step_6)
    argv = FAKE + ["--depth", "1", "--epochs", "1", "--save-every", "4", "--out-dir", out]
    assert runtime.cli(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: out of GPU memory (Tried to allocate 2.00 GiB); nothing half-written is left; "
                   "re-run with a smaller --micro-batch (gradient accumulation: the same --batch-size, so "
                   "the same run, resumed from its last checkpoint) or with --grad-ckpt\n")
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "train_step", real_step)      # the remedy resumes the run
    train.main(argv + ["--micro-batch", "16"])
    assert [r[0] for r in epoch_rows(out)] == [1]


def test_every_rank_reports_its_own_failure(capsys, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")           # (torchrun's environment)
    e = runtime.UserError("cannot read image x.jpg")
    for rank, printed in (("0", True), ("3", True)):
        os.environ.update(RANK=rank, WORLD_SIZE="4")
        try:
            code = runtime.cli(lambda argv: (_ for _ in ()).throw(e))
        finally:
            os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
        assert code == 2 and f"error (rank {rank}): cannot read image x.jpg" in capsys.readouterr().err
    os.environ.update(RANK="3", WORLD_SIZE="4")
    try:   # an error every rank hits alike is printed once, by rank 0
        shared_error = runtime.UserError("bad flag", shared=True)
        assert runtime.cli(lambda argv: (_ for _ in ()).throw(shared_error)) == 2
    finally:
        os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    assert capsys.readouterr().err == ""
    os.environ.update(RANK="3", WORLD_SIZE="4")
    try:   # a stop only this rank knows the reason for (its loader worker died): it says so itself
        own_stop = runtime.Stopped("stopped by SIGTERM; a worker died", 143, shared=False)
        assert runtime.cli(lambda argv: (_ for _ in ()).throw(own_stop)) == 143
        shared_stop = runtime.Stopped("stopped by SIGTERM at step 10", 143)
        assert runtime.cli(lambda argv: (_ for _ in ()).throw(shared_stop)) == 143
    finally:
        os.environ.pop("RANK"), os.environ.pop("WORLD_SIZE")
    assert capsys.readouterr().err == "(rank 3) stopped by SIGTERM; a worker died\n"


def test_a_stray_or_broken_launch_environment_is_one_line(monkeypatch, capsys):
    # A RANK left in a shell made a run that logged and saved nothing (only rank 0 does), exit 0.
    ran = []
    for env, said in (({"RANK": "1"}, "RANK=1 (LOCAL_RANK=0) of WORLD_SIZE=1"),
                      ({"RANK": "abc"}, "RANK='abc' in the environment is not a whole number"),
                      ({"RANK": "\u00b2"}, "in the environment is not a whole number"),
                      ({"WORLD_SIZE": "0"}, "RANK=0 (LOCAL_RANK=0) of WORLD_SIZE=0"),
                      ({"LOCAL_WORLD_SIZE": "0"}, "(LOCAL_WORLD_SIZE=0)"),
                      ({"RANK": "0", "WORLD_SIZE": "2"},
                       "WORLD_SIZE=2 in the environment, but no MASTER_ADDR")):
        with monkeypatch.context() as patched:
            for name, value in env.items():
                patched.setenv(name, value)
            assert runtime.cli(ran.append) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err and "torchrun" in err, (env, err)
    assert ran == [] and runtime.launch_env() == (0, 1, 0, 1)


def test_device_cuda_1_makes_gpu_1_the_current_one(monkeypatch):
    # (on a CPU: the device check and set_device stand in for the GPU's)
    current = []
    monkeypatch.setattr(runtime, "check_device", lambda device: "cuda")
    monkeypatch.setattr(runtime.torch.cuda, "set_device", current.append)
    monkeypatch.setattr(runtime.torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(runtime.torch.backends.cudnn, "allow_tf32", False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = runtime.init_distributed(8, device="cuda:1")
    assert env.device == torch.device("cuda:1") and current == [torch.device("cuda:1")]


def test_a_path_that_is_not_utf8_is_printed_escaped_on_a_strict_console(monkeypatch):
    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", console)
    path = os.fsdecode(b"/data/caf\xe9")                       # as Python holds a non-UTF-8 file name
    runtime.Env().log(f"data: {path}")
    console.flush()
    assert console.buffer.getvalue() == b"data: /data/caf\\udce9\n"


@slow
def test_a_world_size_that_is_no_number_is_one_line_to_the_end_of_the_program():
    # cli says it; train.py's own exit path read WORLD_SIZE again with int() and added a traceback
    res = subprocess.run([sys.executable, "train.py", "--data", "fake"], capture_output=True, text=True,
                         cwd=HERE, timeout=120, env={**os.environ, "WORLD_SIZE": "abc"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "WORLD_SIZE='abc'" in res.stderr


def test_on_all_ranks_undoes_what_this_rank_set_up_when_another_rank_failed(monkeypatch):
    # Two ranks: rank 1 fails (a bad file in its share), rank 0 set up (an out-dir). Both raise
    # rank 1's error; rank 0 first undoes its own set-up; rank 1 has nothing to undo.
    failure = "cannot read image val/cat/1.jpg (not a JPEG)"
    monkeypatch.setattr(runtime.dist, "all_gather_object",
                        lambda errors, mine, group=None: errors.__setitem__(slice(None), [None, failure]))
    for rank, fn, undone_after in ((0, lambda: "rank 0's run", ["rank 0's run"]),
                                   (1, lambda: (_ for _ in ()).throw(runtime.UserError(failure)), [])):
        undone = []
        env = SimpleNamespace(ddp=True, world=2, rank=rank, cpu_group=None)
        with pytest.raises(runtime.UserError, match=re.escape(failure)) as raised:
            runtime.on_all_ranks(env, fn, undo=undone.append)
        assert undone == undone_after and raised.value.agreed
        assert str(raised.value) == failure + " (rank 1)"          # whose file it is


@slow
def test_torchrun_with_accumulation_equals_one_process_and_exits_0(tmp_path):
    # One optimizer step of 2 ranks x micro-batch 4 x 2 accumulation steps = the same global batch
    # of 16 in one process; no MixUp, drop path or augmentation. Run twice: a finished DDP run
    # exits 0 every time (it used to exit 1 now and then in process-group teardown).
    flags = ["--data", "fake", "--device", "cpu", "--num-classes", "10", "--subset", "16", "--val-subset",
             "7", "--img-size", "32",
             "--patch-size", "8", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--depth",
             "2", "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-2", "--hflip",
             "0", "--crop-padding", "0", "--workers", "0"]
    single = train.main(flags + ["--out-dir", str(tmp_path / "single")]).state_dict()
    start = build_like(single)
    for attempt in range(2):
        out = str(tmp_path / f"ddp{attempt}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "train.py"), *flags, "--micro-batch", "4", "--out-dir", out]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count("val top-1") == 1 and "2 x 4 x 2 accum" in res.stdout     # only rank 0 logs
        ddp = weights(os.path.join(out, "last.pt"))
        # AdamW's first step moves each weight by about lr x sign(g) wherever the gradient is real, so
        # the same update means (nearly) every weight lands on the same value. Two kinds of element
        # depend on rounding, not on the update's meaning, and are not held to it: the key biases,
        # whose gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys),
        # so another summation order picks the sign of noise; and the few weights whose gradient is
        # as small as Adam's eps. A rank whose gradient is not averaged in, or a micro-batch left
        # out, changes the sign of a large share of all weights.
        def moved_apart(k):           # (n,): how far the two runs' copies of weight k are apart
            d = (ddp[k] - single[k]).abs().flatten()
            return torch.cat([d[:32], d[64:]]) if k.endswith("qkv.bias") else d    # width 32: keys 32..63
        diff = torch.cat([moved_apart(k) for k in single])
        assert (diff > 1e-6).float().mean() < 1e-2, (diff > 1e-6).float().mean()
        # The sign alone would pass a gradient summed over ranks or not divided by the accumulation
        # steps; AdamW's first moment, 0.1 x the gradient, is linear in it: it must agree too.
        moment = lambda path: torch.cat([s["exp_avg"].flatten() for s in
                                         torch.load(path, weights_only=True)["optimizer"]["state"].values()])
        m_ddp, m_one = moment(os.path.join(out, "last.pt")), moment(str(tmp_path / "single" / "last.pt"))
        assert (m_ddp - m_one).abs().max() < 1e-4 * m_one.abs().max(), (m_ddp - m_one).abs().max()
        ddp_loss = read_metrics(out)[1]["train_loss"]
        assert ddp_loss == pytest.approx(read_metrics(str(tmp_path / "single"))[1]["train_loss"])
        assert read_metrics(out)[1]["val_images"] == 7             # 7 images over 2 ranks, each counted once
    moved = max((single[k] - start[k]).abs().max().item() for k in single)
    assert moved > 1e-3                          # a real step (lr 1e-2), far above the tolerance


def test_ranks_one_step_apart_refuse_to_start(monkeypatch):
    env = SimpleNamespace(ddp=True, world=2, cpu_group=None)

    def gather(seen, mine, group=None):          # rank 1's node kept an older last.pt, 3 steps behind
        seen[:] = [(0, 3, "node0"), (0, 0, "node1")]
    monkeypatch.setattr(runtime.dist, "all_gather_object", gather)
    with pytest.raises(runtime.UserError, match="rank 0 .node0. resumes at epoch 0 step 3, rank 1 .node1. at "
                                                "epoch 0 step 0"):
        runtime.agree_on_progress(env, train.Progress(epoch=0, step=3), "run")
    both_at_3 = [(0, 3, "node0"), (0, 3, "node1")]
    monkeypatch.setattr(runtime.dist, "all_gather_object",
                        lambda seen, mine, group=None: seen.__setitem__(slice(None), both_at_3))
    runtime.agree_on_progress(env, train.Progress(epoch=0, step=3), "run")        # agreed: no error


@slow
def test_two_nodes_with_local_disks_refuse_a_restart_instead_of_hanging(tmp_path):
    # Two "nodes" on this machine, each with its own working folder and a relative --out-dir: only
    # rank 0 (node 0) writes last.pt. On the restart node 1 finds nothing; the ranks must refuse to
    # start from different places (one line, exit 2 on both nodes), not drift apart and hang.
    import socket as socket_
    with socket_.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = FAKE + ["--subset", "32", "--val-subset", "8", "--batch-size", "16", "--depth", "1", "--epochs",
                    "1", "--out-dir", "run"]

    def launch(attempt):
        procs = []
        for node in (0, 1):
            cwd = tmp_path / f"node{node}"
            cwd.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port + attempt}",
                   os.path.join(HERE, "train.py"), *flags]
            procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        try:
            return [(p.wait(timeout=600), p.stderr.read()) for p in procs]
        finally:
            for p in procs:
                p.kill()
    assert [code for code, _ in launch(0)] == [0, 0]
    assert os.path.isfile(tmp_path / "node0" / "run" / "last.pt")
    assert not os.path.exists(tmp_path / "node1" / "run")
    (code0, err0), (code1, err1) = launch(1)
    # Each worker exits 2; torchrun itself then exits 1 and names the worker's exit code.
    assert code0 != 0 and code1 != 0, (err0, err1)
    assert all(re.search(r"exitcode\s*:\s*2", e) for e in (err0, err1)), (err0, err1)
    assert "the ranks do not agree where the run stands: rank 0" in err0 and "rank 1" in err0
    for err in (err0, err1):       # the one traceback is torchrun's own report of the failed worker
        assert err.count("Traceback") <= err.count("ChildFailedError"), err
    assert "the ranks do not agree" not in err1                                       # said once, by rank 0
    rows = read_metrics(str(tmp_path / "node0" / "run"))     # the refused start wrote no row
    assert [r["type"] for r in rows].count("run") == 1


@slow
def test_sigterm_to_a_ddp_job_stops_every_rank_at_the_same_agreed_step(tmp_path):
    # Slurm's SIGTERM reaches a rank and its loader workers. The workers ignore it, and the rank trains
    # on to the next step at which the ranks compare stop flags (every StopRequest.EVERY steps); every
    # rank stops there: one checkpoint at that step, each rank ending with the one line, nobody left
    # waiting in a collective. Rank 1 signals its own process group at the start of step 4 (2 param
    # groups: lr_at runs twice per step), an exact point whatever the machine's speed, so the stop
    # must come at step 10 exactly.
    out, log, err_file = str(tmp_path / "run"), tmp_path / "stdout", tmp_path / "stderr"
    script = tmp_path / "signal_at_step_4.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport runtime, train\n"
                      "real, calls = train.lr_at, []\n"
                      "def lr_at(*a):\n"
                      "    calls.append(1)\n"
                      "    if os.environ['RANK'] == '1' and len(calls) == 2 * 3 + 1:\n"
                      "        os.killpg(os.getpgid(0), signal.SIGTERM)\n"
                      "    return real(*a)\n"
                      "train.lr_at = lr_at\n"
                      "code = runtime.cli(train.main, sys.argv[1:])\n"
                      "sys.stdout.flush(), sys.stderr.flush()\n"
                      "os._exit(code)                      # as train.py leaves under torchrun\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *FAKE, "--subset", "4096", "--epochs", "50", "--loader", "pil", "--workers", "1", "--out-dir", out]
    with open(log, "w") as stdout, open(err_file, "w") as stderr:      # files: no pipe fills up and blocks
        job = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=HERE, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        try:
            job.wait(timeout=600)
        finally:                       # (a timeout: torchrun ends its ranks, each in a session of its own)
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGTERM)
                job.wait(timeout=120)
    err = err_file.read_text()
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (0, runtime.StopRequest.EVERY), (ckpt["step"], err[-2000:])
    assert err.count("stopped by SIGTERM at epoch 1, step 10/") >= 1 and "died" not in err, err[-2000:]
    assert job.returncode != 0 and not os.path.exists(os.path.join(out, "best.pt")), err[-2000:]


def build_like(state):
    """The initial weights of the run that produced `state` (seed 0, same shapes)."""
    torch.manual_seed(0)
    model = SRViT(img_size=32, patch_size=8, embed_dim=32, num_layers=2, num_heads=2, num_classes=10,
                  depth=2, init="torch")
    assert model.state_dict().keys() == state.keys()
    return model.state_dict()


@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR, "train")),
                    reason="no CIFAR-10 folder: set SRVIT_DATA to one with train/ and test/ "
                           "(real-data check)")
def test_learns_real_cifar10_subset(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--data", "cifar10", "--data-path", CIFAR, "--device", "cpu", "--subset", "4000",
                "--val-subset", "1000", "--epochs", "3", "--lr", "2e-3", "--depth", "2", "--out-dir",
                out] + FAST[:-6] + ["--batch-size", "64", "--workers", "0"])
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


def test_eval_anytime_table_is_what_the_model_gives_with_k_steps(trained_runs):
    ckpt = str(trained_runs / "R3" / "last.pt")
    res = srvit_eval.main(["--checkpoint", ckpt, "--device", "cpu", "--steps", "all", "--workers", "0"])
    model, saved = srvit_eval.load_checkpoint(ckpt)
    targs = SimpleNamespace(**{**saved["args"], "img_size": 32})
    val, _ = loaders.build_dataset(targs, "val", loaders.transforms(targs, train=False))
    x = loaders.normalize_image(torch.stack([v[0] for v in val]), 32)
    y = torch.tensor([int(v[1]) for v in val])
    with torch.no_grad():
        for row in res["anytime"]:
            logits = model(x, steps=row["steps"])
            top1 = 100 * (logits.argmax(1) == y).float().mean().item()
            top5 = 100 * (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
            assert (row["top1"], row["top5"]) == pytest.approx((top1, top5), abs=1e-9), row
    steps2 = srvit_eval.main(["--checkpoint", ckpt, "--device", "cpu", "--steps", "2", "--workers", "0"])
    with torch.no_grad():
        loss2, loss3 = (F.cross_entropy(model(x, steps=k), y).item() for k in (2, 3))
    assert steps2["loss"] == pytest.approx(loss2, rel=1e-5) and loss2 != pytest.approx(loss3, rel=1e-5)
    assert steps2["top1"] == res["anytime"][1]["top1"] and steps2["steps"] == 2
    assert steps2["gmacs"] == res["anytime"][1]["gmacs"] < res["anytime"][2]["gmacs"]      # 2 steps' cost


def test_eval_checkpoint_anytime_table_and_maps(trained_runs, tmp_path):
    from PIL import Image
    ckpt = str(trained_runs / "R3" / "last.pt")
    res = srvit_eval.main(["--checkpoint", ckpt, "--device", "cpu", "--steps", "all", "--maps",
                           str(tmp_path / "maps.png"), "--json", str(tmp_path / "eval.json"), "--workers",
                           "0", "--batch-size", "24"])             # three batches, the last one short
    saved = read_metrics(str(trained_runs / "R3"))[-1]
    # same numbers as training's eval
    # (another batching than training's evaluation: a near tie may round the other way, one image at most)
    assert res["images"] == 64 and res["top1"] == pytest.approx(saved["top1"], abs=100 / 64)
    g = [r["gmacs"] for r in res["anytime"]]
    # each step adds one pass of the blocks
    assert g[0] < g[1] and g[2] - g[1] == pytest.approx(g[1] - g[0])
    # the table's step weights and entropies: the model's own, over the 64 validation images
    model, saved_ckpt = srvit_eval.load_checkpoint(ckpt)
    targs = SimpleNamespace(**{**saved_ckpt["args"], "img_size": 32})
    val, _ = loaders.build_dataset(targs, "val", loaders.transforms(targs, train=False))
    with torch.no_grad():
        _, mix = model(loaders.normalize_image(torch.stack([v[0] for v in val]), 32), return_mix=True)
    for i, w in enumerate(mix):                                            # (64, T, 3)
        torch.testing.assert_close(torch.tensor(res["step_weights"][i]), w.mean(dim=(0, 1)),
                                   atol=1e-5, rtol=0)
        entropy = -(w * w.clamp_min(1e-12).log()).sum(-1).mean()
        assert res["entropy"][i] == pytest.approx(entropy.item(), abs=1e-5)
    with Image.open(tmp_path / "maps.png") as im:      # 4 rows of (label, image + 3 steps at 112 px)
        assert im.size == (6 + 4 * 118, 22 + 4 * (15 + 118) + 40)
        assert len(set(im.convert('RGB').tobytes())) > 10
    model = srvit_eval.load_model(ckpt)
    x = torch.randn(2, 3, 32, 32)
    flat, stretched = (srvit_eval.draw_maps(model, x, relative=r).convert("RGB") for r in (False, True))
    heat = (6 + 118, 22 + 15, 6 + 118 + 112, 22 + 15 + 112)      # step 1's map of the first image
    colours = lambda im: len(set(im.crop(heat).tobytes()[i:i + 3] for i in range(0, 112 * 112 * 3, 3)))
    assert colours(stretched) > colours(flat)          # weights near 1/3 spread over the whole ramp
    assert json.load(open(tmp_path / "eval.json"))["anytime"][0]["steps"] == 1


def test_eval_refuses_foreign_and_broken_checkpoints(trained_runs, tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "timm_style.pth")
    with open(trained_runs / "R3" / "last.pt", "rb") as f:
        (tmp_path / "half.pt").write_bytes(f.read()[:5000])      # a half-written file
    ckpt = torch.load(trained_runs / "R3" / "last.pt", weights_only=True)
    ckpt["config"]["depth"] = 2                                    # config and weights disagree
    torch.save(ckpt, tmp_path / "other.pt")
    for name, message in [("timm_style.pth", "not a train.py checkpoint"), ("half.pt", "cannot read"),
                          ("other.pt", "does not hold an SR-ViT"), ("missing.pt", "checkpoint not found")]:
        with pytest.raises(runtime.UserError, match=message):
            srvit_eval.main(["--checkpoint", str(tmp_path / name)])


@pytest.mark.parametrize("flags, message", [
    (["--maps", "m.png", "--maps-images", "0"], "--maps-images must be in 1..64"),
    (["--maps", "m.png", "--maps-mixer", "7"], "this model has 2 mixers"),
    (["--steps", "4"], "--steps takes 'all' or a number of steps in 1..3"),
    (["--steps", "\u00b2"], "--steps takes 'all' or a number of steps in 1..3"),      # a digit int() refuses
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_eval_bad_flags_give_one_clear_message(trained_runs, tmp_path, flags, message):
    with pytest.raises(runtime.UserError, match=message):
        srvit_eval.main(["--checkpoint", str(trained_runs / "R3" / "last.pt"), "--workers", "0", "--device",
                         "cpu"] + flags)


def test_a_curve_plot_before_any_run_has_finished_is_one_line(trained_runs, tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    rows = [json.loads(line) for line in (trained_runs / "R1" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row.get("type") == "run":
            row["args"]["epochs"] = 5                                        # 1 epoch of 5 done
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(runtime.UserError, match="no finished run to plot"):
        srvit_eval.main(["--curve", str(run), "--plot", str(tmp_path / "curve.png")])
    assert not (tmp_path / "curve.png").exists()
    assert srvit_eval.main(["--curve", str(run)])[0]["finished"] is False   # the table alone still works


def test_eval_cli_prints_one_line_not_the_usage():
    res = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--checkpoint", "missing.pt",
                          "--steps", "2"],
                         capture_output=True, text=True, cwd=HERE)
    assert res.returncode == 2 and res.stderr == "error: checkpoint not found: missing.pt\n", res.stderr


def test_load_model_and_classify_a_pil_image(trained_runs):
    from PIL import Image
    model = srvit_eval.load_model(str(trained_runs / "R3" / "best.pt"))
    image = Image.new("RGB", (50, 40), (200, 30, 30))                 # any size: resized and cropped to 32 px
    model.classes = model.classes[::-1]                    # so that a name paired by rank, not index, shows
    x = srvit_eval.preprocess(model, image)                                               # (1, 3, 32, 32)
    with torch.no_grad():
        values, indices = model(x).softmax(-1)[0].topk(3)
    want = [(model.classes[i], round(v, 4)) for v, i in zip(values.tolist(), indices.tolist())]
    assert srvit_eval.classify(model, image, k=3) == want
    with torch.no_grad():
        probs = sorted(model(x).softmax(-1)[0].tolist(), reverse=True)
    assert [p for _, p in srvit_eval.classify(model, image, k=10)] == pytest.approx(probs, abs=5e-5)


def test_curve_table_and_plot(trained_runs, tmp_path, capsys):
    from PIL import Image
    rows = srvit_eval.main(["--curve", str(trained_runs / "*"), str(tmp_path / "not-a-run"),
                            "--plot", str(tmp_path / "curve.png"), "--paper"])
    assert [(r["depth"], r["mixer"]) for r in rows] == [(1, "-"), (3, "soft")]
    out = capsys.readouterr().out
    assert "| R3 | 3 | soft | block | - | 0 |" in out and "| R1 | 1 | - | - | - | 0 |" in out
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (760 + 520, 380)


def test_curve_groups_step_scale_runs_apart_from_the_soft_runs(tmp_path):
    def run(name, seed, step_scale):
        config = dict(asdict(srvit.SRViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                               num_layers=6, num_heads=4, depth=4)), step_scale=step_scale)
        args = dict(data="cifar10", epochs=1, lr=1e-3, batch_size=128, drop_path=0.0, seed=seed)
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"type": "run", "config": config, "args": args, "params": 1, "gmacs": 0.1}) + "\n" +
            json.dumps({"type": "epoch", "epoch": 1, "top1": 50.0 + seed, "elapsed": 1.0}) + "\n")
    run("R4-soft-s0", 0, False), run("R4-soft-s1", 1, False), run("R4-softscale-s0", 0, True)
    rows = srvit_eval.main(["--curve", str(tmp_path / "*")])
    assert {r["run"]: r["variant"] for r in rows} == {"R4-soft-s0": "", "R4-soft-s1": "",
                                                      "R4-softscale-s0": "step_scale=True"}


def test_curve_plot_draws_the_range_over_seeds():
    # Two seeds of soft at R=4 that differ by 4 points: the plot must show a bar from 57 to 61, so
    # that a gap smaller than the seeds' spread does not read as a trend. Count the rows of pixels
    # in the soft colour at the R=4 end of the panel: a bar spans many rows, a dot only ~9.
    import numpy as np
    soft = srvit_eval.MIXER_COLOURS["soft"]
    def soft_rows(groups):
        im = np.asarray(srvit_eval.plot_curve(groups))
        near_r4 = im[:, 600:720]                            # R=4 sits at the right end of the 760 px panel
        return int((near_r4 == soft).all(-1).any(-1).sum())
    one_seed = {("", 1, "-", "-"): [55.0], ("", 4, "soft", "block"): [59.0]}
    two_seeds = {("", 1, "-", "-"): [55.0], ("", 4, "soft", "block"): [57.0, 61.0]}
    assert soft_rows(two_seeds) > soft_rows(one_seed) + 40


BENCH = ["--bench", "--device", "cpu", "--img-size", "32", "--patch-size", "8", "--embed-dim", "32",
         "--num-layers", "2", "--num-heads", "2", "--num-classes", "10", "--batch-size", "8", "--iters", "2",
         "--rounds", "1"]


def test_bench_numbers_are_finite_and_consistent(tmp_path):
    res = bench_script().main(BENCH + ["--depth", "1", "4", "--json", str(tmp_path / "bench.json")])
    r1, r4 = res
    for r in res:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("train_img_s", "infer_img_s", "of_achievable"))
        assert r["mfu"] is None                  # MFU is of a datasheet peak: none for a CPU
    # 4x the blocks, 1x embed and head
    assert 3.0 < (r4["gmacs"] - r4["mixer_gmacs"]) / r1["gmacs"] < 4.0
    unshared = srvit.SRViT(img_size=32, patch_size=8, embed_dim=32, num_layers=8, num_heads=2, num_classes=10)
    # 2 blocks x 4 steps, unshared
    assert r4["unshared_gmacs"] == pytest.approx(srvit.forward_gmacs(unshared))
    assert r4["unshared_params"] > r4["params"] and "sharing_ratio" not in r1
    assert r4["saved_mib"] > r1["saved_mib"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == json.loads(json.dumps(res))


def test_the_device_path_makes_no_tensor_from_python_data_in_a_batch(tmp_path):
    # results/bench.py --count-ops at small batches: decode + augmentation of a batch make no tensor from
    # Python data (each would be a blocking host-to-device copy on a GPU); the draws reach the device as
    # one table, made by the loader workers. MixUp/CutMix makes one: the Beta parameter, on the CPU.
    bench = bench_script()
    counts = bench.device_path_counts(bench.get_args(["--count-ops", "--batch-size", "8"]))
    assert [r["from_python"] for r in counts["rows"]] == [0, 0, 0]
    assert [r["mix_from_python"] for r in counts["rows"]] == [1, 1, 1]
    assert [r["decode_ops"] for r in counts["rows"]] == [8, 16, 32]          # one per file on a CPU


@pytest.mark.parametrize("flag", ["--patch-size", "--num-classes", "--embed-dim"])
def test_bench_refuses_a_model_size_below_1_in_one_line(flag):
    with pytest.raises(runtime.UserError, match=f"{flag} must be >= 1"):
        bench_script().get_args(["--bench", "--device", "cpu", flag, "0"])


def test_loader_cpu_bench_times_the_workers_of_both_paths(tmp_path, monkeypatch):
    # DeiT's recipe on 500 x 375 JPEGs. What it times, counted rather than raced: the PIL path's workers
    # decode every image; the device path's workers decode none (they read files and draw); its device
    # side decodes every image once. Times are only checked to be measured.
    decoded = {"pil": 0, "device": 0}
    read_image, cpu_decode = loaders.read_image, loaders.cpu_decode
    monkeypatch.setattr(loaders, "read_image",
                        lambda p: (decoded.__setitem__("pil", decoded["pil"] + 1), read_image(p))[1])
    monkeypatch.setattr(loaders, "cpu_decode",
                        lambda d, p: (decoded.__setitem__("device", decoded["device"] + 1),
                                      cpu_decode(d, p))[1])
    r = bench_script().main(["--loader-cpu", "--bench-images", "8", "--batch-size", "4", "--rounds", "1",
                             "--json", str(tmp_path / "loader.json")])
    assert r["images"] == 8 and decoded == {"pil": 8, "device": 8}
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("pil_worker_ms_per_image",
                                                          "device_worker_ms_per_image",
                                                          "device_side_cpu_ms_per_image"))
    assert json.load(open(tmp_path / "loader.json")) == {"device": "cpu", "threads": 1, **r}


def test_loader_bench_trains_the_model_it_is_given():
    # --model reaches the models of both loaders; without it, train.py's default for the data.
    flags = ["--bench-loader", "--data", "fake", "--img-size", "32", "--patch-size", "8", "--num-layers", "1",
             "--depth", "1", "--bench-images", "8", "--batch-size", "4", "--workers", "0"]
    bench = bench_script()
    given = bench.loader_setups(bench.get_args(flags + ["--model", "small"]), 1, torch.device("cpu"))
    default = bench.loader_setups(bench.get_args(flags), 1, torch.device("cpu"))
    assert {k: s[1].config.embed_dim for k, s in given.items()} == {"memory": 384, "pil": 384}
    # small-images' D
    assert {k: s[1].config.embed_dim for k, s in default.items()} == {"memory": 192, "pil": 192}


@slow
def test_compiled_bench_compiles_every_model_of_every_row():
    # 10 models (R=1; R=2..4 each with its unshared ViT and no-mixer twin): one Dynamo cache for
    # all of them reached the recompile limit at R=3, and the rest ran eagerly.
    res = bench_script().main(BENCH + ["--depth", "1", "2", "3", "4", "--compile", "--compile-backend",
                                       "eager", "--iters", "1"])
    assert [r["compiled_graphs_min"] >= 1 for r in res] == [True] * 4


def test_mfu_uses_the_datasheet_peak_of_the_exact_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names.pop(0))
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla T4"]
    peaks = [runtime.peak_flops(torch.device("cuda")) for _ in range(5)]
    assert peaks == [989e12, 756e12, 989e12, 312e12, None]
    assert runtime.mfu(10, 1000, 989e12) == pytest.approx(6e13 / 989e12)


# ----------------------------------------------------------------------------------------
# The classroom notebook

def cpu_only(monkeypatch):
    """The notebook trains on the default device, as its reader would (a GPU where there is one); its
    tests run it on the CPU, whatever the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.default_device
def test_classroom_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """notebooks/classroom.ipynb, executed cell by cell in its quick budget (SRVIT_NOTEBOOK=quick), as a
    teacher's "Run All" would: no stored outputs, no Jupyter magics, and every cell runs without error."""
    import sys
    from PIL import Image
    cpu_only(monkeypatch)

    data = CIFAR
    if not os.path.isdir(os.path.join(data, "train")):
        pytest.skip("no local CIFAR-10 folder (set SRVIT_DATA to one with train/ and test/, or put them in "
                    "data/cifar10); this test does not download data")
    folder = os.path.join(HERE, "notebooks")
    with open(os.path.join(folder, "classroom.ipynb")) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = [("".join(c["source"]) if isinstance(c["source"], list) else c["source"], c)
             for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells, "the notebook has no code cells"
    for i, (source, cell) in enumerate(cells):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
            f"code cell {i} holds stored outputs: strip them before committing"
        magic = [line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
        assert not magic, f"code cell {i} uses Jupyter magics, which plain Python cannot run: {magic}"

    monkeypatch.setenv("SRVIT_NOTEBOOK", "quick")
    # the notebook looks there, then in data/cifar10
    monkeypatch.setenv("SRVIT_DATA", os.path.abspath(data))
    monkeypatch.setenv("SRVIT_RUNS", str(tmp_path / "runs"))   # checkpoints in the test's own folder
    monkeypatch.chdir(folder)                                   # where Jupyter starts the kernel
    monkeypatch.setattr(sys, "path", list(sys.path))            # the notebook inserts the repository
    ns = {"__name__": "__main__"}
    for i, (source, _) in enumerate(cells):
        exec(compile(source, f"cell {i}", "exec"), ns)          # a failing cell names itself in the traceback

    budget = ns["BUDGET"]
    assert ns["MODE"] == "quick" and ns["DATA"] is not None
    # section 1: DeiT = SR-ViT at R=1; the extra parameters are the mixers
    extra = srvit.count_params(ns["recursive"]) - srvit.count_params(ns["deit"])
    assert extra == ns["parts_recursive"]["mixers"] > 0
    # sections 3 and 4: a trained model, its checkpoints, a picture of its weights, one anytime row per step
    model = ns["model"]
    assert isinstance(model, srvit.SRViT) and model.config.depth == budget["depth"] and not model.training
    assert os.path.isfile(tmp_path / "runs" / "main" / "best.pt")
    for name in ("maps", "maps_relative", "curve", "gallery"):
        assert isinstance(ns[name], Image.Image) and min(ns[name].size) > 0, name
    table = ns["anytime_table"]
    assert [row["steps"] for row in table] == list(range(1, budget["depth"] + 1))
    assert all(row["images"] == budget["val_images"] for row in table)
    assert table[0]["gmacs"] < table[-1]["gmacs"]
    # the race: R=1 and three mixers at R=compare_depth, each with a finished run
    assert sorted(ns["groups"]) == sorted([("", 1, "-", "-")] + [("", budget["compare_depth"], m, "block")
                                                                 for m in ("last", "mean", "soft")])
    assert all(r["finished"] for r in ns["results"].values())
    # classify: k (name, probability) pairs, most likely first, names from the checkpoint
    guess = ns["guess"]
    assert len(guess) == 3 and all(name in ns["CLASSES"] for name, _ in guess)
    assert guess[0][1] >= guess[-1][1]


# Each section of the notebook on its own: a teacher skips what the period has no time for. The
# code cells before "## 1." are the setup (imports, budget, data, helpers); a code cell belongs to
# the last numbered heading above it ("## 2.", "### 4.1", ...). The setup runs once; each section
# then runs alone on a copy of the setup's namespace with an empty runs folder, so a section that
# needs another section's variables or files fails here. The sections after training use the
# shipped checkpoint (assets/classroom-R4.pt) when section 3 has not run.
NOTEBOOK = os.path.join(HERE, "notebooks", "classroom.ipynb")
SHIPPED = os.path.join(HERE, "assets", "classroom-R4.pt")
TRAINING_SECTIONS = {"3", "4.6"}          # the only sections that train (in the quick budget: seconds)


def notebook_sections(path=NOTEBOOK):
    """(setup, sections): [(cell number, source)] before the first numbered heading, and per section."""
    heading = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.?\s", re.M)      # "## 1. ...", "### 4.1 ..."
    with open(path) as f:
        nb = json.load(f)
    setup, sections, current = [], {}, None
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown" and heading.findall(source):
            current = heading.findall(source)[-1]         # "## 4. ...\n### 4.1 ..." in one cell: 4.1
            sections.setdefault(current, [])
        elif cell["cell_type"] == "code":
            (setup if current is None else sections[current]).append((i, source))
    return setup, {name: cells for name, cells in sections.items() if cells}


NOTEBOOK_SETUP, NOTEBOOK_SECTIONS = notebook_sections()


def run_cells(cells, ns, where):
    for i, source in cells:
        exec(compile(source, f"notebook cell {i} ({where})", "exec"), ns)   # a failing cell names itself


@pytest.fixture(scope="module")
def notebook_setup(tmp_path_factory):
    data = CIFAR
    if not os.path.isdir(os.path.join(data, "train")):
        pytest.skip("no local CIFAR-10 folder (set SRVIT_DATA to one with train/ and test/, or put them in "
                    "data/cifar10); this test does not download data")
    mp = pytest.MonkeyPatch()
    mp.setenv("SRVIT_NOTEBOOK", "quick")
    mp.setenv("SRVIT_DATA", os.path.abspath(data))
    mp.setenv("SRVIT_RUNS", str(tmp_path_factory.mktemp("runs-setup")))
    mp.chdir(os.path.dirname(NOTEBOOK))                   # where Jupyter starts the kernel
    mp.setattr(sys, "path", list(sys.path))               # the setup inserts the repository
    ns = {"__name__": "__main__", "display": lambda *a, **k: None}
    try:
        run_cells(NOTEBOOK_SETUP, ns, "setup")
        yield ns
    finally:
        mp.undo()


def run_section(name, setup_ns, runs):
    setup_ns["RUNS"] = str(runs)      # the helpers were defined in the setup's namespace and read RUNS there
    ns, cwd = dict(setup_ns), os.getcwd()
    os.chdir(os.path.dirname(NOTEBOOK))
    try:
        run_cells(NOTEBOOK_SECTIONS[name], ns, f"section {name}")
    finally:
        os.chdir(cwd)
    return ns


def test_notebook_has_its_sections_and_a_small_shipped_checkpoint():
    assert len(NOTEBOOK_SETUP) == 4, ("setup = imports, budget, data, helpers; "
                                      f"found {len(NOTEBOOK_SETUP)} cells")
    assert {"1", "2", "3", "4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "4.7"} <= set(NOTEBOOK_SECTIONS)
    assert os.path.getsize(SHIPPED) < 1_000_000
    model = srvit_eval.load_model(SHIPPED)
    assert model.config.depth == 4 and model.config.init == "torch" and len(model.classes) == 10


@pytest.mark.default_device
@pytest.mark.parametrize("name", list(NOTEBOOK_SECTIONS))
def test_notebook_section_runs_alone_after_the_setup(name, notebook_setup, tmp_path, monkeypatch):
    cpu_only(monkeypatch)
    runs = tmp_path / "runs"
    ns = run_section(name, notebook_setup, runs)
    trained = sorted(os.listdir(runs)) if runs.is_dir() else []
    assert bool(trained) == (name in TRAINING_SECTIONS), (name, trained)   # the others use the shipped model
    if name == "3":   # re-running the training cell (as after an interrupt) reuses the run, never deletes it
        assert isinstance(ns["model"], srvit.SRViT) and not ns["model"].training
        before = os.stat(runs / "main" / "last.pt")
        run_section(name, notebook_setup, runs)
        after = os.stat(runs / "main" / "last.pt")        # a save writes a new file (a new inode) and renames
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_files_a_reader_opens_first_stay_within_their_budgets():
    """train.py reads in one sitting (the loop; loaders.py and runtime.py hold the rest), and so do
    eval.py and the README; srvit.py imports only torch and the standard library."""
    budgets = {"train.py": 750, "eval.py": 500, "README.md": 300}
    lines = {name: len(open(os.path.join(HERE, name)).read().splitlines()) for name in budgets}
    assert all(lines[name] <= budget for name, budget in budgets.items()), lines
    code = sorted(glob.glob(os.path.join(HERE, "*.py"))                 # every Python file of the product
                  + glob.glob(os.path.join(HERE, "results", "**", "*.py"), recursive=True))
    assert len(code) >= 10 and os.path.join(HERE, "results", "bench.py") in code, code
    wide = [f"{os.path.relpath(name, HERE)}:{n}" for name in code for n, line in enumerate(open(name), 1)
            if len(line.rstrip("\n")) > 110]
    with open(NOTEBOOK) as f:                # the lesson's code cells follow the same rule
        cells = json.load(f)["cells"]
    wide += [f"notebooks/classroom.ipynb cell {i}:{n}" for i, cell in enumerate(cells)
             if cell["cell_type"] == "code"
             for n, line in enumerate("".join(cell["source"]).splitlines(), 1) if len(line) > 110]
    assert wide == [], wide                  # no line packed past 110 columns
    imports = set(re.findall(r"^\s*(?:import|from) (\w+)", open(os.path.join(HERE, "srvit.py")).read(), re.M))
    assert imports <= {"torch", *sys.stdlib_module_names}, imports


def readme_snippets(section):
    """The ```python blocks of one README section."""
    text = open(os.path.join(HERE, "README.md")).read()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


def test_readme_notebook_snippets_run_as_written(trained_runs, tmp_path, monkeypatch):
    from PIL import Image
    model_snippet, classify_snippet = readme_snippets("In a notebook")
    ns = {}
    exec(model_snippet, ns)                            # exactly as written
    assert ns["logits"].shape == (2, 1000) and len(ns["mix"]) == 12 and ns["mix"][0].shape == (2, 197, 4)
    assert len(ns["trace"]["steps"]) == 12 and len(ns["trace"]["anytime"]) == 4
    # The classify snippet names a run of `python train.py` and the user's picture: give it both.
    run = tmp_path / "runs" / "cifar10-D192-L6-H3-R2-soft-block-s0"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes((trained_runs / "R3" / "best.pt").read_bytes())
    Image.new("RGB", (40, 40), (120, 80, 40)).save(tmp_path / "my_cat.jpg")
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(classify_snippet, ns)
    assert isinstance(ns["model"], SRViT)


# ---- eval.py

def test_classify_takes_a_path_or_an_image_and_rounds_to_4_decimals(trained_runs, tmp_path):
    from pathlib import Path
    from PIL import Image
    model = srvit_eval.load_model(str(trained_runs / "R3" / "best.pt"))
    Image.new("RGB", (50, 40), (30, 200, 90)).save(tmp_path / "pic.png")
    with Image.open(tmp_path / "pic.png") as image:
        from_image = srvit_eval.classify(model, image, k=4)
    assert srvit_eval.classify(model, str(tmp_path / "pic.png"), k=4) == from_image      # a str path
    assert srvit_eval.classify(model, Path(tmp_path / "pic.png"), k=4) == from_image     # a PathLike
    assert len(from_image) == 4 and all(p == round(p, 4) and isinstance(name, str) for name, p in from_image)


def test_eval_val_subset_takes_trainings_subset_and_progress_stays_out_of_stdout(trained_runs, tmp_path,
                                                                                  capsys):
    from contextlib import nullcontext
    ckpt = str(trained_runs / "R3" / "last.pt")
    res = srvit_eval.main(["--checkpoint", ckpt, "--device", "cpu", "--val-subset", "16", "--batch-size",
                           "2", "--workers", "0", "--json", str(tmp_path / "eval.json")])
    assert res["images"] == 16
    # the same 16 images as train.py --val-subset 16 picks, scored as train.py scores them
    targs = SimpleNamespace(**{**torch.load(ckpt, weights_only=True)["args"], "val_subset": 16})
    val, _ = loaders.build_dataset(targs, "val", loaders.transforms(targs, train=False))
    batches = loaders.OnDevice(torch.utils.data.DataLoader(val, 2),      # eval's batches: the same sums
                               loaders.Normalize(*loaders.mean_std(32), "cpu"))
    want = train.evaluate(srvit_eval.load_model(ckpt), batches, torch.device("cpu"), nullcontext())
    assert (res["top1"], res["top5"]) == (want["top1"], want["top5"])
    assert res["loss"] == pytest.approx(want["val_loss"])
    out, err = capsys.readouterr()
    # progress on stderr
    assert "evaluating: batch 4/8" in err and "images/s | eta" in err and "batch" not in out
    # mixers counted from 1
    assert "| mixer 1 |" in out and "| mixer 2 |" in out and "| 0 |" not in out
    assert "batches" not in (tmp_path / "eval.json").read_text()


def test_weight_maps_number_mixers_from_1_and_do_not_paint_uniform_weights_as_a_pattern():
    # a fresh soft mixer gives every step 1/3, up to rounding
    fresh = tiny(depth=3, mixer="soft").eval()
    x = images(2)
    heat = (6 + 118, 22 + 15, 6 + 118 + 112, 22 + 15 + 112)      # step 1's map of the first image
    pixels = lambda im: {bytes(px) for px in zip(*[iter(im.convert("RGB").crop(heat).tobytes())] * 3)}
    uniform = srvit_eval.draw_maps(fresh, x, relative=True)
    # the middle of the ramp: no bright or dark patches
    assert pixels(uniform) == {bytes(srvit_eval.colour(0.5))}
    assert "weights uniform" in uniform.info["title"]
    torch.manual_seed(0)
    with torch.no_grad():
        for m in fresh.mixers:                              # routers that tell tokens apart
            for p in m.parameters():
                p.normal_(0, 1)
    varied = srvit_eval.draw_maps(fresh, x, relative=True)
    assert "weights uniform" not in varied.info["title"] and len(pixels(varied)) > 5
    assert "mixer 2 of 2" in varied.info["title"]           # -1: the last
    # block 1's mixer is mixer 1
    assert "mixer 1 of 2" in srvit_eval.draw_maps(fresh, x, mixer=1).info["title"]
    for bad in (0, 3, -3):
        with pytest.raises(runtime.UserError, match=r"this model has 2 mixers, numbered 1\.\.2"):
            srvit_eval.draw_maps(fresh, x, mixer=bad)


def test_weight_maps_paint_each_patch_where_it_lies(monkeypatch):
    # Weights on a ramp over the 4 x 4 patches (row-major), the class token apart: each 28 px
    # square of step r's map has the colour of its own patch's weight.
    model = tiny(depth=2, mixer="soft").eval()
    ramp = torch.zeros(1, 17, 2)                                                 # (n, T, R)
    ramp[0, 1:, 0] = torch.arange(16) / 15
    ramp[0, 1:, 1] = 1 - ramp[0, 1:, 0]
    ramp[0, 0] = torch.tensor([0.3, 0.7])
    monkeypatch.setattr(model, "forward", lambda x, return_mix=False: (None, [ramp]))
    picture = srvit_eval.draw_maps(model, images(1))
    for step in range(2):
        x0, y0 = 6 + (step + 1) * 118, 22 + 15                                   # the map's corner
        for patch in range(16):
            row, col = divmod(patch, 4)
            pixel = picture.getpixel((x0 + 28 * col + 14, y0 + 28 * row + 14))
            assert pixel == srvit_eval.colour(ramp[0, 1 + patch, step].item()), (step, patch)


def test_curve_plot_gives_every_line_its_own_colour_and_says_how_many_runs(monkeypatch):
    drawn = []
    monkeypatch.setattr(srvit_eval, "draw_lines",
                        lambda panel, series, title, *a: drawn.append((series, title)))
    groups = {("", 1, "-", "-"): [46.3, 46.9], ("", 4, "soft", "block"): [53.0],
              ("", 4, "last", "block"): [54.5],
              ("", 4, "soft", "stack"): [54.9], ("drop_path=0.1", 4, "soft", "block"): [53.0],
              ("router_init=last", 4, "soft", "block"): [54.0], ("L=2", 1, "-", "-"): [52.8]}
    srvit_eval.plot_curve(groups, paper=True)
    (ours, title), (paper, _) = drawn
    colours = [col for _, _, col, _ in ours]
    assert len(set(colours)) == len(colours) == 7, [(label, col) for label, _, col, _ in ours]
    assert dict((label, col) for label, _, col, _ in ours)["soft"] == srvit_eval.MIXER_COLOURS["soft"]
    assert "range" in title                                  # R=1 has two seeds
    deit = [pts for label, pts, _, _ in paper if label.startswith("DeiT-B")]
    assert len(deit) == 1 and len(deit[0]) == 1              # one model: one mark, not a line across R = 1..4
    assert "one model" in next(label for label, *_ in paper if label.startswith("DeiT-B"))
    drawn.clear()
    srvit_eval.plot_curve({("", 1, "-", "-"): [55.0], ("", 2, "soft", "block"): [57.0]})
    assert "one run each" in drawn[0][1] and "range" not in drawn[0][1]


# ----------------------------------------------------------------------------------------
# The GPU path, checked where a CPU can show it, and the node check (results/node_check.py)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (the node check runs these there)")


@needs_gpu
def test_gpu_batched_decode_gives_the_cpu_decoders_pixels_within_rounding():
    # nvJPEG and libjpeg round the inverse DCT and the colour upsampling differently: a small mean
    # difference, never a different picture.
    args, _, _ = deit_augment()
    aug, g = loaders.DeviceAugment(args, torch.device("cuda")), torch.Generator().manual_seed(3)
    files = [encoded(smooth_image(g, 375, 500)) for _ in range(8)]
    decoded = aug.decode(files, [f"{i}.jpg" for i in range(8)])
    assert aug.cpu_decoded == 0 and all(im.is_cuda for im in decoded)
    for got, data in zip(decoded, files, strict=True):
        diff = (got.cpu().int() - loaders.cpu_decode(data, "x.jpg").int()).abs()
        assert diff.float().mean() <= 2.0 and diff.max() <= 64, (diff.float().mean(), diff.max())


@needs_gpu
def test_gpu_run_trains_saves_and_evaluates_as_it_recorded(tmp_path):
    out = str(tmp_path / "run")
    on_gpu = [("cuda" if a == "cpu" else a) for a in FAKE]                         # bf16 where the GPU has it
    train.main(on_gpu + ["--depth", "2", "--epochs", "1", "--out-dir", out])
    saved = epoch_rows(out)[-1][3]                                                  # its top-1
    amp = torch.load(os.path.join(out, "last.pt"), weights_only=True)["args"]["amp"]   # as training evaluated
    res = srvit_eval.main(["--checkpoint", os.path.join(out, "last.pt"), "--device", "cuda", "--workers",
                           "0", "--amp", amp])
    assert res["images"] == 64 and abs(res["top1"] - saved) <= 2 * 100 / 64       # two images may flip

def test_every_loader_sends_uint8_through_shared_memory_and_the_device_normalises(tmp_path):
    # What loader workers hand over crosses /dev/shm: uint8 pixels (or file bytes), never float32.
    root = make_image_folder(tmp_path / "data", n=8, size=100)
    env = SimpleNamespace(rank=0, world=1, micro=4, device=torch.device("cpu"), log=lambda *a: None)
    for loader_kind in ("pil", "device"):
        args = train.get_args(["--data-path", root, "--recipe", "deit", "--img-size", "96", "--patch-size",
                               "16", "--loader", loader_kind, "--workers", "0", "--batch-size", "4",
                               "--erasing", "1"])
        train_loader, val, _, _ = loaders.build_loaders(args, env)
        crossing = next(iter(train_loader.loader))                 # what the workers' DataLoader yields
        assert crossing[0].dtype == torch.uint8, loader_kind          # pixels, or the files' bytes
        # no floats: the erasing noise is drawn on the device; the device path's draws are one int64 table
        # (the affine matrices' bits among its columns), the batch's one copy to the device
        floats = [t for t in crossing if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert not floats, loader_kind
        if loader_kind == "device":
            tables = [t for t in crossing if isinstance(t, torch.Tensor) and t.dtype == torch.long]
            assert len(tables) == 1 and tables[0].shape == (4, 19)
        val_batch = next(iter(val.loader))
        assert val_batch[0].dtype == torch.uint8 and val_batch[0].shape[1:] == (3, 96, 96)
        x, _ = next(iter(val))                                     # normalised on the device
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in loaders.MEAN_STD["imagenet"])
        torch.testing.assert_close(x, (val_batch[0] / 255 - mean) / std, atol=1e-5, rtol=0)


@needs_gpu
def test_gpu_device_path_gives_the_cpu_device_paths_batches_within_rounding(tmp_path):
    # The same draws through the device path on the GPU and on the CPU: the same pictures up to nvJPEG's
    # and the kernels' rounding (a tensor on the wrong device or in the wrong dtype would show).
    g = torch.Generator().manual_seed(4)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / "data" / split / name)
            for i in range(8):
                smooth_image(g, 120, 100).save(tmp_path / "data" / split / name / f"{i}.jpg", quality=90)
    flags = ["--data-path", str(tmp_path / "data"), "--loader", "device", "--recipe", "deit", "--img-size",
             "96", "--patch-size", "16", "--batch-size", "8", "--workers", "0"]
    batches = {}
    for device in ("cpu", "cuda"):
        args = train.get_args(flags + ["--device", device])
        env = SimpleNamespace(rank=0, world=1, micro=8, device=torch.device(device), log=lambda *a: None)
        loader = loaders.build_loaders(args, env)[0]
        loader.set_epoch(1)
        batches[device] = [(x.cpu(), y.cpu()) for x, y in loader]
    std = torch.tensor(loaders.mean_std(96)[1]).view(1, 3, 1, 1)
    assert len(batches["cuda"]) == len(batches["cpu"]) == 2
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert torch.equal(y_cpu, y_gpu)
        diff = ((x_cpu - x_gpu) * std * 255).abs()                                  # in 0..255 units
        assert diff.mean() <= 3.0, diff.mean()


def test_erasing_noise_is_standard_normal_and_each_box_s_own_whatever_its_batch():
    def noise(boxes):
        table = loaders.erasing_table(boxes)
        return loaders.erasing_noise(table, loaders.noise_size(table))
    a, b = (0, 0, 40, 50, 11), (5, 7, 30, 20, 12)                        # (top, left, h, w, noise seed)
    both = noise([a, None, b])
    assert both.shape == (3 * 40 * 50 + 3 * 30 * 20,) and both.dtype == torch.float32
    assert torch.equal(both, torch.cat([noise([a]), noise([None, b])]))    # a box's noise is its own
    assert not torch.equal(noise([b]), noise([b[:4] + (13,)]))             # another seed, other noise
    many = noise([(0, 0, 200, 200, seed) for seed in range(5)])              # 600,000 values
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1) < 0.01  # (standard errors 0.0013, 0.0009)
    within = [(many.abs() < k).float().mean().item() for k in (1, 2, 3)]
    assert all(abs(w - p) < 0.005 for w, p in zip(within, (0.6827, 0.9545, 0.9973))), within
    assert noise([None, None]).numel() == 0


def test_erasing_as_one_masked_copy_equals_pasting_each_box():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, 12, generator=g)
    boxes = torch.tensor([[0, 0, 3, 4], [0, 0, 0, 0], [5, 2, 7, 10], [11, 11, 1, 1], [2, 3, 4, 2]])
    noise = [torch.randn(3, h, w, generator=g) for _, _, h, w in boxes.tolist()]
    want = x.clone()
    for b, (i, j, h, w) in enumerate(boxes.tolist()):
        want[b, :, i:i + h, j:j + w] = noise[b]
    got = loaders.erase(x, boxes, torch.cat([n.flatten() for n in noise]))
    assert torch.equal(got, want)
    assert torch.equal(loaders.erase(x, torch.zeros(5, 4, dtype=torch.long), torch.zeros(0)), x)


def test_device_path_sends_only_the_files_nvjpeg_does_not_take_to_the_cpu_and_counts_them(monkeypatch):
    _, aug, _ = deit_augment()
    g = torch.Generator().manual_seed(0)
    data = [encoded(smooth_image(g, 40, 50, mode), fmt)
            for mode, fmt in (("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"),
                              ("RGB", "JPEG"))]
    items = [loaders.SeededDraws([((d, f"{i}.jpg"), 0)], aug)[0, 7] for i, d in enumerate(data)]
    takes = aug.collate(items)[-1]                    # from each file's header, read in the worker
    assert takes == [True, False, True, False, True]
    given = []

    def gpu(files, device, augment):                  # nvJPEG, standing in: refuses the last file
        given.append(len(files))
        if any(torch.equal(f, data[4]) for f in files):
            raise RuntimeError("Failed to decode batch: 4")
        return [loaders.cpu_decode(f, "x") for f in files]
    monkeypatch.setattr(loaders, "gpu_decode", gpu)
    aug.device = SimpleNamespace(type="cuda")                     # as on a GPU, without one
    monkeypatch.setattr(aug, "to_device", lambda t: t)
    images = aug.decode(data, [f"{i}.jpg" for i in range(5)], takes)
    # the 3 it takes as one batch (refused), then one by one; CMYK, PNG and the refused one on the CPU
    assert given == [3, 1, 1, 1] and aug.cpu_decoded == 3
    assert all(torch.equal(im, loaders.cpu_decode(d, "x")) for im, d in zip(images, data, strict=True))
    note = loaders.cpu_decode_note(SimpleNamespace(augment=aug))
    assert note == " | 3 images decoded on the CPU (CMYK, PNG or others nvJPEG does not take)"
    assert loaders.cpu_decode_note(SimpleNamespace()) == ""
    monkeypatch.setattr(loaders, "gpu_decode", lambda *a: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):              # a device fault is not hidden
        aug.decode(data[:1], ["0.jpg"], [True])
    loader = loaders.DeviceLoader(SimpleNamespace(sampler=loaders.RepeatedAugSampler(8, 0, 1, 1, 0),
                                                  batch_size=4), aug)
    loader.set_epoch(1)                                            # counted per epoch
    assert aug.cpu_decoded == 0


def test_the_loader_bound_line_names_a_remedy_that_fits_the_loader():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    deit = train.get_args(["--data", "imagenet", "--loader", "device"])
    assert "more workers cannot help" in loaders.loader_remedy(deit, cuda)
    assert "--micro-batch" not in loaders.loader_remedy(deit, cuda)       # (it is the per-rank batch already)
    deit.loader = "pil"
    assert "--loader device" in loaders.loader_remedy(deit, cuda)
    assert "--workers" in loaders.loader_remedy(deit, cpu)
    assert "--batch-size" in loaders.loader_remedy(train.get_args(["--data", "cifar10"]), cuda)


def test_resume_from_a_folder_or_a_missing_file_is_refused_before_the_data_is_read(tmp_path):
    os.makedirs(tmp_path / "run")
    for path, said in ((tmp_path / "run", "is a folder: pass the checkpoint in it, e.g. its last.pt"),
                       (tmp_path / "run" / "last.pt", "no such file")):
        with pytest.raises(runtime.UserError, match=re.escape(f"--resume {path}: {said}")):
            train.get_args(["--data", "fake", "--resume", str(path)])
    # a picture or a cut-short checkpoint given to --resume, and a model that cannot be built: said by
    # get_args, before any image is read
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.jpg")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    for path in (tmp_path / "cat.jpg", tmp_path / "cut.pt"):
        said = f"cannot read {re.escape(str(path))} .*not a whole PyTorch checkpoint .*A train.py checkpoint"
        with pytest.raises(runtime.UserError, match=said):
            train.get_args(["--data", "fake", "--resume", str(path)])
    with pytest.raises(runtime.UserError, match="cannot build the model: embed_dim 192 is not divisible by "
                                                "num_heads 5"):
        train.get_args(["--data", "fake", "--embed-dim", "192", "--num-heads", "5"])


def test_files_of_the_class_folders_that_are_not_pictures_are_named_not_left_out_silently(tmp_path):
    root = make_image_folder(tmp_path / "data", n=4)
    for name in ("train/cat/a.heic", "train/cat/b.HEIC", "train/dog/notes", "val/dog/x.gif"):
        (tmp_path / "data" / name).write_bytes(b"not one torchvision reads")
    lines = []
    env = runtime.Env(device=torch.device("cpu"), micro=4)
    env.log = lines.append
    _, _, _, n_train = loaders.build_loaders(train.get_args(["--data-path", root, "--device", "cpu",
                                                             "--workers", "0", "--batch-size", "4"]), env)
    assert n_train == 8
    assert ("left out 4 files of the class folders that are not pictures train.py reads (2 .heic, 1 .gif, "
            "1 no suffix); convert them to JPEG or PNG to use them") in lines, lines


def test_a_run_that_decodes_into_memory_says_so_before_it_decodes(monkeypatch):
    # A CPU user's first line comes at once, not after the decode (CIFAR-10's takes 12 s and more)
    lines, real_decode_all = [], loaders.decode_all

    def decode_all(dataset, workers):
        assert lines and lines[0].startswith("decoding 256 + 64 images into memory on cpu"), lines
        return real_decode_all(dataset, workers)
    monkeypatch.setattr(loaders, "decode_all", decode_all)
    env = runtime.Env(device=torch.device("cpu"), micro=32)
    env.log = lines.append
    loaders.build_loaders(train.get_args(FAKE + ["--workers", "0"]), env)
    assert len(lines) == 2 and lines[1].startswith("decoded 256 + 64 images into memory on cpu in ")


def test_a_batch_larger_than_the_data_says_where_the_batch_came_from(tmp_path):
    root = make_image_folder(tmp_path / "data", n=8, size=100)          # > 64 px: DeiT's recipe, batch 1024
    env = SimpleNamespace(rank=0, world=1, micro=1024, device=torch.device("cpu"), log=print)
    for flags, said in (([], "a batch of 1024 (the deit recipe's); lower --batch-size"),
                        (["--batch-size", "32"], "a batch of 32; lower --batch-size")):
        with pytest.raises(runtime.UserError, match=re.escape(f"only 16 training images for {said}")):
            loaders.build_loaders(train.get_args(["--data-path", root, "--workers", "0", *flags]), env)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")     # (none start)
def test_a_small_dev_shm_is_named_at_start(tmp_path, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "data", n=8, size=100)
    args = train.get_args(["--data-path", root, "--loader", "pil", "--workers", "8", "--batch-size", "4"])
    lines = []
    env = SimpleNamespace(rank=0, world=1, micro=4, device=torch.device("cpu"), log=lines.append)
    # Docker's 64 MB, then 64 GB that other jobs have filled but for 64 MB, then 64 GB free
    for total, free in ((64 * 2**20, 64 * 2**20), (64 * 2**30, 64 * 2**20)):
        lines.clear()
        shm = SimpleNamespace(total=total, free=free)
        monkeypatch.setattr(loaders.shutil, "disk_usage", lambda path: shm)
        loaders.build_loaders(args, env)
        assert any("/dev/shm has 64 MiB free" in line and "--shm-size" in line for line in lines), lines
    lines.clear()
    # the first rank of each node says it for its node (rank 0 only prints through env.log); the others not
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(loaders.socket, "gethostname", lambda: "node7")
    with monkeypatch.context() as on_node_7:
        for rank, local_rank, said in ((8, 0, True), (9, 1, False)):
            on_node_7.setattr(loaders, "launch_env", lambda: (rank, 16, local_rank, 8))
            loaders.check_shared_memory(8, 4, 224, env)
            printed = capsys.readouterr().out
            assert ("/dev/shm" in printed) == said, printed
            assert not said or "warning on node7 (rank 8): /dev/shm has 64 MiB free" in printed, printed
            assert not lines
    monkeypatch.setattr(loaders.shutil, "disk_usage", lambda path: SimpleNamespace(total=64 * 2**30,
                                                                                    free=64 * 2**30))
    loaders.build_loaders(args, env)
    assert not any("/dev/shm" in line for line in lines)


def test_an_out_dir_without_file_locks_is_named_as_such(tmp_path, monkeypatch):
    out = runtime.OutDir(str(tmp_path / "run"), master=True)

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runtime.fcntl, "flock", no_locks)
    with pytest.raises(runtime.UserError, match="does not support file locks .*local disk") as e:
        out.open()
    assert "in use" not in str(e.value) and out.lock_file is None


def test_resume_with_more_epochs_extends_the_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = FAKE + ["--depth", "1", "--subset", "64", "--out-dir", out]
    train.main(args + ["--epochs", "1"])
    capsys.readouterr()
    train.main(args + ["--epochs", "2"])
    said = capsys.readouterr().out
    assert [r[0] for r in epoch_rows(out)] == [1, 2]
    assert "--epochs 2 (the run was started with 1)" in said and "epoch 2/2" in said
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["epochs"] == 2
    # the recipe's 1 warm-up epoch, clipped to a fifth of the 1-epoch run, stays as the run started it
    assert ckpt["args"]["warmup_epochs"] == pytest.approx(0.2)


def node_check_script():
    """results/node_check.py (a script beside its outputs, not a package), as a module."""
    if os.path.join(HERE, "results") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "results"))
    import node_check
    return node_check


@slow
def test_node_check_runs_every_section_on_a_cpu_and_reports_failures(tmp_path, monkeypatch):
    node_check = node_check_script()
    roomy_shm = SimpleNamespace(total=2**36, free=2**36)                 # (this machine's own may be small)
    monkeypatch.setattr(node_check.shutil, "disk_usage", lambda path: roomy_shm)
    report = node_check.main(["--small", "--out", str(tmp_path), "--compile-backend", "eager", "--device",
                              "cpu"])
    md = (tmp_path / "node-check.md").read_text()
    for title in ("## Machine", "## Decode", "## Speed", "## DDP: 2 ranks, SIGTERM, resume"):
        assert title in md
    assert report.failures == [] and "Result: every check passed" in md
    data = json.loads((tmp_path / "node-check.json").read_text())
    assert len(data["sections"]["speed"]) == 4 and len(data["sections"]["ddp"]) == 2      # R 1, 4 x compile
    # A failing check is marked, with what to do: a corrupting decode, a small /dev/shm.
    small_shm = SimpleNamespace(total=2**30, free=2**20)
    monkeypatch.setattr(node_check.shutil, "disk_usage", lambda path: small_shm)
    decode = loaders.DeviceAugment.decode
    monkeypatch.setattr(loaders.DeviceAugment, "decode",
                        lambda self, *a: [im // 2 for im in decode(self, *a)])
    report = node_check.main(["--small", "--out", str(tmp_path), "--skip", "speed", "ddp", "--device", "cpu"])
    md = (tmp_path / "node-check.md").read_text()
    assert "check(s) FAILED" in md and "FAIL: " in md and "--shm-size" in md and "--loader pil" in md
    # /dev/shm, and the decode against the CPU and of the odd files against PIL
    assert len(report.failures) == 3


def test_node_check_counts_the_pictures_read_changed_after_their_batch_is_dropped(monkeypatch):
    # The GPU-only row's counting, on the CPU: the GPU's wait stood in by nothing, a decode that hands the
    # second batch's pictures changed (as a reused block would be) is counted picture by picture.
    node_check = node_check_script()
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    files = [torch.full((3, 4, 5), i, dtype=torch.uint8) for i in range(7)]       # stand-ins, decoded as is
    want = torch.tensor([int(f.sum(dtype=torch.int64)) for f in files])
    calls = []

    def decode(chunk):
        calls.append(len(chunk))
        return [f + 1 if len(calls) == 2 else f.clone() for f in chunk]
    cpu = torch.device("cpu")
    assert node_check.reads_after_drop(files, 3, cpu, lambda chunk: [f.clone() for f in chunk], want) == 0
    assert node_check.reads_after_drop(files, 3, cpu, decode, want) == 3 and calls == [3, 3, 1]


def test_node_check_reports_a_section_that_fails_and_goes_on_and_exits_1(tmp_path, monkeypatch):
    node_check = node_check_script()
    argv = ["--small", "--out", str(tmp_path), "--skip", "speed", "ddp", "--device", "cpu"]

    def out_of_memory(report, *a):
        report.section("decode", "Decode", ["case", "images", "largest", "mean", "result"])
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(node_check, "decode_check", out_of_memory)
    monkeypatch.setattr(node_check, "tests", lambda report, args: report.section("tests", "Tests", ["a"]))
    with pytest.raises(SystemExit) as e:
        node_check.check_node(argv + ["--tests", "quick"])
    assert e.value.code == 1
    md = (tmp_path / "node-check.md").read_text()
    assert "| the section stopped | - | - | - | FAIL: OutOfMemoryError: CUDA out of memory" in md
    assert "smaller --batch" in md and "## Machine" in md and "## Tests" in md     # before and after it
    # a section that stops the check (Ctrl-C) still leaves the report of what ran
    monkeypatch.setattr(node_check, "decode_check", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    os.remove(tmp_path / "node-check.md")
    with pytest.raises(KeyboardInterrupt):
        node_check.main(argv)
    md = (tmp_path / "node-check.md").read_text()
    assert "## Machine" in md and "INTERRUPTED in the decode section" in md


def test_node_check_gives_the_tests_what_its_time_limit_leaves(tmp_path, monkeypatch):
    node_check = node_check_script()
    waited = []

    @contextlib.contextmanager
    def never_ends(command, env, log_path, cwd=None):       # a suite that runs past any timeout
        def wait(timeout):
            waited.append(timeout)
            raise subprocess.TimeoutExpired(command, timeout)
        yield SimpleNamespace(wait=wait, poll=lambda: None, log=lambda: "....")
    monkeypatch.setattr(node_check, "job", never_ends)
    rows = {}
    with monkeypatch.context() as standing:
        standing.setattr(node_check, "time", SimpleNamespace(time=lambda: 10_000.0))   # a clock that stands
        for limit, used in ((600, 590), (600, 300), (5000, 0)):      # seconds of the check, and used so far
            report = node_check.Report(str(tmp_path))
            args = SimpleNamespace(tests="quick", time_limit=limit, started=10_000.0 - used)
            node_check.tests(report, args)
            rows[used] = (report.data["tests"][-1][-1], report.failures, report.incomplete)
    # not run, or cut short by --time-limit: not the node's failure, but the report says it is incomplete
    assert rows[590][0].startswith("not run: under a minute of --time-limit 600 s") and not rows[590][1]
    assert rows[300][0].startswith("stopped after 300 s: what --time-limit 600 s left") and not rows[300][1]
    assert rows[590][2] == ["the tests did not run"]
    assert rows[300][2] == ["the tests were stopped by --time-limit"]
    assert rows[0][0].startswith("FAIL: stopped after 420 s") and rows[0][1] and not rows[0][2]  # a hang
    assert waited == [300, 420]
    report = node_check.Report(str(tmp_path))
    report.incomplete.append("the tests did not run")
    report.write("cpu")
    assert "Result: INCOMPLETE (the tests did not run); every check that ran passed" in \
        (tmp_path / "node-check.md").read_text()
    # on a GPU node the quick part is the suite's not-slow tests and, of the slow ones, those that start ranks
    words = node_check.QUICK_TESTS.split(" or ")
    assert words[0] == "not slow"
    for name, test in globals().items():
        if name.startswith("test_") and any(mark.name == "slow" for mark in getattr(test, "pytestmark", [])):
            starts_ranks = "torch.distributed.run" in inspect.getsource(test)
            assert starts_ranks == any(word in name for word in words[1:]), name


def test_node_check_refuses_a_report_folder_it_cannot_write_and_a_zero_batch_before_the_work(tmp_path):
    node_check = node_check_script()
    (tmp_path / "a-file").write_text("")
    argv = ["--small", "--device", "cpu", "--skip", "decode", "speed", "ddp"]
    with pytest.raises(runtime.UserError, match="cannot write there"):
        node_check.main(argv + ["--out", str(tmp_path / "a-file")])
    with pytest.raises(runtime.UserError, match="--batch must be >= 1"):
        node_check.main(argv + ["--out", str(tmp_path / "report"), "--batch", "0"])
    assert not (tmp_path / "report").exists()                       # refused before anything was made


def test_node_check_links_each_picture_into_a_long_epoch(tmp_path):
    node_check = node_check_script()
    for split in ("train", "val"):
        os.makedirs(tmp_path / "data" / split / "c0")
        for i in range(2):
            (tmp_path / "data" / split / "c0" / f"{i}.jpg").write_bytes(bytes([i]) * 10)
    linked = node_check.linked_copies(str(tmp_path / "data"), 3)
    train_files = sorted(os.listdir(os.path.join(linked, "train", "c0")))
    assert len(train_files) == 6 and len(os.listdir(os.path.join(linked, "val", "c0"))) == 2
    # the DDP section's: a validation image for each of 8 ranks, beside the speed section's folder
    for_ranks = node_check.linked_copies(str(tmp_path / "data"), 2, val_copies=4)
    assert len(os.listdir(os.path.join(for_ranks, "val", "c0"))) == 8 and for_ranks != linked
    assert node_check.get_args(["--device", "cpu"]).tests == "none"
    assert sorted(open(os.path.join(linked, "train", "c0", f), "rb").read() for f in train_files) == \
        [bytes([0]) * 10] * 3 + [bytes([1]) * 10] * 3
    for argv in ([], ["--small"], ["--small", "--batch", "100"]):        # one epoch holds every timed step
        args = node_check.get_args(argv)
        epoch = loaders.RepeatedAugSampler(args.images * args.copies, 0, 1, 3, 0)    # DeiT's sampler
        steps = args.loader_iters + node_check.warmup_steps(args.loader_iters)
        assert len(epoch) // args.batch >= steps, argv


# ----------------------------------------------------------------------------------------
# Bad input: every file read, folder walked and file written (README "Bad input" lists the cases)

def test_the_device_loader_names_an_empty_a_dangling_or_an_unreadable_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.mkdir(tmp_path / "folder.jpg")                                   # read() of a folder fails too
    for name in ("empty.jpg", "dangling.jpg", "folder.jpg"):
        with pytest.raises(runtime.UserError, match=f"cannot read image .*{name}.*move it out of the data"):
            loaders.read_encoded(str(tmp_path / name))


@contextlib.contextmanager
def pipe_released(path, after=1.0):
    """A named pipe at path that any reader blocked on it leaves (its write end is opened and closed
    every `after` seconds until the block ends), so code that waits on it fails a test instead of
    hanging the suite. Yields a list that holds True once some reader was found waiting."""
    os.mkfifo(path)
    waited, done = [], threading.Event()

    def release():
        while not done.wait(after):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))   # fails (ENXIO) when no reader waits
                waited.append(True)
            except OSError:
                pass
    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    try:
        yield waited
    finally:
        done.set()
        releaser.join()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_a_named_pipe_or_a_device_named_like_an_image_is_refused_not_waited_on(tmp_path):
    from PIL import Image
    os.symlink("/dev/null", tmp_path / "device.jpg")       # a device (/dev/zero's reading would never end)
    classify = functools.partial(srvit_eval.classify, tiny())
    for read in (loaders.read_encoded, loaders.read_image, classify):   # device path, PIL path, eval.classify
        with pipe_released(tmp_path / "pipe.jpg") as waited:
            with pytest.raises(runtime.UserError, match="pipe.jpg .*not a regular file but a named pipe"):
                read(str(tmp_path / "pipe.jpg"))
        assert not waited
        os.remove(tmp_path / "pipe.jpg")
        with pytest.raises(runtime.UserError, match="device.jpg .*not a regular file but a device"):
            read(str(tmp_path / "device.jpg"))
    os.makedirs(tmp_path / "data" / "a")
    os.makedirs(tmp_path / "data" / "b")
    Image.new("RGB", (16, 12)).save(tmp_path / "data" / "b" / "1.png")
    with pipe_released(tmp_path / "data" / "a" / "0.png") as waited:   # sorts first: the size probe skips it
        assert loaders.image_size(str(tmp_path / "data")) == (16, 12) and not waited
        with pytest.raises(runtime.UserError, match="0.png .*named pipe"):   # the start-up check names it
            loaders.check_headers(loaders.ClassFolders(str(tmp_path / "data")))


def test_the_image_size_comes_from_many_files_and_survives_a_decompression_bomb(tmp_path, monkeypatch):
    from PIL import Image
    for cls in ("a", "b"):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            Image.new("RGB", (16, 12)).save(tmp_path / cls / f"{i}.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "a" / "0-first-icon.png")         # sorts first
    Image.new("RGB", (60, 60)).save(tmp_path / "b" / "0-bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                         # 60 x 60 > 2 x 1000: a bomb
    assert loaders.image_size(str(tmp_path)) == (16, 12)
    os.makedirs(tmp_path / ".ipynb_checkpoints")                                  # hidden: not a class
    assert loaders.image_size(str(tmp_path)) == (16, 12)


def test_an_animated_gif_is_its_first_frame_and_pictures_in_sub_folders_set_the_size(tmp_path):
    import io
    from PIL import Image
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    got = loaders.cpu_decode(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), "a.jpg")
    pil = np.array(loaders.to_rgb(Image.open(io.BytesIO(buffer.getvalue()))))     # the PIL path's reading
    assert torch.equal(got, torch.from_numpy(pil).permute(2, 0, 1)) and got[0, 0, 0] == 255   # red
    # pictures only in sub-folders of each class, as the dataset lists them
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / c / "sub")
        Image.new("RGB", (48, 40)).save(tmp_path / "train" / c / "sub" / "0.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not a picture")
    assert loaders.image_size(str(tmp_path / "train")) == (48, 40)


def test_hidden_folders_are_not_classes(tmp_path):
    root = make_image_folder(tmp_path / "data", n=4)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, ".ipynb_checkpoints"))
    args = train.get_args(["--data-path", root, "--device", "cpu"])
    assert loaders.build_dataset(args, "train", None)[1] == ["cat", "dog"]


def test_class_mismatch_names_the_classes(tmp_path):
    with pytest.raises(runtime.UserError, match="only in train: cat; only in validation: cow"):
        loaders.check_same_classes(["cat", "dog"], ["cow", "dog"], str(tmp_path))
    with pytest.raises(runtime.UserError, match="the same classes in another order"):
        loaders.check_same_classes(["cat", "dog"], ["dog", "cat"], str(tmp_path))


def test_resume_beside_a_broken_best_pt_is_one_line(tmp_path):
    out = str(tmp_path / "run")
    args = FAKE + ["--depth", "1", "--subset", "64", "--epochs", "1", "--out-dir", out]
    train.main(args)
    with open(os.path.join(out, "best.pt"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    message = user_error(args + ["--epochs", "2"], "cannot read", "best.pt", "move it aside")
    assert "delete" not in message


def test_a_truncated_last_pt_points_at_best_pt_and_a_fresh_start_keeps_the_rows(tmp_path):
    out = str(tmp_path / "run")
    args = FAKE + ["--depth", "1", "--subset", "64", "--out-dir", out]
    train.main(args + ["--epochs", "1"])
    last = os.path.join(out, "last.pt")
    data = open(last, "rb").read()
    with open(last, "wb") as f:
        f.write(data[:len(data) // 2])
    message = user_error(args + ["--epochs", "2"], "not a whole PyTorch checkpoint (cut short, or another "
                         "kind of file). A train.py checkpoint", f"--resume {out}/best.pt")
    assert "delete" not in message
    os.remove(last)                                          # what the old message told the user to do
    user_error(args + ["--epochs", "2"], "holds 1 epoch of metrics but no last.pt", "best.pt")
    assert [r[0] for r in epoch_rows(out)] == [1]            # nothing lost
    train.main(args + ["--epochs", "2", "--resume", os.path.join(out, "best.pt")])
    assert [r[0] for r in epoch_rows(out)] == [1, 2]


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):

    def no_space(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runtime, "open", no_space, raising=False)     # the lock file cannot be made
    with pytest.raises(runtime.UserError, match="cannot write in --out-dir .*No space left"):
        runtime.OutDir(str(tmp_path / "run"), master=True).open()


def test_a_full_disk_while_appending_a_metrics_row_leaves_no_torn_row(tmp_path, monkeypatch):
    out = runtime.OutDir(str(tmp_path), master=True)
    out.append_metrics({"type": "epoch", "epoch": 1})
    before = open(out.metrics).read()
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runtime.os, "write", half_then_full)
    with pytest.raises(runtime.UserError, match="could not write .*metrics.jsonl .*disk full"):
        out.append_metrics({"type": "epoch", "epoch": 2})
    assert open(out.metrics).read() == before


def test_a_console_that_has_gone_ends_the_printing_not_the_run(tmp_path, monkeypatch):
    # `python train.py ... | head`: the pipe closes after a few lines; the run trains and saves to the end.
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = str(tmp_path / "run")
    train.main(FAKE + ["--depth", "1", "--epochs", "2", "--out-dir", out])
    assert [row[0] for row in epoch_rows(out)] == [1, 2]
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 2


def test_torn_and_blank_metrics_lines_are_read_and_repaired(tmp_path):
    out = runtime.OutDir(str(tmp_path / "run"), master=True)
    os.makedirs(out.path)
    rows = [{"type": "run", "args": {}, "config": {}}, {"type": "epoch", "epoch": 1, "top1": 10.0}]
    with open(out.metrics, "w") as f:
        f.write(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + '{"type": "epoch", "ep')
    out.repair_metrics(1, [rows[1]])
    assert read_metrics(out.path) == rows
    shutil.copytree(os.path.join(HERE, "results", "cifar10-deep2", "R1-s0"), tmp_path / "R1")
    with open(tmp_path / "R1" / "metrics.jsonl", "a") as f:
        # a blank line, a kill mid-row: --curve reads on
        f.write('\n{"type": "epo')
    assert srvit_eval.read_run(str(tmp_path / "R1"))["final_top1"] == 66.96
    assert [runtime.json_row(line) for line in ("", "{", "[1]", '{"a": 1}')] == [None, None, None, {"a": 1}]


def test_curve_reads_a_run_extended_with_more_epochs_and_names_a_row_it_cannot_read(tmp_path):
    with open(os.path.join(HERE, "results", "cifar10-deep2", "R1-s0", "metrics.jsonl")) as f:
        run_row = json.loads(f.readline())
    first, extended = ({**run_row, "args": {**run_row["args"], "epochs": n}} for n in (2, 3))
    epochs = [{"type": "epoch", "epoch": e, "top1": top1, "elapsed": 10.0 * e}
              for e, top1 in ((1, 50.0), (2, 60.0))]
    os.makedirs(tmp_path / "run")

    def write(*rows):
        (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(first, *epochs, extended, {"type": "epoch", "epoch": 3, "top1": 55.0, "elapsed": 30.0})
    row = srvit_eval.read_run(str(tmp_path / "run"))       # the best epoch, the last epoch, the last leg
    assert (row["best_top1"], row["final_top1"], row["epochs"], row["finished"]) == (60.0, 55.0, 3, True)
    write(first, *epochs, extended)                        # extended, not yet trained further
    assert srvit_eval.read_run(str(tmp_path / "run"))["finished"] is False
    for broken in ({**epochs[1], "top1": None}, {"type": "epoch", "epoch": 2}):
        write(first, epochs[0], broken)
        with pytest.raises(runtime.UserError, match=r"metrics.jsonl holds a row train.py does not write "
                                                    r"\((TypeError|KeyError)"):
            srvit_eval.read_run(str(tmp_path / "run"))


def test_a_failed_write_after_the_work_is_one_line_and_leaves_no_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runtime.UserError, match=r"could not write .*file/out.json"):
        runtime.write_json(str(tmp_path / "file" / "out.json"), {"a": 1})
    runtime.write_json(str(tmp_path / "ok.json"), {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["file", "ok.json"]                  # no .tmp left behind


class FullDiskFile:
    """A file on a full disk, as Python's buffered files meet it: write() fills a buffer and returns;
    the flush that puts it on disk writes half and fails, and so does close(), which still closes."""
    def __init__(self, path, mode="r", *a, **k):
        self.file, self.pending = open(path, mode, *a, **k), ""

    def write(self, text):
        self.pending += text
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.pending:
            self.file.write(self.pending[:len(self.pending) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        try:
            self.flush()
        finally:
            self.file.close()

    def __getattr__(self, name):          # fileno, seek, read, truncate: the real file's
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_a_full_disk_found_when_a_file_is_closed_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "open", FullDiskFile, raising=False)
    # a result written after the work: no half a JSON renamed into place
    with pytest.raises(runtime.UserError, match=r"could not write .*out.json .*No space left"):
        runtime.write_json(str(tmp_path / "out.json"), {"rows": list(range(100))})
    assert os.listdir(tmp_path) == []
    # the lock's holder line: one line, and the start leaves no trace (no folder, no lock)
    out = runtime.OutDir(str(tmp_path / "new" / "run"), master=True)
    with pytest.raises(runtime.UserError, match="cannot write in --out-dir .*No space left"):
        out.open()
    assert os.listdir(tmp_path) == [] and out.lock_file is None
    # resume's repair of metrics.jsonl: the old file stays whole, no .tmp beside it
    os.makedirs(out.path)
    (tmp_path / "new" / "run" / "train.lock").write_text("")
    rows = [{"type": "epoch", "epoch": 1}, {"type": "epoch", "epoch": 2}]
    with open(out.metrics, "w") as f:
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(runtime.UserError, match="could not rewrite .*metrics.jsonl .*Nothing is lost"):
        out.repair_metrics(2, rows)
    assert open(out.metrics).read() == json.dumps(rows[0]) + "\n"
    assert sorted(os.listdir(out.path)) == ["metrics.jsonl", "train.lock"]


def test_class_folders_skip_hidden_files_and_folders_and_walk_a_link_loop_once(tmp_path):
    from PIL import Image
    want = []
    for index, name in enumerate(("cat", "dog")):
        os.makedirs(tmp_path / name / "more")
        for i, sub in enumerate(("", "", "more")):
            path = str(tmp_path / name / sub / f"{i}.png")
            Image.new("RGB", (8, 8)).save(path)
            want.append((path, index))
        (tmp_path / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")     # macOS's metadata
        os.makedirs(tmp_path / name / ".ipynb_checkpoints")
        Image.new("RGB", (8, 8)).save(tmp_path / name / ".ipynb_checkpoints" / "0-checkpoint.png")
        os.symlink("..", tmp_path / name / "more" / "loop")                    # more/loop -> the class folder
    samples = loaders.ClassFolders(str(tmp_path)).samples
    assert sorted(samples) == sorted(want), samples
    assert [os.path.dirname(p) for p, _ in samples] == sorted(os.path.dirname(p) for p, _ in samples)


def test_two_links_to_one_folder_list_its_pictures_once_whatever_order_the_disk_lists_them(tmp_path,
                                                                                           monkeypatch):
    # The folder behind two links is walked once, through the first link by name: the same sample
    # paths (so the same --subset draw and the same checkpoint's data record) on every filesystem.
    from PIL import Image
    os.makedirs(tmp_path / "cat" / "real")
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "real" / "0.png")
    for link in ("a", "z"):
        os.symlink("real", tmp_path / "cat" / link)
    listed = loaders.pictures_in(str(tmp_path / "cat"), lambda path: True)
    scandir = os.scandir

    class Backwards:                        # a filesystem that lists entries in the other order
        def __init__(self, path):
            with scandir(path) as entries:
                self.entries = iter(sorted(entries, key=lambda entry: entry.name, reverse=True))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)
    monkeypatch.setattr(os, "scandir", Backwards)
    assert loaders.pictures_in(str(tmp_path / "cat"), lambda path: True) == listed
    assert listed == [str(tmp_path / "cat" / "a" / "0.png")]


def test_classify_reads_a_16_bit_picture_as_its_8_bit_twin():
    from PIL import Image
    model = tiny(depth=1)
    grey = np.linspace(0, 255, 32 * 32).round().astype(np.uint8).reshape(32, 32)
    eight, sixteen = Image.fromarray(grey), Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    x8, x16 = srvit_eval.preprocess(model, eight), srvit_eval.preprocess(model, sixteen)
    assert (x8 - x16).abs().max() < 1e-6                                  # (white, unscaled: about 3)


# ----------------------------------------------------------------------------------------
# What a newcomer hits: one-line argparse errors, curve groups, messages, start-up lines

def test_argparse_errors_are_one_line_with_help(capsys):
    for argv, fragment in ((["--depth", "two"], "--depth: invalid int value: 'two'"),
                           (["--mixer", "softmax"], "--mixer: invalid choice: 'softmax'")):
        assert runtime.cli(train.main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err and "--help" in err and "usage" not in err, err


def test_a_shared_error_on_another_rank_waits_for_rank_0_to_say_it(monkeypatch, capsys):
    # A bad flag: each rank hits it; rank 0 prints it, the others wait for torchrun to end them. Before,
    # rank 1 could exit first, and torchrun ended rank 0 before it printed (seen 1 run in 6). Rank 1 says
    # it only if rank 0 did not meet it (another node's disk).
    slept = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "x"),
                        ("MASTER_ADDR", "localhost")):
        monkeypatch.setenv(name, value)

    def failing(agreed):
        def main(argv):
            raise runtime.UserError("--depth must be > 0", shared=True, agreed=agreed)
        return main
    assert runtime.cli(failing(True)) == 2 and capsys.readouterr().err == ""
    assert slept == [runtime.SHARED_ERROR_WAIT]
    assert runtime.cli(failing(False)) == 2
    assert capsys.readouterr().err == "error (rank 1): --depth must be > 0\n"
    monkeypatch.setenv("RANK", "0")
    assert runtime.cli(failing(True)) == 2 and capsys.readouterr().err == "error: --depth must be > 0\n"
    assert len(slept) == 2                                                        # rank 0 does not wait


def test_a_picture_given_to_resume_is_said_once_by_rank_0_under_torchrun(tmp_path, monkeypatch, capsys):
    # every rank reads the same --resume file: its error is shared, so rank 1 waits for rank 0 to say it
    slept = []
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "x"),
                        ("MASTER_ADDR", "localhost")):
        monkeypatch.setenv(name, value)
    picture = tmp_path / "cat.jpg"
    picture.write_bytes(b"\xff\xd8\xff\xe0" + bytes(60))       # a JPEG's first bytes, no checkpoint
    argv = FAKE + ["--resume", str(picture), "--out-dir", str(tmp_path / "run")]
    assert runtime.cli(train.main, argv) == 2
    assert slept == [runtime.SHARED_ERROR_WAIT]          # (torchrun ends this rank once rank 0 has said it)
    assert capsys.readouterr().err.startswith(f"error (rank 1): cannot read {picture}")


def test_a_rank_whose_peer_has_gone_says_one_line(monkeypatch, capsys):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("TORCHELASTIC_RUN_ID", "x"),
                        ("MASTER_ADDR", "localhost")):
        monkeypatch.setenv(name, value)

    def raising(error):
        def main(argv):
            raise error
        return main
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500")
    with pytest.raises(RuntimeError, match="closed by peer"):      # before the ranks met: not a peer gone
        runtime.cli(raising(gloo))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    assert runtime.cli(raising(gloo)) == 2
    err = capsys.readouterr().err
    assert err == (f"error (rank 1): stopped because another rank ended the run ({gloo}); that rank's "
                   f"message says why\n")
    with pytest.raises(RuntimeError, match="a bug"):                      # anything else stays a traceback
        runtime.cli(raising(RuntimeError("a bug")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="closed by peer"):             # one process has no peer
        runtime.cli(raising(gloo))


@slow
def test_a_failed_write_on_rank_0_is_one_line_on_every_rank_under_torchrun(tmp_path):
    out = tmp_path / "run"
    (out / "best.pt").mkdir(parents=True)                  # rank 0 cannot write its first best.pt
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *FAKE, "--epochs", "2", "--out-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = res.stderr.split("elastic/multiprocessing")[0]          # what the ranks said, before torchrun
    assert res.returncode != 0 and "Traceback" not in ranks, res.stderr[-3000:]
    assert "error (rank 0): could not write" in ranks and "error (rank 1): stopped because" in ranks, ranks


@slow
def test_a_shared_error_under_torchrun_reaches_the_user(tmp_path):
    # Three runs (the lost line was seen 1 run in 6; the order itself is tested in-process above).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *FAKE, "--depth", "0", "--out-dir", str(tmp_path / "run")]
    for attempt in range(3):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode != 0 and res.stderr.count("error: --depth must be > 0") == 1, \
            (attempt, res.stderr[-2000:])


def test_curve_groups_by_every_setting_that_changes_the_result_and_counts_a_seed_once(tmp_path, capsys):
    def run(name, seed, top1, lacks=(), **changes):
        config = asdict(srvit.SRViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64,
                                          num_layers=6, num_heads=4, depth=4))
        args = {**dict(data="cifar10", epochs=1, lr=1e-3, batch_size=128, drop_path=0.0, seed=seed,
                       subset=None, workers=0, out_dir=name, schedule="cosine"), **changes}
        args = {key: value for key, value in args.items() if key not in lacks}   # (a run before the flag)
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"type": "run", "config": config, "args": args, "params": 1, "gmacs": 0.1}) + "\n" +
            json.dumps({"type": "epoch", "epoch": 1, "top1": top1, "elapsed": 1.0}) + "\n")
    run("a-s0", 0, 50.0), run("a-s1", 1, 52.0), run("again-s1", 1, 54.0, workers=4)   # workers change nothing
    run("sub-s0", 0, 40.0, subset=1000), run("cifar100-s0", 0, 30.0, data="cifar100")
    run("older-s0", 0, 45.0, lacks=("schedule",))              # DeiT's schedule, as the code did then
    rows = srvit_eval.main(["--curve", str(tmp_path / "*")])
    variants = {r["run"]: r["variant"] for r in rows}
    assert variants["sub-s0"] == "subset=1000" and variants["cifar100-s0"] == "data=cifar100"
    assert variants["older-s0"] == "schedule=deit"
    assert variants["a-s0"] == variants["again-s1"] == ""
    out = capsys.readouterr().out
    # seed 1 twice: its runs' mean (53) counts once beside seed 0's 50
    assert "| 4 | soft | block | - | 2; seed 1 run 2 times, counted once | 51.50 (50.00-53.00) |" in out
    assert "grouped by every setting that changes the result" in out and "subset=None" in out
    assert "most common value" in out and "schedule=cosine" in out


def test_eval_takes_a_run_folder_as_its_best_checkpoint(trained_runs, capsys):
    res = srvit_eval.main(["--checkpoint", str(trained_runs / "R1"), "--device", "cpu", "--workers", "0"])
    assert res["checkpoint"].endswith(os.path.join("R1", "best.pt"))
    assert "is a run's folder: evaluating its best.pt" in capsys.readouterr().err


def test_a_corrupt_warm_start_file_is_not_told_to_load_with_weights_only_false(tmp_path):
    ckpt = tmp_path / "deit.pth"
    torch.save({"model": tiny().state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])                          # cut short
    with pytest.raises(ValueError, match="not a whole PyTorch checkpoint") as e:
        srvit.load_pretrained(tiny(), str(ckpt))
    assert "weights_only=False" not in str(e.value)
    torch.save({"model": tiny().state_dict(), "extra": SimpleNamespace(a=1)}, ckpt)   # whole, with an object
    with pytest.raises(ValueError, match="weights_only=False"):
        srvit.load_pretrained(tiny(), str(ckpt))


def test_a_file_that_is_not_a_checkpoint_says_what_was_expected(tmp_path):
    picture = tmp_path / "cat.jpg"
    smooth_image(torch.Generator().manual_seed(0), 20, 20).save(picture)
    for load in (runtime.read_checkpoint, srvit_eval.load_model):
        with pytest.raises(runtime.UserError, match="not a whole PyTorch checkpoint") as e:
            load(str(picture))
        assert "delete" not in str(e.value)
    os.mkdir(tmp_path / "last.pt")                          # there, but no file: named, not "not found"
    with pytest.raises(runtime.UserError, match="last.pt is not a checkpoint file but a folder"):
        runtime.read_checkpoint(str(tmp_path / "last.pt"))


def test_the_default_out_dir_keeps_a_quick_subset_run_apart():
    quick, real = (train.get_args(["--data", "cifar10", "--device", "cpu",
                                   *flags]) for flags in (["--subset", "500"], []))
    assert quick.out_dir != real.out_dir and "-n500-" in quick.out_dir


def test_the_start_up_lines_say_what_the_recipe_set_and_clip_a_long_warm_up(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", n=8, size=100)
    train.main(["--data-path", root, "--device", "cpu", "--recipe", "deit", "--img-size", "32",
                "--patch-size", "16", "--embed-dim", "16", "--num-layers", "1", "--num-heads", "2",
                "--batch-size", "8", "--epochs", "1", "--workers", "0", "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "recipe deit: 1 epoch," in out and "1 epochs" not in out
    recipe_line = next(line for line in out.splitlines() if line.startswith("from the deit recipe"))
    for said in ("--warmup-epochs 0.2 (its 5 warm-up epochs, clipped to a fifth of the run as it started), ",
                 "--min-lr 1e-05, ", "--mixup 0.8, ", "--randaug 9, ", "--repeated-aug 3, ",
                 "--schedule deit", "--lr 7.8125e-06"):      # every setting the recipe gave, not the flags
        assert said in recipe_line, recipe_line
    assert not any(flag in recipe_line for flag in ("--epochs", "--img-size", "--batch-size", "--embed-dim"))
    assert train.get_args(["--data", "cifar10", "--epochs", "3"]).warmup_epochs == 1         # shorter: kept
    user_error(FAKE + ["--epochs", "2", "--warmup-epochs", "2"],
               "--warmup-epochs 2 is not shorter than --epochs 2")


def test_a_resume_before_the_first_evaluation_says_so(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    args = FAKE + ["--depth", "1", "--subset", "64", "--epochs", "1", "--out-dir", out]
    lr_at, calls = train.lr_at, []

    def signal_at_step_1(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(*a)
    monkeypatch.setattr(train, "lr_at", signal_at_step_1)
    with pytest.raises(runtime.Stopped):
        train.main(args)
    monkeypatch.setattr(train, "lr_at", lr_at)
    capsys.readouterr()
    train.main(args)
    said = capsys.readouterr().out
    assert ": 0 epochs and 1 step done, not evaluated yet" in said, said
    subsets = ([], ["--subset", "64"], ["--val-subset", "32"], ["--subset", "64", "--val-subset", "32"])
    names = {train.get_args(["--data", "fake"] + extra).out_dir for extra in subsets}
    assert len(names) == 4, names                  # a quick run on subsets keeps apart from the real run


@pytest.mark.parametrize("loader", ["pil", "device", "memory"])
def test_a_broken_validation_image_stops_the_run_at_start_not_after_an_epoch(tmp_path, monkeypatch, loader):
    root = make_image_folder(tmp_path / "data", n=4, size=72 if loader == "device" else 32)
    (tmp_path / "data" / "val" / "dog" / "zz-broken.jpg").write_bytes(b"not a JPEG")
    trained = []
    monkeypatch.setattr(train, "train_one_epoch", lambda *a: trained.append(1))
    user_error(["--data-path", root, "--device", "cpu", "--loader", loader, "--batch-size", "4",
                "--workers", "0", "--out-dir", str(tmp_path / "run")], "cannot read image", "zz-broken.jpg")
    assert not trained


def test_a_run_that_fails_before_its_first_save_leaves_the_out_dir_as_it_found_it(tmp_path):
    root = make_image_folder(tmp_path / "data", n=4)
    (tmp_path / "data" / "train" / "dog" / "zz-broken.jpg").write_bytes(b"not a JPEG")   # found mid-epoch
    argv = ["--data-path", root, "--device", "cpu", "--loader", "pil", "--batch-size", "4", "--workers", "0"]
    fresh = tmp_path / "fresh"
    user_error(argv + ["--out-dir", str(fresh)], "cannot read image", "zz-broken.jpg")
    assert not fresh.exists()
    mine = tmp_path / "mine"                          # a folder of the user's: only what the run made goes
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    user_error(argv + ["--out-dir", str(mine)], "zz-broken.jpg")
    assert sorted(os.listdir(mine)) == ["notes.txt"]
    user_error(argv + ["--out-dir", str(tmp_path / "new" / "deeper" / "run")], "zz-broken.jpg")
    assert not (tmp_path / "new").exists()                # and the parent folders it made for itself


@slow
def test_a_failed_start_on_another_rank_leaves_no_out_dir_on_rank_0(tmp_path):
    # Rank 1's share of the validation files holds the broken one (the odd indices: cat/1.jpg), so
    # rank 0 sets up (folder, lock) and learns of the failure only when the ranks compare results.
    root = make_image_folder(tmp_path / "data", n=4)
    (tmp_path / "data" / "val" / "cat" / "1.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "runs" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), "--data-path", root, "--device", "cpu", "--loader", "pil",
           *FAST, "--batch-size", "4", "--workers", "0", "--out-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "cannot read image" in res.stderr and "(rank 1)" in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists(), os.listdir(tmp_path / "runs")


# ----------------------------------------------------------------------------------------
# Bad input, a third pass: output paths, other data under one count, unreadable places, numbers

def test_an_output_never_replaces_a_checkpoint_or_a_run_s_metrics(trained_runs):
    run = trained_runs / "R1"
    before = {name: (run / name).read_bytes() for name in ("best.pt", "metrics.jsonl")}
    for argv, said in ((["--checkpoint", str(run), "--json", str(run / "best.pt")], "--json"),
                       (["--curve", str(run), "--json", str(run / "metrics.jsonl")], "--json"),
                       (["--curve", str(run), "--plot", str(run / "last.pt")], "--plot"),
                       (["--curve", str(run), "--plot", str(run)], "is a folder")):
        with pytest.raises(runtime.UserError, match=re.escape(said)):
            srvit_eval.main(argv)
    with pytest.raises(runtime.UserError, match=r"--plot .*curve: name a picture file \(\.png"):
        srvit_eval.main(["--curve", str(run), "--plot", str(run.parent / "curve")])
    assert {name: (run / name).read_bytes() for name in before} == before


def test_other_class_names_under_the_same_count_are_refused_on_resume_and_in_eval(tmp_path):
    make_image_folder(tmp_path / "ab", classes=("a", "b"), n=4)
    make_image_folder(tmp_path / "cd", classes=("cat", "dog"), n=4)
    args = ["--device", "cpu", "--loader", "pil", *FAST, "--batch-size", "4", "--epochs", "1",
            "--out-dir", str(tmp_path / "run")]
    train.main(["--data-path", str(tmp_path / "ab"), *args])
    user_error(["--data-path", str(tmp_path / "cd"), *args, "--epochs", "2"], "another data",
               "class 1: 'a' then, 'cat' now")
    with pytest.raises(runtime.UserError, match="class 1: 'a' then, 'cat' now.*trained on"):
        srvit_eval.main(["--checkpoint", str(tmp_path / "run"), "--data-path", str(tmp_path / "cd"),
                         "--workers", "0", "--device", "cpu"])
    # --data-path alone means a folder, as in train.py (it was ignored for a run on --data fake)
    train.main(FAKE + ["--depth", "1", "--epochs", "1", "--num-classes", "2", "--out-dir",
                       str(tmp_path / "fk")])
    with pytest.raises(runtime.UserError, match="class 1: 'class 0' then, 'a' now"):   # the folder was read
        srvit_eval.main(["--checkpoint", str(tmp_path / "fk"), "--data-path", str(tmp_path / "ab"),
                         "--workers", "0", "--device", "cpu"])
    user_error(FAKE + ["--data-path", str(tmp_path / "ab")], "--data fake makes up its images")
    user_error(["--data-path", str(tmp_path / "ab"), "--num-classes", "5"], "a folder's classes are its")


def test_an_unreadable_folder_and_a_single_class_are_one_line(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", n=4)
    os.makedirs(tmp_path / "data" / "train" / "cat" / "more")
    args = ["--data-path", root, "--device", "cpu", "--loader", "pil", *FAST, "--batch-size", "4",
            "--out-dir", str(tmp_path / "run")]
    scandir, listdir = os.scandir, os.listdir

    def refuse(under):                      # as a folder at chmod 000 does (this test may run as root)
        def opener(path="."):
            if str(path).endswith(under):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return (scandir if opener.kind == "scandir" else listdir)(path)
        return opener
    for kind, under in (("scandir", "more"), ("listdir", "train")):       # inside a class; the split itself
        with monkeypatch.context() as patched:
            opener = refuse(under)
            opener.kind = kind
            patched.setattr(os, kind, opener)
            user_error(args, f"cannot read the folder {root}/train", "Permission denied", "chmod")
    shutil.rmtree(tmp_path / "data" / "train" / "dog")
    shutil.rmtree(tmp_path / "data" / "val" / "dog")
    user_error(args, "the train split has one class (cat): a classifier needs two or more")


def test_a_folder_that_cannot_be_written_fails_at_start_and_each_failed_write_says_its_cause(tmp_path,
                                                                                             monkeypatch):
    real_open = open

    def read_only(path, *args, **kwargs):   # a folder at chmod 555 (this test may run as root)
        if "write-test" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(runtime, "open", read_only, raising=False)
    user_error(FAKE + ["--out-dir", str(tmp_path / "run")], "cannot write in --out-dir", "Permission denied")
    monkeypatch.undo()
    assert not (tmp_path / "run").exists()
    out = runtime.OutDir(str(tmp_path / "run"), master=True).open()
    for error, said in ((PermissionError(errno.EACCES, "Permission denied"), "give this user write access"),
                        (OSError(errno.ENOSPC, "No space left on device"), "is the disk full? Free space")):
        monkeypatch.setattr(runtime.torch, "save", lambda *args, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(runtime.UserError, match=re.escape(said)):
            out.save({}, out.last)
    out.close(failed=False)


def test_an_unreadable_checkpoint_and_metrics_file_say_what_they_are(tmp_path, monkeypatch, trained_runs):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    with monkeypatch.context() as patched:
        patched.setattr(srvit.torch, "load", denied)
        with pytest.raises(runtime.UserError) as e:
            runtime.read_checkpoint(str(trained_runs / "R1" / "last.pt"))
    assert "give this user read access" in str(e.value) and "best.pt" not in str(e.value)
    metrics = tmp_path / "metrics.jsonl"
    rows = (trained_runs / "R1" / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    metrics.write_bytes(rows[0] + b'{"type": "epoch", \xff\xfe torn}\n' + b"".join(rows[1:]))
    assert [runtime.json_row(line) for line in runtime.read_lines(str(metrics))].count(None) == 1
    metrics.unlink()
    metrics.mkdir()
    with pytest.raises(runtime.UserError, match="a run's metrics file, readable by this user, was expected"):
        runtime.read_lines(str(metrics))


def test_numbers_out_of_reach_are_refused_before_the_run(monkeypatch):
    for flags, said in ((["--mixup", "inf"], "--mixup must be 0 (off) or >= 0.01"),
                        (["--cutmix", "1e-320"], "--cutmix must be 0 (off) or >= 0.01"),
                        (["--weight-decay", "inf"], "--weight-decay must be >= 0, got inf"),
                        (["--seed", str(10**23)], "--seed must be within +-2^63"),
                        (["--workers", "100000"], "--workers must be in 0..256, got 100000"),
                        (["--repeated-aug", str(10**9)], "--repeated-aug must be in 1..64 (DeiT: 3)"),
                        (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.001")):
        with pytest.raises(runtime.UserError, match=re.escape(said)):
            train.get_args(FAKE + flags)
    args = train.get_args(FAKE)
    out_of_memory = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                 "memory")
    monkeypatch.setattr(srvit, "SRViT", lambda config: (_ for _ in ()).throw(out_of_memory))
    with pytest.raises(runtime.UserError, match="cannot build the model: out of memory"):
        train.build_model(args, 10)


def test_a_nan_validation_loss_stops_before_anything_is_saved(tmp_path, monkeypatch):
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: {**evaluate(*args, **kwargs),
                                                                   "val_loss": float("nan")})
    out = tmp_path / "run"
    user_error(FAKE + ["--depth", "1", "--epochs", "1", "--out-dir", str(out)],
               "the validation loss is nan at epoch 1; stopped before saving")
    assert not out.exists()                       # nothing saved: the failed start leaves no trace


def test_pictures_without_an_agreed_8_bit_scale_are_refused_not_made_black():
    from PIL import Image
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    with pytest.raises(ValueError, match="F pixels up to 1, not 8 or 16 bits"):
        loaders.to_rgb(Image.fromarray(ramp))                       # mode F: convert made it black
    eight = (ramp * 255).round().astype(np.int32)
    as_int = Image.fromarray(eight)                                  # 8-bit values in a 32-bit "I" picture
    assert as_int.mode == "I" and np.array_equal(np.asarray(loaders.to_rgb(as_int))[..., 0], eight)
    with pytest.raises(ValueError, match="not 8 or 16 bits"):
        loaders.to_rgb(Image.fromarray(eight * 70000))


def test_a_warm_start_of_another_width_names_train_py_s_flags(trained_runs, tmp_path):
    user_error(FAKE + ["--embed-dim", "64", "--init-from", str(trained_runs / "R1" / "best.pt"), "--out-dir",
                       str(tmp_path / "run")], "checkpoint is a ViT of width 32",
               "(train.py: --model, or --embed-dim, --patch-size)")


def test_every_planted_bug_of_results_mutants_finds_its_line_once():
    # results/mutants.py plants each bug by replacing one line; a line renamed since would make its bug
    # fail to plant when the page is next rebuilt: found here, when the rename is made
    sys.path.insert(0, os.path.join(HERE, "results"))
    try:
        import mutants
    finally:
        sys.path.pop(0)
    assert len({name for name, *_ in mutants.BUGS}) == len(mutants.BUGS)          # names are unique
    for name, path, old, new in mutants.BUGS:
        text = open(os.path.join(HERE, path)).read()
        assert text.count(old) == 1 and old != new, name


def loader_lines(root):
    """build_loaders' log lines and its number of training images, for a class-folder tree on the CPU."""
    lines = []
    env = runtime.Env(device=torch.device("cpu"), micro=4)
    env.log = lines.append
    _, _, _, n_train = loaders.build_loaders(train.get_args(["--data-path", root, "--device", "cpu",
                                                             "--workers", "0", "--batch-size", "4"]), env)
    return lines, n_train


def test_a_link_in_a_class_folder_to_the_split_or_another_class_lists_no_picture_under_it(tmp_path):
    # Through such a link the walk of one class listed the other classes' pictures under it: {cat: 16,
    # dog: 16} for 4 + 4 pictures, mislabelled without a word. Not followed now, and named.
    from collections import Counter
    root = make_image_folder(tmp_path / "data", n=4)
    split = tmp_path / "data" / "train"
    os.symlink("..", split / "cat" / "up")                                 # the split's folder
    os.symlink(os.path.join("..", "dog"), split / "cat" / "dogs")          # another class's folder
    os.symlink(os.path.join("..", ".."), split / "dog" / "top")            # above the split: val/ too
    data = loaders.ClassFolders(str(split))
    assert Counter(data.classes[i] for _, i in data.samples) == {"cat": 4, "dog": 4}
    assert sorted(data.samples) == sorted((str(split / c / f"{i}.jpg"), data.classes.index(c))
                                          for c in ("cat", "dog") for i in range(4))
    links = [str(split / "cat" / "dogs"), str(split / "cat" / "up"), str(split / "dog" / "top")]
    assert data.not_walked == links
    lines, n_train = loader_lines(root)
    assert n_train == 8
    assert (f"left out 3 folders inside class folders that are also the split's folder, a folder above it "
            f"or another class's ({', '.join(links)}), not walked: each would list other classes' pictures "
            f"under its class") in lines, lines


def test_files_beside_the_class_folders_are_named_and_a_class_folder_link_to_nowhere_is_refused(tmp_path):
    # Both were dropped silently: a loose file at the class level, and a link to a class folder on a disk
    # not mounted (the whole class gone, the run training on the others).
    from PIL import Image
    root = make_image_folder(tmp_path / "data", n=4)
    split = tmp_path / "data" / "train"
    Image.new("RGB", (8, 8)).save(split / "loose.png")
    (split / "d.tar.gz").write_bytes(b"\x1f\x8b an archive")
    (split / ".DS_Store").write_bytes(b"Finder's")                   # hidden: left out without a word
    lines, n_train = loader_lines(root)
    assert n_train == 8
    assert (f"left out 2 files beside the class folders, in no class ({split / 'd.tar.gz'}, "
            f"{split / 'loose.png'}); move a picture into its class's folder to use it") in lines, lines
    assert loaders.ClassFolders(str(split)).loose == [str(split / "d.tar.gz"), str(split / "loose.png")]
    os.symlink(tmp_path / "unmounted" / "bird", split / "bird")
    said = (f"{re.escape(str(split / 'bird'))} is a link to {re.escape(str(tmp_path / 'unmounted' / 'bird'))}"
            f", which does not exist \\(a disk not mounted\\?\\): mount it, or remove the link$")
    with pytest.raises(runtime.UserError, match=said):
        loaders.ClassFolders(str(split))
    with pytest.raises(runtime.UserError, match=said):       # (train.py's first look at the folder)
        loaders.image_size(str(split))


def test_a_cuda_call_failing_in_the_stable_abi_jpeg_decoder_is_a_device_fault_not_a_bad_file(monkeypatch):
    # torchvision 0.29's decoder (torch's stable ABI) says only where a CUDA call failed, its "out of
    # memory" dropped: taken for a bad file, the batch went to the CPU without a word
    _, aug, _ = deit_augment()
    aug.device = torch.device("cuda")                                # (nothing reaches the device here)
    monkeypatch.setattr(aug, "to_device", lambda x: x)
    jpeg = encoded(smooth_image(torch.Generator().manual_seed(2), 40, 50), "JPEG")
    fault = RuntimeError("Error while decoding JPEG images: CUDA API call failed at /__w/vision/vision/"
                         "torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp, line 412")
    assert loaders.is_device_fault(fault)
    assert loaders.is_device_fault(RuntimeError("nvjpeg api CALL FAILED at decode.cpp, line 9"))
    monkeypatch.setattr(loaders, "gpu_decode", lambda *a: (_ for _ in ()).throw(fault))
    with pytest.raises(RuntimeError, match="API call failed at .*line 412"):
        aug.decode([jpeg], ["x.jpg"])
    assert aug.cpu_decoded == 0
    assert not loaders.is_device_fault(RuntimeError("Error while decoding JPEG images: Failed to decode "
                                                    "batch: 4"))                  # a file nvJPEG refuses


def test_a_crop_over_32_times_the_output_side_is_averaged_down_first_and_stays_near_the_plain_resize(
        monkeypatch):
    # CUDA's antialiased bicubic fails ("Too much shared memory required") past about 47 x the output
    # side; a crop over 32 x is first averaged over k x k blocks. Checked on the CPU at S = 8.
    image = torch.from_numpy(np.array(smooth_image(torch.Generator().manual_seed(3), 420, 330)))
    image = image.permute(2, 0, 1).contiguous()                                  # (3, 420, 330) uint8
    pooled, avg_pool2d = [], F.avg_pool2d

    def spy(x, kernel, *args, **kw):
        pooled.append((tuple(x.shape[-2:]), list(kernel)))
        return avg_pool2d(x, kernel, *args, **kw)
    monkeypatch.setattr(F, "avg_pool2d", spy)

    def plain(top, left, h, w):
        crop = image[None, :, top:top + h, left:left + w].float()
        return F.interpolate(crop, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    out = loaders.resized_crop(image, 5, 7, 400, 300, 8)                        # 50 x and 37.5 x
    assert pooled == [((400, 300), [2, 2])]
    diff = (out - plain(5, 7, 400, 300)).abs()          # in levels of 255: mean < 0.1, max < 0.5
    assert out.shape == (1, 3, 8, 8) and diff.mean() < 0.1 and diff.max() < 0.5, (diff.mean(), diff.max())
    # a side that k does not divide: its last pixel is dropped (401 = 2 * 200 + 1), as written out
    out = loaders.resized_crop(image, 3, 11, 401, 120, 8)
    crop = image[None, :, 3:403, 11:131].float()
    assert pooled[1:] == [((401, 120), [2, 1])]
    assert torch.equal(out, F.interpolate(avg_pool2d(crop, [2, 1]), size=(8, 8), mode="bicubic",
                                          align_corners=False, antialias=True))
    # at 32 x and under: the one resize, as before
    assert torch.equal(loaders.resized_crop(image, 0, 0, 256, 200, 8), plain(0, 0, 256, 200))
    assert len(pooled) == 2


# ----------------------------------------------------------------------------------------
# eval.py and results/bench.py, a reviewer's pass: outputs, a closed stdout, long labels, ranges

def test_an_eval_output_is_never_the_checkpoint_another_output_or_a_run_s_metrics(tmp_path):
    ckpt, run, png = tmp_path / "model.pth", tmp_path / "run", str(tmp_path / "p.png")
    ckpt.write_bytes(b"weights")                         # refused before it is read: any bytes do
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "metrics-until-epoch-3.jsonl").write_text("{}\n")          # rows a resume kept aside
    (tmp_path / "link.json").symlink_to(ckpt)
    for argv, said in ((["--checkpoint", str(ckpt), "--json", str(ckpt)],
                        f"--json {ckpt} is the checkpoint it evaluates, which this would replace"),
                       (["--checkpoint", str(ckpt), "--json", str(tmp_path / "link.json")],
                        "link.json is the checkpoint it evaluates"),
                       (["--checkpoint", str(ckpt), "--json", png, "--maps", png],
                        f"--maps {png} is the file --json writes"),
                       (["--curve", str(run), "--json", png, "--plot", png],
                        f"--plot {png} is the file --json writes"),
                       (["--curve", str(run), "--json", str(run / "metrics-until-epoch-3.jsonl")],
                        "metrics-until-epoch-3.jsonl is the metrics of a run")):
        with pytest.raises(runtime.UserError, match=re.escape(said)):
            srvit_eval.main(argv + ["--device", "cpu"])
    assert ckpt.read_bytes() == b"weights" and (run / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "model.pth", "run"]
    assert sorted(os.listdir(run)) == ["metrics-until-epoch-3.jsonl", "metrics.jsonl"]


def test_eval_piped_into_head_still_writes_its_files(trained_runs, tmp_path, monkeypatch):
    from PIL import Image

    class ClosedPipe:                           # stdout once `| head -1` has exited: every write fails
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    res = srvit_eval.main(["--checkpoint", str(trained_runs / "R3" / "last.pt"), "--device", "cpu",
                           "--workers", "0", "--maps", str(tmp_path / "m.png"), "--maps-images", "1",
                           "--json", str(tmp_path / "e.json")])
    assert sys.stdout.name == os.devnull                 # the printing went on, to nowhere
    sys.stdout.close()
    assert res["images"] == 64
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(res))
    with Image.open(tmp_path / "m.png") as im:                             # one row: the image and 3 steps
        assert im.size == (6 + 4 * 118, 22 + 1 * (15 + 118) + 40)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rows = srvit_eval.main(["--curve", str(trained_runs / "*"), "--json", str(tmp_path / "c.json"),
                            "--plot", str(tmp_path / "c.png")])
    sys.stdout.close()
    assert [r["run"] for r in json.loads((tmp_path / "c.json").read_text())] == [r["run"] for r in rows]
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (760, 380)


def test_a_curve_label_too_long_for_the_legend_is_cut_not_a_crash():
    variant = " ".join(f"setting{i}=value{i}" for i in range(7))       # a run that differs in many settings
    groups = {("", 1, "-", "-"): [55.0], ("", 4, "soft", "block"): [59.0],
              (variant, 4, "soft", "block"): [58.0]}
    assert max(len(label) for label, *_ in srvit_eval.curve_series(groups)) > 100
    im = np.asarray(srvit_eval.plot_curve(groups, paper=True))
    assert im.shape == (380, 760 + 520, 3)
    # the frame's bottom edge (y = 380 - 42) runs from x = 58 to the legend, 40 + 7 * 48 px from the right
    assert (im[338, 58:760 - 376] == 0).all() and (im[338, 760 - 370:760 - 300] == 255).all()


def test_curve_names_an_argument_that_held_no_run(tmp_path, capsys):
    config = asdict(srvit.SRViTConfig(img_size=32, patch_size=8, num_classes=10, depth=2))
    args = dict(data="cifar10", epochs=1, lr=1e-3, batch_size=128, seed=0)
    os.makedirs(tmp_path / "R2")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "R2" / "metrics.jsonl").write_text(
        json.dumps({"type": "run", "config": config, "args": args, "params": 1, "gmacs": 0.1}) + "\n" +
        json.dumps({"type": "epoch", "epoch": 1, "top1": 50.0, "elapsed": 1.0}) + "\n")
    typo, empty = str(tmp_path / "R2x"), str(tmp_path / "empty")
    rows = srvit_eval.main(["--curve", str(tmp_path / "R2"), typo, empty])
    assert [r["run"] for r in rows] == ["R2"]
    said = capsys.readouterr().err
    assert said == f"warning: no run (metrics.jsonl with an epoch) in {typo} {empty}: skipped\n", said
    with pytest.raises(runtime.UserError, match=re.escape(f"no finished runs (metrics.jsonl with an epoch) "
                                                          f"in {typo} {empty}")):
        srvit_eval.main(["--curve", typo, empty])


@pytest.mark.parametrize("script, flags, message", [
    ("eval", ["--maps-images", "1000000000"], "--maps-images must be in 1..64, got 1000000000"),
    ("eval", ["--workers", "300"], "--workers must be in 0..256, got 300"),
    ("eval", ["--workers", "-1"], "--workers must be in 0..256, got -1"),
    ("bench", ["--bench-loader", "--workers", "300"], "--workers must be in 0..256, got 300"),
    ("bench", ["--loader-cpu", "--bench-images", "4", "--batch-size", "8"],
     "--bench-images 4 is less than one batch (--batch-size 8): give at least 8, or a smaller --batch-size"),
    ("bench", ["--loader-cpu", "--bench-images", "10"],
     "--bench-images 10 is less than one batch (--batch-size 64)"),
])
def test_eval_and_bench_refuse_counts_out_of_range_before_any_work(tmp_path, script, flags, message):
    # eval: before it reads the checkpoint (here none); bench: in its argument checks
    if script == "eval":
        flags = ["--checkpoint", str(tmp_path / "x.pt"), "--maps", str(tmp_path / "m.png")] + flags
    with pytest.raises(runtime.UserError, match=re.escape(message)):
        (srvit_eval.main if script == "eval" else bench_script().get_args)(flags + ["--device", "cpu"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("capability, amp", [((7, 5), torch.float16), ((9, 0), torch.bfloat16)])
def test_bench_takes_train_py_s_default_precision_on_each_gpu(monkeypatch, capability, amp):
    # a T4 (7.5) computes bf16 slowly, by emulation: train.py runs fp16 there (runtime.default_amp)
    bench = bench_script()
    args = bench.get_args(BENCH + ["--depth", "1"])
    args.device = "cuda"                                 # no GPU needed: the bench stops at its first matmul

    class Measured(Exception):
        pass

    def ceiling(device, dtype):
        raise Measured(dtype)
    monkeypatch.setattr(bench, "matmul_ceiling", ceiling)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):       # bench sets them on a GPU
        monkeypatch.setattr(backend, "allow_tf32", backend.allow_tf32)
    with pytest.raises(Measured) as measured:
        bench.bench(args)
    assert measured.value.args == (amp,)
