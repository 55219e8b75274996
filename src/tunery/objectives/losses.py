"""Loss functions of the objectives beyond SFT, as pure tensor functions (no model calls).

Conventions shared by every function here:
- Nothing is reduced over the batch. Each function returns one loss per *unit* (pair, example, token),
  so an objective sums them into `StepOutput.loss_sum` and reports how many units it summed; the
  training loop then divides by the units of the whole optimizer step (see `objectives/base.py`).
  GRPO is the exception: its normalisation depends on `loss_type`, so `grpo_loss` returns the
  sum and the unit count itself.
- Log-probabilities (`objectives/logps.py`) are *aligned*: `logits[b, t]` scores `labels[b, t]`.
  For a causal LM the caller shifts once, `logits[:, :-1]` against `input_ids[:, 1:]` (with
  prompt/padding labels set to -100).
- Rewards and other logging quantities are returned detached.
- Conventions (signs, means, epsilons) follow TRL 1.16 so the parity tests in `tests/test_losses.py`
  can compare against it within 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tunery.errors import ConfigError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")
GRPO_LOSS_TYPES = ("grpo", "dapo", "bnpo")


def _choice(value: str, allowed: tuple[str, ...], param: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {param} {value!r}; choose one of {', '.join(allowed)}", param=param)


# --------------------------------------------------------------------------- paired preferences


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """The metrics every pairwise objective logs, as sums over pairs (the loop averages):
    `accuracy`, chosen scored above rejected, and `margin`, the score gap. Scores are implicit
    rewards (DPO, SimPO) or a reward model's outputs."""
    diff = (chosen - rejected).detach()
    return {"accuracy": float((diff > 0).float().sum()), "margin": float(diff.sum())}


