"""Tests for SR-ViT: python -m pytest -q test_srvit.py  (a few minutes on a 2-core CPU)."""

import json
import math
import os
import shutil
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
