"""Quality vs prefill saving: distil one model at several L with the same budget, then plot held-out agreement and
perplexity against the fraction of layers prompt tokens skip.

For each L: `swiftkv distill CONFIG num_key_value_layers=L output_dir=OUT/L{L} [OVERRIDES]` (the Python API), skipped
when OUT/L{L}/eval.json exists, so an interrupted sweep resumes at the first unfinished L, and runs made elsewhere
(e.g. in parallel on a GPU) are collected by copying their output directories (eval.json, metrics.jsonl) into OUT.
Writes one JSON row per L and a PNG.

    python benchmarks/quality_vs_layers.py configs/smollm2.yaml --layers 15 18 21 24 --out out/sweep \\
        --json results/quality_vs_layers.json --plot results/quality_vs_layers.png \\
        lr=1e-3 temperature=1 hidden_loss_weight=0 max_steps=900 save_full_checkpoint=false
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from swiftkv.distill import distill
from swiftkv.distill.config import load_config, parse_overrides
from swiftkv.files import figure_beside, save_figure
from swiftkv.loading import load_model_config

GOAL_AGREEMENT, GOAL_PPL_INCREASE = 0.92, 0.03  # the 50% targets, drawn as reference lines


def run_layer(config_path: str, overrides: dict, layers: int, out: Path) -> Path:
    """Distil at L=`layers` unless OUT/L{layers}/eval.json already exists; returns the run's directory."""
    run_dir = out / f"L{layers}"
    if not (run_dir / "eval.json").exists():
        values = overrides | {"num_key_value_layers": layers, "output_dir": str(run_dir)}
        distill(load_config(config_path, values), resume=(run_dir / "checkpoint").exists())
    return run_dir


def summarize(run_dir: Path, layers: int, num_layers: int) -> dict:
    """One row: skip fraction, training budget and final training KL (metrics.jsonl), held-out eval (eval.json)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tail = metrics[-max(1, len(metrics) // 20) :]  # last 5% of the logged steps: the noise-averaged final KL
    row = {
        "num_key_value_layers": layers,
        "skip_fraction": (num_layers - layers) / num_layers,
        "steps": metrics[-1]["step"],
        "tokens_seen": metrics[-1]["tokens_seen"],
        "final_train_kl": sum(r["kl"] for r in tail) / len(tail),
        "sources": {},
    }
    for source, ev in json.loads((run_dir / "eval.json").read_text()).items():
        row["sources"][source] = ev | {"ppl_increase": ev["distilled_ppl"] / ev["base_ppl"] - 1}
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = [100 * r["skip_fraction"] for r in rows]
    fig, (agree_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, source in enumerate(rows[0]["sources"]):
        color = f"C{i}"
        values = [r["sources"][source] for r in rows]
        agree_ax.plot(skip, [100 * v["distilled_agreement"] for v in values], "o-", color=color, label=source)
        agree_ax.plot(skip, [100 * v["undistilled_agreement"] for v in values], "x--", color=color, alpha=0.5)
        ppl_ax.plot(skip, [100 * v["ppl_increase"] for v in values], "o-", color=color, label=source)
    agree_ax.axhline(100 * GOAL_AGREEMENT, color="gray", ls=":", label="goal 92%")
    ppl_ax.axhline(100 * GOAL_PPL_INCREASE, color="gray", ls=":", label="goal +3%")
    agree_ax.set_ylabel("top-1 agreement with the base model (%)\n(dashed: undistilled)")
    ppl_ax.set_ylabel("held-out perplexity vs base (%)")
    for ax in (agree_ax, ppl_ax):
        ax.set_xlabel("layers prompt tokens skip (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a distillation YAML (e.g. configs/smollm2.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run (as `swiftkv distill`)")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="the L values to distil")
    parser.add_argument("--out", type=Path, default=Path("out/sweep"))
    parser.add_argument("--json", type=Path, default=Path("out/sweep/quality_vs_layers.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --json with .png)")
    args = parser.parse_args()

    overrides = parse_overrides(args.overrides)
    config = load_config(args.config, overrides)
    num_layers = load_model_config(config.model).num_hidden_layers
    if not config.eval_data:
        parser.error("the config has no eval_data: set held-out sources to score, e.g. eval_data=[chitchat,gsm8k-test]")
    bad = [n for n in args.layers if not 0 < n < num_layers]
    if bad:
        parser.error(f"--layers {bad} invalid: the model has {num_layers} layers, so L must be in 1..{num_layers - 1}")
    rows = [summarize(run_layer(args.config, overrides, n, args.out), n, num_layers) for n in sorted(args.layers)]
    result = {"config": args.config, "overrides": args.overrides, "num_hidden_layers": num_layers, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, figure_beside(args.json, args.plot))
    for r in rows:
        cells = "  ".join(
            f"{s}: agree {v['distilled_agreement']:.1%} ppl {v['ppl_increase']:+.1%}" for s, v in r["sources"].items()
        )
        print(f"L={r['num_key_value_layers']:>3} skip {r['skip_fraction']:.0%}  {r['tokens_seen']:>9,} tokens  {cells}")


if __name__ == "__main__":
    main()
