#!/usr/bin/env python
"""Markdown tables and a plot from ``bench/diagnose_pretrain.py`` runs.

python bench/diagnose_report.py bench/diagnose/*.json --plot bench/diagnose/diagnose.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    runs = {Path(r).stem: json.loads(Path(r).read_text()) for r in args.runs}
    print(
        "| run | step | k-NN F1 species | k-NN F1 mean | cosine species | cosine mean | spread species |"
        " ID loss full / corpus | value loss | |grad| value/ID, layers | knowledge share of fusion |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        history = {h["step"]: h for h in run["history"]}
        for ev in run["evals"]:
            h = history.get(ev["step"], {})
            ratio = ev["value/layers"] / max(ev["id/layers"], 1e-12)
            fusion = {k: v for k, v in ev.items() if k.startswith("fusion/")}
            knowledge = sum(v for k, v in fusion.items() if "knowledge" in k) / max(
                sum(fusion.values()), 1e-12
            )
            losses = f"{h['id_full']:.2f} / {h['id_corpus']:.2f}" if h else "—"
            value = f"{h['value']:.3f}" if h else "—"
            print(
                f"| {name} | {ev['step']} | {ev['species/knn_macro_f1']:.3f} | "
                f"{ev['mean/knn_macro_f1']:.3f} | {ev['species/mean_cosine']:.4f} | "
                f"{ev['mean/mean_cosine']:.4f} | {ev['species/spread']:.1e} | "
                f"{losses} | {value} | {ratio:.2g}× | {knowledge:.2f} |"
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for name, run in runs.items():
            steps = [h["step"] for h in run["history"]]
            axes[0].plot(steps, [h["id_corpus"] for h in run["history"]], label=f"{name} ID (corpus genes)")
            axes[1].plot(steps, [h["lr"] for h in run["history"]], label=name)
            ev_steps = [e["step"] for e in run["evals"]]
            axes[2].plot(ev_steps, [e["mean/knn_macro_f1"] for e in run["evals"]], "o-", label=f"{name} mean")
            axes[2].plot(
                ev_steps, [e["species/knn_macro_f1"] for e in run["evals"]], "x--", label=f"{name} species"
            )
        axes[0].set_title("ID loss over the corpus's genes (nats)")
        axes[1].set_title("learning rate")
        axes[2].set_title("k-NN macro-F1, held-out Kang stimulated")
        for axis in axes:
            axis.set_xlabel("step")
            axis.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
