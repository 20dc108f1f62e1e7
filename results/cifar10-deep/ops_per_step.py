"""How many tensor operations one training step of the study's models runs: the basis of the README's
estimate of the study's GPU wall time.

    python results/cifar10-deep/ops_per_step.py

At 17 tokens and width 64 a GPU has almost no arithmetic to do per step (0.0228 GMACs per image at
R=4, about 17.5 GFLOP per step of 128 images with the backward pass), so an eager step costs what
dispatching its operators and launching their kernels costs. This counts the ATen operators one step
dispatches (forward, backward, optimizer) on the CPU, with a batch of 4 (the count does not depend on
the batch), leaving out views (view, transpose, expand, ...: no kernel). On a GPU each of the others
is about one kernel; bf16 autocast adds casts, and the fused AdamW of train.py's GPU path replaces
the optimizer's per-tensor operators with a few kernels, so the optimizer is counted apart.
"""
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import srvit  # noqa: E402

# The study's models (study.sh and plan.txt): 6 shared blocks (24 unshared for the ViT), width 64.
# R4-softlast is R4-soft with another initial router: the same operators.
MODELS = {
    "R1": dict(depth=1),
    "R4-last": dict(depth=4, mixer="last"),
    "R4-mean": dict(depth=4, mixer="mean"),
    "R4-soft": dict(depth=4, mixer="soft"),
    "ViT24": dict(depth=1, num_layers=24),
    # the block-vs-stack runs at the shallow sweep's settings: 2 blocks of width 128
    "L2-R1": dict(depth=1, num_layers=2, embed_dim=128),
    "L2-R4-soft-block": dict(depth=4, num_layers=2, embed_dim=128, mixer="soft", share="block"),
    "L2-R4-soft-stack": dict(depth=4, num_layers=2, embed_dim=128, mixer="soft", share="stack"),
}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:            # a view launches no kernel
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model, optimizer, images, labels):
    """(operators of forward + backward, operators of the optimizer step) for one training step."""
    with CountOps() as counter:
        loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
    model_ops = sum(counter.ops.values())
    with CountOps() as counter:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model_ops, sum(counter.ops.values())


def main():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    print("| model | operators, forward + backward | operators, AdamW step (foreach, CPU) |")
    print("|---|---|---|")
    for name, overrides in MODELS.items():
        cfg = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_layers=6, num_heads=4)
        model = srvit.SRViT(srvit.SRViTConfig(**{**cfg, **overrides}))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        count_step(model, optimizer, images, labels)       # first step: the optimizer creates its state
        model_ops, optimizer_ops = count_step(model, optimizer, images, labels)
        print(f"| {name} | {model_ops} | {optimizer_ops} |")


if __name__ == "__main__":
    main()
