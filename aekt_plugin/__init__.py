"""aekt-plugin: AEKT (adaptive explicit knowledge transfer) and its decoupled family, KD and DKD.

The core depends on torch alone::

    from aekt_plugin import aekt_loss, AEKTLoss, SerialLayer

Integrations are separate modules, imported only when used: :mod:`aekt_plugin.mdistiller`,
:mod:`aekt_plugin.timm`, :mod:`aekt_plugin.torchdistill`.
"""

from .defaults import DEFAULTS, Defaults
from .functional import aekt_loss, dkd_loss, kd_loss
from .loss import AEKTLoss, DKDLoss, KDLoss
from .serial import SerialLayer

__version__ = "0.1.0"

__all__ = [
    "DEFAULTS",
    "AEKTLoss",
    "DKDLoss",
    "Defaults",
    "KDLoss",
    "SerialLayer",
    "__version__",
    "aekt_loss",
    "dkd_loss",
    "kd_loss",
]
