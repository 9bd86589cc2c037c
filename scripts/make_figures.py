"""Draw the figures of README and docs/ from committed data (docs/data/) and the package's exact lag maths.

    python scripts/make_figures.py            # writes docs/figures/*.png

docs/figures/lag_and_fid.png: left, the per-step weights that diffusers' warm-up EMA and LAWA (k = 5,
ν = 50) over it put on past training steps at step 1000 (the main job's settings), with their mean lags
and the ΔL between them; right, FID vs step of ema, lawa and lawa@delayed from the main job's metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STYLE = {"ema": ("tab:blue", "o", "EMA"), "lawa": ("tab:orange", "s", "LAWA over EMA"),
         "lawa@delayed": ("tab:green", "^", "EMA delayed by ΔL")}


def read_rows(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def lag_and_fid(metrics: str, out: str, step: int = 1000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lawa_diffusion.config import load_train_config
    from lawa_diffusion.maths import lag

    cfg = load_train_config(os.path.join(ROOT, "configs", "fashion_mnist_cpu.yaml"), [], None)
    track = lag.EMATrack.from_settings(cfg.ema)
    d = lag.decays(track, step)
    ema, lawa = lag.profile(track, step, d), lag.lawa_profile(track, cfg.lawa, step, d)
    back = list(range(step, -1, -1))  # index s -> steps back t - s
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for w, key in ((ema, "ema"), (lawa, "lawa")):
        color, _, label = STYLE[key]
        left.plot(back, w, color=color, label=f"{label}: mean lag {lag.mean_lag(w):.0f} steps")
        left.axvline(lag.mean_lag(w), color=color, linestyle=":")
    delta = lag.mean_lag(lawa) - lag.mean_lag(ema)
    y = max(ema) * 0.75
    left.annotate("", xy=(lag.mean_lag(lawa), y), xytext=(lag.mean_lag(ema), y), arrowprops={"arrowstyle": "<->"})
    left.text((lag.mean_lag(ema) + lag.mean_lag(lawa)) / 2, y * 1.04, f"ΔL = {delta:.0f}", ha="center")
    left.set_xlim(0, 600)
    left.set_xlabel("steps before step 1000")
    left.set_ylabel("weight on the trained weights")
    left.set_title(f"what each average weighs (k={cfg.lawa.k}, ν={cfg.lawa.every_n_steps})")
    left.legend(fontsize=8)
    rows = read_rows(metrics)
    for key, (color, marker, label) in STYLE.items():
        pts = sorted((r["step"], r["fid"]) for r in rows if r["variant"] == key)
        if pts:
            right.plot(*zip(*pts), color=color, marker=marker, label=label)
    right.set_xlabel("training step")
    right.set_ylabel("FID (200 samples, same noise)")
    right.set_title("the main job: LAWA scores like the delayed EMA")
    right.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default=os.path.join(ROOT, "docs", "data", "main_job_metrics.jsonl"))
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs", "figures"))
    args = parser.parse_args()
    lag_and_fid(args.metrics, os.path.join(args.out_dir, "lag_and_fid.png"))


if __name__ == "__main__":
    main()
