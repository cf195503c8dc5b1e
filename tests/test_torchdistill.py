"""aekt_plugin.torchdistill against the real torchdistill: registry, yaml, io dicts, serial layer, a run."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

pytest.importorskip("torchdistill")

import yaml  # noqa: E402  (torchdistill's dependency)
from torchdistill.common import yaml_util  # noqa: E402
from torchdistill.common.main_util import import_dependencies, set_seed  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.core.interfaces.registry import (  # noqa: E402
    POST_FORWARD_PROC_FUNC_DICT,
    PRE_EPOCH_PROC_FUNC_DICT,
)
from torchdistill.losses.registry import (  # noqa: E402
    MIDDLE_LEVEL_LOSS_DICT,
    get_high_level_loss,
    get_mid_level_loss,
)
from torchdistill.models.registry import MODEL_DICT, get_model  # noqa: E402

import aekt_plugin  # noqa: E402
from aekt_plugin import aekt_loss, dkd_loss  # noqa: E402
from aekt_plugin import torchdistill as td  # noqa: E402

CONFIG_DIR = files("aekt_plugin") / "configs" / "torchdistill"
CIFAR_CONFIGS = (
    "wide_resnet40_1_from_wide_resnet40_4-aekt.yaml",
    "wide_resnet40_1_from_wide_resnet40_4-aekt_serial.yaml",
)

CRITERION_YAML = """
dependencies:
  - name: 'aekt_plugin.torchdistill'
criterion:
  key: 'WeightedSumLoss'
  kwargs:
    sub_terms:
      ce:
        criterion:
          key: 'CrossEntropyLoss'
          kwargs:
            reduction: 'mean'
        criterion_wrapper:
          key: 'SimpleLossWrapper'
          kwargs:
            input: {{is_from_teacher: False, module_path: '.', io: 'output'}}
            target: {{uses_label: True}}
        weight: 1.0
      kd:
        criterion:
          key: '{key}'
          kwargs:
            student_module_path: 'fc'
            student_module_io: 'output'
            teacher_module_path: '.'
            teacher_module_io: 'output'
{extra}
        weight: {weight}
