"""singleflight: make concurrent identical work happen exactly once."""

from ._decorator import Singleflight as Singleflight, singleflight as singleflight
from ._errors import (
    FlightAbandoned as FlightAbandoned,
    ReentrancyError as ReentrancyError,
    SingleflightError as SingleflightError,
)
from ._group import Group as Group, Stats as Stats
from ._oncemap import OnceMap as OnceMap

__all__ = [
    "FlightAbandoned",
    "Group",
    "OnceMap",
    "ReentrancyError",
    "Singleflight",
    "SingleflightError",
    "Stats",
    "singleflight",
]

__version__ = "0.1.0"

for _name in __all__:
    globals()[_name].__module__ = "singleflight"
del _name
