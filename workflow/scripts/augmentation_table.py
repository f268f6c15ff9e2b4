"""Rule augmentation_table: validation top-1 with and without training-time augmentation, per method.

Reads the metrics.json of every run (runs/augment/... = augmentation on; the
default run's folders = off) and writes one row per (method, augmentation):
mean and std over seeds of validation top-1 and MACs reduction, and on the
"on" rows the paired gain (on minus off, seed by seed). Only validation
figures are read: the augmentation is a knob, chosen like the others.
"""

import json
from pathlib import Path

import pandas as pd

metrics_files = [Path(f) for f in snakemake.input.metrics]  # noqa: F821 (Snakemake defines `snakemake` in scripts)
out = Path(snakemake.output[0])  # noqa: F821

rows = []
for path in metrics_files:
    m = json.loads(path.read_text())
    rows.append({
        "method": m["method"], "augmentation": "on" if path.parts[1] == "augment" else "off",
        "augment": json.dumps({k: v for k, v in m["config"]["data"].items() if k.startswith("augment_")},
                              sort_keys=True),
        "budget": m.get("budget"), "seed": m["seed"], "val_top1": m["val_top1"],
        "val_macs_reduction": m.get("val_macs_reduction", 0.0), "run": str(path.parent),
    })
runs = pd.DataFrame(rows)
off = runs[runs["augmentation"] == "off"].set_index(["method", "seed"])["val_top1"]
table = []
for (method, arm), group in runs.groupby(["method", "augmentation"], sort=True):
    row = {"method": method, "augmentation": arm, "augment_options": group["augment"].iloc[0],
           "budget": group["budget"].iloc[0], "n_seeds": len(group),
           "seeds": " ".join(str(s) for s in sorted(group["seed"])),
           "val_top1_mean": group["val_top1"].mean(), "val_top1_std": group["val_top1"].std(ddof=1),
           "val_macs_reduction_mean": group["val_macs_reduction"].mean(), "gain_mean": None, "gain_std": None}
    if arm == "on":
        gain = group.set_index("seed")["val_top1"] - off.loc[method]
        row.update(gain_mean=gain.mean(), gain_std=gain.std(ddof=1))
    table.append(row)
pd.DataFrame(table).to_csv(out, index=False, float_format="%.4f")
