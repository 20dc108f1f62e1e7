"""What the per-step scales (--step-scale) learned: for each block and recursion step, the mean and
standard deviation over the D channels of g, the scale on that application's update (1 at the start);
then per run the smallest and largest g of any channel and the mean distance |g - 1|.

    python results/cifar10-deep2/scales.py <dir>/R4-softscale-s0/last.pt <dir>/R4-softscale-s1/last.pt
"""
import sys

import torch


def main(paths):
    print("| run | block | step 1 | step 2 | step 3 | step 4 |\n|---|---|---|---|---|---|")
    spread = []
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg, g = ckpt["config"], ckpt["model"]["step_scale"]          # g: (L*R, D), row l*R + r
        L, R = cfg["num_layers"], cfg["depth"]
        name = ckpt.get("args", {}).get("out_dir", path).rstrip("/").split("/")[-1]
        for l in range(L):
            cells = " | ".join(f"{g[l * R + r].mean():.2f} +/- {g[l * R + r].std():.2f}" for r in range(R))
            print(f"| {name} | {l + 1} | {cells} |")
        spread.append(f"- {name}: every g in {g.min():.2f} to {g.max():.2f}, "
                      f"mean |g - 1| {(g - 1).abs().mean():.3f}")
    print("\n" + "\n".join(spread))


if __name__ == "__main__":
    main(sys.argv[1:])
