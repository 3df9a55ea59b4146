"""The figure of ``convsink bench gpu``: peak memory and tokens/s of the training step against T."""

from __future__ import annotations

from pipeline.bench.gpu import CAUSAL, SINK_FLEX


def plot_gpu(result: dict, path: str) -> None:
    """Peak memory and tokens/s of the training step against T, sink and causal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = [False, False]
    for method in (SINK_FLEX, CAUSAL):
        pts = sorted((p for p in result["steps"] if p["method"] == method and p.get("fits")), key=lambda p: p["T"])
        mem = [p for p in pts if p.get("peak_gb") is not None]  # CUDA only
        axes[0].plot([p["T"] for p in mem], [p["peak_gb"] for p in mem], marker="o", label=method)
        axes[1].plot([p["T"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", label=method)
        drawn = [drawn[0] or bool(mem), drawn[1] or bool(pts)]
    lengths = sorted({p["T"] for p in result["steps"] if p.get("fits")})
    for ax, label, yscale, has_points in zip(axes, ("peak memory allocated (GiB)", "tokens/s"), ("log", "linear"), drawn):
        if not has_points:  # nothing measured (a CPU run has no GPU memory; a spent time budget no steps)
            ax.set(ylabel=label, title="no points")
            continue
        ax.set(xlabel="T (tokens)", ylabel=label, xscale="log", yscale=yscale)
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(lengths, [f"{t:,}" for t in lengths], rotation=30)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
    s = result["setting"]
    tiled = "tiled loss + MLP" if s.get("mlp_chunk") else "tiled loss"
    fig.suptitle(f"{s['model']} (random init), {s['dtype']}, checkpointed + {tiled}, one training step, {s['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
