"""Double of ``mdistiller/engine/trainer.py``: the calling contract of the trainers.

* ``BaseTrainer`` passes ``image``, ``target`` and ``epoch`` as keywords, sums ``l.mean()`` over the
  losses dict, and, after each epoch, writes ``latest``/``best`` (the distiller's state dict) and
  ``student_latest``/``student_best`` (the bare student's), each as ``{"model": state_dict, ...}``.
* ``DOT`` reads exactly ``loss_ce`` and ``loss_kd`` and back-propagates them one after the other
  (the first with ``retain_graph=True``). mdistiller's DOT silently ignores other keys; this double
  rejects them, which is what a distiller meant for DOT must satisfy anyway.
* ``CRDTrainer`` batches are ``(image, target, index, contrastive_index)`` and no ``epoch`` is passed.

Every batch goes through ``.cuda(non_blocking=True)``, as in mdistiller.
"""

import os

import torch
from torch import optim


def _save(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)


def _load(path):
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu")


class BaseTrainer:
    def __init__(self, experiment_name, distiller, train_loader, val_loader, cfg):
        self.cfg = cfg
        self.distiller = distiller
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = self.init_optimizer(cfg)
        self.best_acc = -1
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        os.makedirs(self.log_path, exist_ok=True)

    def init_optimizer(self, cfg):
        return optim.SGD(
            self.distiller.module.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    def train(self, resume=False):
        epoch = 1
        if resume:
            state = _load(os.path.join(self.log_path, "latest"))
            epoch = state["epoch"] + 1
            self.distiller.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.best_acc = state["best_acc"]
        while epoch < self.cfg.SOLVER.EPOCHS + 1:
            self.train_epoch(epoch)
            epoch += 1

    def train_epoch(self, epoch):
        self.distiller.train()
        for data in self.train_loader:
            self.train_iter(data, epoch)
        test_acc = self.validate()
        self.best_acc = max(self.best_acc, test_acc)
        state = {
            "epoch": epoch,
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
        }
        student_state = {"model": self.distiller.module.student.state_dict()}
        _save(state, os.path.join(self.log_path, "latest"))
        _save(student_state, os.path.join(self.log_path, "student_latest"))
        if test_acc >= self.best_acc:
            _save(state, os.path.join(self.log_path, "best"))
            _save(student_state, os.path.join(self.log_path, "student_best"))

    def validate(self):
        self.distiller.eval()
        correct = total = 0
        with torch.no_grad():
            for image, target in self.val_loader:
                image = image.float().cuda(non_blocking=True)
                target = target.cuda(non_blocking=True)
                output = self.distiller(image=image)
                correct += (output.argmax(dim=1) == target).sum().item()
                total += target.numel()
        return 100.0 * correct / total

    def train_iter(self, data, epoch):
        self.optimizer.zero_grad()
        image, target, index = data
        image = image.float().cuda(non_blocking=True)
        target = target.cuda(non_blocking=True)
        index = index.cuda(non_blocking=True)
        preds, losses_dict = self.distiller(image=image, target=target, epoch=epoch)
        loss = sum([value.mean() for value in losses_dict.values()])
        loss.backward()
        self.optimizer.step()
        return preds


class CRDTrainer(BaseTrainer):
    def train_iter(self, data, epoch):
        self.optimizer.zero_grad()
        preds, losses_dict = self._crd_forward(data)
        loss = sum([value.mean() for value in losses_dict.values()])
        loss.backward()
        self.optimizer.step()
        return preds

    def _crd_forward(self, data):
        """CRD's batches carry the sample and contrastive indices; the distiller gets them, not the epoch."""
        image, target, index, contrastive_index = data
        image = image.float().cuda(non_blocking=True)
        target = target.cuda(non_blocking=True)
        index = index.cuda(non_blocking=True)
        contrastive_index = contrastive_index.cuda(non_blocking=True)
        return self.distiller(image=image, target=target, index=index, contrastive_index=contrastive_index)


class DOT(BaseTrainer):
    def train_iter(self, data, epoch):
        image, target, index = data
        image = image.float().cuda(non_blocking=True)
        target = target.cuda(non_blocking=True)
        index = index.cuda(non_blocking=True)
        preds, losses_dict = self.distiller(image=image, target=target, epoch=epoch)
        self._dot_step(losses_dict)
        return preds

    def _dot_step(self, losses_dict):
        """DOT's update: the two losses backpropagated separately (mdistiller gives them two momenta)."""
        if set(losses_dict) != {"loss_ce", "loss_kd"}:
            raise KeyError(f"the DOT trainer needs exactly loss_ce and loss_kd, got {sorted(losses_dict)}")
        loss_ce, loss_kd = losses_dict["loss_ce"].mean(), losses_dict["loss_kd"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss_kd.backward(retain_graph=True)
        kd_grads = [None if p.grad is None else p.grad.clone() for p in self._params()]
        self.optimizer.zero_grad(set_to_none=True)
        loss_ce.backward()
        for param, kd_grad in zip(self._params(), kd_grads, strict=True):
            if kd_grad is not None:
                param.grad = kd_grad if param.grad is None else param.grad + kd_grad
        self.optimizer.step()

    def _params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class CRDDOT(CRDTrainer, DOT):
    """CRD's data and call (indices, no epoch) with DOT's two-loss update."""

    def train_iter(self, data, epoch):
        preds, losses_dict = self._crd_forward(data)
        self._dot_step(losses_dict)
        return preds
