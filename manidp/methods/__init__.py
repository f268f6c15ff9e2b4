"""Method registry. Importing this package registers the built-in methods;
:func:`load_all` also imports ``baselines`` (the comparison methods)."""
from manidp.methods._base import METHODS, Method, RunContext, default_param_groups, register_method
from manidp.methods import dense  # noqa: F401  (registers)

__all__ = ["METHODS", "Method", "RunContext", "default_param_groups", "register_method", "load_all"]


def load_all() -> None:
    """Import every package that registers methods (idempotent)."""
    import importlib

    for module in ("manidp.methods.manidp", "baselines"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
