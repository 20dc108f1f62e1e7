"""
SR-ViT: the Soft Recursive Vision Transformer, in one file.

A Vision Transformer whose encoder re-applies weight-shared blocks R times ("recursion
depth") and mixes the outputs of all R steps, per token, with learned weights (SoftMoR,
Soft Mixture-of-Recursions). Lee and Park, arXiv 2607.00774. Only the abstract is public;
where the method is not pinned down there, this file follows our reading, written down in
README.md ("Our reading of the method").

    python srvit.py                   # parameters and forward GMACs of each preset, R = 1..4

    >>> from srvit import srvit_small
    >>> model = srvit_small(depth=4)    # 12 shared blocks, each applied 4 times, SoftMoR mixers
    >>> logits, mix = model(images, return_mix=True)   # mix[l]: (B, T, R) weights of mixer l
    >>> logits_2 = model(images, steps=2)              # anytime inference: the first 2 steps only
    >>> t = model.trace(images)    # t["steps"][l]: h_1..h_R of block l; t["mix"], t["anytime"]

What is re-applied, for L = 2 blocks f1, f2 and R = 3 steps (effective depth L*R = 6 either way):

    share="block" (default), one mixer per block     share="stack", one mixer
    x -> f1 -> f1 -> f1                              x -> f1 f2 -> f1 f2 -> f1 f2
         h1    h2    h3  -> mix_1 -> x'                      h1       h2       h3  -> mix -> x'
    x' -> f2 -> f2 -> f2 -> mix_2 -> x''

The file reads in the order the data flows: patches -> block -> mixer -> recursion -> head,
then presets, checkpoint loading and the cost table.

Shapes: B images, C channels, D width, p patch size, N = (H/p)(W/p) patches, T = N + 1 tokens
(class token first), L blocks, R recursion steps, k <= R steps actually run.
"""

import math
import os
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MIXERS = ("soft", "mean", "last")
SHARES = ("block", "stack")
INITS = ("timm", "torch")
LOOP_SCALES = ("none", "fixed", "learned")


@dataclass
class SRViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384        # D
    num_layers: int = 12        # L distinct (weight-shared) blocks
    num_heads: int = 6
    mlp_ratio: float = 4.0
    depth: int = 1              # R recursion steps; R = 1 is a plain DeiT
    mixer: str = "soft"         # how the R step outputs are combined: soft | mean | last
    share: str = "block"        # what is re-applied: each block R times, or the whole stack
    router_init: str = "uniform"  # a fresh soft mixer: "uniform" (= mean) or "last" (0.9 on step R)
    init: str = "timm"          # weights: "timm" (DeiT's, std 0.02) or "torch" (fan-in scaled; small widths)
    step_scale: bool = False    # beyond our reading of the paper: a learned scale on each step's update
    loop_scale: str = "none"    # beyond our reading: looped residual branches x 1/R ("fixed", "learned")
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self):
        # Every check a user can trip, with the fix in the message (ValueError, not an assert).
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"depth (recursion steps R) must be an integer >= 1, got {self.depth!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {self.share!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.loop_scale not in LOOP_SCALES:
            raise ValueError(f"loop_scale must be one of {LOOP_SCALES}, got {self.loop_scale!r}")
        if self.router_init not in ("uniform", "last"):
            raise ValueError(f"router_init must be 'uniform' or 'last', got {self.router_init!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                             f"choose a patch size that divides the image (e.g. 4 or 8 for 32 px, 16 "
                             f"for 224 px)")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------
# 1. Patches: image -> tokens

class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each to D numbers: one strided conv."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, self.in_chans = img_size, in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[2:] != (self.img_size, self.img_size):
            S = self.img_size
            raise ValueError(f"expected images of shape (B, {self.in_chans}, {S}, {S}), got "
                             f"{tuple(x.shape)}: resize or crop the input to {S} px, or build the model with "
                             f"img_size={x.shape[-1] if x.ndim == 4 else '...'}")
        x = self.proj(x)                      # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)   # (B, N, D)


# ----------------------------------------------------------------------------------------
# 2. The block: exactly DeiT's pre-norm Transformer block
#    x = x + drop_path(attn(norm1(x)));  x = x + drop_path(mlp(norm2(x)))

def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples,
    scaling the kept ones by 1/(1-p) so the expected output is unchanged."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - p)  # (B, 1, 1)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)          # each (B, heads, T, D/heads)
        x = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(d)) v, fused kernel
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out_dim=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One Transformer block f_l. The drop-path rate is an argument of forward, not an
    attribute: under recursion the same block is applied at several depths, and each
    application has its own rate. So are the branch scales (1 in DeiT; see SRViT.loop_scale)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, drop_prob=0.0, attn_scale=1.0, mlp_scale=1.0):
        x = x + drop_path(attn_scale * self.attn(self.norm1(x)), drop_prob, self.training)
        x = x + drop_path(mlp_scale * self.mlp(self.norm2(x)), drop_prob, self.training)
        return x


