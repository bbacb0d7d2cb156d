"""losses.py against plain float64 re-derivations (loops, numpy, math) and against TRL 1.16's own loss code.

TRL keeps its GRPO and DPO losses inside `GRPOTrainer._compute_loss` and `DPOTrainer._compute_loss` (1.16 has
no standalone `dpo_loss`). Both methods read a handful of attributes and call the model once, so the TRL
tests call the real methods unbound on a stand-in `self` (a SimpleNamespace with those attributes, a model
stub that returns our log-probs, and a one-process accelerator); nothing heavy is instantiated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_veripo.losses import (
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    dpo_loss,
    dpo_losses_weighted,
    dpo_sft_loss,
    group_advantages,
    group_mean,
    group_std,
    grpo_loss,
    k3_kl,
    sequence_logps,
)

B, T = 6, 9


def random_mask(b: int, t: int, seed: int) -> torch.Tensor:
    """Right-padded completion mask with random lengths, row 1 entirely masked (an empty completion)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[1] = 0
    return torch.arange(t)[None, :] < lengths[:, None]


def grpo_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    return {
        "logps": logps,
        # ratios well outside [0.8, 1.2] for some tokens, and (per-sequence shift) for some sequences
        "old": logps + 0.3 * torch.randn(B, T, generator=g) + 0.4 * torch.randn(B, 1, generator=g),
        "ref": logps + 0.5 * torch.randn(B, T, generator=g),
        "adv": torch.randn(B, generator=g),
        "mask": random_mask(B, T, seed),
    }


# ----------------------------------------------------------------------------- float64 references


def ref_advantages(rewards: list[float], g: int, scale: str, eps: float) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(r)
    for start in range(0, len(r), g):
        group = r[start : start + g]
        out[start : start + g] = group - group.mean()
        if scale == "group":
            out[start : start + g] /= group.std(ddof=1) + eps
    if scale == "batch":
        out /= r.std(ddof=1) + eps
    return out


def ref_grpo(x, *, beta, eps_low, eps_high, loss_type, level, max_len=None, old_is_none=False):
    """Loss and d loss / d logp, token by token in float64. Returns (loss, grad [B, T], clip_low, clip_high)."""
    lp, ad, m = x["logps"].double().numpy(), x["adv"].double().numpy(), x["mask"].numpy()
    old = lp if old_is_none else x["old"].double().numpy()
    ref = x["ref"].double().numpy()
    n_tok, n_seq, width = m.sum(), m.shape[0], m.shape[1] if max_len is None else max_len
    loss, grad, low, high = 0.0, np.zeros_like(lp), 0, 0
    for i in range(n_seq):
        n_i = m[i].sum()
        seq_ratio = math.exp(sum(lp[i, t] - old[i, t] for t in range(T) if m[i, t]) / max(n_i, 1))
        for t in range(T):
            if not m[i, t]:
                continue
            weight = {"grpo": 1 / (n_i * n_seq), "bnpo": 1 / n_tok, "dapo": 1 / n_tok}.get(
                loss_type, 1 / (n_seq * width)
            )
            s = math.exp(lp[i, t] - old[i, t]) if level == "token" else seq_ratio
            a = ad[i]
            clipped = (a > 0 and s > 1 + eps_high) or (a < 0 and s < 1 - eps_low)
            low += a < 0 and s < 1 - eps_low
            high += a > 0 and s > 1 + eps_high
            surrogate = -min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a)
            kl = math.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
            loss += weight * (surrogate + beta * kl)
            # d/dlogp_t: the surrogate moves with s (d s / d logp_t = s, GSPO-token included) unless clipped
            grad[i, t] = weight * ((0.0 if clipped else -a * s) + beta * (1 - math.exp(ref[i, t] - lp[i, t])))
    return loss, grad, low / n_tok, high / n_tok


def logsig(v: float) -> float:
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def sig(v: float) -> float:
    return math.exp(logsig(v))


