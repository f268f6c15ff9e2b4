"""``imagenet``: ILSVRC-2012, a preset of the ImageFolder dataset (``image_folder.py``).

The folder named by ``data.imagenet_path`` (or the env var ``MANIDP_IMAGENET``)
holds ``train/`` and ``val/``, each with one subfolder per class (the official
validation images sorted into class folders). Validation is a fixed holdout of
``data.imagenet_val_holdout`` (default 10,000) training images; the official
``val/`` folder is the test split; images are seen at ``data.image_size`` (default 224).
"""
from manidp.data.image_folder import FolderPreset, register_image_folder

ENV_VAR = "MANIDP_IMAGENET"

IMAGENET = register_image_folder(FolderPreset(
    name="imagenet",
    path_key="imagenet_path",
    env_var=ENV_VAR,
    folder="the ILSVRC-2012 folder",
    path_help=f"ILSVRC-2012 ImageFolder root (train/, val/); null: env {ENV_VAR}",
    holdout_key="imagenet_val_holdout",
    holdout=10000,
    holdout_help="validation images carved from ImageNet train",
))