"""

OPTIONS = {
    "AEKTLoss": {"temperature": 2.0, "alpha": 0.5, "beta": 3.0, "max_weight": 3.0, "normalize_weight": False},
    "DKDLoss": {"temperature": 2.0, "alpha": 0.5, "beta": 3.0},
}
CORE = {"AEKTLoss": aekt_loss, "DKDLoss": dkd_loss}


def _yaml_loss(key: str, path: str = ".", io: str = "output", teacher_path: str = ".", teacher_io: str = "output", **kwargs):
    """The loss a yaml's ``criterion: {key: KEY, kwargs: {...}}`` builds, through torchdistill's registry."""
    return MIDDLE_LEVEL_LOSS_DICT[key](
        student_module_path=path,
        student_module_io=io,
        teacher_module_path=teacher_path,
        teacher_module_io=teacher_io,
        **kwargs,
    )


def _criterion_from_yaml(tmp_path: Path, key: str, options: dict, weight: float = 0.7):
    extra = "\n".join(f"            {k}: {v}" for k, v in options.items())
    path = tmp_path / "criterion.yaml"
    path.write_text(CRITERION_YAML.format(key=key, extra=extra, weight=weight))
    config = yaml_util.load_yaml_file(str(path))
    import_dependencies(config.get("dependencies"))
    return get_high_level_loss(config["criterion"])


def _logits(batch: int = 16, classes: int = 10, seed: int = 0, teacher_requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(batch, classes, generator=gen)).requires_grad_()
    v = (3 * torch.randn(batch, classes, generator=gen)).requires_grad_(teacher_requires_grad)
    y = torch.randint(classes, (batch,), generator=gen)
    return z, v, y


# --------------------------------------------------------------------------------------------- registry


@pytest.mark.slow
def test_import_aekt_plugin_does_not_import_torchdistill():
    code = "import sys, aekt_plugin; assert 'torchdistill' not in sys.modules, 'torchdistill imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_registers_losses_and_models_with_torchdistill():
    for key in td.LOSS_KEYS:
        built = MIDDLE_LEVEL_LOSS_DICT[key](student_module_path=".", student_module_io="output", beta=2.0)
        assert isinstance(built, td.IODictLoss) and type(built.criterion) is getattr(aekt_plugin, key)
        assert built.criterion.beta == 2.0
    assert MODEL_DICT["AEKTSerialStudent"] is td.AEKTSerialStudent
    assert PRE_EPOCH_PROC_FUNC_DICT["aekt_pre_epoch_process"] is td.aekt_pre_epoch_process
    assert POST_FORWARD_PROC_FUNC_DICT["aekt_post_forward_process"] is td.aekt_post_forward_process
    # torchdistill's own losses keep their keys: ours are named apart from its KDLoss
    assert MIDDLE_LEVEL_LOSS_DICT["KDLoss"] not in [MIDDLE_LEVEL_LOSS_DICT[key] for key in td.LOSS_KEYS]


@pytest.mark.slow
def test_the_demo_model_is_registered_only_by_the_demo_module():
    code = (
        "import torchdistill.models.registry as r, aekt_plugin.torchdistill\n"
        "assert 'aekt_demo_cnn' not in r.MODEL_DICT\n"
        "import aekt_plugin.demo.torchdistill\n"
        "assert callable(r.MODEL_DICT['aekt_demo_cnn'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_registering_twice_is_harmless(caplog):
    before = dict(MIDDLE_LEVEL_LOSS_DICT), dict(MODEL_DICT)
    with caplog.at_level(logging.WARNING):
        td.register()
        td.register()
        import_dependencies(["aekt_plugin.torchdistill", {"name": "aekt_plugin.torchdistill"}])
    assert (dict(MIDDLE_LEVEL_LOSS_DICT), dict(MODEL_DICT)) == before
    assert not [r for r in caplog.records if r.name == td.__name__]


def test_foreign_registration_under_our_key_is_replaced_with_a_warning(caplog):
    class Impostor(nn.Module):
        pass

    ours = MIDDLE_LEVEL_LOSS_DICT["AEKTLoss"]
    MIDDLE_LEVEL_LOSS_DICT["AEKTLoss"] = Impostor
    try:
        with caplog.at_level(logging.WARNING, logger=td.__name__):
            td.register()
        assert MIDDLE_LEVEL_LOSS_DICT["AEKTLoss"] is not Impostor
    finally:
        MIDDLE_LEVEL_LOSS_DICT["AEKTLoss"] = ours
    assert "AEKTLoss" in caplog.text and "Impostor" in caplog.text


@pytest.mark.slow
def test_importing_twice_in_a_fresh_interpreter_keeps_one_registration():
    code = (
        "import importlib, torchdistill.losses.registry as r\n"
        "import aekt_plugin.torchdistill as a\n"
        "first = r.MIDDLE_LEVEL_LOSS_DICT['AEKTLoss']\n"
        "importlib.reload(a)\n"
        "second = r.MIDDLE_LEVEL_LOSS_DICT['AEKTLoss']\n"
        "assert second.__module__ == first.__module__ and second.__qualname__ == first.__qualname__\n"
        "assert isinstance(second(student_module_path='.'), a.IODictLoss)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "replaces it" not in result.stderr


# ----------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("key", ["AEKTLoss", "DKDLoss"])
def test_loss_from_yaml_in_weighted_sum_equals_core_plus_ce(tmp_path, key):
    criterion = _criterion_from_yaml(tmp_path, key, OPTIONS[key], weight=0.7)
    z, v, y = _logits()
    out = torch.randn(16, 10)
    io = {
        "student": {".": {"output": out}, "fc": {"output": z}},
        "teacher": {".": {"output": v}},
    }
    total = criterion(io, {}, y)
    expected = nn.functional.cross_entropy(out, y) + 0.7 * CORE[key](z, v, y, **OPTIONS[key])
    torch.testing.assert_close(total, expected)
    kd_term = criterion.term_dict["kd"][0]
    assert isinstance(kd_term, td.IODictLoss) and type(kd_term.criterion) is getattr(aekt_plugin, key)
    torch.testing.assert_close(kd_term(io["student"], io["teacher"], y), CORE[key](z, v, y, **OPTIONS[key]))


@pytest.mark.parametrize("key", ["AEKTLoss", "DKDLoss"])
def test_gradients_reach_the_student_logits_only(tmp_path, key):
    criterion = _criterion_from_yaml(tmp_path, key, OPTIONS[key])
    z, v, y = _logits(seed=1, teacher_requires_grad=True)  # a teacher trained alongside, say
    io = {"student": {".": {"output": z}, "fc": {"output": z}}, "teacher": {".": {"output": v}}}
    with pytest.warns(UserWarning, match="teacher_logits requires grad"):
        criterion(io, {}, y).backward()
    assert v.grad is None
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["AEKTLoss", "DKDLoss"])
def test_defaults_come_from_the_package_defaults(key):
    loss = _yaml_loss(key)
    names = ["temperature", "alpha", "beta"]
    if key == "AEKTLoss":
        names += ["max_weight", "normalize_weight"]
    for name in names:
        assert getattr(loss.criterion, name) == getattr(aekt_plugin.DEFAULTS, name)
    z, v, y = _logits(seed=2)
    io_s, io_t = {".": {"output": z}}, {".": {"output": v}}
    torch.testing.assert_close(loss(io_s, io_t, y), CORE[key](z, v, y))


def test_batchmean_is_the_per_sample_mean_and_none_keeps_samples():
    z, v, y = _logits(seed=3)
    io_s, io_t = {".": {"output": z}}, {".": {"output": v}}
    per_sample = _yaml_loss("AEKTLoss", reduction="none")(io_s, io_t, y)
    assert per_sample.shape == (16,)
    batchmean = _yaml_loss("AEKTLoss", reduction="batchmean")(io_s, io_t, y)
    torch.testing.assert_close(batchmean, aekt_loss(z, v, y, reduction="mean"))


@pytest.mark.parametrize("key", ["AEKTLoss", "DKDLoss"])
def test_the_kernel_options_pass_through(key):
    z, v, y = _logits(seed=7)
    y[::3] = 255  # ignored samples, as in a segmentation mask
    temperature = nn.Parameter(torch.tensor(3.0))
    options = {"ignore_index": 255, "standardize": True, "temperature": temperature}
    loss = _yaml_loss(key, **options)
    value = loss({".": {"output": z}}, {".": {"output": v}}, y)
    torch.testing.assert_close(value, CORE[key](z, v, y, **options))
    value.backward()
    assert temperature.grad is not None and torch.isfinite(temperature.grad)
    assert (z.grad[::3] == 0).all() and z.grad.abs().sum() > 0


def test_input_io_reads_the_hooked_module_input():
    z, v, y = _logits(seed=4)
    loss = _yaml_loss("DKDLoss", "head", "input", "head", "input")
    value = loss({"head": {"input": z, "output": None}}, {"head": {"input": v}}, y)
    torch.testing.assert_close(value, dkd_loss(z, v, y))


def test_without_the_box_processes_the_warmup_counts_training_forwards_and_says_so():
    z, v, y = _logits(seed=5)
    z.requires_grad_(True)
    io_s, io_t = {".": {"output": z}}, {".": {"output": v}}
    loss = _yaml_loss("AEKTLoss", warmup_steps=4)
    full = aekt_loss(z, v, y).detach()
    with torch.no_grad():  # evaluation passes do not advance the warm-up
        loss(io_s, io_t, y)
    with pytest.warns(UserWarning, match="aekt_post_forward_process"):
        values = [loss(io_s, io_t, y).detach() for _ in range(6)]
    for step, value in enumerate(values):
        torch.testing.assert_close(value, full * min(step / 4, 1.0))


class _Box:
    """The parts of a torchdistill box that the processes touch."""

    def __init__(self, criterion, batches_per_epoch, grad_accum_step=1):
        self.criterion = criterion
        self.train_data_loader = range(batches_per_epoch)
        self.grad_accum_step = grad_accum_step
        self.teacher_io_dict, self.student_io_dict = {}, {}
        self.teacher_model, self.student_model = nn.Linear(2, 2), nn.Linear(2, 2)
        self.teacher_updatable = False
        self.distributed = False
        self.stage_grad_count = 0
        self.max_grad_norm = None
        self.accelerator = None
        self.lr_scheduler = None
        self.scheduling_step = 0
        self.optimizer = torch.optim.SGD(self.student_model.parameters(), lr=0.0)


def test_the_box_processes_count_optimiser_steps_and_resume_from_the_epoch():
    z, v, y = _logits(seed=6)
    io_s, io_t = {".": {"output": z}}, {".": {"output": v}}
    kd = _yaml_loss("DKDLoss", warmup_steps=6)
    criterion = get_high_level_loss(
        {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}}
    )
    box = _Box(criterion, batches_per_epoch=4, grad_accum_step=2)  # 2 optimiser steps per epoch
    td.aekt_pre_epoch_process(box, epoch=0)
    assert not box.teacher_model.training  # torchdistill's default leaves the teacher as it was
    factors = []
    for _ in range(4):  # one epoch: 4 forward passes, 2 optimiser steps
        factors.append(float(kd.warmup.factor))
        out = box.student_model(torch.randn(1, 2)).sum() * 0
        td.aekt_post_forward_process(box, loss=out)
    assert factors == pytest.approx([0.0, 0.0, 1 / 6, 1 / 6])
    resumed = _yaml_loss("DKDLoss", warmup_steps=6)
    fresh_box = _Box(
        get_high_level_loss(
            {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": resumed, "weight": 1.0}}}}
        ),
        batches_per_epoch=4,
        grad_accum_step=2,
    )
    td.aekt_pre_epoch_process(fresh_box, epoch=2)  # a run resumed at epoch 2
    assert float(resumed.warmup.factor) == pytest.approx(4 / 6)
    value = resumed(io_s, io_t, y)
    torch.testing.assert_close(value, dkd_loss(z, v, y) * (4 / 6))


def test_the_epoch_start_counts_the_updates_torchdistill_made_with_uneven_accumulation():
    """torchdistill counts forwards across the stage and steps every grad_accum_step of them: 10 batches
    and grad_accum_step=3 make 10 updates in 3 epochs, not 3·ceil(10/3) = 12."""
    kd = _yaml_loss("DKDLoss", warmup_steps=20)
    criterion = get_high_level_loss(
        {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}}
    )
    box = _Box(criterion, batches_per_epoch=10, grad_accum_step=3)
    td.aekt_pre_epoch_process(box, epoch=0)
    for _ in range(30):  # three epochs, uninterrupted
        td.aekt_post_forward_process(box, loss=box.student_model(torch.randn(1, 2)).sum() * 0)
    assert float(kd.warmup.steps) == 10
    td.aekt_pre_epoch_process(box, epoch=3)
    assert float(kd.warmup.steps) == 10
    resumed = _yaml_loss("DKDLoss", warmup_steps=20)
    resumed_box = _Box(
        get_high_level_loss(
            {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": resumed, "weight": 1.0}}}}
        ),
        batches_per_epoch=10,
        grad_accum_step=3,
    )
    td.aekt_pre_epoch_process(resumed_box, epoch=3)
    assert float(resumed.warmup.steps) == 10
    # a multi-stage box builds each stage's criterion anew and counts from the stage's first epoch
    stage_two = _yaml_loss("DKDLoss", warmup_steps=20)
    stage_box = _Box(
        get_high_level_loss(
            {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": stage_two, "weight": 1.0}}}}
        ),
        batches_per_epoch=10,
        grad_accum_step=3,
    )
    stage_box.stage_number, stage_box.stage_end_epoch = 2, 9  # stage 2 runs epochs 4-8
    stage_box.train_config = {"stage1": {"num_epochs": 4}, "stage2": {"num_epochs": 5}}
    td.aekt_pre_epoch_process(stage_box, epoch=6)
    assert float(stage_two.warmup.steps) == 2 * 10 // 3


# ------------------------------------------------------------------------------------------ bad configs


def test_missing_student_module_path_names_the_path():
    z, v, y = _logits()
    loss = _yaml_loss("AEKTLoss", "fc", "output", ".", "output")
    with pytest.raises(ValueError, match=r"student_module_path 'fc'.*forward_hook"):
        loss({".": {"output": z}}, {".": {"output": v}}, y)


def test_missing_teacher_module_path_names_the_path():
    z, v, y = _logits()
    loss = _yaml_loss("DKDLoss", ".", "output", "classifier", "output")
    with pytest.raises(ValueError, match=r"teacher_module_path 'classifier'"):
        loss({".": {"output": z}}, {".": {"output": v}}, y)


def test_missing_io_key_names_the_io_and_the_path():
    z, v, y = _logits()
    loss = _yaml_loss("AEKTLoss", "fc", "input", ".", "output")
    with pytest.raises(ValueError, match=r"student_module_io 'input'.*'fc'") as info:
        loss({"fc": {"output": z}}, {".": {"output": v}}, y)
    assert not isinstance(info.value, KeyError)


def test_tuple_output_asks_for_a_classifier_hook():
    z, v, y = _logits()
    loss = _yaml_loss("AEKTLoss")
    with pytest.raises(TypeError, match=r"tuple.*hook its classifier"):
        loss({".": {"output": (z, z)}}, {".": {"output": v}}, y)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"student_module_io": "outputs"}, ValueError, "student_module_io"),
        ({"teacher_module_path": ""}, ValueError, "teacher_module_path"),
        ({"student_module_path": 3}, TypeError, "student_module_path"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"max_weight": 0.0}, ValueError, "max_weight"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"temprature": 4.0}, TypeError, "temprature"),
    ],
)
def test_bad_constructor_values_fail_when_the_box_is_built_naming_the_key(kwargs, error, name):
    config = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        **kwargs,
    }
    with pytest.raises(error, match=name):
        get_mid_level_loss({"key": "AEKTLoss", "kwargs": config})


def test_omitted_module_paths_read_the_models_own_outputs():
    loss = get_mid_level_loss({"key": "DKDLoss", "kwargs": {"beta": 2.0}})
    assert (loss.student_module_path, loss.student_module_io) == (".", "output")
    assert (loss.teacher_module_path, loss.teacher_module_io) == (".", "output")
    z, v, y = _logits(seed=8)
    torch.testing.assert_close(loss({".": {"output": z}}, {".": {"output": v}}, y), dkd_loss(z, v, y, beta=2.0))


# ---------------------------------------------------------------------------------------- serial layer


class _Head(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.num_classes = classes
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("order", ["cls_kd", "kd_cls"])
def test_serial_student_returns_z_cls_and_exposes_z_kd_at_kd_logits(order):
    torch.manual_seed(0)
    student = td.AEKTSerialStudent(_Head(), order=order)
    assert isinstance(student.serial, aekt_plugin.SerialLayer) and student.serial.order == order
    with torch.no_grad():  # move S away from its identity initialisation so z_cls and z_kd differ
        for p in student.serial.parameters():
            p.add_(0.1 * torch.randn_like(p))
    recorded = {}
    student.kd_logits.register_forward_hook(lambda m, i, o: recorded.__setitem__("z_kd", o))
    x = torch.randn(3, 4)
    z_cls = student(x)
    head = student.model(x)
    expected_cls, expected_kd = student.serial(head)
    torch.testing.assert_close(z_cls, expected_cls)
    torch.testing.assert_close(recorded["z_kd"], expected_kd)
    assert not torch.allclose(z_cls, recorded["z_kd"])


def test_serial_student_cls_kd_drops_the_serial_layer_in_eval_mode():
    student = td.AEKTSerialStudent(_Head(), order="cls_kd").eval()
    calls = []
    student.serial.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 4)
    torch.testing.assert_close(student(x), student.model(x))
    assert calls == []


@pytest.mark.parametrize("order", ["cls_kd", "kd_cls"])
def test_deploy_model_folds_the_serial_layer_into_the_classifier(order):
    torch.manual_seed(1)
    student = td.AEKTSerialStudent(_Head(), order=order)
    with torch.no_grad():
        for p in student.serial.parameters():
            p.add_(0.1 * torch.randn_like(p))
    deployed = student.deploy_model("fc")
    x = torch.randn(6, 4)
    torch.testing.assert_close(deployed(x), student.train()(x))
    assert isinstance(deployed, _Head) and deployed is not student.model
    with pytest.raises(ValueError, match="classifier_path"):
        student.deploy_model("head")


def test_serial_student_builds_the_base_model_from_a_torchdistill_config():
    student = get_model(
        "AEKTSerialStudent",
        model={"key": "resnet20", "kwargs": {"num_classes": 7}},
        num_classes=7,
        order="kd_cls",
    )
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert student.serial.order == "kd_cls"


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"order": "sideways"}, ValueError, "order"),
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"model": {"kwargs": {}}}, ValueError, "key"),
        ({"model": "resnet20"}, TypeError, "model"),
    ],
)
def test_serial_student_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        td.AEKTSerialStudent(**{"model": _Head(), **kwargs})


def test_serial_student_without_num_classes_attribute_asks_for_it():
    with pytest.raises(ValueError, match="num_classes"):
        td.AEKTSerialStudent(nn.Sequential(nn.ReLU()), order="cls_kd")


def test_serial_student_rejects_a_model_that_returns_a_tuple():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="logits"):
        td.AEKTSerialStudent(Pair(), num_classes=4)(torch.randn(2, 4))


# -------------------------------------------------------------------------------------- shipped configs


def _offline_config(path: Path) -> dict:
    """A torchdistill yaml with ``!import_call`` left as its config dict (no dataset downloads)."""

    class Loader(yaml.FullLoader):
        pass

    def join(loader, node):
        return "".join(str(x) for x in loader.construct_sequence(node))

    Loader.add_constructor("!join", join)
    Loader.add_constructor("!import_get", yaml_util.yaml_import_get)
    Loader.add_constructor("!import_call", lambda loader, node: loader.construct_mapping(node, deep=True))
    with open(path) as fh:
        return yaml.load(fh, Loader=Loader)


def test_shipped_configs_are_package_data():
    names = {p.name for p in CONFIG_DIR.iterdir()}
    assert set(CIFAR_CONFIGS) | {"digits_aekt_serial.yaml"} <= names


@pytest.mark.parametrize("name", CIFAR_CONFIGS)
def test_cifar100_config_builds_and_takes_a_step_through_the_distillation_box(name):
    config = _offline_config(CONFIG_DIR / name)
    import_dependencies(config["dependencies"])
    models = config["models"]
    teacher_kwargs = {**models["teacher_model"]["kwargs"], "pretrained": False}  # no download here
    teacher = get_model(models["teacher_model"]["key"], **teacher_kwargs)
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"])
    train = copy.deepcopy(config["train"])
    for loader in ("train_data_loader", "val_data_loader"):
        train[loader]["kwargs"].update(batch_size=4, num_workers=0, pin_memory=False)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(100, (8,)))
    datasets = {key: data for key in config["datasets"]}
    box = get_distillation_box(teacher, student, datasets, train, torch.device("cpu"), None, False, 1)
    kd = box.criterion.term_dict["kd"][0]
    assert isinstance(kd, td.IODictLoss) and isinstance(kd.criterion, aekt_plugin.AEKTLoss) and kd.warmup_steps > 0
    box.pre_epoch_process(epoch=0)
    x, y, supp = next(iter(box.train_data_loader))
    loss = box.forward_process(x, y, supp)
    # first step of the warm-up: the AEKT term is 0, the loss is the student's cross-entropy
    assert torch.isfinite(loss) and 3.0 < loss.item() < 7.0
    box.post_forward_process(loss=loss)
    box.clean_modules()


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_digits_config_runs_end_to_end_through_get_distillation_box():
    pytest.importorskip("sklearn")
    set_seed(0)
    config = yaml_util.load_yaml_file(str(CONFIG_DIR / "digits_aekt_serial.yaml"))
    import_dependencies(config.get("dependencies"))
    models = config["models"]
    teacher = get_model(models["teacher_model"]["key"], **models["teacher_model"]["kwargs"])
    student = get_model(models["student_model"]["key"], **models["student_model"]["kwargs"])
    assert isinstance(student, td.AEKTSerialStudent)
    serial_before = student.serial.relation_matrix().detach().clone()
    box = get_distillation_box(
        teacher, student, config["datasets"], config["train"], torch.device("cpu"), None, False, 1
    )
    stage1_epochs = config["train"]["stage1"]["num_epochs"]

    def accuracy(model: nn.Module) -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in box.val_data_loader:
                correct += (model(x).argmax(1) == y).sum().item()
                total += y.numel()
        return correct / total

    epoch_losses = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        losses = []
        for x, y, supp in box.train_data_loader:
            loss = box.forward_process(x, y, supp)
            box.post_forward_process(loss=loss)
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
        if epoch == stage1_epochs - 1:
            teacher_accuracy = accuracy(teacher)
        box.post_epoch_process()
    student_accuracy = accuracy(student)
    box.clean_modules()

    kd = box.criterion.term_dict["kd"][0]
    assert isinstance(kd, td.IODictLoss) and isinstance(kd.criterion, aekt_plugin.AEKTLoss) and kd.student_module_path == "kd_logits"
    steps_per_epoch = len(box.train_data_loader)
    stage2 = epoch_losses[stage1_epochs:]
    assert kd.warmup_steps <= steps_per_epoch  # so the second distillation epoch is past the warm-up
    assert all(torch.isfinite(torch.tensor(epoch_losses)))
    assert epoch_losses[stage1_epochs - 1] < 0.5 * epoch_losses[0]  # the teacher learned
    assert stage2[-1] < 0.7 * stage2[1]  # the distillation loss falls after the warm-up
    assert teacher_accuracy > 0.9
    assert student_accuracy > 0.7  # chance is 0.1
    # the AEKT gradient reached the serial layer through the hooked kd_logits path
    assert not torch.allclose(student.serial.relation_matrix(), serial_before)


def _torchdistill_checkout() -> Path | None:
    root = os.environ.get("TORCHDISTILL_ROOT")
    script = Path(root or "/nonexistent") / "examples" / "torchvision" / "image_classification.py"
    return script.parents[2] if script.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(
    _torchdistill_checkout() is None,
    reason="needs a torchdistill checkout (TORCHDISTILL_ROOT) for its example script, which its wheel lacks; "
    "test_digits_config_runs_end_to_end_through_get_distillation_box covers the same config through the box",
)
def test_the_readme_command_trains_the_shipped_config_with_torchdistills_own_script(tmp_path):
    """The README's torchdistill block, as written (after its clone and cd), in a directory that holds the
    checkout's examples/: exit 0, the student's checkpoint written, its accuracy logged."""
    pytest.importorskip("sklearn")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```bash\n")[1:] if "image_classification.py" in b).split("```")[0]
    lines = [line for line in block.splitlines() if not line.startswith(("git clone", "cd torchdistill"))]
    (tmp_path / "examples").symlink_to(_torchdistill_checkout() / "examples", target_is_directory=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-ec", "\n".join(lines)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "resource" / "ckpt").rglob("*.pt"))
    assert "[Student: AEKTSerialStudent]" in done.stderr and " * Acc@1 " in done.stderr


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """torchdistill's DistillationBox with the AEKT loss, grad_accum_step=4 and a warm-up still ramping:
    killed in the middle of the second epoch and resumed from the last epoch's checkpoint, the run ends with
    the student weights of one never interrupted, bit for bit (the warm-up clock is set from the epoch)."""
    pytest.importorskip("sklearn")
    worker = [sys.executable, str(Path(__file__).with_name("torchdistill_resume_worker.py"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed, marker = tmp_path / "whole", tmp_path / "killed", tmp_path / "paused"
    subprocess.run([*worker, str(whole)], env=env, check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(
        [*worker, str(killed), "--pause-at", "1:17", str(marker)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its pause"
            time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert torch.load(killed / "ckpt.pt", weights_only=False)["epoch"] == 0
    subprocess.run([*worker, str(killed), "--resume"], env=env, check=True, capture_output=True, timeout=600)
    expected = torch.load(whole / "student.pt", weights_only=True)
    resumed = torch.load(killed / "student.pt", weights_only=True)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_a_distributed_run_gets_the_global_batch_unless_the_yaml_says_otherwise(monkeypatch):
    assert _yaml_loss("AEKTLoss").criterion.global_batch is False  # one process
    monkeypatch.setattr(td, "_distributed_run", lambda: True)  # torchdistill set up torch.distributed
    assert _yaml_loss("AEKTLoss").criterion.global_batch is True
    assert _yaml_loss("DKDLoss", global_batch=False).criterion.global_batch is False
