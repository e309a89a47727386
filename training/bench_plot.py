"""``bench.png`` of ``twotower-bench-decode``: throughput ratio and quality against gamma.

Stage: benchmark output. Input: the benchmark's variant summaries (dicts with ``decoder``,
``gamma``, ``block_size``, ``batch_size``, ``ratio_vs_ar``, ``exact_match``). Output: a PNG with
two panels, one line per block size and batch size (solid: the smallest batch), AR as a
reference line (ratio 1; its exact match dashed).
"""

from __future__ import annotations

from pathlib import Path


def plot_bench(variants: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CPU boxes and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    batches = sorted({v["batch_size"] for v in variants})
    blocks = sorted({v["block_size"] for v in variants if v["decoder"] == "diffusion"})
    fig, (ax_r, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for bi, b in enumerate(batches):
        style = styles[bi % len(styles)]
        for si, S in enumerate(blocks):
            pts = sorted((v["gamma"], v["ratio_vs_ar"], v["exact_match"]) for v in variants
                         if v["decoder"] == "diffusion" and v["block_size"] == S and v["batch_size"] == b)
            if not pts:
                continue
            g, r, q = zip(*pts, strict=True)
            label = f"S={S}, batch {b}"
            ax_r.plot(g, r, style, marker="o", color=colors[si % len(colors)], label=label)
            ax_q.plot(g, q, style, marker="o", color=colors[si % len(colors)], label=label)
        ar = [v for v in variants if v["decoder"] == "ar" and v["batch_size"] == b]
        if ar:
            ax_q.axhline(ar[0]["exact_match"], color="black", linestyle=style, linewidth=1, label=f"AR, batch {b}")
    ax_r.axhline(1.0, color="black", linewidth=1, label="AR")
    ax_r.set(xlabel="confidence threshold gamma", ylabel="tokens/s relative to AR (same batch)",
             title="Throughput vs AR")
    ax_q.set(xlabel="confidence threshold gamma", ylabel="exact match", title="Quality on the task prompts",
             ylim=(-0.02, 1.02))
    for ax in (ax_r, ax_q):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
