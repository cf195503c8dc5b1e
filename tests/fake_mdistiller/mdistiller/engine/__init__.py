"""Double of ``mdistiller/engine/__init__.py``: the trainer registry (importing it imports the trainers)."""

from .trainer import CRDDOT, DOT, BaseTrainer, CRDTrainer

trainer_dict = {
    "base": BaseTrainer,
    "crd": CRDTrainer,
    "dot": DOT,
    "crd_dot": CRDDOT,
}
