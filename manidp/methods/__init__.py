"""Method registry. Methods register through the ``manidp.methods`` entry-point
group (``[project.entry-points."manidp.methods"]`` in pyproject.toml), the same
way a third-party package adds its own; :func:`load_all` reads the group, so
``manidp`` never imports the packages that hold the methods by name."""
from __future__ import annotations

from importlib.metadata import entry_points

from manidp._defaults import METHODS_ENTRY_POINT_GROUP
from manidp.errors import UserError
from manidp.methods._base import METHODS, Method, RunContext, default_param_groups, register_method

__all__ = ["METHODS", "Method", "RunContext", "default_param_groups", "register_method", "load_all",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = METHODS_ENTRY_POINT_GROUP


def load_all() -> None:
    """Register every method of the entry-point group (idempotent).

    An entry point that fails to import, names no :class:`Method` whose
    ``name`` is its key, or a name two entry points claim, is a
    :class:`~manidp.errors.UserError` naming the entry points involved.
    """
    claimed: dict[str, str] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        # The same entry point can be listed twice (an editable install and a source checkout's
        # egg-info both on sys.path); only a different target for one name is a conflict.
        if point.name in claimed and claimed[point.name] != point.value:
            raise UserError(f"method '{point.name}' is registered twice: by entry points "
                            f"'{claimed[point.name]}' and '{point.value}' (group {ENTRY_POINT_GROUP})")
        claimed[point.name] = point.value
        try:
            cls = point.load()
        except Exception as err:
            raise UserError(f"method entry point {point.name} = '{point.value}' (group {ENTRY_POINT_GROUP}) "
                            f"failed to import: {type(err).__name__}: {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != point.name:
            raise UserError(f"method entry point {point.name} = '{point.value}' must name a Method subclass "
                            f"whose name is '{point.name}'")
        try:
            METHODS.register(point.name)(cls)
        except ValueError as err:  # registered explicitly (register_method) by something else
            raise UserError(f"{err}: entry point '{point.value}' and {METHODS.get(point.name).__module__}."
                            f"{METHODS.get(point.name).__qualname__}") from None
