"""Double of ``mdistiller/distillers/_base.py``: the distiller base class and its calling convention."""

from torch import nn


class Distiller(nn.Module):
    """Student and teacher; keyword-only ``forward`` dispatching on ``self.training``."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return [param for _, param in self.student.named_parameters()]

    def get_extra_parameters(self):
        return 0

    def forward_train(self, **kwargs):
        raise NotImplementedError()

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])
