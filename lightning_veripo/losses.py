"""The losses VerIPO optimises: group-relative advantages, the clipped GRPO objective, and DPO's pair losses.

Pure functions of tensors, no state. Every function upcasts its inputs and computes in float32, so bf16
log-probs from the model are safe to pass. Shapes: B sequences (GRPO: B = num_prompts * G rollouts, laid out
group-contiguous; DPO: B pairs), T completion tokens.

References: GRPO (DeepSeekMath, arXiv 2402.03300), DAPO (2503.14476), Dr. GRPO (2503.20783), GSPO (2507.18071),
DPO (2305.18290) and the variants named in `dpo_loss`. The formulas follow TRL 1.16 (`GRPOTrainer._compute_loss`,
`DPOTrainer._compute_loss`), which tests/test_losses.py calls to cross-check them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "discopop",
)  # fmt: skip


# ----------------------------------------------------------------------------- group statistics


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """[N] -> [N // G, G] float32, checking that the rewards split into whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}; "
            "pass all G rollouts of every prompt, group-contiguous"
        )
    return rewards.float().view(-1, group_size)


def _centred(grouped: Tensor) -> Tensor:
    """r - mean(group), exactly 0 in groups whose rewards are all equal (the float mean can miss r by an ulp)."""
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [n, 1]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [n, G]
    return torch.where(constant, torch.zeros_like(centred), centred)


def group_mean(rewards: Tensor, group_size: int) -> Tensor:
    """Mean reward of each prompt's group: [N] -> [N // G]."""
    return _grouped(rewards, group_size).mean(dim=1)


def group_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased (Bessel, /(G-1)) std of each prompt's group: [N] -> [N // G].

    Exactly 0 for a group whose rewards are all equal, so dynamic sampling (DAPO) can drop such groups with
    `group_std(...) > 0`: they carry no learning signal. With G = 1 the std is undefined and reported as 0.
    """
    grouped = _grouped(rewards, group_size)
    if group_size == 1:
        return torch.zeros(grouped.size(0), device=grouped.device)
    return (_centred(grouped).pow(2).sum(dim=1) / (group_size - 1)).sqrt()


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage of each rollout: [N] -> [N].

        A_i = (r_i - mean(r_group)) / (std + eps)

    with std the group's std (scale="group", GRPO), the std of all N rewards (scale="batch", as in
    "Tricks or Traps", arXiv 2508.08221), or no division (scale="none", Dr. GRPO). Both stds are unbiased,
    matching TRL's `nanstd`; eps is added to the std, as TRL does. A group whose rewards are all equal gets
    advantages of exactly 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    grouped = _grouped(rewards, group_size)  # [n, G]
    centred = _centred(grouped)  # [n, G]
    if scale == "group":
        centred = centred / (group_std(rewards, group_size)[:, None] + eps)
    elif scale == "batch":
        batch_std = grouped.std() if grouped.numel() > 1 else grouped.new_zeros(())
        centred = centred / (batch_std + eps)
    return centred.reshape(-1)


# ----------------------------------------------------------------------------- masked reductions


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is set (all of them, or along `dim`); 0 where none is."""
    mask = mask.bool()
    total = torch.where(mask, values.float(), 0.0)
    count = mask.float()
    if dim is None:
        return total.sum() / count.sum().clamp(min=1.0)
    return total.sum(dim) / count.sum(dim).clamp(min=1.0)


