"""Rule training_budget_curve: top-1 against the number of fine-tuning epochs, per method.

One row per (method, epochs): mean and std over seeds of test and validation
top-1 and the MACs reduction, the optimizer steps, and each method's rank by
mean test top-1 at that budget (1 = best), so a reader sees at once whether
the ranking holds as training grows. The plot shows test top-1 with error
bars over seeds. A results figure: every run's recipe was chosen on
validation beforehand; nothing here is selected on the test split.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

metrics_files = [Path(f) for f in snakemake.input.metrics]  # noqa: F821 (Snakemake defines `snakemake` in scripts)
rows = []
for path in metrics_files:
    m = json.loads(path.read_text())
    rows.append({"method": m["method"], "budget": m.get("budget"), "epochs": m["epochs_trained"],
                 "optimizer_steps": m.get("optimizer_steps"), "seed": m["seed"], "test_top1": m["test_top1"],
                 "val_top1": m["val_top1"], "macs_reduction": m["macs_reduction"]})
runs = pd.DataFrame(rows)
table = (runs.groupby(["method", "epochs"], sort=True)
         .agg(budget=("budget", "first"), optimizer_steps=("optimizer_steps", "first"), n_seeds=("seed", "size"),
              test_top1_mean=("test_top1", "mean"), test_top1_std=("test_top1", "std"),
              val_top1_mean=("val_top1", "mean"), val_top1_std=("val_top1", "std"),
              macs_reduction_mean=("macs_reduction", "mean"))
         .reset_index())
table["rank"] = table.groupby("epochs")["test_top1_mean"].rank(ascending=False, method="min").astype(int)
table.sort_values(["epochs", "rank"]).to_csv(snakemake.output.csv, index=False, float_format="%.4f")  # noqa: F821

fig, ax = plt.subplots(figsize=(7, 4.5))
for method, group in table.groupby("method", sort=True):
    ax.errorbar(group["epochs"], group["test_top1_mean"], yerr=group["test_top1_std"], marker="o", capsize=3,
                label=method)
ax.set_xscale("log", base=2)
ax.set_xticks(sorted(table["epochs"].unique()), [str(e) for e in sorted(table["epochs"].unique())])
ax.set_xlabel("fine-tuning epochs")
ax.set_ylabel("test top-1 (%)")
ax.set_title(f"top-1 against the training budget, MACs budget {table['budget'].iloc[0]:g} (mean +- std over seeds)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(snakemake.output.png, dpi=150)  # noqa: F821
