"""Rule check_data: stop before any job on a dataset whose files are missing, or fetch them once.

ImageNet and imagefolder are folders the user provides: each must hold train/ and val/. CIFAR is
downloaded by torchvision into ``datasets.NAME.data.root`` when
``datasets.NAME.data.download`` is true, here and only here (the jobs only read
it), else checked. Runs on the machine that runs Snakemake (config
``data_check: local``), before the MLflow parent run and every job of the
dataset; with ``data_check: job`` the jobs find the data themselves, e.g. on a
cluster whose data is mounted only on compute nodes.
"""

import sys
from pathlib import Path

ds = snakemake.wildcards.dataset  # noqa: F821 (Snakemake defines `snakemake` in scripts)
data = snakemake.params.data  # noqa: F821
log = Path(snakemake.log[0])  # noqa: F821
DRY_RUN_HINT = "A dry run (snakemake -n) lists the plan without the data"


def stop(message: str) -> None:
    """One message: the log, which Snakemake prints (show-failed-logs), is all the user reads."""
    log.write_text(message + "\n")
    sys.exit(1)


if data["fetch"]:
    from manidp.data.torchvision_sets import fetch
    from manidp.errors import UserError

    try:
        found = fetch(ds, data["data"], keys=data["keys"])
    except UserError as err:
        stop(f"{err}. {DRY_RUN_HINT}.")
    log.write_text(f"{ds}: found {found}\n")
else:
    found = Path(data["folder"]).expanduser() if data["folder"] else None
    if found is None or not (found / "train").is_dir() or not (found / "val").is_dir():
        where = f"'{found}' holds no train/ and val/ folders" if found else "no path is set"
        stop(
            f"{ds}: {where}. Set the folder (train/ and val/, one subfolder per class) with the config "
            f"key '{data['key']}' (snakemake ... --config {data['key']}=/path/to/{ds}) or the environment "
            f"variable {data['env']}. {DRY_RUN_HINT}; a cluster whose data only compute nodes see sets the config "
            "key 'data_check: job'."
        )
Path(snakemake.output[0]).write_text(f"{found}\n")  # noqa: F821