def ref_dpo_pair(c: float, r: float, *, beta, loss_type, ls=0.0, delta=0.0, tau=0.05) -> float:
    """One pair's loss, each variant written out from its paper's equation; c, r are the implicit rewards."""
    z = beta * (c - r)
    if loss_type == "sigmoid":
        return -(1 - ls) * logsig(z) - ls * logsig(-z)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - ls)) + sig(-z) * (logsig(-z) - math.log(ls))
    if loss_type == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if loss_type == "robust":
        return (-(1 - ls) * logsig(z) + ls * logsig(-z)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -logsig(beta * c - delta) - logsig(-(beta * r - delta))
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(beta * (c - r))
    assert loss_type == "discopop"
    return -logsig(z) * (1 - sig(z / tau)) + math.exp(-z) * sig(z / tau)


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_float64(scale):
    rewards = torch.rand(4 * 5, generator=torch.Generator().manual_seed(1)) * 2
    got = group_advantages(rewards, 5, scale=scale)
    want = ref_advantages(rewards.tolist(), 5, scale, 1e-4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_nanstd_recipe(scale):
    """Mirrors GRPOTrainer._generate_and_score_completions ("sum_then_normalize"), with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    rewards = torch.randn(3 * 8, generator=torch.Generator().manual_seed(2))
    mean = rewards.view(-1, 8).mean(dim=1).repeat_interleave(8)
    std = nanstd(rewards.view(-1, 8), dim=1).repeat_interleave(8) if scale == "group" else nanstd(rewards)
    want = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 8, scale=scale), want)


def test_all_equal_group_gets_exactly_zero_advantage():
    """Also where float32's group mean misses the rewards by an ulp (seven 0.1s, seven 0.9s)."""
    rewards = torch.tensor([0.1] * 7 + [0.9] * 7 + [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    for scale in ["group", "batch", "none"]:
        adv = group_advantages(rewards, 7, scale=scale)
        assert torch.equal(adv[:14], torch.zeros(14)), scale
        assert adv[14:].abs().min() > 0
    assert torch.equal(group_std(rewards, 7)[:2], torch.zeros(2))
    assert group_std(rewards, 7)[2] > 0


def test_group_mean_and_std_per_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0, 4.0])
    torch.testing.assert_close(group_mean(rewards, 3), torch.tensor([2 / 3, 7 / 3]))
    torch.testing.assert_close(group_std(rewards, 2), torch.tensor([math.sqrt(0.5), 0.0, math.sqrt(2.0)]))
    assert torch.equal(group_std(rewards, 1), torch.zeros(6))


def test_advantage_bad_arguments_raise():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(torch.zeros(6), 3, scale="rank")
    with pytest.raises(ValueError):
        group_std(torch.zeros(6), 0)


# ----------------------------------------------------------------------------- GRPO against float64


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_grads_match_float64(loss_type, level, beta):
    x = grpo_inputs(0)
    logps = x["logps"].clone().requires_grad_()
    kw = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type)
    loss, stats = grpo_loss(
        logps,
        x["old"],
        x["ref"],
        x["adv"],
        x["mask"],
        importance_sampling_level=level,
        max_completion_length=12,
        **kw,
    )
    loss.backward()
    want, want_grad, low, high = ref_grpo(
        x, beta=beta, eps_low=0.2, eps_high=0.28, loss_type=loss_type, level=level, max_len=12
    )
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(logps.grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert stats["clip_ratio_low"].item() == pytest.approx(low)
    assert stats["clip_ratio_high"].item() == pytest.approx(high)
    assert stats["clip_ratio"].item() == pytest.approx(low + high)
    assert low > 0 and high > 0  # the inputs exercise both clips


def test_dr_grpo_without_max_length_divides_by_t():
    x = grpo_inputs(4)
    loss, _ = grpo_loss(x["logps"], x["old"], None, x["adv"], x["mask"], loss_type="dr_grpo")
    want, *_ = ref_grpo(x, beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="dr_grpo", level="token", max_len=T)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_old_none_means_ratio_one_with_policy_gradient():
    x = grpo_inputs(5)
    logps = x["logps"].clone().requires_grad_()
    loss, stats = grpo_loss(logps, None, None, x["adv"], x["mask"], loss_type="bnpo")
    loss.backward()
    m = x["mask"].float()
    n = m.sum()
    assert loss.item() == pytest.approx((-(x["adv"][:, None] * m).sum() / n).item(), rel=1e-6)
    torch.testing.assert_close(logps.grad, -x["adv"][:, None] * m / n)
    assert stats["clip_ratio"].item() == 0.0


def test_kl_is_exactly_zero_when_policy_equals_reference():
    x = grpo_inputs(6)
    loss_kl, stats = grpo_loss(x["logps"], x["old"], x["logps"].clone(), x["adv"], x["mask"], beta=0.1)
    loss_plain, _ = grpo_loss(x["logps"], x["old"], None, x["adv"], x["mask"], beta=0.0)
    assert stats["kl"].item() == 0.0
    assert torch.equal(loss_kl, loss_plain)
    assert torch.equal(k3_kl(x["logps"], x["logps"]), torch.zeros(B, T))


def test_kl_is_reported_with_a_reference_even_at_beta_zero():
    x = grpo_inputs(7)
    _, stats = grpo_loss(x["logps"], x["old"], x["ref"], x["adv"], x["mask"], beta=0.0)
    want = k3_kl(x["logps"], x["ref"])[x["mask"]].mean()
    assert stats["kl"].item() == pytest.approx(want.item(), rel=1e-6) and want > 0
    _, stats = grpo_loss(x["logps"], x["old"], None, x["adv"], x["mask"])
    assert stats["kl"].item() == 0.0


def test_asymmetric_clipping_clips_each_side_at_its_own_epsilon():
    """eps_low=0.1, eps_high=0.3: ratio 0.85 is clipped only for A<0, 1.25 never, 1.35 only for A>0."""
    ratios = torch.tensor([0.85, 1.25, 1.35, 0.85, 1.25, 1.35])
    adv = torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    old = torch.full((6, 1), -1.0)
    logps = (old + ratios.log()[:, None]).requires_grad_()
    mask = torch.ones(6, 1, dtype=torch.bool)
    loss, stats = grpo_loss(logps, old, None, adv, mask, epsilon_low=0.1, epsilon_high=0.3, loss_type="bnpo")
    loss.backward()
    clipped = torch.tensor([True, False, True, False, False, False])
    assert torch.equal(logps.grad[:, 0] == 0, clipped)
    assert stats["clip_ratio_low"].item() == pytest.approx(1 / 6)
    assert stats["clip_ratio_high"].item() == pytest.approx(1 / 6)
    # the clipped tokens contribute the clipped value: -0.9 * (-1) and -1.3 * 1
    per_token = -torch.minimum(ratios * adv, ratios.clamp(0.9, 1.3) * adv)
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_masked_tokens_change_nothing_and_get_no_gradient(loss_type, level):
    x = grpo_inputs(8)
    pad = ~x["mask"]
    results = []
    for fill in [0.0, float("-inf"), float("nan"), 123.0]:
        tensors = [torch.where(pad, fill, x[k]) for k in ("logps", "old", "ref")]
        logps = tensors[0].clone().requires_grad_()
        loss, stats = grpo_loss(
            logps, tensors[1], tensors[2], x["adv"], x["mask"], beta=0.05, loss_type=loss_type,
            importance_sampling_level=level,
        )  # fmt: skip
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
        assert torch.equal(logps.grad[pad], torch.zeros(int(pad.sum())))
        results.append((loss.item(), logps.grad, {k: v.item() for k, v in stats.items()}))
    for loss, grad, stats in results[1:]:
        assert loss == results[0][0] and torch.equal(grad, results[0][1]) and stats == results[0][2]


def test_all_masked_batch_gives_zero_loss_not_nan():
    x = grpo_inputs(9)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for loss_type in GRPO_LOSS_TYPES:
        for level in ["token", "sequence"]:
            logps = x["logps"].clone().requires_grad_()
            loss, stats = grpo_loss(
                logps, x["old"], x["ref"], x["adv"], mask, beta=0.1, loss_type=loss_type,
                importance_sampling_level=level,
            )  # fmt: skip
            loss.backward()
            assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros(B, T))
            assert all(v.item() == 0.0 for v in stats.values())


def test_bf16_inputs_compute_in_float32():
    x = grpo_inputs(10)
    bf = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
    loss, stats = grpo_loss(bf["logps"], bf["old"], bf["ref"], bf["adv"], bf["mask"], beta=0.04)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in stats.values())


