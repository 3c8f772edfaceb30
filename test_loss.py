"""Tests for loss.py: log-probs, the SPIN loss and the DNPO joint loss against independent computations."""
import math

import pytest
import torch

from loss import dnpo_loss, sequence_logps, spin_loss
from noise import NoiseGenerator, noisy_sequence_logps

BETA = 0.5


def test_sequence_logps_matches_float64_log_softmax():
    """Summed log-probs equal a naive float64 log_softmax loop; prompt and padding positions are ignored."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 11, generator=g) * 3
    labels = torch.randint(0, 11, (3, 8), generator=g)
    labels[:, :3] = -100  # prompt
    labels[0, 6:] = -100  # padding
    labels[2] = -100  # no answer tokens at all
    expected = torch.zeros(3, dtype=torch.float64)
    logp = torch.log_softmax(logits.double(), -1)
    for b in range(3):
        for t in range(1, 8):  # token t is scored by the logits at t − 1
            if labels[b, t] != -100:
                expected[b] += logp[b, t - 1, labels[b, t]]
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)
    assert got[2].item() == 0.0
    changed = logits.clone()
    changed[0, 6:] = 100.0  # logits that score only padding (and the last position, which scores nothing)
    changed[:, :2] = -50.0  # logits that score only prompt tokens
    torch.testing.assert_close(sequence_logps(changed, labels), got)


def test_sequence_logps_bf16_is_computed_in_float32():
    """bf16 logits give float32 results equal to the float32 computation on the same (rounded) logits."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 300, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 300, (2, 6), generator=g)
    got = sequence_logps(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logps(logits.float(), labels))


def test_sequence_logps_gradcheck_float64():
    """Finite differences in float64 agree with autograd for the gather-minus-logsumexp log-probs."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[:, :2] = -100
    assert torch.autograd.gradcheck(lambda z: sequence_logps(z, labels), (logits,))


def test_spin_loss_by_hand():
    """On small numbers the loss is −log σ(m) and relu(1 − m) with m computed by hand."""
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.8))
    m = BETA * ((-1.0 + 1.5) - (-2.0 + 1.8))  # = 0.35
    losses, chosen_rewards, rejected_rewards = spin_loss(pc, pr, rc, rr, BETA)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-m)), abs=1e-6)
    assert losses.item() == pytest.approx(0.533375, abs=1e-5)  # log(1 + e^−0.35)
    assert chosen_rewards.item() == pytest.approx(0.25) and rejected_rewards.item() == pytest.approx(-0.1)
    hinge, _, _ = spin_loss(pc, pr, rc, rr, BETA, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.65)  # relu(1 − 0.35)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(pc, pr, rc, rr, BETA, loss_type="ipo")


def test_swapping_chosen_and_rejected_flips_the_margin():
    """Swapping chosen and rejected negates the margin: ℓ(m) − ℓ(−m) = −m and the rewards swap."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    losses, cr, rj = spin_loss(pc, pr, rc, rr, BETA)
    swapped, cr2, rj2 = spin_loss(pr, pc, rr, rc, BETA)
    torch.testing.assert_close(losses - swapped, -(cr - rj))
    torch.testing.assert_close(cr2, rj)
    torch.testing.assert_close(rj2, cr)


def test_spin_loss_gradcheck_float64():
    """Finite differences in float64 agree with autograd for the sigmoid and hinge losses."""
    g = torch.Generator().manual_seed(4)
    inputs = tuple(torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    assert torch.autograd.gradcheck(lambda *x: spin_loss(*x, BETA)[0], inputs)
    hinge_inputs = tuple(x.detach().mul(0.1).requires_grad_() for x in inputs)  # keep 1 − m away from the kink
    assert torch.autograd.gradcheck(lambda *x: spin_loss(*x, BETA, "hinge")[0], hinge_inputs)


def logps(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=g) * 3 - 20 for _ in range(4))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_noise_none_is_exactly_spin(loss_type):
    """--noise none (clean reference, no noise term, no α term) equals spin_loss(...).mean() bit for bit."""
    pc, pr, rc, rr = logps(5)
    pc.requires_grad_(), pr.requires_grad_()
    out = dnpo_loss(pc, pr, rc, rr, None, None, BETA, 0.3, loss_type=loss_type)
    losses, cr, rj = spin_loss(pc, pr, rc, rr, BETA, loss_type)
    assert torch.equal(out["loss"], losses.mean()) and torch.equal(out["model_loss"], losses.mean())
    assert out["noise_loss"].item() == 0.0 and out["variance_penalty"].item() == 0.0
    assert torch.equal(out["chosen_rewards"], cr) and torch.equal(out["rejected_rewards"], rj)
    torch.testing.assert_close(out["margin"], BETA * ((pc - pr) - (rc - rr)).detach())
    assert out["reward_acc"].item() == pytest.approx((cr > rj).float().mean().item())


