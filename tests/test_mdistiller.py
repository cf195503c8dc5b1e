"""aekt_plugin.mdistiller against mdistiller's contract.

One module, two backends, so the contract double cannot drift from the real package:

* a real mdistiller checkout when ``MDISTILLER_ROOT`` points at one or ``import mdistiller`` works
  (mdistiller's own dependencies, scipy and tensorboardX, must then be installed);
* otherwise the contract double in ``tests/fake_mdistiller`` (what CI runs).

Test ids carry ``[real]`` or ``[fake]``; ``AEKT_MDISTILLER=fake`` forces the double. Everything runs on
CPU: ``.cuda()`` is patched to a no-op inside the tests that drive mdistiller's trainers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aekt_plugin.mdistiller as am
from aekt_plugin.mdistiller import launcher
from aekt_plugin import DEFAULTS
from aekt_plugin import reference as ref

FAKE_ROOT = Path(__file__).resolve().parent / "fake_mdistiller"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _choose_backend() -> tuple[str, Path]:
    if os.environ.get("AEKT_MDISTILLER", "").lower() == "fake":
        return "fake", FAKE_ROOT
    if os.environ.get("MDISTILLER_ROOT"):
        return "real", Path(os.environ["MDISTILLER_ROOT"]).resolve()
    spec = importlib.util.find_spec("mdistiller")
    if spec is not None and spec.origin is not None:
        return "real", Path(spec.origin).resolve().parent.parent
    return "fake", FAKE_ROOT


BACKEND, ROOT = _choose_backend()

# DKD's β per CIFAR-100 pair (8 unless listed) and per ImageNet pair, with T and warm-up.
DKD_BETA = {
    "cifar100/res56_res20": 2.0,
    "cifar100/res110_res32": 2.0,
    "cifar100/vgg13_vgg8": 6.0,
    "cifar100/vgg13_mv2": 6.0,
    "cifar100/wrn40_2_wrn_16_2": 6.0,
    "cifar100/wrn40_2_wrn_40_1": 6.0,
    "imagenet/r34_r18": 0.5,
    "imagenet/r50_mv1": 2.0,
}
DKD_T_WARMUP = {"cifar100": (4.0, 20), "imagenet": (1.0, 1)}
NUM_CLASSES = 100


def _purge_mdistiller() -> None:
    for name in [m for m in sys.modules if m == "mdistiller" or m.startswith("mdistiller.")]:
        del sys.modules[name]


@pytest.fixture(scope="module", params=[BACKEND])
def md(request: pytest.FixtureRequest):
    """The mdistiller under test (real checkout or contract double), with AEKT registered."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    added = str(ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(ROOT))
    try:
        am.register()
        ns = SimpleNamespace(
            backend=request.param,
            root=ROOT,
            distillers=importlib.import_module("mdistiller.distillers"),
            base=importlib.import_module("mdistiller.distillers._base").Distiller,
            cfg=importlib.import_module("mdistiller.engine.cfg"),
            engine=importlib.import_module("mdistiller.engine"),
            models=importlib.import_module("mdistiller.models"),
        )
        imported_from = Path(ns.distillers.__file__).resolve()
        assert imported_from.is_relative_to(ROOT.resolve()), (
            f"mdistiller imported from {imported_from}, not {ROOT}"
        )
        yield ns
    finally:
        torch.set_num_threads(threads)
        if added:
            sys.path.remove(str(ROOT))
        _purge_mdistiller()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def cfg(md):
    """A private copy of mdistiller's CFG (with the AEKT node), WANDB off."""
    cfg = md.cfg.CFG.clone()
    cfg.LOG.WANDB = False
    return cfg


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """mdistiller's trainers move batches with ``.cuda()``; keep them on the CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *args, **kwargs: self)


def _models(md, student: str = "resnet20", teacher: str = "resnet56", student_classes: int = NUM_CLASSES):
    student_model = md.models.cifar_model_dict[student][0](num_classes=student_classes)
    teacher_model = md.models.cifar_model_dict[teacher][0](num_classes=NUM_CLASSES)
    return student_model, teacher_model


def _distiller(md, cfg, kind: str = "AEKT", **models):
    student, teacher = _models(md, **models)
    return md.distillers.distiller_dict[kind](student, teacher, cfg)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32), torch.randint(0, NUM_CLASSES, (n,))


def _perturb(serial: nn.Module) -> None:
    with torch.no_grad():
        serial.weight.add_(0.05 * torch.randn_like(serial.weight))
        serial.bias.add_(0.1 * torch.randn_like(serial.bias))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------------------------------------------
# Importing and registering
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_list_and_help_need_no_mdistiller(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import contextlib, importlib.util, io, json, sys
        import aekt_plugin.mdistiller as am
        report = {"imported_at_import": "mdistiller" in sys.modules}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            report["list_rc"] = am.main(["--list"])
            try:
                am.main(["--help"])
            except SystemExit as exit:
                report["help_rc"] = exit.code
        report["stdout"] = out.getvalue()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            report["train_rc"] = am.main(["--cfg", "cifar100/res56_res20"])
        report["stderr"] = err.getvalue()
        report["imported_at_end"] = "mdistiller" in sys.modules
        report["mdistiller_installed"] = importlib.util.find_spec("mdistiller") is not None
        print(json.dumps(report))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MDISTILLER_ROOT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["imported_at_import"] and not report["imported_at_end"]
    assert report["list_rc"] == 0 and report["help_rc"] == 0
    for name in am.list_configs():
        assert name in report["stdout"]
    assert "--mdistiller-root" in report["stdout"]  # from --help
    if not report["mdistiller_installed"]:  # else main() finds the installed one, as it should
        assert report["train_rc"] == 2
        assert "mdistiller is not importable" in report["stderr"] and "git clone" in report["stderr"]


def test_register_is_idempotent_and_keeps_values_already_set(md) -> None:
    first = am.register()
    node = md.cfg.CFG.AEKT
    saved = node.BETA
    node.BETA = saved + 1.5
    try:
        second = am.register()
        assert node.BETA == saved + 1.5
        assert md.cfg.CFG.AEKT is node
    finally:
        node.BETA = saved
    assert second == first
    for key in am.DISTILLER_NAMES:
        assert md.distillers.distiller_dict[key] is first[key]
        assert issubclass(first[key], md.base)
    assert am.AEKT is first["AEKT"] and am.DKDFused is first["DKD_FUSED"]
    assert "DKD_FUSED" not in md.cfg.CFG  # DKD_FUSED reads mdistiller's own DKD node


def test_cfg_node_has_typed_defaults_from_the_core(md) -> None:
    node = md.cfg.CFG.AEKT
    expected = {
        "CE_WEIGHT": ("ce_weight", float),
        "ALPHA": ("alpha", float),
        "BETA": ("beta", float),
        "T": ("temperature", float),
        "MAX_WEIGHT": ("max_weight", float),
        "NORMALIZE_WEIGHT": ("normalize_weight", bool),
        "WARMUP": ("warmup", int),
        "ORDER": ("order", (str, type(None))),
    }
    assert set(node.keys()) == set(expected) | {"STANDARDIZE"}
    for key, (default, kind) in expected.items():
        assert node[key] == getattr(DEFAULTS, default), key
        assert isinstance(node[key], kind), key
    assert node.STANDARDIZE is False
    # the types mdistiller users write, as in its own DKD node
    for key in ("CE_WEIGHT", "ALPHA", "BETA", "T", "WARMUP"):
        assert type(node[key]) is type(md.cfg.CFG.DKD[key]), key


def test_show_cfg_prints_the_aekt_node(md, cfg, capsys: pytest.CaptureFixture[str]) -> None:
    cfg.DISTILLER.TYPE = "AEKT"
    cfg.AEKT.BETA = 3.25
    md.cfg.show_cfg(cfg)
    out = capsys.readouterr().out
    assert "AEKT:" in out and "BETA: 3.25" in out and "MAX_WEIGHT" in out


# ------------------------------------------------------------------------------------------------------
# Shipped configs and config errors
# ------------------------------------------------------------------------------------------------------


def test_shipped_configs_cover_every_dkd_pair(md) -> None:
    names = am.list_configs()
    assert len([n for n in names if n.startswith("cifar100/")]) == 11
    assert sorted(n for n in names if n.startswith("imagenet/")) == ["imagenet/r34_r18", "imagenet/r50_mv1"]
    if md.backend == "real":
        theirs = {f"cifar100/{p.stem}" for p in (md.root / "configs" / "cifar100" / "dkd").glob("*.yaml")}
        theirs |= {f"imagenet/{p.parent.name}" for p in (md.root / "configs" / "imagenet").glob("*/dkd.yaml")}
        assert set(names) == theirs


@pytest.mark.parametrize("name", am.list_configs())
def test_every_shipped_config_merges_into_cfg(md, cfg, name: str) -> None:
    with am.config_file(name) as path:
        cfg.merge_from_file(str(path))
    dataset = name.split("/")[0]
    assert cfg.DISTILLER.TYPE == "AEKT" and cfg.LOG.WANDB is False
    temperature, warmup = DKD_T_WARMUP[dataset]
    assert (cfg.AEKT.T, cfg.AEKT.WARMUP, cfg.AEKT.BETA) == (temperature, warmup, DKD_BETA.get(name, 8.0))
    assert cfg.AEKT.MAX_WEIGHT == DEFAULTS.max_weight and cfg.AEKT.ORDER == DEFAULTS.order
    models = md.models.imagenet_model_dict if dataset == "imagenet" else md.models.cifar_model_dict
    assert cfg.DISTILLER.TEACHER in models and cfg.DISTILLER.STUDENT in models
    assert cfg.DATASET.TYPE == ("imagenet" if dataset == "imagenet" else "cifar100")
    if md.backend == "real":  # same schedule and DKD settings as mdistiller's own DKD config of the pair
        stem = name.split("/")[1]
        dkd_yaml = (
            md.root
            / "configs"
            / (f"cifar100/dkd/{stem}.yaml" if dataset == "cifar100" else f"imagenet/{stem}/dkd.yaml")
        )
        theirs = md.cfg.CFG.clone()
        theirs.merge_from_file(str(dkd_yaml))
        assert cfg.SOLVER == theirs.SOLVER and cfg.DATASET == theirs.DATASET
        assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (
            theirs.DISTILLER.TEACHER,
            theirs.DISTILLER.STUDENT,
        )
        for key in ("CE_WEIGHT", "ALPHA", "BETA", "T", "WARMUP"):
            assert cfg.AEKT[key] == theirs.DKD[key], key


def test_read_config_matches_config_file() -> None:
    name = am.list_configs()[0]
    with am.config_file(name) as path:
        assert path.read_text() == am.read_config(name) == am.read_config(name + ".yaml")
    with pytest.raises(ValueError, match="no shipped mdistiller config named 'cifar100/nope'"):
        am.read_config("cifar100/nope")


def test_unknown_aekt_key_in_yaml_names_the_key(cfg, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "AEKT:\n  BEETA: 2.0\n")
    with pytest.raises(KeyError, match="AEKT.BEETA"):
        cfg.merge_from_file(str(path))


def test_int_for_float_in_yaml_names_the_key(cfg, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "AEKT:\n  T: 4\n")
    with pytest.raises(ValueError, match="AEKT.T"):
        cfg.merge_from_file(str(path))


@pytest.mark.parametrize("order", ["sideways", "KD_CLS", 3])
def test_unknown_order_is_rejected_naming_the_key(md, cfg, order) -> None:
    cfg.AEKT.ORDER = order
    with pytest.raises(ValueError, match="AEKT.ORDER"):
        _distiller(md, cfg)


@pytest.mark.parametrize(
    ("key", "value"), [("T", 0.0), ("ALPHA", -1.0), ("BETA", math.nan), ("MAX_WEIGHT", 0.0)]
)
def test_bad_loss_settings_are_rejected_naming_the_key(md, cfg, key: str, value: float) -> None:
    cfg.AEKT[key] = value
    with pytest.raises(ValueError, match=f"AEKT.{key}"):
        _distiller(md, cfg)


@pytest.mark.parametrize("order", [None, "cls_kd", "kd_cls"])
def test_student_with_other_class_count_is_rejected(md, cfg, order) -> None:
    cfg.AEKT.ORDER = order
    with pytest.raises(ValueError, match="same classes"):
        _distiller(md, cfg, student_classes=10)


# ------------------------------------------------------------------------------------------------------
# The distiller
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [None, "none", "cls_kd", "kd_cls"])
def test_train_step_returns_the_two_losses_and_trains_student_and_serial_only(md, cfg, order) -> None:
    cfg.AEKT.ORDER = order
    distiller = nn.DataParallel(_distiller(md, cfg))
    distiller.train()
    assert distiller.module.training and not distiller.module.teacher.training
    image, target = _batch()
    preds, losses = distiller(image=image, target=target, epoch=cfg.AEKT.WARMUP)
    assert set(losses) == {"loss_ce", "loss_kd"}
    assert preds.shape == (4, NUM_CLASSES)
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value)
    sum(loss.mean() for loss in losses.values()).backward()
    module = distiller.module
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.student.fc.weight.grad is not None and module.student.fc.weight.grad.abs().sum() > 0
    learnable = {id(p) for p in module.get_learnable_parameters()}
    assert {id(p) for p in module.student.parameters()} <= learnable
    if order in (None, "none"):
        assert module.serial is None and module.get_extra_parameters() == 0
        assert len(learnable) == len(list(module.student.parameters()))
    else:
        assert {id(p) for p in module.serial.parameters()} <= learnable
        assert module.get_extra_parameters() == NUM_CLASSES * NUM_CLASSES + NUM_CLASSES
        assert module.serial.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("standardize", [False, True])
def test_losses_follow_the_cfg_and_the_warmup(md, cfg, standardize: bool) -> None:
    cfg.AEKT.update(
        {
            "CE_WEIGHT": 0.7,
            "ALPHA": 0.5,
            "BETA": 3.0,
            "T": 2.0,
            "MAX_WEIGHT": 4.0,
            "NORMALIZE_WEIGHT": False,
            "STANDARDIZE": standardize,
            "WARMUP": 10,
        }
    )
    cfg.AEKT.ORDER = None
    distiller = _distiller(md, cfg)
    distiller.train()
    image, target = _batch()
    with torch.no_grad():
        student_logits = distiller.student(image)[0]
        teacher_logits = distiller.teacher(image)[0]
        _, full = distiller(image=image, target=target, epoch=12)
        _, early = distiller(image=image, target=target, epoch=4)
    expected_kd = ref.aekt_loss(
        student_logits,
        teacher_logits,
        target,
        temperature=2.0,
        alpha=0.5,
        beta=3.0,
        max_weight=4.0,
        normalize_weight=False,
        standardize=standardize,
    )
    torch.testing.assert_close(full["loss_kd"], expected_kd, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full["loss_ce"], 0.7 * F.cross_entropy(student_logits, target))
    torch.testing.assert_close(early["loss_kd"], 0.4 * full["loss_kd"], rtol=1e-5, atol=1e-6)


def test_trainer_without_epoch_gets_full_weight_and_a_warning(md, cfg) -> None:
    cfg.AEKT.WARMUP = 20
    distiller = _distiller(md, cfg)
    distiller.train()
    image, target = _batch()
    with torch.no_grad():
        _, warmed = distiller(image=image, target=target, epoch=20)
        with pytest.warns(UserWarning, match="passes no epoch"):
            _, no_epoch = distiller(image=image, target=target, index=torch.arange(4))
    torch.testing.assert_close(no_epoch["loss_kd"], warmed["loss_kd"])


def test_no_warning_without_epoch_when_warmup_is_off(md, cfg, recwarn: pytest.WarningsRecorder) -> None:
    cfg.AEKT.WARMUP = 0
    distiller = _distiller(md, cfg)
    distiller.train()
    image, target = _batch()
    with torch.no_grad():
        distiller(image=image, target=target)
    assert not [w for w in recwarn if "no epoch" in str(w.message)]


@pytest.mark.parametrize("order", [None, "cls_kd", "kd_cls"])
def test_forward_test_returns_the_classification_logits(md, cfg, order) -> None:
    cfg.AEKT.ORDER = order
    distiller = _distiller(md, cfg)
    if distiller.serial is not None:
        _perturb(distiller.serial)
    distiller.eval()
    image, _ = _batch()
    with torch.no_grad():
        out = distiller(image=image)
        head = distiller.student(image)[0]
    expected = distiller.serial.transform(head) if order == "kd_cls" else head
    torch.testing.assert_close(out, expected)
    if order == "kd_cls":
        assert not torch.allclose(out, head)


@pytest.mark.parametrize("student", ["resnet20", "vgg8", "MobileNetV2", "ShuffleV1"])
def test_kd_cls_student_state_dict_reproduces_the_distiller(md, cfg, student: str) -> None:
    """mdistiller's student_best is the bare student's state dict: S must be folded into it."""
    cfg.AEKT.ORDER = "kd_cls"
    distiller = nn.DataParallel(_distiller(md, cfg, student=student))
    _perturb(distiller.module.serial)
    distiller.eval()
    image, _ = _batch()
    with torch.no_grad():
        expected = distiller(image=image)
    exported = md.models.cifar_model_dict[student][0](num_classes=NUM_CLASSES)
    exported.load_state_dict(distiller.module.student.state_dict())  # strict: same keys as the plain student
    exported.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(image)[0], expected, rtol=1e-4, atol=1e-4)
    # the distiller's own state dict (mdistiller's 'latest', loaded by --resume) keeps S unfolded
    resumed = nn.DataParallel(_distiller(md, cfg, student=student))
    resumed.load_state_dict(distiller.state_dict())
    resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(image=image), expected)


def test_kd_cls_needs_a_recognisable_last_layer(md, cfg) -> None:
    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    student, teacher = _models(md)
    cfg.AEKT.ORDER = "kd_cls"
    with pytest.raises(ValueError, match="AEKT.ORDER"):
        md.distillers.distiller_dict["AEKT"](Wrapped(student), teacher, cfg)
    cfg.AEKT.ORDER = "cls_kd"  # the class count comes from the teacher then
    distiller = md.distillers.distiller_dict["AEKT"](Wrapped(student), teacher, cfg)
    assert distiller.serial.num_classes == NUM_CLASSES


def test_model_without_logits_is_a_type_error(md, cfg) -> None:
    class Features(nn.Module):
        def forward(self, x):
            return {"feats": x}

    teacher = _models(md)[1]
    distiller = md.distillers.distiller_dict["AEKT"](Features(), teacher, cfg)
    distiller.train()
    with pytest.raises(TypeError, match="student must return"):
        distiller(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), epoch=1)


# ------------------------------------------------------------------------------------------------------
# DKD_FUSED
# ------------------------------------------------------------------------------------------------------


def test_dkd_fused_matches_mdistillers_dkd(md, cfg) -> None:
    cfg.DKD.BETA = 6.0
    cfg.DKD.T = 3.0
    student, teacher = _models(md)
    dkd = md.distillers.distiller_dict["DKD"](student, teacher, cfg)
    fused = md.distillers.distiller_dict["DKD_FUSED"](student, teacher, cfg)
    dkd.train()
    fused.train()
    image, target = _batch(8)
    _, theirs = dkd(image=image, target=target, epoch=5)
    _, ours = fused(image=image, target=target, epoch=5)
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    grads = []
    for losses in (theirs, ours):
        student.zero_grad()
        sum(loss.mean() for loss in losses.values()).backward()
        grads.append(student.fc.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_dkd_fused_stays_finite_on_extreme_logits(md, cfg) -> None:
    class Loud(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.fc = inner.fc
            self.inner = inner

        def forward(self, x):
            logits, feats = self.inner(x)
            return 1e4 * logits / logits.abs().amax(dim=1, keepdim=True), feats

    student, teacher = _models(md)
    fused = md.distillers.distiller_dict["DKD_FUSED"](Loud(student), Loud(teacher), cfg)
    fused.train()
    image, target = _batch()
    _, losses = fused(image=image, target=target, epoch=20)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(student.fc.weight.grad).all()


# ------------------------------------------------------------------------------------------------------
# mdistiller's trainers
# ------------------------------------------------------------------------------------------------------


def _loaders(trainer: str) -> tuple[list, list]:
    train = []
    for _ in range(2):
        image, target = _batch()
        index = torch.arange(4)
        crd = trainer in ("crd", "crd_dot")  # CRD's loaders also yield the contrastive indices
        train.append((image, target, index, index) if crd else (image, target, index))
    return train, [_batch()]


@pytest.mark.parametrize("trainer", ["base", "dot", "crd", "crd_dot"])
def test_mdistiller_trainer_trains_and_writes_a_usable_student_best(
    md, cfg, no_cuda, tmp_path: Path, recwarn: pytest.WarningsRecorder, trainer: str
) -> None:
    cfg.SOLVER.TRAINER = trainer
    cfg.SOLVER.EPOCHS = 1
    cfg.LOG.PREFIX = str(tmp_path)
    cfg.AEKT.ORDER = "kd_cls"
    distiller = nn.DataParallel(_distiller(md, cfg).cuda())  # as tools/train.py does
    module = distiller.module
    fc_before = module.student.fc.weight.detach().clone()
    train_loader, val_loader = _loaders(trainer)
    md.engine.trainer_dict[trainer]("aekt_test", distiller, train_loader, val_loader, cfg).train()

    assert not torch.equal(module.student.fc.weight, fc_before)
    assert not torch.equal(module.serial.weight, torch.eye(NUM_CLASSES))  # S was trained too
    no_epoch_warnings = [w for w in recwarn if "passes no epoch" in str(w.message)]
    assert bool(no_epoch_warnings) == (trainer in ("crd", "crd_dot"))  # CRD's trainers pass no epoch

    log_path = tmp_path / "aekt_test"
    best = torch.load(log_path / "student_best", map_location="cpu")
    exported = md.models.cifar_model_dict["resnet20"][0](num_classes=NUM_CLASSES)
    exported.load_state_dict(best["model"])
    exported.eval()
    distiller.eval()
    image = val_loader[0][0]
    with torch.no_grad():
        expected = distiller(image=image)
        torch.testing.assert_close(exported(image)[0], expected, rtol=1e-4, atol=1e-4)
        resumed = nn.DataParallel(_distiller(md, cfg))
        resumed.load_state_dict(torch.load(log_path / "latest", map_location="cpu")["model"])
        resumed.eval()
        torch.testing.assert_close(resumed(image=image), expected)


def test_dot_trainer_rejects_a_losses_dict_without_its_two_keys(md, cfg, no_cuda, tmp_path: Path) -> None:
    """The twin of the DOT test above: the key contract that the double enforces holds for our distiller,
    and a distiller breaking it is caught (by the double's check, or by the real DOT's indexing)."""
    base = md.distillers.distiller_dict["AEKT"]

    class Renamed(base):
        def forward_train(self, image, target, **kwargs):
            preds, losses = super().forward_train(image, target, **kwargs)
            return preds, {"loss_ce": losses["loss_ce"], "loss_aekt": losses["loss_kd"]}

    cfg.SOLVER.EPOCHS = 1
    cfg.LOG.PREFIX = str(tmp_path)
    distiller = nn.DataParallel(Renamed(*_models(md), cfg))
    train_loader, val_loader = _loaders("dot")
    with pytest.raises(KeyError, match="loss_kd"):
        md.engine.trainer_dict["dot"]("renamed", distiller, train_loader, val_loader, cfg).train()


# ------------------------------------------------------------------------------------------------------
# The console script
# ------------------------------------------------------------------------------------------------------

_STUB_TRAIN = """
    # Stands in for the checkout's tools/train.py: same argument parsing and config merge, then a report.
    import argparse, json, os, sys
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG as cfg

    parser = argparse.ArgumentParser("training for knowledge distillation.")
    parser.add_argument("--cfg", type=str, default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg.merge_from_file(args.cfg)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    with open(os.environ["STUB_REPORT"], "w") as f:
        json.dump({
            "name": __name__, "argv0": sys.argv[0], "cfg": args.cfg, "resume": args.resume,
            "type": cfg.DISTILLER.TYPE, "registered": sorted(distiller_dict),
            "beta": cfg.AEKT.BETA, "order": cfg.AEKT.ORDER, "epochs": cfg.SOLVER.EPOCHS,
        }, f)
"""


@pytest.fixture
def checkout(md, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout layout (mdistiller/ and tools/train.py) around the backend's package, and a private CFG."""
    root = tmp_path / "checkout"
    root.mkdir()
    (root / "mdistiller").symlink_to(md.root / "mdistiller", target_is_directory=True)
    _write(root / "tools" / "train.py", _STUB_TRAIN)
    monkeypatch.setattr(md.cfg, "CFG", md.cfg.CFG.clone())  # tools/train.py merges into and freezes CFG
    monkeypatch.setenv("STUB_REPORT", str(tmp_path / "report.json"))
    monkeypatch.delenv("MDISTILLER_ROOT", raising=False)
    _provide_teachers(md, root, monkeypatch)
    monkeypatch.setattr(launcher, "_cuda_available", lambda: True)  # the pre-flight asks for a GPU
    return root


def _provide_teachers(md, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher checkpoints where the checkout's model registry says they are (``download_ckpts/``)."""
    for name, (build, path) in list(md.models.cifar_model_dict.items()):
        if path is not None:
            moved = root / "download_ckpts" / path.split("download_ckpts/", 1)[1]
            moved.parent.mkdir(parents=True, exist_ok=True)
            moved.touch()
            monkeypatch.setitem(md.models.cifar_model_dict, name, (build, str(moved)))


def test_console_script_runs_the_checkouts_train_py_with_aekt_registered(md, checkout: Path) -> None:
    argv_before = list(sys.argv)
    rc = am.main(
        [
            "--mdistiller-root",
            str(checkout),
            "--cfg",
            "cifar100/res56_res20",
            "--resume",
            "SOLVER.EPOCHS",
            "3",
            "AEKT.ORDER",
            "kd_cls",
        ]
    )
    assert rc == 0 and sys.argv == argv_before
    report = json.loads((checkout.parent / "report.json").read_text())
    assert report["name"] == "__main__" and report["argv0"] == str(checkout / "tools" / "train.py")
    assert report["type"] == "AEKT" and report["beta"] == 2.0
    assert {"AEKT", "DKD_FUSED"} <= set(report["registered"])
    assert report["resume"] is True and report["epochs"] == 3 and report["order"] == "kd_cls"


def test_console_script_takes_the_root_from_the_environment_and_cfg_paths_from_the_checkout(
    md, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(checkout / "configs" / "mine.yaml", 'DISTILLER:\n  TYPE: "DKD_FUSED"\nSOLVER:\n  EPOCHS: 7\n')
    monkeypatch.setenv("MDISTILLER_ROOT", str(checkout))
    monkeypatch.chdir(checkout.parent)
    assert am.main(["--cfg", "configs/mine.yaml"]) == 0
    report = json.loads((checkout.parent / "report.json").read_text())
    assert report["type"] == "DKD_FUSED" and report["epochs"] == 7 and report["resume"] is False
    assert report["cfg"] == str((checkout / "configs" / "mine.yaml").resolve())


def test_console_script_finds_the_checkout_it_is_run_from(
    md, checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cd mdistiller && aekt-mdistiller --cfg ...``: no option, no environment variable needed."""
    monkeypatch.chdir(checkout / "tools")  # anywhere inside the checkout
    assert am.main(["--cfg", "cifar100/res56_res20"]) == 0
    report = json.loads((checkout.parent / "report.json").read_text())
    assert report["argv0"] == str(checkout.resolve() / "tools" / "train.py")


def test_console_script_errors_say_the_fix(md, checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert am.main(["--mdistiller-root", str(checkout), "--cfg", "cifar100/nope"]) == 2
    err = capsys.readouterr().err
    assert "cifar100/nope" in err and "cifar100/res32x4_res8x4" in err

    (checkout / "tools" / "train.py").unlink()
    assert am.main(["--mdistiller-root", str(checkout), "--cfg", "cifar100/res56_res20"]) == 2
    assert "tools/train.py" in capsys.readouterr().err

    other = checkout.parent / "other"
    _write(other / "mdistiller" / "__init__.py", "")
    _write(other / "tools" / "train.py", "raise SystemExit('must not run')\n")
    assert am.main(["--mdistiller-root", str(other), "--cfg", "cifar100/res56_res20"]) == 2
    assert "imported from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["AEKT.BETTA", "2.0"], r"refused by yacs: Non-existent key: AEKT\.BETTA"),
        (["AEKT.BETA", "two"], r"refused by yacs: .*AEKT\.BETA"),
        (["SOLVER.EPOCHS"], r"refused by yacs: Override list has odd length"),
        (["DISTILLER.TYPE", "AEKTT"], r"DISTILLER\.TYPE 'AEKTT' is no mdistiller distiller \(did you mean 'AEKT'\?\)"),
        (["AEKT.ORDER", "foo"], r"AEKT\.ORDER must be 'cls_kd', 'kd_cls' or null, got 'foo'"),
        (["AEKT.BETA", "-1.0"], r"AEKT\.BETA must be a finite number >= 0"),
        (["DISTILLER.TEACHER", "resnet57"], r"DISTILLER\.TEACHER 'resnet57' is no cifar100 model.*resnet56"),
        (["DATASET.TYPE", "imagenet"], r"imagenet is not in .*data/imagenet \(train and val missing\)"),
    ],
)
def test_console_script_checks_the_config_before_any_data_is_read(
    md, checkout: Path, capsys: pytest.CaptureFixture[str], opts: list[str], message: str
) -> None:
    if opts == ["DATASET.TYPE", "imagenet"]:
        opts = opts + ["DISTILLER.TEACHER", "ResNet34", "DISTILLER.STUDENT", "ResNet18"]
    assert am.main(["--mdistiller-root", str(checkout), "--cfg", "cifar100/res56_res20", *opts]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1 and err.startswith("aekt-mdistiller: error: ")  # one line, no traceback
    assert not (checkout.parent / "report.json").exists()  # tools/train.py never ran


def test_console_script_names_the_environment_it_lacks(
    md, checkout: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--mdistiller-root", str(checkout), "--cfg", "cifar100/res56_res20"]
    monkeypatch.setattr(launcher, "_cuda_available", lambda: False)
    assert am.main(argv) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(launcher, "_cuda_available", lambda: True)
    checkpoint = Path(md.models.cifar_model_dict["resnet56"][1])
    checkpoint.unlink()
    assert am.main(argv) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "cifar_teachers.tar" in err and "download_ckpts" in err
    checkpoint.touch()
    assert am.main(argv) == 0  # CIFAR-100 absent: a note that torchvision will download it, then the run
    assert "note: CIFAR-100 is not in" in capsys.readouterr().err
    assert (checkout.parent / "report.json").exists()


@pytest.mark.skipif(
    BACKEND != "real", reason="needs a real checkout's tools/train.py; the stub twin above covers the wiring"
)
def test_console_script_trains_with_the_real_train_py(
    md, cfg, no_cuda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through mdistiller's unchanged tools/train.py, with an in-memory dataset and teacher."""
    dataset = importlib.import_module("mdistiller.dataset")
    utils = importlib.import_module("mdistiller.engine.utils")
    teacher_state = md.models.cifar_model_dict["resnet56"][0](num_classes=NUM_CLASSES).state_dict()
    train_loader, val_loader = _loaders("base")
    monkeypatch.setattr(dataset, "get_dataset", lambda cfg: (train_loader, val_loader, 8, NUM_CLASSES))
    monkeypatch.setattr(utils, "load_checkpoint", lambda path: {"model": teacher_state})
    monkeypatch.setattr(md.cfg, "CFG", md.cfg.CFG.clone())
    _provide_teachers(md, tmp_path, monkeypatch)
    monkeypatch.setattr(launcher, "_cuda_available", lambda: True)  # no_cuda keeps the GPU's work on the CPU
    monkeypatch.chdir(tmp_path)
    rc = am.main(
        [
            "--mdistiller-root",
            str(md.root),
            "--cfg",
            "cifar100/res56_res20",
            "SOLVER.EPOCHS",
            "1",
            "AEKT.ORDER",
            "kd_cls",
        ]
    )
    assert rc == 0
    (best,) = tmp_path.rglob("student_best")  # under ./output/<project>/<experiment>
    student = md.models.cifar_model_dict["resnet20"][0](num_classes=NUM_CLASSES)
    student.load_state_dict(torch.load(best, map_location="cpu")["model"])
    assert "best_acc" in (best.parent / "worklog.txt").read_text()


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(md, tmp_path: Path) -> None:
    """mdistiller's base trainer, AEKT with the serial layer and a warm-up still ramping at the kill: killed
    in the middle of epoch 3 and resumed from ``latest`` with ``--resume``, the run ends with the same
    distiller and student weights, bit for bit, as one never interrupted."""
    worker = [sys.executable, str(Path(__file__).with_name("mdistiller_resume_worker.py")), str(md.root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*worker, str(whole)], env=env, check=True, capture_output=True, timeout=600)
    marker = tmp_path / "paused"
    process = subprocess.Popen(
        [*worker, str(killed), "--pause-at", "3:2", str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
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
    latest = killed / "resume_test" / "latest"
    assert torch.load(latest, map_location="cpu", weights_only=False)["epoch"] == 2  # the kill lost epoch 3
    subprocess.run([*worker, str(killed), "--resume"], env=env, check=True, capture_output=True, timeout=600)
    for name in ("latest", "student_latest"):
        expected = torch.load(whole / "resume_test" / name, map_location="cpu", weights_only=False)["model"]
        resumed = torch.load(killed / "resume_test" / name, map_location="cpu", weights_only=False)["model"]
        assert expected.keys() == resumed.keys()
        different = [key for key in expected if not torch.equal(expected[key], resumed[key])]
        assert not different, f"{name}: {different[:5]}"
    state = torch.load(latest, map_location="cpu", weights_only=False)["model"]
    assert any(key.endswith("serial.weight") for key in state)  # the serial layer travelled with the run
