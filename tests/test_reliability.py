"""What users do to a loss besides calling it: compile it, autocast it, transform it with torch.func, hand it
the wrong thing. Each case gives a clear result, never a crash."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from strategies import LOSS_NAMES

import aekt_plugin
from aekt_plugin import reference


def _inputs(batch=16, classes=10, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=dtype) * 3
    teacher = torch.randn(batch, classes, generator=generator, dtype=dtype) * 3
    target = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, target


def _loss_and_grad(fn, student, *args, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    return loss.detach(), grad


# --- torch.compile ------------------------------------------------------------------------------------


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, aekt_plugin
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    for backend in sys.argv[1].split(","):
        for name in ("kd_loss", "dkd_loss", "aekt_loss"):
            fn = getattr(aekt_plugin, name)
            for temperature in (3.0, 1.7):  # a new temperature after the first compilation
                compiled = torch.compile(
                    lambda z: fn(z, t, y, temperature=temperature, validate_args=False), backend=backend
                )
                z = s.clone().requires_grad_(True)
                loss = compiled(z)
                loss.backward()
                z_eager = s.clone().requires_grad_(True)
                eager = fn(z_eager, t, y, temperature=temperature, validate_args=False)
                eager.backward()
                torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(z.grad, z_eager.grad, rtol=1e-5, atol=1e-6)
        print(backend, "ok")
    """
)


def _run_fresh(backends: str) -> str:
    """Run the compile script in a new interpreter: no eager call has warmed anything up before."""
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, backends], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_compile_works_on_the_first_call_of_a_fresh_process():
    assert _run_fresh("eager,aot_eager").split() == ["eager", "ok", "aot_eager", "ok"]


@pytest.mark.slow
def test_inductor_compiles_the_loss_on_the_first_call_of_a_fresh_process():
    assert _run_fresh("inductor").split() == ["inductor", "ok"]