def dpo_loss(
    pol_chosen: torch.Tensor,
    pol_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization and its variants, one loss per pair.

    With summed sequence log-probs and `h = (pi_c - ref_c) - (pi_r - ref_r)`:
    - `sigmoid` (DPO, Rafailov et al. 2023, arXiv:2305.18290, eq. 7) with conservative label
      smoothing eps (cDPO, Mitchell 2023): `-(1-eps) log s(beta h) - eps log s(-beta h)`.
    - `robust` (rDPO, Chowdhury et al. 2024, arXiv:2403.00409, eq. 8), unbiased under label noise eps:
      `(-(1-eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)`, eps < 0.5.
    - `hinge` (SLiC, Zhao et al. 2023, arXiv:2305.10425): `relu(1 - beta h)`.
    - `ipo` (IPO, Azar et al. 2023, arXiv:2310.12036, eq. 17): `(h' - 1/(2 beta))^2`, where `h'` uses
      per-token *average* log-ratios as the IPO authors and TRL do; pass `chosen_lengths` /
      `rejected_lengths` (token counts) to have them averaged here, or pass averaged log-probs.

    Returns `(losses, chosen_rewards, rejected_rewards)`, rewards `beta * (pi - ref)` (detached).
    """
    _choice(loss_type, DPO_LOSS_TYPES, "loss_type")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(
            f"label_smoothing must be in [0, 0.5) for the robust DPO loss, got {label_smoothing}",
            param="label_smoothing",
        )
    chosen_ratio = pol_chosen - ref_chosen
    rejected_ratio = pol_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        if chosen_lengths is not None and rejected_lengths is not None:
            h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    avg_logp_chosen: torch.Tensor,
    avg_logp_rejected: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): reference-free, length-normalised.

    `loss = -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)`, written with the
    token-averaged log-probs and `gamma_beta_ratio = gamma / beta` as in the authors' code, plus the
    same label smoothing as cDPO. TRL's CPO trainer (`loss_type="simpo"`) takes `simpo_gamma = gamma`.
    Returns `(losses, chosen_rewards, rejected_rewards)` with rewards `beta * avg_logp` (detached).
    """
    h = avg_logp_chosen - avg_logp_rejected - gamma_beta_ratio
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, beta * avg_logp_chosen.detach(), beta * avg_logp_rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for x < 0, switching formulas at -ln 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    avg_logp_chosen: torch.Tensor, avg_logp_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv:2403.07691, eqs. 4-7), one per pair.

    With `p = exp(avg_logp)` and `odds(p) = p / (1 - p)`:
    `log_odds = log odds(p_c) - log odds(p_r)` and the term is `-beta * log s(log_odds)` (beta is the
    paper's lambda). The objective adds it to the SFT NLL of the chosen reply; TRL returns the
    opposite sign and subtracts. Computed in float32 because `1 - p` cancels badly in bf16.
    Returns `(losses, log_odds)`; `log_odds` is detached for logging.
    """
    chosen = avg_logp_chosen.float()
    rejected = avg_logp_rejected.float()
    # A bf16 forward can round a near-certain reply to log p == 0, where the odds are infinite and
    # the gradient NaN; nudging to just below 0 keeps the step finite without moving real values.
    chosen, rejected = chosen.clamp(max=-1e-7), rejected.clamp(max=-1e-7)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


# --------------------------------------------------------------------------- unpaired (KTO)


def kto_mismatched_order(n: int) -> list[int]:
    """Completion index to pair with each prompt for KTO's KL estimate: rotate by one.

    Prompt i gets completion i-1 (prompt 0 the last), so the mismatched completions are the same set
    as the matched ones, as the KTO paper (section 4.1) and TRL build them.
    """
    return [n - 1, *range(n - 1)] if n > 0 else []


def kto_kl_estimate(kl_pol_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: `max(0, mean(log pi(y'|x) - log ref(y'|x)))` over mismatched pairs.

    Detached: the paper (eq. 7) does not backpropagate through z0.
    """
    return (kl_pol_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    pol_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable_mask: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7), one per example.

    With `r = log pi(y|x) - log ref(y|x)` (summed over the completion) and reference point z0
    (`kto_kl_estimate`):
    desirable `lambda_D * (1 - s(beta (r - z0)))`, undesirable `lambda_U * (1 - s(beta (z0 - r)))`.
    Returns `(losses, rewards)` in the input order, rewards `beta * r` (detached).
    """
    z0 = torch.as_tensor(kl_estimate, dtype=pol_logps.dtype, device=pol_logps.device).detach().clamp(min=0)
    ratio = pol_logps - ref_logps
    desirable = desirable_mask.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return losses, beta * ratio.detach()


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss (Bradley & Terry 1952; InstructGPT, arXiv:2203.02155, eq. 1).

    `-log s(r_c - r_r - m)` per pair, with an optional preference-strength margin m (Llama 2,
    arXiv:2307.09288, eq. 2) and an optional `c * (r_c + r_r)^2` term that keeps rewards centred
    (Eisenstein et al. 2023, arXiv:2312.09244), as TRL's `center_rewards_coefficient`.
    Returns `(losses, correct, margins)`: `correct` is 1.0 where chosen outscores rejected (the
    accuracy metric) and `margins` is `r_c - r_r`, both detached.
    """
    diff = r_chosen - r_rejected
    losses = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coefficient:
        losses = losses + center_coefficient * (r_chosen + r_rejected) ** 2
    return losses, (diff > 0).float().detach(), diff.detach()


# --------------------------------------------------------------------------- distillation


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence between teacher T and student S next-token distributions (GKD, Agarwal et
    al. 2024, arXiv:2306.13649, eq. 1), `[B, T]`, 0 where `mask` is False.

    - `forward_kl`: KL(T || S), the classic distillation target (mode covering).
    - `reverse_kl`: KL(S || T) (mode seeking).
    - `jsd`: generalised JSD with `M = beta T + (1 - beta) S`:
      `beta KL(T || M) + (1 - beta) KL(S || M)`; like TRL, beta 0 and 1 fall back to forward and
      reverse KL.
    Both distributions are `softmax(logits / temperature)`; like TRL (and unlike Hinton et al.)
    there is no `temperature^2` factor. Only masked-in positions are computed, in float32.
    """
    _choice(kind, DISTILL_KINDS, "kind")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ConfigError(f"distillation beta must be in [0, 1], got {beta}", param="beta")
    mask = mask.bool()
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)

    def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:  # KL(P || Q) per row
        return (p_log.exp() * (p_log - q_log)).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        div = kl(t, s)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        div = kl(s, t)
    else:
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        div = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return div.new_zeros(mask.shape).masked_scatter(mask, div)


# --------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, arXiv:2402.03300, section 4.1.2).

    `rewards` `[N]` holds consecutive groups of `group_size` completions of the same prompt;
    `A_i = (r_i - mean(group)) / (std(group) + 1e-4)`, with the unbiased std as TRL uses
    (`scale=False` keeps only the centring, as Dr. GRPO, arXiv:2503.20783, recommends).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        # one completion per prompt has no spread: TRL treats its std as 0 rather than NaN
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(advantages)
        advantages = advantages / (std + 1e-4)
    return advantages.view(-1)


@dataclass
class GRPOLoss:
    """`loss_sum / n_units` is the step's loss; the loop sums both over micro-batches."""

    loss_sum: torch.Tensor
    n_units: float  # sequences (grpo), tokens (dapo) or 1 per micro-batch (bnpo)
    metrics: dict[str, float] = field(default_factory=dict)  # token means: kl, clip ratios


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
) -> GRPOLoss:
    """GRPO's clipped surrogate with a KL penalty (Shao et al. 2024, arXiv:2402.03300, eq. 3).

    Per completion token, with `rho = exp(logp - old_logp)` and sequence advantage A:
    `l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * KL_k3`, where
    `KL_k3 = exp(ref - logp) - (ref - logp) - 1` (Schulman's unbiased, non-negative estimator).
    `epsilon_high` > `epsilon_low` is DAPO's clip-higher (arXiv:2503.14476). Aggregation:
    - `grpo`: mean over each sequence's tokens, then mean over sequences (units = sequences);
    - `dapo`: mean over all tokens of the optimizer step (units = tokens);
    - `bnpo`: mean over the micro-batch's tokens, then over micro-batches (units = 1 each).
    Tensors are `[B, T]` except `advantages` `[B]`; `ref_logps` may be None when `beta == 0`.
    """
    _choice(loss_type, GRPO_LOSS_TYPES, "loss_type")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    n_tokens = mask.sum()

    def token_mean(x: torch.Tensor) -> float:
        return float((x * mask).sum() / n_tokens.clamp(min=1))

    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss needs ref_logps when beta != 0")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = token_mean(kl.detach())
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        metrics["clip_ratio/low"] = token_mean(low)
        metrics["clip_ratio/high"] = token_mean(high)
        metrics["clip_ratio/region"] = token_mean(torch.maximum(low, high))

    masked = per_token * mask
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return GRPOLoss(per_seq.sum(), float(per_seq.numel()), metrics)
    if loss_type == "dapo":
        return GRPOLoss(masked.sum(), float(n_tokens), metrics)
    return GRPOLoss(masked.sum() / n_tokens.clamp(min=1), 1.0, metrics)