def sequence_logps(per_token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """log pi(y|x) of each row: the sum (or, with average=True, the mean) of its unmasked token log-probs.

    [B, T], [B, T] -> [B]. Masked positions may hold anything, padding's -inf included.
    """
    if average:
        return masked_mean(per_token_logps, mask, dim=-1)
    return torch.where(mask.bool(), per_token_logps.float(), 0.0).sum(-1)


# ----------------------------------------------------------------------------- GRPO


def k3_kl(per_token_logps: Tensor, ref_per_token_logps: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 (Schulman, "Approximating KL divergence"; GRPO eq. 4).

    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     >= 0, exactly 0 where pi == pi_ref
    """
    delta = ref_per_token_logps.float() - per_token_logps.float()
    return torch.exp(delta) - delta - 1


def importance_log_ratio(
    per_token_logps: Tensor, old_per_token_logps: Tensor, mask: Tensor, level: str = "token"
) -> Tensor:
    """log of the importance ratio pi_theta / pi_old at each token: [B, T] -> [B, T].

    level="token" (GRPO): log s_t = logp_t - old_t.
    level="sequence" (GSPO-token, GSPO eq. 13): every token of sequence i carries the value of the sequence
    ratio log s_i = mean_t(logp_t - old_t) over its unmasked tokens, with gradient d/dlogp_t = 1:

        log s_{i,t} = sg[log s_i] + logp_t - sg[logp_t]

    For per-sequence advantages this has the same value and gradients as TRL's (B, 1) GSPO ratio.
    """
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {level!r}; expected one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    log_ratio = per_token_logps - old_per_token_logps  # [B, T]
    if level == "token":
        return log_ratio
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # [B]
    return seq_log_ratio.detach()[:, None] + per_token_logps - per_token_logps.detach()


def _aggregate(
    per_token_loss: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None
) -> Tensor:
    """Reduce a [B, T] per-token loss to the scalar each GRPO variant optimises (masked tokens count as 0)."""
    per_token_loss = torch.where(mask, per_token_loss, 0.0)
    if loss_type == "grpo":  # each sequence weighs the same, whatever its length (GRPO eq. 3)
        return (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo"):  # each token weighs the same (DAPO eq. 8, token-level loss)
        return per_token_loss.sum() / mask.sum().clamp(min=1)
    length = per_token_loss.size(1) if max_completion_length is None else max_completion_length
    return per_token_loss.sum() / (per_token_loss.size(0) * length)  # dr_grpo: a constant normaliser


def aggregation_count(completion_mask: Tensor, loss_type: str) -> Tensor:
    """What `loss_type` averages over, counted (float): the unmasked tokens for "bnpo"/"dapo", the sequences
    for "grpo"/"dr_grpo" (dr_grpo's constant length cancels). Data-parallel ranks that each normalise by their
    own count weigh their tokens unequally; rescaling rank r's loss by W * count_r / sum of counts makes the
    ranks' averaged gradient the one loss over the global batch (`GRPOModule`)."""
    if loss_type in ("bnpo", "dapo"):
        return completion_mask.sum().float()
    return completion_mask.new_tensor(completion_mask.size(0), dtype=torch.float32)


def grpo_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor | None,
    ref_per_token_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    rollout_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate GRPO minimises, with an optional k3 KL penalty to the reference policy.

        s_t = pi_theta(y_t) / pi_old(y_t)                      (see `importance_log_ratio` for GSPO)
        L_t = -min(s_t A, clip(s_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t

    aggregated over the unmasked tokens by `loss_type`: "grpo" (mean per sequence, then over sequences),
    "bnpo"/"dapo" (mean over all tokens of the batch), "dr_grpo" (sum / (B * max_completion_length), T if None).
    Asymmetric eps_high > eps_low is DAPO's clip-higher. With old_per_token_logps None (one update per
    generation) pi_old = sg[pi_theta]: s = 1 with the policy gradient A * grad logp.

    Shapes: log-probs and mask [B, T], advantages [B]. Masked tokens influence neither the loss nor any
    gradient, whatever they hold. Returns (loss, stats) with detached scalar stats: "clip_ratio_low" (fraction
    of tokens with s < 1 - eps_low and A < 0), "clip_ratio_high" (s > 1 + eps_high and A > 0), "clip_ratio"
    (either), and "kl" (masked mean KL_t; reported whenever a reference is given, 0 without one).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"beta={beta} needs ref_per_token_logps for the KL penalty; pass them or set beta=0")
    if advantages.dim() != 1 or advantages.size(0) != per_token_logps.size(0):
        raise ValueError(
            f"advantages must be [B]={per_token_logps.size(0)}, got shape {tuple(advantages.shape)}"
        )
    mask = completion_mask.bool()  # [B, T]
    # zero the masked positions first, so padding's inf/nan cannot leak into the loss or its gradients
    logps = torch.where(mask, per_token_logps.float(), 0.0)  # [B, T]
    old = (
        logps.detach() if old_per_token_logps is None else torch.where(mask, old_per_token_logps.float(), 0.0)
    )
    adv = advantages.float()[:, None]  # [B, 1]

    ratio = torch.exp(importance_log_ratio(logps, old, mask, importance_sampling_level))  # [B, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * adv, clipped * adv)  # [B, T]
    if rollout_weights is not None:  # `rollout_correction`: the sampler was not pi_old (e.g. a vLLM server)
        per_token_loss = per_token_loss * rollout_weights.detach().float()

    kl = None
    if ref_per_token_logps is not None:
        kl = k3_kl(logps, torch.where(mask, ref_per_token_logps.float(), 0.0))  # [B, T]
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl
    loss = _aggregate(per_token_loss, mask, loss_type, max_completion_length)

    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        stats = {
            "clip_ratio_low": masked_mean(low.float(), mask),
            "clip_ratio_high": masked_mean(high.float(), mask),
            "clip_ratio": masked_mean((low | high).float(), mask),
            "kl": masked_mean(kl, mask) if kl is not None else logps.new_zeros(()),
        }
    return loss, stats


ROLLOUT_CORRECTIONS = ("none", "token", "sequence")


def rollout_correction(
    old_per_token_logps: Tensor,
    rollout_per_token_logps: Tensor,
    completion_mask: Tensor,
    level: str,
    clip: float,
) -> Tensor | None:
    """Truncated importance weights [B, T] for rollouts sampled by another engine than the trainer's pi_old:

        token:    w_t = min(exp(log pi_old(y_t) - log pi_rollout(y_t)), clip)
        sequence: w_t = min(exp(sum_t' m_t' (log pi_old(y_t') - log pi_rollout(y_t'))), clip)   (same for all t)

    0 on masked tokens; None for level "none". They multiply the per-token surrogate (`grpo_loss`'s
    `rollout_weights`), with no gradient."""
    if level not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {level!r}; expected one of {ROLLOUT_CORRECTIONS}")
    if level == "none":
        return None
    mask = completion_mask.bool()
    diff = torch.where(mask, old_per_token_logps.float() - rollout_per_token_logps.float(), 0.0)
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True).expand_as(diff)
    weights = torch.exp(diff.clamp(max=math.log(clip)))
    return torch.where(mask, weights, 0.0).detach()


# ----------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    bco_delta: float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss from sequence log-probs [B] (usually `sequence_logps`): (losses, chosen, rejected).

    With the implicit rewards c = logp_c - ref_c, r = logp_r - ref_r and margin h = c - r (ls = label_smoothing):
        sigmoid   -(1-ls) logsig(b h) - ls logsig(-b h)        DPO; ls > 0 is conservative DPO (cDPO)
        hinge     relu(1 - b h)                                SLiC (arXiv 2305.10425)
        ipo       (h - 1/(2b))^2                               IPO eq. 17 (2310.12036); pass per-token *mean*
                                                               log-probs (`sequence_logps(average=True)`), as the
                                                               IPO authors do and TRL does
        exo_pair  q_w (log q_w - log(1-ls)) + q_l (log q_l - log ls), q_w = sig(b h), q_l = sig(-b h)
                                                               EXO eq. 16 (2402.00856); needs 0 < ls < 1
        nca_pair  -logsig(b c) - logsig(-b c)/2 - logsig(-b r)/2       NCA (2402.05369)
        robust    (-(1-ls) logsig(b h) + ls logsig(-b h)) / (1 - 2 ls)    rDPO (2403.00409); 0 <= ls < 0.5
        bco_pair  -logsig(b c - delta) - logsig(-(b r - delta))  BCO (2404.04656); delta = running mean of
                                                               the rewards, kept by the caller (0 = TRL 1.16)
        sppo_hard (c - 1/(2b))^2 + (r + 1/(2b))^2               SPPO with hard win probabilities (2405.00675)
        apo_zero  1 - sig(b c) + sig(b r)                       APO eq. 7 (2408.06266)
        apo_down  sig(b c) + 1 - sig(b (c - r))                 APO eq. 8
        discopop  z = b h, m = sig(z / tau): -logsig(z) (1 - m) + exp(-z) m     DiscoPOP eq. 5 (2406.08414)

    chosen/rejected rewards are the detached b c and b r, for logging and reward accuracy.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (EXO uses 1e-3), got {label_smoothing}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    c = policy_chosen_logps.float() - ref_chosen_logps.float()  # [B]
    r = policy_rejected_logps.float() - ref_rejected_logps.float()  # [B]
    z = beta * (c - r)  # [B]
    ls = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (c - r - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    elif loss_type == "robust":
        losses = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
    elif loss_type == "sppo_hard":
        losses = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
    else:  # discopop
        mix = torch.sigmoid(z / discopop_tau)
        losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    return losses, (beta * c).detach(), (beta * r).detach()


def dpo_sft_loss(
    policy_chosen_logps_sum: Tensor, chosen_lengths: Tensor, tokens_per_pair: Tensor | float | None = None
) -> Tensor:
    """The "sft" term: negative log-likelihood of the chosen answers per token, as a per-pair [B] tensor.

        loss_i = -logp_c,i / mean_j(len_j)      so that   mean_i(loss_i) = -sum_i logp_c,i / sum_i len_i

    i.e. its mean over the batch is the token-mean NLL of all chosen tokens (TRL's "sft" term) and a long
    answer's tokens weigh as much as a short one's. Takes summed log-probs [B] and token counts [B].
    `tokens_per_pair` overrides mean_j(len_j), e.g. with the mean over the global batch of all ranks, so that
    data-parallel training averages to the single-device loss (TRL normalises per device).
    """
    if tokens_per_pair is None:
        tokens_per_pair = chosen_lengths.float().mean()
    return -policy_chosen_logps_sum.float() / torch.as_tensor(tokens_per_pair).float().clamp(min=1.0)


def dpo_losses_weighted(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_types: list[str],
    weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    bco_delta: float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """sum_k w_k * loss_k per pair [B], with loss_k any `dpo_loss` type or "sft" (`dpo_sft_loss`).

    MPO (InternVL, arXiv 2411.10442) is loss_types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0];
    "sft" needs chosen_lengths. weights default to 1 each. All terms see the same (summed) log-probs, so "ipo"
    belongs in a mixture only if the caller passes mean log-probs throughout. Returns (losses, chosen rewards,
    rejected rewards) as `dpo_loss` does.
    """
    weights = [1.0] * len(loss_types) if weights is None else weights
    unknown = [t for t in loss_types if t not in (*DPO_LOSS_TYPES, "sft")]
    if unknown:
        raise ValueError(f"unknown DPO loss types {unknown}; expected any of {(*DPO_LOSS_TYPES, 'sft')}")
    if not loss_types or len(weights) != len(loss_types):
        raise ValueError(f"need one weight per loss type, got loss_types={loss_types} and weights={weights}")
    if "sft" in loss_types and chosen_lengths is None:
        raise ValueError("loss type 'sft' needs chosen_lengths (token counts of the chosen answers)")
    total = torch.zeros_like(policy_chosen_logps, dtype=torch.float32)  # [B]
    c = policy_chosen_logps.float() - ref_chosen_logps.float()
    r = policy_rejected_logps.float() - ref_rejected_logps.float()
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if loss_type == "sft":
            losses = dpo_sft_loss(policy_chosen_logps, chosen_lengths)
        else:
            losses, _, _ = dpo_loss(
                policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, bco_delta=bco_delta,
                discopop_tau=discopop_tau,
            )  # fmt: skip
        total = total + weight * losses
    return total, (beta * c).detach(), (beta * r).detach()