# ----------------------------------------------------------------------------------------
# 3. Mixers: combine the step outputs h_1..h_k of one recursion, per token
#    Each takes the list [h_1, ..., h_k], each (B, T, D), and returns (out (B, T, D), weights
#    a (B, T, k)) with out_t = sum_r a_{r,t} h_{r,t}. Returning a for all three makes them
#    comparable in plots. The steps stay a list: stacking them into one (B, T, k, D) tensor
#    costs a copy, and the weighted sum as k fused multiply-adds is several times faster on a
#    CPU than the batched matmul an einsum turns into.

class SoftMixer(nn.Module):
    """SoftMoR.  s_{r,t} = g(LayerNorm(h_{r,t})) + b_r,   a_{.,t} = softmax_r(s_{.,t}),
                 out_t   = sum_r a_{r,t} h_{r,t}
    g = Linear(D, D) -> GELU -> Linear(D, 1) is one router shared by all steps: it scores
    what a token looks like after a step, not which step it is; the step bias b carries the
    step's identity. The router's last layer and b start at zero, so a fresh model mixes
    the steps uniformly (it starts as the "mean" mixer) and learns to prefer steps.
    router_init="last" instead starts b so that the last step gets weight 0.9 (near plain recursion)."""

    def __init__(self, dim, depth, router_init="uniform"):
        super().__init__()
        self.router_init = router_init
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.router = Mlp(dim, dim, out_dim=1)             # g: fc1 (D -> D), GELU, fc2 (D -> 1)
        self.step_bias = nn.Parameter(torch.zeros(depth))  # b, one per recursion step
        self.reset_parameters()                            # a mixer built on its own starts uniform too

    def reset_parameters(self):
        # Also called by SRViT after its model-wide init, which would overwrite these zeros.
        nn.init.zeros_(self.router.fc2.weight)
        nn.init.zeros_(self.router.fc2.bias)
        nn.init.zeros_(self.step_bias)
        R = len(self.step_bias)
        if self.router_init == "last" and R > 1:   # softmax weight 0.9 on step R, 0.1 / (R-1) on each other
            with torch.no_grad():
                self.step_bias[-1] = math.log(9 * (R - 1))

    def score(self, h):
        """s_{r,t} without the step bias, for one step's tokens (B, T, D) -> (B, T). The router's
        last layer runs in fp32 even under autocast: rounded to bf16, scores of 4 to 8 carry
        errors of ~0.03, which the softmax turns into ~3% errors in the weight ratios."""
        hidden = self.router.act(self.router.fc1(self.norm(h)))         # (B, T, D), autocast dtype
        fc2 = self.router.fc2
        kind = h.device.type
        no_autocast = (torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind)
                       else nullcontext())                       # (the meta device has no autocast)
        with no_autocast:
            return F.linear(hidden.float(), fc2.weight.float(), fc2.bias.float()).squeeze(-1)

    def forward(self, hs):
        k = len(hs)
        scores = torch.stack([self.score(h) for h in hs], dim=-1)     # (B, T, k), fp32
        scores = scores + self.step_bias[:k].float()
        weights = scores.softmax(dim=-1)                        # (B, T, k), sums to 1 over steps
        a = weights.to(hs[0].dtype)
        out = sum(a[..., r, None] * h for r, h in enumerate(hs))   # (B, T, D)
        return out, weights


