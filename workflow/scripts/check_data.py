"""Rule check_data: stop before any job on a dataset whose folder the user provides, when it is missing.

Runs on the machine that runs Snakemake (config ``data_check: local``); with
``data_check: job`` the jobs find the folder themselves, e.g. on a cluster whose
data is mounted only on compute nodes.
"""

import sys
from pathlib import Path

data = snakemake.params.data  # noqa: F821 (Snakemake defines `snakemake` in scripts)
folder = Path(data["folder"]).expanduser() if data["folder"] else None
if folder is None or not (folder / "train").is_dir() or not (folder / "val").is_dir():
    found = f"'{folder}' holds no train/ and val/ folders" if folder else "no path is set"
    message = (
        f"{snakemake.wildcards.dataset}: {found}. Set the ILSVRC-2012 folder (train/ and val/, one subfolder "  # noqa: F821
        f"per class) with the config key '{data['key']}' (snakemake ... --config {data['key']}=/path/to/imagenet) "
        f"or the environment variable {data['env']}. A dry run (snakemake -n) lists the plan without the data; "
        "a cluster whose data only compute nodes see sets the config key 'data_check: job'."
    )
    Path(snakemake.log[0]).write_text(message + "\n")  # noqa: F821
    sys.exit(1)
Path(snakemake.output[0]).write_text(f"{folder}\n")  # noqa: F821
