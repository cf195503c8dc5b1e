"""``aekt-timm`` against timm's ``train.py``: one module, two backends.

* a real pytorch-image-models checkout when ``TIMM_ROOT`` points at one (its ``train.py``, unchanged, and
  its ``validate.py`` for the checkpoints);
* otherwise the contract double ``tests/fake_timm/train.py`` (what CI runs).

Test ids carry ``[real]`` or ``[fake]``; ``AEKT_TIMM=fake`` forces the double. Everything runs on the CPU,
offline: the data are tiny PNG folders written here, the teacher's weights a file saved here (given with
``--kd-pretrained-path``) or a ``local-dir:`` folder. Runs that must show the whole process (exit status,
no traceback, SIGKILL, torchrun) start ``python -m aekt_plugin.timm.launcher``; the others call
:func:`aekt_plugin.timm.launcher.main` in this process and watch the task train.py builds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.task import LogitDistillationTask  # noqa: E402
from timm.utils import unwrap_model  # noqa: E402

from aekt_plugin import AEKTLoss, DKDLoss  # noqa: E402
from aekt_plugin.timm import AEKTDistillationTask, AEKTStudent  # noqa: E402
from aekt_plugin.timm import launcher  # noqa: E402

FAKE_ROOT = Path(__file__).resolve().parent / "fake_timm"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _choose_backend() -> tuple[str, Path]:
    if os.environ.get("AEKT_TIMM", "").lower() == "fake":
        return "fake", FAKE_ROOT
    root = os.environ.get("TIMM_ROOT")
    if root and (Path(root) / "train.py").is_file():
        return "real", Path(root).resolve()
    return "fake", FAKE_ROOT


BACKEND, ROOT = _choose_backend()
MODEL = "test_resnet"  # timm's own test model: 0.4M parameters, a Linear fc
CLASSES, N_TRAIN, N_VAL, BATCH = 4, 10, 3, 8  # per class; 40 training images: 5 batches, the last update short
IMG = 32


@pytest.fixture(autouse=True)
def _logging_as_before():
    """train.py's main() adds a stderr handler to the root logger and sets it to INFO; in this process that
    would outlive the test (and write to its closed capture)."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(scope="module", params=[BACKEND])