# --- autocast -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_autocast_leaves_the_loss_in_float32_and_unchanged(name):
    student, teacher, target = _inputs(64, 100)
    fn = getattr(aekt_plugin, name)
    expected, expected_grad = _loss_and_grad(fn, student, teacher, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = _loss_and_grad(fn, student, teacher, target)
        half_student = student.bfloat16().requires_grad_(True)
        half_loss = fn(half_student, teacher.bfloat16(), target)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    half_loss.backward()
    assert half_loss.dtype == torch.float32 and half_student.grad.dtype == torch.bfloat16


# --- who requires grad --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_a_teacher_that_requires_grad_alone_gets_none_and_a_warning_once(name):
    student, teacher, target = _inputs()
    teacher.requires_grad_(True)
    fn = getattr(aekt_plugin, name)
    with pytest.warns(UserWarning, match="swapped"):
        fn(student, teacher, target).backward()
    assert teacher.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(student, teacher, target).backward()  # once per process


def test_with_both_requiring_grad_only_the_student_is_differentiated():
    student, teacher, target = _inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    with pytest.warns(UserWarning, match="never differentiates the teacher"):
        aekt_plugin.dkd_loss(student, teacher, target).backward()
    assert teacher.grad is None and student.grad is not None


# --- torch.func ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_torch_func_grad_equals_the_reference(name):
    student, teacher, target = _inputs(dtype=torch.float64)
    grad = torch.func.grad(lambda z: getattr(aekt_plugin, name)(z, teacher, target, validate_args=False))(
        student
    )
    _, expected = _loss_and_grad(getattr(reference, name), student, teacher, target)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_per_sample_gradients_with_vmap_of_grad(name):
    student, teacher, target = _inputs(dtype=torch.float64)
    fn = getattr(aekt_plugin, name)

    def one_sample(z, v, y):
        return fn(z[None], v[None], y[None], validate_args=False)

    per_sample = torch.func.vmap(torch.func.grad(one_sample))(student, teacher, target)
    for i in range(student.shape[0]):
        _, expected = _loss_and_grad(
            getattr(reference, name), student[i : i + 1], teacher[i : i + 1], target[i : i + 1]
        )
        torch.testing.assert_close(per_sample[i], expected[0], rtol=1e-10, atol=1e-12)


def test_vmap_over_batches_keeps_each_batch_normalisation_apart():
    student, teacher = torch.randn(3, 8, 10, dtype=torch.float64), torch.randn(3, 8, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (3, 8))
    batched = torch.func.vmap(lambda z, v, y: aekt_plugin.aekt_loss(z, v, y, validate_args=False))(
        student, teacher, target
    )
    one_by_one = torch.stack([reference.aekt_loss(student[i], teacher[i], target[i]) for i in range(3)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-12)


def test_jacrev_of_per_sample_losses_is_block_diagonal():
    student, teacher, target = _inputs(4, 6, dtype=torch.float64)
    jacobian = torch.func.jacrev(
        lambda z: aekt_plugin.kd_loss(z, teacher, target, reduction="none", validate_args=False)
    )(student)
    assert jacobian.shape == (4, 4, 6)
    off_diagonal = jacobian.clone()
    for i in range(4):
        off_diagonal[i, i] = 0
    assert float(off_diagonal.abs().max()) == 0.0
    _, expected = _loss_and_grad(reference.kd_loss, student, teacher, target, reduction="sum")
    torch.testing.assert_close(jacobian.sum(dim=0), expected, rtol=1e-10, atol=1e-12)


def test_double_backward_is_refused_outside_torch_func():
    student, teacher, target = _inputs(dtype=torch.float64)
    student.requires_grad_(True)
    loss = aekt_plugin.aekt_loss(student, teacher, target)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


# --- mistakes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dkd_loss", "aekt_loss"])
def test_a_missing_target_is_an_error_not_class_zero(name):
    student, teacher, _ = _inputs()
    for module in (aekt_plugin, reference):
        with pytest.raises(TypeError, match="target is required"):
            getattr(module, name)(student, teacher, None)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_teacher_probabilities_passed_as_logits_give_a_warning_naming_the_argument(name):
    student, teacher, target = _inputs()
    with pytest.warns(UserWarning, match="teacher_logits.*probabilities"):
        getattr(aekt_plugin, name)(student, teacher.softmax(dim=1), target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(aekt_plugin, name)(student, teacher, target)  # logits: no warning


def test_option_types_are_checked_one_way_everywhere():
    student, teacher, target = _inputs()
    for bad in ({"validate_args": "no"}, {"normalize_weight": 1}, {"standardize": 1}, {"ignore_index": 2.5}):
        with pytest.raises(TypeError, match=next(iter(bad))):
            aekt_plugin.aekt_loss(student, teacher, target, **bad)
    with pytest.raises(TypeError, match="validate_args"):
        aekt_plugin.AEKTLoss(validate_args="no")


@pytest.mark.parametrize("temperature", [1e20, 1e-20, math.inf, math.nan, 0.0, -1.0])
def test_temperatures_outside_the_working_range_are_refused(temperature):
    student, teacher, target = _inputs()
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0.0001, 10000\]"):
        aekt_plugin.kd_loss(student, teacher, target, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        aekt_plugin.KDLoss(temperature=temperature)


# --- non-finite inputs under validate_args=False ------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(
    ("who", "column", "value"),
    [
        ("student", "other", -math.inf),
        ("student", "target", -math.inf),
        ("student", "target", math.inf),
        ("student", "other", math.nan),
        ("teacher", "other", -math.inf),
        ("teacher", "target", math.inf),
    ],
)
def test_a_non_finite_row_gets_a_non_finite_gradient_and_the_others_stay_finite(name, who, column, value):
    student, teacher, target = _inputs(8, 6, dtype=torch.float64)
    bad = 3
    where = target[bad] if column == "target" else (target[bad] + 1) % 6
    (student if who == "student" else teacher)[bad, where] = value
    options = {"normalize_weight": False} if name == "aekt_loss" else {}
    loss, grad = _loss_and_grad(
        getattr(aekt_plugin, name), student, teacher, target, reduction="none", validate_args=False, **options
    )
    assert not math.isfinite(float(loss[bad]))
    assert not bool(torch.isfinite(grad[bad]).all())
    others = torch.arange(8) != bad
    assert bool(torch.isfinite(loss[others]).all()) and bool(torch.isfinite(grad[others]).all())


def test_grad_scaler_skips_the_step_of_a_batch_with_a_non_finite_logit():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, target = torch.randn(4, 5), torch.randint(0, 6, (4,))
    teacher = torch.randn(4, 6)
    teacher[1, (int(target[1]) + 1) % 6] = -math.inf  # one bad teacher logit
    loss = aekt_plugin.dkd_loss(model(x), teacher, target, validate_args=False)
    assert not math.isfinite(float(loss.detach()))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, before)  # the step was skipped
    assert scaler.get_scale() < 65536.0


def test_vmap_and_export_with_value_checks_say_what_to_pass():
    """Value checks read data, which vmap and torch.export cannot: one line saying to pass
    validate_args=False, and with it both work (export gives the eager value)."""
    from torch.func import grad, vmap

    z, v = torch.randn(5, 7), torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"torch\.func\.vmap cannot.*validate_args=False"):
        vmap(grad(lambda z, v: aekt_plugin.kd_loss(z[None], v[None])))(z, v)
    per_sample = vmap(grad(lambda z, v: aekt_plugin.kd_loss(z[None], v[None], validate_args=False)))(z, v)
    assert per_sample.shape == z.shape

    class Distil(torch.nn.Module):
        def __init__(self, validate_args: bool) -> None:
            super().__init__()
            self.validate_args = validate_args

        def forward(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return aekt_plugin.kd_loss(z, v, validate_args=self.validate_args)

    with pytest.raises(ValueError, match=r"torch\.export cannot.*validate_args=False"):
        torch.export.export(Distil(True), (z, v))
    exported = torch.export.export(Distil(False), (z, v))
    torch.testing.assert_close(exported.module()(z, v), aekt_plugin.kd_loss(z, v))


@pytest.mark.slow
def test_fake_and_traced_calls_leave_no_fake_tensor_in_the_constant_cache():
    """A call under FakeTensorMode or make_fx (fake or symbolic) made the kernel cache fake constants, and
    every later real call in the process raised (and a fake call after a real one did too)."""
    code = textwrap.dedent(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        import aekt_plugin as ak

        z, v, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
        expected = ak.aekt_loss(z, v, y, temperature=3.0)

        def fake_call():
            with FakeTensorMode() as mode:
                out = ak.aekt_loss(mode.from_tensor(z), mode.from_tensor(v), mode.from_tensor(y),
                                   temperature=3.0, validate_args=False)
            assert out.shape == ()

        fake_call()
        assert torch.equal(ak.aekt_loss(z, v, y, temperature=3.0), expected)
        for mode in ("fake", "symbolic"):
            graph = make_fx(lambda a, b: ak.kd_loss(a, b, temperature=5.0, validate_args=False),
                            tracing_mode=mode)(z, v)
            torch.testing.assert_close(graph(z, v), ak.kd_loss(z, v, temperature=5.0))
        fake_call()
        assert torch.equal(ak.aekt_loss(z, v, y, temperature=3.0), expected)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