def test_dnpo_terms_sum_and_margins():
    """loss = model + noise + α·mean σ²; margins use the clean reference, noisy margins the ε₁ reference."""
    pc, pr, rc, rr = logps(6)
    noisy1, noisy2 = rr - 0.7, rr - 1.1
    variance_mean = torch.tensor(0.2)
    out = dnpo_loss(pc, pr, rc, noisy1, noisy2, variance_mean, BETA, 0.5, ref_rejected_logps=rr)
    model = -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - noisy1))).mean()
    noise = torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - noisy2))).mean()
    torch.testing.assert_close(out["model_loss"], model)
    torch.testing.assert_close(out["noise_loss"], noise)
    torch.testing.assert_close(out["variance_penalty"], torch.tensor(0.1))
    torch.testing.assert_close(out["loss"], model + noise + 0.1)
    torch.testing.assert_close(out["margin"], BETA * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(out["noisy_margin"], BETA * ((pc - rc) - (pr - noisy1)))
    with pytest.raises(ValueError, match="one shape"):
        dnpo_loss(pc, pr[:2], rc, noisy1, None, None, BETA, 0.5)


def noisy_setup(seed=0, n_pairs=4, length=10, vocab=40, hidden_size=8):
    """Policy log-probs with grad, clean reference, a generator, and reference logits/hidden for rejected answers."""
    g = torch.Generator().manual_seed(seed)
    policy_chosen, policy_rejected = (torch.randn(n_pairs, generator=g) - 20).requires_grad_(), \
        (torch.randn(n_pairs, generator=g) - 22).requires_grad_()
    ref_chosen = torch.randn(n_pairs, generator=g) - 21
    logits = torch.randn(n_pairs, length, vocab, generator=g) * 2
    hidden = torch.randn(n_pairs, length, hidden_size, generator=g)
    labels = torch.randint(0, vocab, (n_pairs, length), generator=g)
    labels[:, :3] = -100
    torch.manual_seed(seed)
    gen = NoiseGenerator(hidden_size, vocab, init_variance=0.5, init_std=0.1)
    return policy_chosen, policy_rejected, ref_chosen, logits, hidden, labels, gen


def dnpo_from(setup, alpha=0.0, seed=1):
    """Eq. 9 as train.py assembles it: ε₁ with the generator detached, ε₂ with grad, shared rng."""
    policy_chosen, policy_rejected, ref_chosen, logits, hidden, labels, gen = setup
    rng = torch.Generator().manual_seed(seed)
    noisy_model = noisy_sequence_logps(logits, hidden, labels, gen, False, chunk_size=7, rng=rng)
    noisy_noise, variance_mean = noisy_sequence_logps(logits, hidden, labels, gen, True, chunk_size=7, rng=rng,
                                                      return_variance=True)
    out = dnpo_loss(policy_chosen, policy_rejected, ref_chosen, noisy_model, noisy_noise, variance_mean,
                    BETA, alpha, ref_rejected_logps=sequence_logps(logits, labels))
    out["eps2_margins"] = BETA * ((policy_chosen - ref_chosen) - (policy_rejected - noisy_noise)).detach()
    return out


def test_gradient_routing():
    """The model term reaches only the policy; the noise and α terms reach only the generator."""
    setup = noisy_setup()
    policy_chosen, policy_rejected, gen = setup[0], setup[1], setup[-1]
    out = dnpo_from(setup, alpha=1.0)
    params = list(gen.parameters())
    model_grads = torch.autograd.grad(out["model_loss"], [policy_chosen, policy_rejected] + params,
                                      allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in model_grads[2:])
    assert model_grads[0].abs().sum() > 0 and model_grads[1].abs().sum() > 0
    for term in ("noise_loss", "variance_penalty"):
        grads = torch.autograd.grad(out[term], [policy_chosen, policy_rejected] + params,
                                    allow_unused=True, retain_graph=True)
        assert all(g is None or not g.any() for g in grads[:2]), term
        assert grads[3].abs().sum() > 0, term  # the bias


def test_alpha_term_pushes_variance_down():
    """∂(α·mean σ²)/∂b > 0 for every entry, and one SGD step on the α term alone lowers mean σ²."""
    setup = noisy_setup()
    gen = setup[-1]
    out = dnpo_from(setup, alpha=2.0)
    out["variance_penalty"].backward()
    assert (gen.proj.bias.grad > 0).all()
    before = out["variance_penalty"].item()
    torch.optim.SGD(gen.parameters(), lr=1.0).step()
    assert dnpo_from(setup, alpha=2.0)["variance_penalty"].item() < before


def test_noise_step_lowers_the_noisy_margin():
    """One SGD step on the noise term lowers that term and the mean ε₂ noisy margin (same ε), clean margin fixed."""
    setup = noisy_setup()
    gen = setup[-1]
    out = dnpo_from(setup, seed=3)
    out["noise_loss"].backward()
    torch.optim.SGD(gen.parameters(), lr=0.05).step()
    after = dnpo_from(setup, seed=3)  # same rng seed: ε₁ and ε₂ are the same samples as before
    assert after["noise_loss"].item() < out["noise_loss"].item()
    assert after["eps2_margins"].mean() < out["eps2_margins"].mean()
    torch.testing.assert_close(after["margin"], out["margin"])  # the clean margin does not move
