"""The single-layer CNN analysis of the paper (§3, Figs. 5-7, Lemma 2) for a finished cnn run.

    python analysis.py runs/<cnn run> --out reports/<cnn run>

Writes, into --out:
- filters.png: the first-layer filters of the last weights (Fig. 5);
- feature_maps.png: each filter's ReLU feature map of a test image, and its response to uniform
  noise in the eps-ball (Fig. 6: a filter that turned into a noise amplifier lights up on noise);
- filter_norms.png: the L2 norm of each filter over training, from metrics.jsonl (Fig. 7);
- lemma2.csv / lemma2.png / lemma2.md: gradient alignment at initialisation over widths 1..256
  against Lemma 2's lower bound 0.5 (cos between input gradients at x and x + eta,
  eta ~ U[-eps, eps]^d, of a freshly initialised single-layer CNN with one output).
eps is read from the run (1/255 units); images are the run's dataset's first test points.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import data
import models
import rundir
import utils

LEMMA2_BOUND = 0.5
WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def load_run(run_dir: str) -> tuple[dict, models.CNN, list[dict]]:
    """(config, CNN with the last weights, metrics rows) of a cnn run directory."""
    cfg = rundir.read_config(run_dir)
    if cfg is None:
        raise ValueError(f"{run_dir} has no readable config.json; give a run directory written by train.py")
    if cfg["model"] != "cnn":
        raise ValueError(f"{run_dir} trained a {cfg['model']}; the analysis is for --model cnn runs")
    info = data.DATASETS[cfg["dataset"]]
    model = models.build_model("cnn", info.n_classes, info.shape, cfg["n_layers"], cfg["n_filters_cnn"])
    models.load_state(model, models.read_checkpoint(os.path.join(run_dir, "model.pth"), "last"))
    rows, damaged = rundir.read_jsonl_records(os.path.join(run_dir, "metrics.jsonl"))
    if damaged:
        print(f"analysis.py: warning: {run_dir}/metrics.jsonl: skipped {len(damaged)} damaged line(s) "
              f"({', '.join(map(str, damaged[:5]))}); the filter norms leave them out", file=sys.stderr)
    return cfg, model.eval(), rows


def plot_filters(model: models.CNN, path: str) -> None:
    """One panel per filter (channels averaged for colour inputs), with its L2 norm."""
    weights = model.first_layer_filters().detach()
    fig, axes = plt.subplots(1, len(weights), figsize=(1.6 * len(weights), 2), squeeze=False)
    for ax, w in zip(axes[0], weights):
        ax.imshow(w.mean(0).numpy(), cmap="coolwarm", vmin=-weights.abs().max(), vmax=weights.abs().max())
        ax.set_title(f"|w|={w.norm():.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle("first-layer filters (last weights)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_feature_maps(model: models.CNN, image: torch.Tensor, eps: float, path: str) -> None:
    """ReLU(conv(x)) of one image (C, H, W) and conv(eta) of eta ~ U[-eps, eps], per filter."""
    conv = model._model[0]
    with torch.no_grad():
        on_image = torch.relu(conv(image[None]))[0]
        on_noise = torch.relu(conv(utils.uniform_delta(image[None], eps)))[0]
    n = len(on_image)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(image.mean(0).numpy(), cmap="gray")
        axes[1, j].imshow(on_image[j].numpy(), cmap="viridis")
        axes[2, j].imshow(on_noise[j].numpy(), cmap="viridis")
        axes[1, j].set_title(f"filter {j}: max {on_image[j].max():.2f}", fontsize=7)
        axes[2, j].set_title(f"noise: max {on_noise[j].max():.2f}", fontsize=7)
        for i in range(3):
            axes[i, j].axis("off")
    fig.suptitle(f"feature maps of a test image (row 2) and of uniform noise, eps={eps:.3f} (row 3)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_filter_norms(rows: list[dict], path: str) -> None:
    """Each filter's norm against the iteration of the periodic evaluations."""
    rows = [r for r in rows if "filter_norms" in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    if rows:
        norms = torch.tensor([r["filter_norms"] for r in rows])
        for j in range(norms.shape[1]):
            ax.plot([r["iteration"] for r in rows], norms[:, j].numpy(), label=f"filter {j}")
        ax.legend(fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_ylabel("filter L2 norm")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def alignment_at_init(images: torch.Tensor, eps: float, width: int, n_models: int = 5) -> float:
    """Mean cos(grad f(x), grad f(x + eta)) of freshly initialised single-output CNNs of this width.

    images: (N, C, H, W) in [0, 1]; f is CNN(n_conv=1, n_filters=width) with one output, the
    reference's Gaussian initialisation; averaged over n_models initialisations.
    """
    values = []
    for _ in range(n_models):
        model = models.build_model("cnn", 1, tuple(images.shape[1:]), 1, width)
        grads = []
        for delta in (torch.zeros_like(images), utils.uniform_delta(images, eps)):
            z = (images + delta).requires_grad_(True)
            (g,) = torch.autograd.grad(model(z).sum(), z)
            grads.append(g)
        values.append(utils.per_example_cos(*grads).mean().item())
    return sum(values) / len(values)


def lemma2_table(images: torch.Tensor, eps: float, widths=WIDTHS) -> list[dict]:
    torch.manual_seed(0)
    return [{"width": w, "cos_x_eta_at_init": alignment_at_init(images, eps, w), "lemma2_bound": LEMMA2_BOUND}
            for w in widths]


def write_lemma2(table: list[dict], eps: float, out: str) -> None:
    with open(os.path.join(out, "lemma2.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [f"Gradient alignment at initialisation (eps = {eps * 255:g}/255), Lemma 2 bound {LEMMA2_BOUND}",
             "", "| width | cos(grad f(x), grad f(x+eta)) | >= 0.5 |", "|---|---|---|"]
    lines += [f"| {r['width']} | {r['cos_x_eta_at_init']:.3f} | {'yes' if r['cos_x_eta_at_init'] >= 0.5 else 'no'} |"
              for r in table]
    with open(os.path.join(out, "lemma2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["width"] for r in table], [r["cos_x_eta_at_init"] for r in table], "o-", label="measured")
    ax.axhline(LEMMA2_BOUND, color="k", linestyle="--", label="Lemma 2 bound")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("number of filters")
    ax.set_ylabel("gradient alignment at init")
    ax.legend()
    fig.savefig(os.path.join(out, "lemma2.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished run of train.py --model cnn")
    p.add_argument("--out", default=None, help="output folder (default: reports/<run name>)")
    p.add_argument("--data_dir", default=os.environ.get("DATA_DIR", "./data"))
    p.add_argument("--n_images", type=int, default=256, help="test images for the Lemma 2 check")
    args = p.parse_args(argv)
    try:
        cfg, model, rows = load_run(args.run_dir)
        split = data.load_split(cfg["dataset"], args.data_dir, train=False)
    except (OSError, ValueError, data.DataMissingError, models.CheckpointError) as exc:
        print(f"analysis.py: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("reports", os.path.basename(os.path.normpath(args.run_dir)))
    os.makedirs(out, exist_ok=True)
    images = split.images[: args.n_images].float() / split.scale
    eps = cfg["eps"] / 255
    torch.manual_seed(0)
    plot_filters(model, os.path.join(out, "filters.png"))
    plot_feature_maps(model, images[0], eps, os.path.join(out, "feature_maps.png"))
    plot_filter_norms(rows, os.path.join(out, "filter_norms.png"))
    write_lemma2(lemma2_table(images, eps), eps, out)
    print(f"wrote {out}/filters.png, feature_maps.png, filter_norms.png, lemma2.png, lemma2.csv, lemma2.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
