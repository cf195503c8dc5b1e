"""Double of mdistiller's DKD distiller: same config node, objective and losses dict.

The loss is written here from the DKD paper's definition, T²·(α·TCKD + β·NCKD) averaged over the batch,
in plain autograd (probabilities for the binary part, a masked log-softmax for the non-target part).
"""

import torch
import torch.nn.functional as F

from ._base import Distiller


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt = F.one_hot(target, logits_student.shape[1]).bool()
    p = F.softmax(logits_student / temperature, dim=1)
    q = F.softmax(logits_teacher / temperature, dim=1)
    p_t, q_t = p[gt], q[gt]
    tckd = q_t * (q_t.log() - p_t.log()) + (1 - q_t) * ((1 - q_t).log() - (1 - p_t).log())
    log_p_hat = F.log_softmax((logits_student / temperature).masked_fill(gt, float("-inf")), dim=1)
    q_hat = F.softmax((logits_teacher / temperature).masked_fill(gt, float("-inf")), dim=1)
    nckd = (torch.xlogy(q_hat, q_hat) - q_hat * log_p_hat.masked_fill(gt, 0.0)).sum(dim=1)
    return (temperature**2) * (alpha * tckd + beta * nckd).mean()


class DKD(Distiller):
    """Decoupled knowledge distillation, reading ``cfg.DKD``."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.DKD.CE_WEIGHT
        self.alpha = cfg.DKD.ALPHA
        self.beta = cfg.DKD.BETA
        self.temperature = cfg.DKD.T
        self.warmup = cfg.DKD.WARMUP

    def forward_train(self, image, target, **kwargs):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_kd = min(kwargs["epoch"] / self.warmup, 1.0) * dkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.temperature
        )
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}
