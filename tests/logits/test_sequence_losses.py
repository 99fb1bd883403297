"""Token-level losses: agreement with dense formulas, padding masked, sparse and sampled rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from narrowing import present

from kdcache.errors import ConfigError, SpecError
from kdcache.logits.encodings import SampledEncoding, parse_encoding
from kdcache.logits.loss_options import TOKEN_LOSS_DECLARATIONS
from kdcache.logits.sampled import draw_samples
from kdcache.logits.sequence_losses import TokenDistillationLoss, _teacher_rows, divergence
from kdcache.logits.sparse import SparseLogits

VOCAB = 40


def batch(seed: int = 0, lengths=(5, 3, 7)):
    gen = torch.Generator().manual_seed(seed)
    length = max(lengths)
    student = torch.randn(len(lengths), length, VOCAB, generator=gen)
    targets = torch.randint(0, VOCAB, (len(lengths), length), generator=gen)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, : n - 1] = True  # the last token has no next token
    teacher = torch.randn(int(mask.sum()), VOCAB, generator=gen) * 3
    return student, teacher, targets, mask


def reference(name, student_rows, teacher_rows, temperature, skew=0.1):
    """Dense transcription of each divergence over all V classes, float64."""
    p = F.softmax(teacher_rows.double() / temperature, dim=1)
    q = F.softmax(student_rows.double() / temperature, dim=1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(dim=1)

    if name == "kd":
        return kl(p, q)
    if name == "reverse":
        return kl(q, p)
    if name == "skew":
        return kl(p, skew * p + (1 - skew) * q)
    m = 0.5 * (p + q)
    return 0.5 * (kl(p, m) + kl(q, m))


@pytest.mark.parametrize("name", TOKEN_LOSS_DECLARATIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dense_teacher_matches_reference(name, temperature):
    student, teacher, targets, mask = batch()
    alpha = 0.3
    out = TokenDistillationLoss(divergence=name, temperature=temperature, alpha=alpha)(
        student, teacher, targets, mask
    )
    rows = student[mask]
    soft = reference(name, rows, teacher, temperature).mean() * temperature**2
    hard = F.cross_entropy(rows.double(), targets[mask])
    assert out["tokens"].item() == int(mask.sum())
    assert out["soft"].item() == pytest.approx(soft.item(), rel=1e-5, abs=1e-6)
    assert out["hard"].item() == pytest.approx(hard.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(
        (alpha * soft + (1 - alpha) * hard).item(), rel=1e-5
    )


@pytest.mark.parametrize("name", TOKEN_LOSS_DECLARATIONS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_topk_rows_equal_the_dense_loss_on_their_reconstruction(name, temperature):
    student, teacher, targets, mask = batch(1)
    encoding = parse_encoding("topk:6", num_classes=VOCAB)
    sparse = present(encoding.sparse(encoding.encode(teacher.numpy())))
    loss = TokenDistillationLoss(divergence=name, temperature=temperature, alpha=1.0)
    got = loss(student, sparse, targets, mask)["soft"]
    want = loss(student, sparse.dense(temperature), targets, mask)["soft"]
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_padding_and_masked_positions_do_not_count():
    student, teacher, targets, mask = batch(2)
    loss = TokenDistillationLoss(divergence="kd", temperature=2.0, alpha=0.5)
    base = loss(student, teacher, targets, mask)
    scrambled = student.clone()
    scrambled[~mask] = torch.randn(int((~mask).sum()), VOCAB) * 100
    other_targets = targets.clone()
    other_targets[~mask] = 0
    again = loss(scrambled, teacher, other_targets, mask)
    assert torch.equal(base["total"], again["total"])
    # and the gradient never reaches a masked position
    student = student.clone().requires_grad_(True)
    loss(student, teacher, targets, mask)["total"].backward()
    assert torch.count_nonzero(student.grad[~mask]) == 0


def test_sampled_rows_are_unbiased_and_refuse_what_they_cannot_give():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, VOCAB, generator=gen) * 2).numpy()
    encoding = parse_encoding("sampled:12", num_classes=VOCAB)
    assert isinstance(encoding, SampledEncoding)
    # The mean of p_hat over many independent rows of draws tends to p (unbiased).
    many = np.repeat(logits, 4000, axis=0) + np.arange(4000)[:, None] * 0  # same row, one block
    classes, counts = draw_samples(many, 12)
    assert (counts.sum(axis=1) == 12).all()
    rows = encoding.sampled({"sample_indices": classes, "sample_counts": counts})
    mean = rows.dense_probs().mean(dim=0)
    p = torch.softmax(torch.from_numpy(logits[0]).double(), dim=0).float()
    assert torch.allclose(mean, p, atol=0.01)
    # KD at T = 1 over the draws is the cross-entropy to p_hat minus its entropy.
    student, _, targets, mask = batch(4, lengths=(3,))
    teacher = encoding.sampled(encoding.encode(np.repeat(logits, 2, axis=0)))
    at_1 = {"temperature": 1.0}  # draws are at T = 1
    out = TokenDistillationLoss(divergence="kd", alpha=1.0, **at_1)(student, teacher, targets, mask)
    want = reference_kl_to(teacher.dense_probs(), student[mask])
    assert out["soft"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="temperature 1"):
        TokenDistillationLoss(temperature=2.0)(student, teacher, targets, mask)
    with pytest.raises(ConfigError, match="reverse KL"):
        TokenDistillationLoss(divergence="reverse", **at_1)(student, teacher, targets, mask)
    for name in ("skew", "js"):
        loss = TokenDistillationLoss(divergence=name, alpha=1.0, **at_1)
        value = loss(student, teacher, targets, mask)
        assert math.isfinite(value["soft"].item())


def reference_kl_to(p_hat, student_rows):
    log_q = F.log_softmax(student_rows.double(), dim=1)
    p = p_hat.double()
    return (torch.where(p > 0, p * (p.log() - log_q), 0.0)).sum(dim=1).mean().item()


def test_sampled_encoding_round_trip_and_spec_errors():
    encoding = parse_encoding("sampled:4", num_classes=VOCAB)
    logits = np.random.default_rng(0).normal(size=(5, VOCAB)).astype(np.float32) * 4
    encoded = encoding.encode(logits)
    again = encoding.encode(logits)  # seeded by the block: a resumed dump draws the same
    assert all(np.array_equal(encoded[k], again[k]) for k in encoded)
    assert encoding.row_nbytes(VOCAB) == 4 * 2
    dense = encoding.decode(encoded)
    assert np.isfinite(dense).all()
    most = np.argmax(encoded["sample_counts"], axis=1)[:, None]
    most_drawn_class = np.take_along_axis(encoded["sample_indices"], most, axis=1).astype(int)
    most_drawn = np.take_along_axis(dense, most_drawn_class, axis=1)
    assert (most_drawn[:, 0] == dense.max(axis=1)).all()
    shares = np.exp(dense).sum(axis=1)  # the drawn classes' shares sum to 1, the rest ~ e^-30
    assert np.allclose(shares, 1.0, atol=1e-6)
    for bad in ("sampled:0", "sampled:300", "sampled:x"):
        with pytest.raises(SpecError, match="sampled:S"):
            parse_encoding(bad)


def test_bad_shapes_and_options_are_one_line_errors():
    student, teacher, targets, mask = batch()
    with pytest.raises(ConfigError, match="teacher rows"):
        TokenDistillationLoss()(student, teacher[:-1], targets, mask)
    with pytest.raises(ConfigError, match="valid choices"):
        TokenDistillationLoss(divergence="wasserstein")
    with pytest.raises(ConfigError, match="alpha"):
        TokenDistillationLoss(alpha=2.0)


def _unfused_kd(student, teacher, targets, mask, temperature, alpha):
    """The kd loss by autograd through its formula (the other divergences' path)."""
    rows = student[mask]
    teacher_rows = _teacher_rows(teacher, temperature, rows.dtype)
    log_q = F.log_softmax(rows / temperature, dim=-1)
    soft = divergence("kd", teacher_rows, log_q).mean() * temperature**2
    return alpha * soft + (1 - alpha) * F.cross_entropy(rows, targets[mask])


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_kd_gradient_in_closed_form_is_autograds_through_the_formula(kind, temperature):
    student, teacher, targets, mask = batch(4)
    if kind == "topk":
        encoding = parse_encoding("topk:6", num_classes=VOCAB)
        teacher = present(encoding.sparse(encoding.encode(teacher.numpy())))
    elif kind == "sampled":
        temperature = 1.0
        encoding = parse_encoding("sampled:5", num_classes=VOCAB)
        assert isinstance(encoding, SampledEncoding)
        teacher = encoding.sampled(encoding.encode(teacher.numpy()))  # padded rows repeat ids
    grads = []
    for fused in (True, False):
        leaf = student.clone().requires_grad_(True)
        if fused:
            loss = TokenDistillationLoss(temperature=temperature, alpha=0.3)(
                leaf, teacher, targets, mask
            )["total"]
        else:
            loss = _unfused_kd(leaf, teacher, targets, mask, temperature, 0.3)
        loss.backward()
        grads.append((loss.detach(), leaf.grad))
    (fused_loss, fused_grad), (loss, grad) = grads
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(fused_grad[~mask]) == 0


@pytest.mark.parametrize("name", TOKEN_LOSS_DECLARATIONS)
def test_a_batch_with_no_counted_position_gives_a_zero_loss_on_the_graph(name):
    student = torch.randn(2, 3, 5, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    teachers = [
        torch.zeros(0, 5),
        SparseLogits(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 6), 5),
    ]
    for teacher in teachers:
        terms = TokenDistillationLoss(divergence=name)(
            student, teacher, torch.full((2, 3), -100), mask
        )
        assert [terms[key].item() for key in ("total", "soft", "hard", "tokens")] == [0, 0, 0, 0]
        terms["total"].backward()
        assert student.grad is not None
        assert not student.grad.any()


def test_the_kd_gradient_from_a_sampled_store_on_disk_is_the_dense_one_on_average(tmp_path):
    """Unbiased through the whole path (draws at dump, store, read, loss): n token rows of one
    teacher row hold n independent draws of S, and the mean kd gradient over them (what the loss
    takes) is the dense one within the draws' noise, sqrt(p (1 - p) / (S n)) per class; the
    gradient is over the student's full-vocabulary softmax, not one renormalised over the draws."""
    from kdcache.store.sequence import create_sequence_store, open_sequence_store

    draws, vocab, lengths = 12, 50, [101] * 20
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(vocab, generator=gen) * 2
    student = torch.randn(vocab, generator=gen)
    n = sum(lengths) - len(lengths)
    # Each row shifted by its own constant (the same softmax) so no two blocks of rows have the
    # same bytes, which seed their draws.
    rows = (teacher + torch.arange(n)[:, None] * 1e-2).numpy().astype(np.float32)
    path = tmp_path / "sampled.zarr"
    writer = create_sequence_store(
        path,
        sequences=[np.zeros(length, dtype=np.int64) for length in lengths],
        vocab_size=vocab,
        encoding=f"sampled:{draws}",
        chunk_rows=256,
    )
    writer.write(list(range(len(lengths))), rows)
    writer.finalize()
    sampled = open_sequence_store(path).read(list(range(len(lengths))))
    mask = torch.ones(len(lengths), lengths[0], dtype=torch.bool)
    mask[:, -1] = False
    targets = torch.zeros(len(lengths), lengths[0], dtype=torch.long)
    grads = []
    for rows_in in (sampled, torch.from_numpy(rows)):
        leaf = student.expand(len(lengths), lengths[0], vocab).clone().requires_grad_(True)
        loss = TokenDistillationLoss(temperature=1.0, alpha=1.0)
        loss(leaf, rows_in, targets, mask)["soft"].backward()
        # the loss is a mean over rows: the rows' gradients sum to q - (mean p_hat)
        grads.append(present(leaf.grad)[mask].sum(dim=0).double())
    mean, dense = grads
    p = torch.softmax(teacher.double(), dim=0)
    torch.testing.assert_close(dense, torch.softmax(student.double(), 0) - p, atol=1e-6, rtol=0)
    noise = (p * (1 - p) / (draws * n)).sqrt()
    assert ((mean - dense).abs() <= 4 * noise + 1e-6).all()
    cosine = torch.dot(mean, dense) / (mean.norm() * dense.norm())
    assert math.degrees(math.acos(min(1.0, float(cosine)))) < 2.0
