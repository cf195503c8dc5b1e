"""aekt-plugin: AEKT (adaptive explicit knowledge transfer) and its decoupled family, KD and DKD.

The core depends on torch alone::

    from aekt_plugin import aekt_loss, AEKTLoss, SerialLayer

Integrations are separate modules, imported only when used: :mod:`aekt_plugin.mdistiller`,
:mod:`aekt_plugin.timm`, :mod:`aekt_plugin.torchdistill`.
"""

from ._validation import ORDERS, check_order
from .functional import DEFAULTS, aekt_loss, dkd_loss, kd_loss
from .loss import AEKTLoss, DKDLoss, KDLoss
from .serial import SerialLayer, split_logits, warmup_factor

__version__ = "0.1.0"

__all__ = [
    "DEFAULTS",
    "ORDERS",
    "AEKTLoss",
    "DKDLoss",
    "KDLoss",
    "SerialLayer",
    "__version__",
    "aekt_loss",
    "check_order",
    "dkd_loss",
    "kd_loss",
    "split_logits",
    "warmup_factor",
]