class MeanMixer(nn.Module):
    """a_{r,t} = 1/k: "average all stages", no parameters."""

    def forward(self, hs):
        k, (B, T, _) = len(hs), hs[0].shape
        return sum(hs) / k, hs[0].new_full((B, T, k), 1.0 / k, dtype=torch.float32)


class LastMixer(nn.Module):
    """out = h_k: plain recursion, the classic recursive Transformer. No parameters."""

    def forward(self, hs):
        k, (B, T, _) = len(hs), hs[0].shape
        weights = hs[0].new_zeros((B, T, k), dtype=torch.float32)
        weights[..., -1] = 1.0
        return hs[-1], weights


def build_mixer(kind, dim, depth, router_init="uniform"):
    return {"soft": lambda: SoftMixer(dim, depth, router_init), "mean": MeanMixer, "last": LastMixer}[kind]()


# ----------------------------------------------------------------------------------------
# 4. The model: embed -> recursive encoder -> head

class SRViT(nn.Module):
    """SRViT(config) or SRViT(**fields): fields as in SRViTConfig, keywords override config."""

    def __init__(self, config=None, **overrides):
        super().__init__()
        config = SRViTConfig(**{**(asdict(config) if config else {}), **overrides})
        self.config = cfg = config
        D, L, R = cfg.embed_dim, cfg.num_layers, cfg.depth

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))   # (1, T, D)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(L))
        # One mixer per recursion: L of them when each block recurses, one when the stack does.
        # With R = 1 there is nothing to mix, no mixer is built, and the model IS a DeiT.
        n_mixers = 0 if R == 1 else (L if cfg.share == "block" else 1)
        self.mixers = nn.ModuleList(build_mixer(cfg.mixer, D, R, cfg.router_init) for _ in range(n_mixers))
        # Off by default, and not part of our reading of the paper (README, "Beyond our reading"): one
        # learned scale per channel for each of the L*R block applications, in the order they run,
        # on the update the application makes: h <- h + g_i * (f(h) - h). It starts at 1, so a
        # fresh model computes what it computes without it; training can then shrink or grow each
        # step's update on its own, where the shared block alone must do the same thing every step.
        self.step_scale = nn.Parameter(torch.ones(L * R, D)) if cfg.step_scale else None   # (L*R, D)
        # Also off by default and beyond our reading: the residual branches of a looped block scaled
        # by 1/R, x <- x + attn(norm1(x)) / R, then x <- x + mlp(norm2(x)) / R, so that the R steps
        # together make about one block's update (refined R times) instead of R updates that pile up
        # in the residual stream. "fixed": 1/R (nothing to learn); "learned": one scale per channel
        # for each branch of each of the L*R applications, starting at 1/R (timm's LayerScale,
        # initialised at 1/R). R = 1 is unchanged by "fixed" (1/1) and, at the start, by "learned".
        self.loop_scale = (nn.Parameter(torch.full((L * R, 2, D), 1.0 / R)) if cfg.loop_scale == "learned"
                           else None)                                                    # (L*R, 2, D)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, cfg.num_classes)

        # Stochastic depth rises linearly over the L*R block applications, in the order they
        # run: block-sharing runs f_1 R times, then f_2 R times...; stack-sharing runs the
        # stack f_1..f_L, R times. Either way the deepest application gets drop_path_rate.
        n = L * R
        self.drop_path_rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.init_weights()

    def init_weights(self):
        # "timm" (DeiT's, the presets' and the ImageNet path's): trunc-normal(0.02) for Linear
        # weights, class token and position embedding; zero biases; LayerNorm (1, 0); the patch
        # conv keeps PyTorch's default.
        # "torch": every layer keeps PyTorch's default, uniform(+-1/sqrt(fan_in)) for weights and
        # biases, a scale that follows the width. At D=768 (where DeiT chose it) 0.02 is close to
        # 1/sqrt(3 D) = 0.021; at D=64 it is 3.6x smaller, the attention logits start near zero
        # (every token attends to all alike), and a small model learns measurably slower
        # (results/cifar10-recipe). The tokens start at trunc-normal(0.02) either way.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.config.init == "timm":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for m in self.mixers:
            if isinstance(m, SoftMixer):
                m.reset_parameters()

    def _apply_block(self, block, h, app):
        """Block application number `app` of the L*R, counted in the order they run (the same
        count at any number of steps k <= R), on tokens h (B, T, D)."""
        drop_prob = self.drop_path_rates[app]
        if self.loop_scale is not None:          # learned: (2, D) for this application
            attn_scale, mlp_scale = self.loop_scale[app]
        elif self.config.loop_scale == "fixed":
            attn_scale = mlp_scale = 1.0 / self.config.depth
        else:
            attn_scale = mlp_scale = 1.0
        if self.config.grad_checkpointing and torch.is_grad_enabled():
            # Recompute this application in the backward pass instead of storing its
            # activations. The RNG state is saved and restored, so drop-path draws the same
            # mask twice and neither the output nor the gradient changes.
            out = checkpoint(block, h, drop_prob, attn_scale, mlp_scale, use_reentrant=False)
        else:
            out = block(h, drop_prob, attn_scale, mlp_scale)
        if self.step_scale is not None:           # h + g_i * (f(h) - h); g_i = 1 gives f(h)
            out = h + self.step_scale[app] * (out - h)
        return out

    def _mix(self, i, hs, mix, step_outputs=None):
        if step_outputs is not None:             # kept for trace(): the steps before mixing
            step_outputs.append(list(hs))
        if not self.mixers:                      # R = 1: the one step is the output
            return hs[-1]
        mixer = self.mixers[i]
        if self.config.grad_checkpointing and torch.is_grad_enabled() and isinstance(mixer, SoftMixer):
            # The router's LayerNorm, fc1 and GELU outputs for every step would otherwise be kept
            # for the backward pass: more than the block inputs that checkpointing keeps.
            out, weights = checkpoint(lambda *steps: mixer(list(steps)), *hs, use_reentrant=False)
        else:
            out, weights = mixer(hs)        # k x (B, T, D) -> (B, T, D), (B, T, k)
        mix.append(weights)                 # (B, T, k)
        return out

    def forward_features(self, x, steps=None, return_mix=False, step_outputs=None):
        """Images (B, C, H, W) -> tokens (B, T, D) after the recursive encoder and final norm.
        A list passed as step_outputs receives, per recursion, the step outputs [h_1..h_k]."""
        cfg = self.config
        R, L = cfg.depth, cfg.num_layers
        k = R if steps is None else steps
        if not (isinstance(k, int) and 1 <= k <= R):
            raise ValueError(f"steps must be an integer in 1..{R} (the model's depth), got {steps!r}")

        x = self.patch_embed(x)                                   # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)           # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed           # (B, T, D)

        mix = []
        if cfg.share == "block":
            # h_1 = f_l(x), h_r = f_l(h_{r-1}), x <- mix_l(h_1..h_k), for l = 1..L
            for l, block in enumerate(self.blocks):
                hs, h = [], x
                for r in range(k):
                    h = self._apply_block(block, h, l * R + r)
                    hs.append(h)
                x = self._mix(l, hs, mix, step_outputs)
        else:
            # F = f_L o ... o f_1;  h_1 = F(x), h_r = F(h_{r-1}), x <- mix(h_1..h_k)
            hs, h = [], x
            for r in range(k):
                for l, block in enumerate(self.blocks):
                    h = self._apply_block(block, h, r * L + l)
                hs.append(h)
            x = self._mix(0, hs, mix, step_outputs)

        x = self.norm(x)
        return (x, mix) if return_mix else x

    def forward(self, x, steps=None, return_mix=False):
        """Images (B, C, H, W) -> logits (B, classes); with return_mix, also the list of
        mixture weights, one (B, T, k) tensor per mixer (empty when R = 1)."""
        x, mix = self.forward_features(x, steps=steps, return_mix=True)
        logits = self.head(x[:, 0])               # class token -> (B, classes)
        return (logits, mix) if return_mix else logits

    @torch.no_grad()
    def trace(self, x):
        """Everything one forward pass computes, for teaching and analysis (eval mode is up to
        the caller). Returns a dict:
          "steps":   per recursion (L of them with block sharing, 1 with stack sharing), the
                     step outputs [h_1, ..., h_R], each (B, T, D);
          "mix":     per mixer, the weights a, (B, T, R) (empty when R = 1);
          "logits":  (B, classes);
          "anytime": [logits after k = 1..R steps], each (B, classes) (the last is "logits")."""
        step_outputs = []
        feats, mix = self.forward_features(x, return_mix=True, step_outputs=step_outputs)
        logits = self.head(feats[:, 0])
        anytime = [self(x, steps=k) for k in range(1, self.config.depth)] + [logits]
        return {"steps": step_outputs, "mix": mix, "logits": logits, "anytime": anytime}

    def no_weight_decay(self):
        """Names of parameters that DeiT trains without weight decay (besides biases and norms); the
        step and loop scales too, which decay would pull towards 0 (timm's LayerScale, 1-d, is not
        decayed either)."""
        step_biases = {name for name, _ in self.named_parameters() if name.endswith("step_bias")}
        return {"cls_token", "pos_embed", "step_scale", "loop_scale"} | step_biases


