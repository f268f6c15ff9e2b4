"""manidp: a reproducible benchmark of dynamic network pruning (ManiDP and its rivals)."""
from manidp._version import __version__
from manidp.errors import UserError

__all__ = ["__version__", "UserError", "InstanceMacs", "count_macs"]


def __getattr__(name: str):
    # The MAC counter needs torch; loaded on first use so that commands that
    # never touch a model (tables, plots, tracking, --help) start without it.
    if name in ("InstanceMacs", "count_macs"):
        from manidp import macs

        return getattr(macs, name)
    raise AttributeError(f"module 'manidp' has no attribute {name!r}")