def test_grpo_bad_arguments_raise():
    x = grpo_inputs(11)
    args = (x["logps"], x["old"], x["ref"], x["adv"], x["mask"])
    with pytest.raises(ValueError, match="'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        grpo_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        grpo_loss(*args, importance_sampling_level="sentence")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(x["logps"], x["old"], None, x["adv"], x["mask"], beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x["logps"], x["old"], None, x["adv"][:, None], x["mask"])


# ----------------------------------------------------------------------------- GRPO against TRL


def trl_grpo_loss(logps, old, ref, adv, mask, *, beta, eps_low, eps_high, loss_type, level, max_len):
    """Run TRL 1.16's GRPOTrainer._compute_loss on a stand-in self; returns (loss, metrics)."""
    from trl import GRPOTrainer
    from trl.trainer.grpo_trainer import nanmax, nanmin  # noqa: F401  (the method needs them importable)

    metrics = defaultdict(lambda: defaultdict(list))
    accelerator = SimpleNamespace(
        num_processes=1, gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction: t
    )
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, aux_loss_enabled=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerator, _entropy_bonus_enabled=False, _metrics=metrics,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )  # fmt: skip
    m = mask.long()
    inputs = {
        "prompt_ids": torch.zeros(len(m), 2, dtype=torch.long), "prompt_mask": torch.ones(len(m), 2),
        "completion_ids": torch.zeros_like(m), "completion_mask": m, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": m.sum(),
    }  # fmt: skip
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,old_is_none", [(0.0, False), (0.04, False), (0.04, True)])
def test_grpo_loss_matches_trl(loss_type, level, beta, old_is_none):
    x = grpo_inputs(5)
    kw = dict(beta=beta, eps_low=0.2, eps_high=0.28, loss_type=loss_type, level=level, max_len=T + 3)
    old = None if old_is_none else x["old"]
    ours = x["logps"].clone().requires_grad_()
    loss, stats = grpo_loss(
        ours, old, x["ref"], x["adv"], x["mask"], beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=T + 3, importance_sampling_level=level,
    )  # fmt: skip
    loss.backward()
    theirs = x["logps"].clone().requires_grad_()
    trl_loss, trl_metrics = trl_grpo_loss(theirs, old, x["ref"], x["adv"], x["mask"], **kw)
    trl_loss.backward()
    torch.testing.assert_close(loss, trl_loss)
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert old_is_none or (stats["clip_ratio_low"] > 0 and stats["clip_ratio_high"] > 0)
    if beta:
        assert stats["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-5)
    if level == "token":  # TRL counts sequence-level clips per sequence, we count tokens (see grpo_loss)
        assert stats["clip_ratio_low"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"])
        assert stats["clip_ratio_high"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"])
        assert stats["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"])


# ----------------------------------------------------------------------------- DPO


def dpo_inputs(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    pc, pr = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
    return pc, pr, pc + 2 * torch.randn(n, generator=g), pr + 2 * torch.randn(n, generator=g)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_matches_float64(loss_type):
    logps = dpo_inputs(1)
    ls = {"exo_pair": 1e-3, "robust": 0.2, "sigmoid": 0.1}.get(loss_type, 0.0)
    losses, chosen, rejected = dpo_loss(
        *logps, beta=0.1, loss_type=loss_type, label_smoothing=ls, bco_delta=0.3
    )
    pc, pr, rc, rr = (t.double().tolist() for t in logps)
    want = [
        ref_dpo_pair(pc[i] - rc[i], pr[i] - rr[i], beta=0.1, loss_type=loss_type, ls=ls, delta=0.3)
        for i in range(len(pc))
    ]
    np.testing.assert_allclose(losses.numpy(), want, rtol=1e-5, atol=1e-6)
    pc, pr, rc, rr = logps
    torch.testing.assert_close(chosen, 0.1 * (pc - rc))
    torch.testing.assert_close(rejected, 0.1 * (pr - rr))
    assert not chosen.requires_grad


def test_dpo_rewards_are_detached_and_loss_has_gradient():
    pc, pr, rc, rr = dpo_inputs(2)
    pc.requires_grad_()
    losses, chosen, _ = dpo_loss(pc, pr, rc, rr)
    losses.sum().backward()
    assert chosen.grad_fn is None and (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_sequence_logps_sums_and_averages_unmasked_tokens():
    x = grpo_inputs(13)
    lp = torch.where(x["mask"], x["logps"], float("-inf"))
    sums = [sum(lp[i, t].item() for t in range(T) if x["mask"][i, t]) for i in range(B)]
    counts = [max(int(x["mask"][i].sum()), 1) for i in range(B)]
    np.testing.assert_allclose(sequence_logps(lp, x["mask"]).numpy(), sums, rtol=1e-6)
    np.testing.assert_allclose(
        sequence_logps(lp, x["mask"], average=True).numpy(), np.divide(sums, counts), rtol=1e-6
    )


def test_sft_term_averages_over_all_chosen_tokens():
    sums, lengths = torch.tensor([-3.0, -10.0, -1.0]), torch.tensor([2, 8, 2])
    losses = dpo_sft_loss(sums, lengths)
    assert losses.mean().item() == pytest.approx(14 / 12)


def test_weighted_mixture_is_the_weighted_sum_of_its_terms():
    logps, lengths = dpo_inputs(3), torch.tensor([3, 5, 7, 2, 9, 4, 1, 6])
    total, _, _ = dpo_losses_weighted(
        *logps, loss_types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], chosen_lengths=lengths
    )
    want = 0.8 * dpo_loss(*logps)[0] + 0.2 * dpo_loss(*logps, loss_type="bco_pair")[0]
    torch.testing.assert_close(total, want + dpo_sft_loss(logps[0], lengths))


def test_dpo_bad_arguments_raise():
    logps = dpo_inputs(4)
    with pytest.raises(ValueError, match="'sigmoid', 'hinge'"):
        dpo_loss(*logps, loss_type="kto")
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*logps, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(*logps, loss_type="exo_pair")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*logps, beta=0.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_losses_weighted(*logps, loss_types=["sigmoid", "sft"])
    with pytest.raises(ValueError, match="one weight per loss type"):
        dpo_losses_weighted(*logps, loss_types=["sigmoid"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="'sft'"):
        dpo_losses_weighted(*logps, loss_types=["kto"])


def trl_dpo_loss(per_token, ref_chosen, ref_rejected, completion_mask, *, loss_types, weights, beta, ls):
    """Run TRL 1.16's DPOTrainer._compute_loss on a stand-in self; returns (loss, metrics).

    The model stub plays TRL's fused LM head: log-probs [2B, L-1] of the shifted labels, 0 where ignored.
    """
    from trl import DPOTrainer

    n = per_token.size(0)

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )  # fmt: skip

    metrics = defaultdict(lambda: defaultdict(list))
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights, beta=beta,
        label_smoothing=ls, args=SimpleNamespace(discopop_tau=0.05), use_weighting=False, _metrics=metrics,
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, per_token.size(1) + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, per_token.size(1) + 1, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }  # fmt: skip
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


TRL_DPO_CASES = [
    pytest.param([t], [1.0], {"exo_pair": 1e-3, "robust": 0.2}.get(t, 0.0), id=t) for t in DPO_LOSS_TYPES
] + [
    pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0, id="mpo"),
    pytest.param(["sigmoid", "hinge", "apo_zero"], [0.5, 1.5, 0.25], 0.0, id="mixture"),
]


@pytest.mark.parametrize("loss_types,weights,ls", TRL_DPO_CASES)
def test_dpo_losses_match_trl(loss_types, weights, ls):
    """The batch mean of our per-pair losses (and its gradient) equals TRL's DPO loss, for every shared type.

    Not compared: sigmoid with label_smoothing > 0 (TRL 1.16's sigmoid ignores label_smoothing) and bco_pair
    with a running-mean delta (TRL 1.16 dropped it); both are covered against float64 above.
    """
    n, length, beta = 4, 10, 0.1
    g = torch.Generator().manual_seed(14)
    completion_mask = torch.zeros(2 * n, length, dtype=torch.long)
    for row in range(2 * n):  # column 0 is prompt, then a random-length completion, then padding
        completion_mask[row, 1 : 1 + int(torch.randint(1, length, (1,), generator=g))] = 1
    shift_mask = completion_mask[:, 1:].bool()
    raw = (-3 * torch.rand(2 * n, length - 1, generator=g)).requires_grad_()
    ref_sums = sequence_logps(-3 * torch.rand(2 * n, length - 1, generator=g), shift_mask)
    ref_chosen, ref_rejected = ref_sums.chunk(2)

    trl_loss, trl_metrics = trl_dpo_loss(
        raw * shift_mask, ref_chosen, ref_rejected, completion_mask, loss_types=loss_types, weights=weights,
        beta=beta, ls=ls,
    )  # fmt: skip
    (trl_grad,) = torch.autograd.grad(trl_loss, raw)

    average = loss_types == ["ipo"]  # IPO takes per-token mean log-probs (see dpo_loss)
    policy = sequence_logps(raw, shift_mask, average=average)
    lengths = shift_mask.sum(-1)
    ref_c, ref_r = (
        (ref_chosen, ref_rejected) if not average else (ref_chosen / lengths[:n], ref_rejected / lengths[n:])
    )
    losses, chosen, rejected = dpo_losses_weighted(
        *policy.chunk(2), ref_c, ref_r, loss_types=loss_types, weights=weights, beta=beta, label_smoothing=ls,
        chosen_lengths=lengths[:n],
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.mean(), raw)
    torch.testing.assert_close(losses.mean(), trl_loss)
    torch.testing.assert_close(grad, trl_grad)
    if not average:
        assert chosen.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-5)
        assert rejected.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], rel=1e-5)