def root(request: pytest.FixtureRequest) -> Path:
    """The directory of the train.py under test (real checkout or contract double)."""
    return ROOT


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder data set: train/ and validation/, one colour per class plus noise, 32×32 PNGs."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train", N_TRAIN), ("validation", N_VAL)):
        for label in range(CLASSES):
            (folder / split / f"class{label}").mkdir(parents=True)
            for index in range(count):
                colour = np.zeros((IMG, IMG, 3))
                colour[..., label % 3] = 60 + 60 * (label // 3)
                pixels = (colour + rng.normal(0, 40, colour.shape) + 60).clip(0, 255).astype("uint8")
                Image.fromarray(pixels).save(folder / split / f"class{label}" / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher's weights as a state-dict file: what --kd-pretrained-path reads instead of a download."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(timm.create_model(MODEL, num_classes=CLASSES).state_dict(), path)
    return path


def _argv(root: Path, data: Path, out: Path, *extra: str, epochs: int = 1, teacher: Path | None = None) -> list[str]:
    argv = [
        "--timm-root", str(root), "--data-dir", str(data), "--model", MODEL, "--num-classes", str(CLASSES),
        "--img-size", str(IMG), "--device", "cpu", "--workers", "0", "--no-prefetcher", "-b", str(BATCH),
        "--opt", "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--epochs", str(epochs), "--seed", "0",
        "--log-interval", "1", "--output", str(out.parent), "--experiment", out.name,
    ]  # fmt: skip
    if teacher is not None:
        argv += ["--kd-model-name", MODEL, "--kd-pretrained-path", str(teacher)]
    return argv + list(extra)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TIMM_ROOT"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])}


def _launch(*argv: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aekt_plugin.timm.launcher", *argv],
        env={**_env(), **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _batches() -> int:
    return CLASSES * N_TRAIN // BATCH  # train.py's training loader drops the last partial batch


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch):
    """``watch(task_class)``: a list that receives ``(task, kd_warmup, training)`` at each forward."""

    def _watch(task_class: type) -> list:
        seen: list = []
        forward = task_class.forward

        def spy(self, input, target):
            warm = self.kd_warmup if isinstance(self, AEKTDistillationTask) else None
            seen.append((self, warm))
            return forward(self, input, target)

        monkeypatch.setattr(task_class, "forward", spy)
        return seen

    return _watch


# --- the flags reach train.py's task ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("loss_type", "loss_class", "flags", "options"),
    [
        ("aekt", AEKTLoss, ["--kd-alpha", "0.5", "--kd-beta", "2", "--kd-max-weight", "3", "--no-kd-normalize-weight"],
         {"alpha": 0.5, "beta": 2.0, "max_weight": 3.0, "normalize_weight": False}),
        ("dkd", DKDLoss, ["--kd-alpha", "0.5", "--kd-beta", "6", "--kd-standardize"],
         {"alpha": 0.5, "beta": 6.0, "standardize": True}),
    ],
)  # fmt: skip
def test_the_flags_reach_the_loss_and_the_warmup_counts_optimizer_updates(
    root, data, teacher, tmp_path, watch, loss_type, loss_class, flags, options
) -> None:
    seen = watch(AEKTDistillationTask)
    extra = [
        "--kd-loss-type", loss_type, *flags, "--kd-temperature", "2", "--kd-order", "kd_cls",
        "--kd-warmup-epochs", "2", "--grad-accum-steps", "2", "--smoothing", "0.2",
        "--task-loss-weight", "0.5", "--distill-loss-weight", "3",
    ]  # fmt: skip
    assert launcher.main(_argv(root, data, tmp_path / "run", *extra, teacher=teacher)) == 0
    task = seen[0][0]
    assert all(t is task for t, _ in seen) and len(seen) == _batches()
    assert type(task.distill_loss) is loss_class
    assert task.distill_loss.options() == {**task.distill_loss.option_defaults, **options, "temperature": 2.0}
    assert task.distill_loss.validate_args is True  # fp32: the loss checks the values
    assert (task.task_loss_weight, task.distill_loss_weight) == (0.5, 3.0)
    assert isinstance(task.criterion, LabelSmoothingCrossEntropy) and task.criterion.smoothing == 0.2  # train.py's
    student = unwrap_model(task.get_trainable_module())
    assert isinstance(student, AEKTStudent) and student.order == "kd_cls"
    updates = math.ceil(_batches() / 2)
    assert task.updates_per_epoch == updates and task.warmup_epochs == 2.0
    # micro-batch i belongs to optimizer update i // 2; the ramp is linear in updates from 0
    assert [warm for _, warm in seen] == pytest.approx([(i // 2) / (2 * updates) for i in range(_batches())])
    assert task.num_updates == updates
    teacher_state = torch.load(teacher, weights_only=True)
    assert all(torch.equal(p, teacher_state[k]) for k, p in task.teacher.model.state_dict().items())


def test_amp_trains_with_the_losss_value_checks_off(root, data, teacher, tmp_path, watch) -> None:
    """``--amp`` (bfloat16 autocast on the CPU): the loss runs without its value checks, which would refuse
    the inf of an fp16 overflow that the gradient scaler handles, and the run trains."""
    seen = watch(AEKTDistillationTask)
    extra = ["--kd-loss-type", "aekt", "--kd-beta", "2", "--kd-warmup-epochs", "0", "--amp", "--amp-dtype", "bfloat16"]
    assert launcher.main(_argv(root, data, tmp_path / "run", *extra, teacher=teacher)) == 0
    task = seen[0][0]
    assert task.distill_loss.validate_args is False and len(seen) == _batches()
    saved = _load(tmp_path / "run" / "last.pth.tar")
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_kl_stays_timms_own_task_with_a_local_dir_teacher(root, data, tmp_path, watch) -> None:
    from timm.models import save_for_hf

    torch.manual_seed(7)
    teacher_model = timm.create_model(MODEL, num_classes=CLASSES)
    save_for_hf(teacher_model, tmp_path / "teacher")
    seen = watch(LogitDistillationTask)
    extra = ["--kd-model-name", f"local-dir:{tmp_path / 'teacher'}", "--kd-temperature", "3", "--task-loss-weight", "0.25"]
    assert launcher.main(_argv(root, data, tmp_path / "run", *extra)) == 0
    task = seen[0][0]
    assert isinstance(task, LogitDistillationTask) and not isinstance(task, AEKTDistillationTask)
    assert task.loss_type == "kl" and task.temperature == 3.0
    assert (task.task_loss_weight, task.distill_loss_weight) == (0.25, 0.75)  # timm's rule
    expected = teacher_model.state_dict()
    assert all(torch.equal(p, expected[k]) for k, p in task.teacher.model.state_dict().items())


# --- wrong values: one line, exit status 2, before any data is read -------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kd-loss-type", "aektt"], r"--kd-loss-type 'aektt' is none of kl, aekt, dkd \(did you mean 'aekt'\?\)"),
        (["--kd-loss-type", "aekt", "--kd-beta", "-1"], r"--kd-beta must be a finite number >= 0, got -1\.0"),
        (["--kd-loss-type", "aekt", "--kd-beta", "two"], r"argument --kd-beta: invalid float value: 'two'"),
        (["--kd-loss-type", "aekt", "--kd-order", "serial"], r"--kd-order: invalid choice: 'serial'.*none.*cls_kd.*kd_cls"),
        (["--kd-loss-type", "aekt", "--kd-max-weight", "0"], r"--kd-max-weight must be a positive number"),
        (["--kd-loss-type", "dkd", "--kd-max-weight", "3"], r"--kd-max-weight is an option of --kd-loss-type aekt, not of dkd"),
        (["--kd-beta", "2"], r"--kd-beta is an option of --kd-loss-type aekt and dkd, not of kl"),
        (["--kd-order", "kd_cls"], r"--kd-order needs --kd-loss-type aekt or dkd"),
        (["--kd-loss-type", "aekt", "--kd-warmup-epochs", "-2"], r"--kd-warmup-epochs must be a finite number >= 0"),
        (["--kd-loss-type", "aekt", "--kd-temperature", "0"], r"--kd-temperature must be a number in"),
        (["--kd-loss-type", "aekt", "--task-loss-weight", "2"], r"--task-loss-weight 2\.0 alone .* pass --distill-loss-weight"),
        (["--kd-loss-type", "aekt", "--kd-distill-type", "feature"], r"needs --kd-distill-type logit"),
    ],
)  # fmt: skip
def test_a_wrong_value_stops_with_one_line_before_any_data_is_read(
    root, teacher, tmp_path, capsys, extra, message
) -> None:
    out = tmp_path / "run"
    assert launcher.main(_argv(root, tmp_path / "no-data-here", out, *extra, teacher=teacher)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("aekt-timm: error: ") and err.count("\n") == 1
    assert not out.exists()  # train.py never started


@pytest.mark.parametrize(
    ("teacher_args", "message"),
    [
        (["--kd-model-name", "test_resnett"], r"--kd-model-name 'test_resnett' is no timm model; did you mean test_resnet"),
        (["--kd-model-name", MODEL, "--kd-pretrained-path", "missing.pth"], r"--kd-pretrained-path missing\.pth: no such file"),
        (["--kd-model-name", "local-dir:nowhere"], r"nowhere has no config\.json"),
        (["--kd-beta", "2", "--kd-loss-type", "aekt"], r"--kd-loss-type aekt, --kd-beta distil from a teacher: add --kd-model-name"),
    ],
)  # fmt: skip
def test_a_teacher_that_cannot_be_built_is_one_line(root, tmp_path, capsys, teacher_args, message) -> None:
    assert launcher.main(_argv(root, tmp_path, tmp_path / "run", *teacher_args)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


def test_the_console_script_exits_2_without_a_traceback(root, teacher, tmp_path) -> None:
    done = _launch(*_argv(root, tmp_path / "no-data", tmp_path / "run", "--kd-loss-type", "aektt", teacher=teacher))
    assert done.returncode == 2
    assert done.stderr.startswith("aekt-timm: error: --kd-loss-type 'aektt'") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_without_a_checkout_it_names_timm_root(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TIMM_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert launcher.main(["--model", MODEL, "--kd-loss-type", "aekt"]) == 2
    err = capsys.readouterr().err
    assert "--timm-root" in err and "$TIMM_ROOT" in err and err.count("\n") == 1
    assert launcher.main(["--timm-root", str(tmp_path), "--model", MODEL]) == 2
    assert f"{tmp_path.resolve()} (from --timm-root) has no train.py" in capsys.readouterr().err
    monkeypatch.setenv("TIMM_ROOT", str(tmp_path))
    assert launcher.main(["--model", MODEL]) == 2
    assert "(from $TIMM_ROOT) has no train.py" in capsys.readouterr().err
    assert launcher.main(["--help"]) == 0  # no checkout: the launcher's own flags
    assert "--kd-beta" in capsys.readouterr().out


def test_it_finds_the_checkout_it_is_run_from_and_lists_its_flags_with_trainpys(
    root, tmp_path, capsys, monkeypatch
) -> None:
    checkout = tmp_path / "pytorch-image-models"
    (checkout / "timm").mkdir(parents=True)
    (checkout / "timm" / "__init__.py").touch()  # a checkout: train.py beside the timm package
    (checkout / "train.py").symlink_to(root / "train.py")
    (checkout / "results").mkdir()
    monkeypatch.delenv("TIMM_ROOT", raising=False)
    monkeypatch.chdir(checkout / "results")
    assert launcher.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--kd-model-name", "--kd-loss-type", "--grad-accum-steps", "--kd-beta", "--kd-order", "--kd-pretrained-path"):
        assert flag in out


# --- training runs and their checkpoints --------------------------------------------------------------------
def _validate_py(root: Path, data: Path, checkpoint: Path) -> subprocess.CompletedProcess[str]:
    """The checkout's own validate.py (with the checkout's timm, as `python validate.py` runs it)."""
    command = [
        sys.executable, str(root / "validate.py"), "--data-dir", str(data), "--split", "validation",
        "--model", MODEL, "--num-classes", str(CLASSES), "--img-size", str(IMG), "--device", "cpu",
        "--workers", "1", "--no-prefetcher", "-b", str(BATCH), "--checkpoint", str(checkpoint),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)


@pytest.mark.slow
def test_a_short_run_saves_a_checkpoint_the_plain_timm_model_loads(root, data, teacher, tmp_path) -> None:
    """AEKT without the serial layer, mixup/cutmix soft targets and label smoothing: train.py's checkpoint
    loads into ``timm.create_model(name, checkpoint_path=...)`` (and the checkout's validate.py)."""
    out = tmp_path / "run"
    extra = ["--kd-loss-type", "aekt", "--kd-beta", "2", "--kd-warmup-epochs", "1", "--mixup", "0.5", "--cutmix", "0.5"]
    done = _launch(*_argv(root, data, out, *extra, "--smoothing", "0.1", epochs=2, teacher=teacher))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = _load(out / "last.pth.tar")
    assert saved["epoch"] == 1 and saved["args"].kd_loss_type == "aekt" and saved["args"].kd_beta == 2.0
    assert saved["task_state"]["kd_warmup"]["steps"] == 2 * _batches()  # every optimizer update counted
    model = timm.create_model(MODEL, num_classes=CLASSES, checkpoint_path=str(out / "last.pth.tar"))
    assert model.state_dict().keys() == saved["state_dict"].keys()
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in model.state_dict().items())
    results = json.loads(done.stdout.split("--result\n", 1)[1])  # train.py's summary of the epochs
    assert len(results) == 2 and all(math.isfinite(epoch["train"]["loss"]) for epoch in results)
    if BACKEND == "real":
        checked = _validate_py(root, data, out / "last.pth.tar")
        assert checked.returncode == 0 and '"top1"' in checked.stdout, checked.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("order", ["kd_cls", "cls_kd"])
def test_a_serial_layer_run_resumes_and_exports_the_plain_model_with_equal_outputs(
    root, data, teacher, tmp_path, order, capsys
) -> None:
    out = tmp_path / "run"
    extra = ["--kd-loss-type", "aekt", "--kd-beta", "2", "--kd-order", order, "--kd-warmup-epochs", "1", "--model-ema",
             "--model-ema-decay", "0.5"]  # fmt: skip
    done = _launch(*_argv(root, data, out, *extra, teacher=teacher))
    assert done.returncode == 0, done.stderr[-3000:]
    saved = _load(out / "last.pth.tar")
    assert {"serial.weight", "serial.bias"} <= saved["state_dict"].keys() and "state_dict_ema" in saved
    with pytest.raises(RuntimeError):  # why the export exists
        timm.create_model(MODEL, num_classes=CLASSES, checkpoint_path=str(out / "last.pth.tar"))

    resumed = _launch(*_argv(root, data, out, *extra, "--resume", str(out / "last.pth.tar"), epochs=2, teacher=teacher))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load(out / "last.pth.tar")["epoch"] == 1

    exported = tmp_path / "plain.pth.tar"
    assert launcher.main(["export", str(out / "last.pth.tar"), str(exported)]) == 0
    assert f"wrote {exported}" in capsys.readouterr().out
    saved, plain_state = _load(out / "last.pth.tar"), _load(exported)
    images = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    for key in ("state_dict", "state_dict_ema"):
        wrapper = AEKTStudent(timm.create_model(MODEL, num_classes=CLASSES), order=order)
        wrapper.load_state_dict(saved[key])
        plain = timm.create_model(MODEL, num_classes=CLASSES)
        plain.load_state_dict(plain_state[key])  # strict: exactly the plain model's keys
        with torch.no_grad():
            expected, got = wrapper.eval()(images), plain.eval()(images)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if order == "kd_cls":  # S is not the identity any more: folding it changed the classifier
            assert not torch.equal(plain_state[key]["fc.weight"], saved[key]["model.fc.weight"])
    timm.create_model(MODEL, num_classes=CLASSES, checkpoint_path=str(exported))
    if BACKEND == "real":
        checked = _validate_py(root, data, exported)
        assert checked.returncode == 0 and '"top1"' in checked.stdout, checked.stderr[-3000:]


def test_export_refuses_what_is_not_a_trainpy_checkpoint(tmp_path, capsys) -> None:
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    assert launcher.main(["export", str(tmp_path / "other.pth"), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint of timm's train.py" in err and err.count("\n") == 1
    assert launcher.main(["export", str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(root, data, teacher, tmp_path) -> None:
    """AEKT with the serial layer, EMA, mixup, gradient accumulation and a warm-up still ramping at the kill:
    killed with SIGKILL once its first checkpoint is on disk and resumed with ``--resume last.pth.tar``, the
    run ends with the weights, EMA weights and warm-up clock of one never interrupted, bit for bit."""
    extra = ["--kd-loss-type", "aekt", "--kd-beta", "2", "--kd-order", "kd_cls", "--kd-warmup-epochs", "3",
             "--model-ema", "--model-ema-decay", "0.9", "--grad-accum-steps", "2", "--mixup", "0.4",
             "--sched", "cosine"]  # fmt: skip
    epochs = 4
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _launch(*_argv(root, data, whole, *extra, epochs=epochs, teacher=teacher))
    assert done.returncode == 0, done.stderr[-3000:]

    command = [sys.executable, "-m", "aekt_plugin.timm.launcher", *_argv(root, data, killed, *extra, epochs=epochs, teacher=teacher)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (killed / "checkpoint-0.pth.tar").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    stopped_at = _load(killed / "last.pth.tar")["epoch"]
    assert stopped_at < epochs - 1  # the kill lost epochs
    resumed = _launch(*_argv(root, data, killed, *extra, "--resume", str(killed / "last.pth.tar"), epochs=epochs,
                             teacher=teacher))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = _load(whole / "last.pth.tar"), _load(killed / "last.pth.tar")
    assert got["epoch"] == expected["epoch"] == epochs - 1
    for key in ("state_dict", "state_dict_ema"):
        assert expected[key].keys() == got[key].keys()
        different = [name for name in expected[key] if not torch.equal(expected[key][name], got[key][name])]
        assert not different, f"{key}: {different[:5]}"
    assert expected["task_state"]["kd_warmup"]["steps"] == got["task_state"]["kd_warmup"]["steps"]
    updates = math.ceil(_batches() / 2)
    assert got["task_state"]["kd_warmup"]["steps"] == epochs * updates


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "wrapped"),
    [
        (["--kd-loss-type", "aekt", "--kd-beta", "2", "--kd-order", "cls_kd", "--kd-warmup-epochs", "1"],
         r"AEKTDistillationTask wrapped its student in DistributedDataParallel \(device_ids=None, global_batch=True\)"),
        (["--kd-loss-type", "kl"], r"LogitDistillationTask wrapped its student in DistributedDataParallel \(device_ids=None\)"),
    ],
    ids=["aekt", "kl"],
)  # fmt: skip
def test_torchrun_with_two_cpu_processes_trains_through_the_tasks_ddp(
    root, data, teacher, tmp_path, extra, wrapped
) -> None:
    """``torchrun --standalone --nproc_per_node 2`` on the CPU (gloo): train.py's prepare_distributed reaches
    the task on both ranks, which wraps the student in DDP without the device_ids train.py passes (refused
    for CPU modules) and, for AEKT, switches the loss to the global batch; the run saves a checkpoint."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "aekt_plugin.timm.launcher", *_argv(root, data, out, *extra, teacher=teacher),
    ]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    for rank in (0, 1):
        assert re.search(rf"aekt-timm: rank {rank} of 2: {wrapped}", log), log[-3000:]
    saved = _load(out / "last.pth.tar")
    assert saved["args"].world_size == 2
    if "aekt" in extra:  # each rank sees half the data: the clock counted that rank's updates
        assert saved["task_state"]["kd_warmup"]["steps"] == (CLASSES * N_TRAIN // 2) // BATCH
        assert {"serial.weight", "model.fc.weight"} <= saved["state_dict"].keys()


@pytest.mark.slow
def test_torchcompile_inductor_trains_and_saves_plain_keys(root, data, teacher, tmp_path) -> None:
    out = tmp_path / "run"
    extra = ["--kd-loss-type", "dkd", "--kd-beta", "2", "--kd-warmup-epochs", "0", "--torchcompile", "inductor"]
    cache = tmp_path / "inductor"
    done = _launch(*_argv(root, data, out, *extra, teacher=teacher), timeout=900, TORCHINDUCTOR_CACHE_DIR=str(cache))
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(path.suffix == ".py" for path in cache.rglob("*"))  # inductor generated the compiled kernels
    saved = _load(out / "last.pth.tar")
    model = timm.create_model(MODEL, num_classes=CLASSES)
    model.load_state_dict(saved["state_dict"])  # no _orig_mod. prefix: train.py unwrapped the compiled module


# --- the README ---------------------------------------------------------------------------------------------
def _readme_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    return readme.split("### timm's `train.py`", 1)[1].split("\n## ", 1)[0]


def _readme_commands() -> list[list[str]]:
    """The launcher's arguments in each training command of the README's bash blocks (single process and
    torchrun), continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", _readme_section(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["aekt-timm"] and words[1:2] != ["export"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "aekt_plugin.timm.launcher" in words:
                commands.append(words[words.index("aekt_plugin.timm.launcher") + 1 :])
    return commands


def test_the_readme_documents_every_launcher_flag() -> None:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    for flag in [*flags, "--timm-root", "aekt-timm export", "torchrun --standalone --nproc_per_node"]:
        assert flag in _readme_section(), flag


def test_the_readme_commands_pass_the_launchers_checks(root, tmp_path, monkeypatch) -> None:
    """Each training command of the README, as written, parses with train.py's parser and passes every check
    (the run itself is replaced: the data and teachers are the reader's)."""
    started = []
    monkeypatch.setattr(launcher, "run", lambda module, argv, args, text, settings: started.append((args, settings)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pth").touch()  # the CPU example's local teacher checkpoint
    commands = _readme_commands()
    assert len(commands) == 4
    for words in commands:
        assert launcher.main(["--timm-root", str(root), *words]) == 0, words
        args, settings = started.pop()
        assert settings.loss_type == args.kd_loss_type == words[words.index("--kd-loss-type") + 1]
        assert settings.loss_options["beta"] == float(words[words.index("--kd-beta") + 1])


def test_the_console_script_is_declared() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    scripts = dict(
        line.split(" = ", 1) for line in config["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    module, function = scripts["aekt-timm"].split(":")
    assert (module, function) == ("aekt_plugin.timm.launcher", "main") and callable(getattr(launcher, function))
