"""Tests of kdcache.logits.losses against a direct transcription of the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from narrowing import present

from kdcache.errors import ConfigError, SpecError
from kdcache.logits.loss_options import HYPER_PARAMETERS, IMAGE_LOSSES, TOKEN_LOSS_DECLARATIONS
from kdcache.logits.losses import (
    LOSSES,
    AttentionLogitsLoss,
    FocalDistillationLoss,
    LogitsDistillationLoss,
    build_loss,
    total_loss,
)
from kdcache.logits.sequence_losses import TOKEN_LOSSES

# --- Reference: the spec's formulas, written out as plainly as possible. ---------------------


def ref_kd(student, teacher, labels, temperature, alpha, reduction="mean"):
    teacher_probs = F.softmax(teacher / temperature, dim=1)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    soft = F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2
    hard = F.cross_entropy(student, labels, reduction=reduction)
    return {
        "total": alpha * soft + (1 - alpha) * hard,
        "soft": soft,
        "hard": hard,
        "teacher_probs": teacher_probs,
        "student_probs": F.softmax(student, dim=1),
    }


def ref_focal(student, teacher, labels, temperature, alpha, gamma):
    teacher_probs = F.softmax(teacher / temperature, dim=1)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    weight = (1 - teacher_probs.max(dim=1)[0]) ** gamma
    kl = (teacher_probs * (torch.log(teacher_probs + 1e-10) - student_log_probs)).sum(dim=1)
    soft = (weight * kl).mean() * temperature**2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, labels)


def ref_attention(student, teacher, labels, temperature, alpha, top_k):
    teacher_probs = F.softmax(teacher / temperature, dim=1)
    _, top_idx = teacher_probs.topk(top_k, dim=1)
    mask = torch.zeros_like(teacher_probs)
    mask.scatter_(1, top_idx, 1.0)
    student_log_probs = F.log_softmax(student / temperature, dim=1)
    terms = teacher_probs * (torch.log(teacher_probs + 1e-10) - student_log_probs) * mask
    soft = terms.sum(dim=1).mean() * temperature**2
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, labels)


def make_inputs(seed, batch, classes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen)
    teacher = torch.randn(batch, classes, generator=gen) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return student.to(dtype), teacher.to(dtype), labels


TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0)
ALPHAS = (0.0, 0.3, 1.0)
SHAPES = [(1, 2), (4, 10), (32, 10), (7, 100)]
CASES = [(seed, batch, classes) for seed, (batch, classes) in enumerate(SHAPES)]
ATOL = 1e-6

# --- Agreement with the reference. -----------------------------------------------------------


@pytest.mark.parametrize(("seed", "batch", "classes"), CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_kd_matches_reference(seed, batch, classes, temperature, alpha):
    student, teacher, labels = make_inputs(seed, batch, classes)
    got = LogitsDistillationLoss(temperature, alpha)(student, teacher, labels)
    want = ref_kd(student, teacher, labels, temperature, alpha)
    assert set(got) == {"total", "soft", "hard", "teacher_probs", "student_probs"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kd_reduction_applies_to_hard_term(reduction):
    student, teacher, labels = make_inputs(3, 6, 5)
    got = LogitsDistillationLoss(2.0, 0.3, reduction)(student, teacher, labels)
    want = ref_kd(student, teacher, labels, 2.0, 0.3, reduction)
    for key in ("total", "soft", "hard"):
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
    assert got["hard"].shape == (() if reduction == "sum" else (6,))


@pytest.mark.parametrize(("seed", "batch", "classes"), CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_matches_reference(seed, batch, classes, temperature, alpha, gamma):
    student, teacher, labels = make_inputs(seed, batch, classes)
    got = FocalDistillationLoss(temperature, alpha, gamma)(student, teacher, labels)
    want = ref_focal(student, teacher, labels, temperature, alpha, gamma)
    assert got.shape == ()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("seed", "batch", "classes"), CASES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_attention_matches_reference(seed, batch, classes, temperature, alpha, top_k):
    student, teacher, labels = make_inputs(seed, batch, classes)
    got = AttentionLogitsLoss(temperature, alpha, top_k)(student, teacher, labels)
    want = ref_attention(student, teacher, labels, temperature, alpha, top_k)
    assert got.shape == ()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_focal_gamma_zero_and_full_top_k_reduce_to_kd():
    student, teacher, labels = make_inputs(5, 8, 10)
    kd = LogitsDistillationLoss(4.0, 0.7)(student, teacher, labels)["total"]
    focal = FocalDistillationLoss(4.0, 0.7, gamma=0.0)(student, teacher, labels)
    attention = AttentionLogitsLoss(4.0, 0.7, top_k=10)(student, teacher, labels)
    torch.testing.assert_close(focal, kd, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention, kd, atol=1e-5, rtol=0)


# Computed once from the reference formulas; catches a change made to both implementations.
GOLDEN = {
    "kd_soft": 4.6023817,
    "kd_hard": 2.2212918,
    "kd_total": 3.8880546,
    "focal": 1.5262566,
    "attention": 5.2163424,
}


def test_golden_values():
    torch.manual_seed(0)
    student = torch.randn(4, 6)
    teacher = torch.randn(4, 6) * 3
    labels = torch.tensor([0, 3, 5, 1])
    kd = LogitsDistillationLoss(4.0, 0.7)(student, teacher, labels)
    assert kd["soft"].item() == pytest.approx(GOLDEN["kd_soft"], abs=1e-6)
    assert kd["hard"].item() == pytest.approx(GOLDEN["kd_hard"], abs=1e-6)
    assert kd["total"].item() == pytest.approx(GOLDEN["kd_total"], abs=1e-6)
    focal = FocalDistillationLoss(4.0, 0.7, 2.0)(student, teacher, labels)
    assert focal.item() == pytest.approx(GOLDEN["focal"], abs=1e-6)
    attention = AttentionLogitsLoss(4.0, 0.7, 3)(student, teacher, labels)
    assert attention.item() == pytest.approx(GOLDEN["attention"], abs=1e-6)


# --- Behaviour. -------------------------------------------------------------------------------


def test_alpha_one_is_soft_only_and_alpha_zero_is_ce_only():
    student, teacher, labels = make_inputs(1, 8, 10)
    ce = F.cross_entropy(student, labels)
    soft = LogitsDistillationLoss(4.0, 1.0)(student, teacher, labels)
    assert soft["total"].item() == pytest.approx(soft["soft"].item(), abs=ATOL)
    for name in IMAGE_LOSSES:
        loss = build_loss(name, temperature=4.0, alpha=0.0)
        torch.testing.assert_close(
            total_loss(loss(student, teacher, labels)), ce, atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_gradients_reach_student_not_teacher(name):
    student, teacher, labels = make_inputs(2, 8, 10)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    total_loss(build_loss(name, temperature=4.0, alpha=0.5)(student, teacher, labels)).backward()
    assert student.grad is not None
    assert student.grad.abs().sum() > 0
    assert torch.isfinite(student.grad).all()
    assert teacher.grad is None


@pytest.mark.parametrize("name", IMAGE_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    student, teacher, labels = make_inputs(4, 16, 10)
    loss = build_loss(name, temperature=4.0, alpha=0.5)
    want = total_loss(loss(student, teacher, labels))
    low_student = student.to(dtype).requires_grad_(True)
    got = total_loss(loss(low_student, teacher.to(dtype), labels))
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    # Only the inputs' rounding to half precision separates the two.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    got.backward()
    assert low_student.grad.dtype == dtype
    assert torch.isfinite(low_student.grad.float()).all()


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_no_tensor_is_pinned_to_the_cpu(name):
    # The meta device runs every op without data, so a stray CPU tensor would fail here.
    student = torch.randn(4, 6, device="meta", requires_grad=True)
    teacher = torch.randn(4, 6, device="meta")
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    out = total_loss(build_loss(name, temperature=2.0, alpha=0.5)(student, teacher, labels))
    assert out.device.type == "meta"
    assert out.shape == ()
    out.backward()
    assert present(student.grad).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_cuda_matches_cpu(name):
    student, teacher, labels = make_inputs(6, 16, 10)
    loss = build_loss(name, temperature=4.0, alpha=0.5)
    want = total_loss(loss(student, teacher, labels))
    got = total_loss(loss(student.cuda(), teacher.cuda(), labels.cuda()))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_kd_returns_float32_probabilities_for_float16_inputs():
    student, teacher, labels = make_inputs(4, 3, 5, torch.float16)
    out = LogitsDistillationLoss()(student, teacher, labels)
    assert out["teacher_probs"].dtype == out["student_probs"].dtype == torch.float32
    torch.testing.assert_close(out["teacher_probs"].sum(dim=1), torch.ones(3))


def test_total_loss_accepts_dict_and_tensor():
    value = torch.tensor(1.5)
    assert total_loss({"total": value, "soft": torch.tensor(0.0)}) is value
    assert total_loss(value) is value


# --- Validation. ------------------------------------------------------------------------------

BAD_CONSTRUCTORS = [
    (lambda: LogitsDistillationLoss(temperature=-1.0), "-1.0"),
    (lambda: LogitsDistillationLoss(temperature=0), "0"),
    (lambda: LogitsDistillationLoss(temperature=math.inf), "inf"),
    (lambda: FocalDistillationLoss(temperature=math.nan), "nan"),
    (lambda: AttentionLogitsLoss(temperature="4"), "'4'"),  # type: ignore[arg-type]
    (lambda: LogitsDistillationLoss(alpha=1.5), "1.5"),
    (lambda: FocalDistillationLoss(alpha=-0.1), "-0.1"),
    (lambda: AttentionLogitsLoss(alpha=math.nan), "nan"),
    (lambda: FocalDistillationLoss(gamma=-2.0), "-2.0"),
    (lambda: AttentionLogitsLoss(top_k=0), "0"),
    (lambda: AttentionLogitsLoss(top_k=2.5), "2.5"),  # type: ignore[arg-type]
    (lambda: LogitsDistillationLoss(reduction="avg"), "'avg'"),
]


@pytest.mark.parametrize(("make", "shown"), BAD_CONSTRUCTORS)
def test_invalid_parameters_raise_config_error(make, shown):
    with pytest.raises(ConfigError, match="must be") as info:
        make()
    assert isinstance(info.value, ValueError)
    assert shown in str(info.value)


@pytest.mark.parametrize(
    "loss", [LogitsDistillationLoss(), FocalDistillationLoss(), AttentionLogitsLoss(top_k=2)]
)
@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "labels_shape", "shown"),
    [
        ((4, 5), (4, 6), (4,), r"\(4, 5\) and \(4, 6\)"),
        ((4, 5, 1), (4, 5, 1), (4,), r"\(4, 5, 1\)"),
        ((5,), (5,), (1,), r"\(5,\)"),
        ((4, 5), (4, 5), (4, 1), r"\(4, 1\)"),
        ((4, 5), (4, 5), (3,), r"\(3,\)"),
    ],
)
def test_bad_input_shapes_raise_config_error(
    loss, student_shape, teacher_shape, labels_shape, shown
):
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ConfigError, match=shown):
        loss(torch.randn(student_shape), torch.randn(teacher_shape), labels)


def test_float_labels_raise_config_error():
    with pytest.raises(ConfigError, match="float32"):
        LogitsDistillationLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2))


def test_top_k_above_class_count_raises_config_error():
    student, teacher, labels = make_inputs(0, 2, 4)
    with pytest.raises(ConfigError, match=r"top_k must be in \[1, 4\].*got 5"):
        AttentionLogitsLoss(top_k=5)(student, teacher, labels)


@pytest.mark.parametrize("name", IMAGE_LOSSES)
def test_every_declared_loss_builds_its_implementation(name):
    loss = build_loss(name, temperature=2.0, alpha=0.4, gamma=1.0, top_k=3)
    assert type(loss).__name__ == IMAGE_LOSSES[name].implementation
    assert type(loss) is LOSSES[name]
    assert (loss.temperature, loss.alpha) == (2.0, 0.4)


def test_build_loss_passes_each_loss_its_own_hyper_parameters_and_names_the_valid_ones():
    assert build_loss("focal", temperature=2.0, alpha=0.4, gamma=1.0).gamma == 1.0
    assert build_loss("attention", temperature=2.0, alpha=0.4, top_k=3).top_k == 3
    with pytest.raises(SpecError, match=rf"'mse'.*{', '.join(IMAGE_LOSSES)}") as info:
        build_loss("mse", temperature=2.0, alpha=0.4)
    assert isinstance(info.value, ValueError)


# --- Sparse teacher (topk:K stores). ----------------------------------------------------------


def sparse_teacher(seed, batch, classes, k):
    from kdcache.logits.encodings import parse_encoding

    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, classes, generator=gen) * 3
    encoding = parse_encoding(f"topk:{k}", num_classes=classes)
    return encoding.sparse(encoding.encode(teacher.numpy()))


@pytest.mark.parametrize("name", IMAGE_LOSSES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 4.0, 16.0])
@pytest.mark.parametrize(("classes", "k"), [(10, 3), (100, 5)])
def test_sparse_teacher_equals_dense_loss_on_its_reconstruction(name, temperature, classes, k):
    sparse = sparse_teacher(11, 8, classes, k)
    student, _, labels = make_inputs(12, 8, classes)
    student = student * 2
    loss = build_loss(name, temperature=temperature, alpha=0.6, gamma=2.0, top_k=k)
    got = total_loss(loss(student, sparse, labels))
    want = total_loss(loss(student, sparse.dense(temperature), labels))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparse_kd_outputs_and_gradients():
    sparse = sparse_teacher(3, 6, 50, 4)
    student, _, labels = make_inputs(4, 6, 50)
    student.requires_grad_(True)
    out = LogitsDistillationLoss(2.0, 0.5)(student, sparse, labels)
    assert "teacher_probs" not in out
    assert out["student_probs"].shape == (6, 50)
    out["total"].backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_sparse_attention_refuses_top_k_beyond_the_stored_classes():
    sparse = sparse_teacher(3, 2, 20, 3)
    student, _, labels = make_inputs(4, 2, 20)
    with pytest.raises(ConfigError, match=r"at most the 3 classes.*got 4"):
        AttentionLogitsLoss(top_k=4)(student, sparse, labels)


def test_sparse_teacher_of_the_wrong_width_is_refused():
    sparse = sparse_teacher(3, 4, 20, 3)
    student, _, labels = make_inputs(4, 4, 21)
    with pytest.raises(ConfigError, match=r"\(4, 21\) and \(4, 20\)"):
        LogitsDistillationLoss()(student, sparse, labels)


@pytest.mark.parametrize("name", ["kd", "focal", "attention"])
def test_unlabeled_samples_train_on_the_soft_term_alone_at_alpha_1(name):
    student, teacher, labels = make_inputs(3, 6, 10)
    unlabeled = torch.full_like(labels, -1)
    soft_only = build_loss(name, temperature=3.0, alpha=1.0, top_k=4)
    with_labels = total_loss(soft_only(student, teacher, labels))
    without = total_loss(soft_only(student, teacher, unlabeled))
    assert torch.isfinite(without)
    assert without.item() == with_labels.item()
    # alpha < 1: the hard term averages over the labelled samples only
    blended = build_loss(name, temperature=3.0, alpha=0.5, top_k=4)
    partly = labels.clone()
    partly[:3] = -1
    got = total_loss(blended(student, teacher, partly))
    soft = total_loss(soft_only(student, teacher, labels))
    want = 0.5 * soft + 0.5 * F.cross_entropy(student[3:], labels[3:])
    torch.testing.assert_close(got, want)


def test_kd_without_reduction_keeps_the_batch_shape_without_labels():
    student, teacher, labels = make_inputs(4, 5, 7)
    out = LogitsDistillationLoss(alpha=1.0, reduction="none")(
        student, teacher, torch.full_like(labels, -1)
    )
    assert out["total"].shape == (5,)
    assert torch.isfinite(out["total"]).all()


#: A value outside each hyper-parameter's bounds, and the words its refusal holds.
OUT_OF_BOUNDS = {
    "temperature": (0.0, "temperature must be > 0"),
    "alpha": (1.5, "alpha must lie in"),
    "gamma": (-1.0, "gamma must be a finite number >= 0"),
    "top_k": (0, "top_k must be an integer >= 1"),
    "skew": (1.0, "skew must lie in"),
}


@pytest.mark.parametrize(
    ("registry", "declarations"),
    [(LOSSES, IMAGE_LOSSES), (TOKEN_LOSSES, TOKEN_LOSS_DECLARATIONS)],
    ids=["image", "token"],
)
def test_each_declared_loss_builds_with_its_hyper_parameters_defaults_and_bounds(
    registry, declarations
):
    assert tuple(registry) == tuple(declarations)
    for name, declaration in declarations.items():
        default = registry[name]()
        assert type(default).__name__ == declaration.implementation
        for parameter in declaration.hyper_parameters:
            assert getattr(default, parameter.name) == parameter.default, (name, parameter.name)
            value, message = OUT_OF_BOUNDS[parameter.name]
            with pytest.raises(ConfigError, match=message):
                registry[name](**{parameter.name: value})
    assert {p.name for p in HYPER_PARAMETERS} == set(OUT_OF_BOUNDS)