# ----------------------------------------------------------------------------------------
# 5. Presets: DeiT's sizes (224 px, patch 16, 12 blocks); any other size via keywords

PRESETS = {
    "tiny": dict(embed_dim=192, num_heads=3),
    "small": dict(embed_dim=384, num_heads=6),
    "base": dict(embed_dim=768, num_heads=12),
}


def srvit(preset="small", depth=1, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    return SRViT(SRViTConfig(**{**PRESETS[preset], "depth": depth, **overrides}))


def srvit_tiny(depth=1, **overrides):
    return srvit("tiny", depth, **overrides)


def srvit_small(depth=1, **overrides):
    return srvit("small", depth, **overrides)


def srvit_base(depth=1, **overrides):
    return srvit("base", depth, **overrides)


# ----------------------------------------------------------------------------------------
# 6. Warm start from a DeiT / timm ViT checkpoint

def clean_state_dict(state):
    """Unwrap {"model": ...} and strip DDP's "module." and torch.compile's "_orig_mod." prefixes."""
    while isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict (name -> tensor), got {type(state).__name__}")
    out = {}
    for name, value in state.items():
        while name.startswith(("module.", "_orig_mod.")):     # prefixes only: "module." inside a name stays
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def load_pretrained(model, source, verbose=True):
    """Load a DeiT / timm ViT (or SR-ViT) checkpoint into `model`: `source` is a path or a state dict.

    The L blocks of a plain ViT become the L shared blocks of an SR-ViT of any depth; only the
    mixers stay new (a fresh soft mixer is the uniform mean, unless router_init="last", so the
    warm-started model starts near the pretrained one). Position embeddings of another grid are
    interpolated; a head with another number of classes is left new. Returns a dict with the keys
    left new and the keys of the checkpoint that were not used. Raises ValueError for a checkpoint
    of another width, patch size, number of blocks or block shape (an MLP ratio)."""
    if isinstance(source, (str, os.PathLike)):
        source = read_weights(source)
    state = clean_state_dict(source)
    own = model.state_dict()
    cfg = model.config

    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise ValueError("not a ViT checkpoint: it has no 'patch_embed.proj.weight' "
                         f"(first keys: {list(state)[:5]})")
    if tuple(w.shape) != tuple(own["patch_embed.proj.weight"].shape):
        raise ValueError(f"checkpoint is a ViT of width {w.shape[0]}, patch {w.shape[-1]}, {w.shape[1]} "
                         f"channels; this model has width {cfg.embed_dim}, patch {cfg.patch_size}, "
                         f"{cfg.in_chans} channels. Build the model to match (e.g. srvit_tiny/small/base for "
                         f"DeiT-Ti/S/B).")
    n_blocks = 1 + max((int(n.split(".")[1]) for n in state if n.startswith("blocks.")), default=-1)
    if n_blocks != cfg.num_layers:
        raise ValueError(f"checkpoint has {n_blocks} blocks, this model has num_layers={cfg.num_layers}: "
                         f"build the model with num_layers={n_blocks}")

    load, unused = {}, []
    for name, value in state.items():
        if name not in own:
            unused.append(name)
            continue
        if name == "pos_embed" and value.shape != own[name].shape:
            value = resize_pos_embed(value, own[name].shape[1] - 1)
        if value.shape != own[name].shape and name.startswith("blocks."):   # the warm start's point
            raise ValueError(f"checkpoint's {name} is {tuple(value.shape)}, this model's "
                             f"{tuple(own[name].shape)}: a ViT whose blocks differ, as another mlp_ratio "
                             f"makes them (train.py builds DeiT's, 4); build the model to match")
        if value.shape != own[name].shape:   # another head size, or mixers of another depth
            unused.append(name)
            continue
        load[name] = value
    model.load_state_dict(load, strict=False)
    result = {"new": sorted(set(own) - set(load)), "unused": sorted(unused)}
    if verbose:
        print(f"load_pretrained: loaded {len(load)} tensors; left new: {len(result['new'])} "
              f"{result['new'][:4]}{'...' if len(result['new']) > 4 else ''}; unused: {result['unused'][:4]}")
    return result


def read_weights(path):
    """A checkpoint file read as tensors only (torch.load's weights_only: no code runs), on the CPU. The one
    reader of checkpoint files (train.py's resume and eval.py use it too); a ValueError says why not."""
    if not os.path.isfile(path):          # (a named pipe would be waited on: refused before it is opened)
        raise ValueError(f"{path} is not a checkpoint file but a folder, a named pipe or a device"
                         if os.path.exists(path) else f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:                                    # the file is there, but not for us
        raise ValueError(f"cannot open {path} ({e.strerror or type(e).__name__}): give this user read "
                         f"access to it") from e
    except Exception as e:
        if zipfile.is_zipfile(path) and "weights_only" in str(e):   # whole, with Python objects in it
            raise ValueError(f"{path} holds Python objects besides tensors ({type(e).__name__}). If you "
                             f"trust the file, load it with torch.load(..., weights_only=False) and pass its "
                             f"state dict.") from None
        raise ValueError(f"cannot read {path} ({type(e).__name__}): it is not a whole PyTorch checkpoint "
                         f"(cut short, or another kind of file)") from None


def resize_pos_embed(pos_embed, num_patches):
    """(1, 1 + n*n, D) -> (1, 1 + num_patches, D): bicubic over the patch grid, class token kept."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new, D = math.isqrt(grid.shape[1]), math.isqrt(num_patches), grid.shape[-1]
    if old * old != grid.shape[1]:        # more tokens than one in front: a distilled DeiT, registers
        raise ValueError(f"the checkpoint's position embedding has {pos_embed.shape[1]} tokens, not a class "
                         f"token and a square grid of patches: warm start from a ViT with one class token "
                         f"(a distilled DeiT or a ViT with registers has more)")
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2)            # (1, D, n, n)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


# ----------------------------------------------------------------------------------------
# 7. Cost: parameters and forward multiply-accumulates, counted by PyTorch

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def forward_gmacs(model, steps=None):
    """Forward GMACs for one image, counted by torch.utils.flop_counter (matmuls, convs and
    attention; elementwise ops are not counted, as in the usual ViT figures). A FLOP is a
    multiply or an add, so MACs = FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = model.config
    with torch.device("meta"):   # count on a shape-only copy: no memory, no arithmetic, and the
        model = SRViT(cfg)        # same attention formula whatever kernel the real device picks
        x = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    model.requires_grad_(False)   # the counter's module hooks expect a graph behind any tensor that
                                  # requires grad; a learned scale's slice would have none
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, steps=steps)
    return counter.get_total_flops() / 2e9


if __name__ == "__main__":
    print(f"{'model':<8}{'R':>3}{'params':>14}{'extra vs R=1':>14}{'GMACs':>9}")
    for name in PRESETS:
        for R in (1, 2, 3, 4):
            with torch.device("meta"):   # shapes only: no memory, no arithmetic
                model, plain = srvit(name, depth=R), srvit(name, depth=1)
            n = count_params(model)
            print(f"{name:<8}{R:>3}{n:>14,}{n - count_params(plain):>+14,}{forward_gmacs(model):>9.2f}")
