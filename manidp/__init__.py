"""manidp: a reproducible benchmark of dynamic network pruning (ManiDP and its rivals)."""
from manidp._version import __version__
from manidp.errors import UserError
from manidp.macs import InstanceMacs, count_macs

__all__ = ["__version__", "UserError", "InstanceMacs", "count_macs"]
