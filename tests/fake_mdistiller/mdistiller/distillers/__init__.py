"""Double of ``mdistiller/distillers/__init__.py``: the plain-dict registry ``tools/train.py`` reads."""

from .DKD import DKD

distiller_dict = {
    "DKD": DKD,
}
