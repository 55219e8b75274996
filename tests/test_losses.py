"""Parity of `tunery.objectives.losses` with TRL 1.16 (a test-only dependency) and with plain loops.

How TRL is called: most of its losses are inlined in trainer methods that read `self.beta` and
friends, so we call the unbound method with a `SimpleNamespace` carrying just the attributes it
reads (`_trl_self`), never a constructed Trainer. Where TRL's method runs the model itself (DPO,
KTO, reward), it gets a real tiny random Llama with TRL's own fused LM head (`add_fused_lm_head`),
and our side runs the same model through `sequence_logps`. TRL's GRPO gets its per-token
log-probs from `self._get_per_token_logps_and_entropies`, which the namespace supplies as the
given random tensor (the model forward is all that is skipped). Accelerate's gather/reduce are
identities in one process, so `SingleProcess` stands in for the Accelerator.

Where TRL 1.16 has no equivalent (cDPO label smoothing on the sigmoid loss, group advantages,
KTO's mismatched pairing), the reference is a per-element Python loop.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunery.errors import ConfigError
from tunery.objectives import logps as LP
from tunery.objectives import losses as L

ATOL = 1e-5


class SingleProcess:
    """accelerate.Accelerator's collective ops in a single process: identities."""

    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, model):
        return model


def _trl_self(**attrs) -> SimpleNamespace:
    return SimpleNamespace(
        accelerator=SingleProcess(), _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attrs
    )


def _close(a, b, atol: float = ATOL) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


# --------------------------------------------------------------------------- shared tiny model


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer Llama with TRL's fused LM head added (its plain forward is unchanged)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from tests.helpers.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=128)).eval()
    with torch.no_grad():  # spread the (tied) head so log-probs differ between sequences
        model.get_input_embeddings().weight.normal_(0.0, 0.15)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _sequences(n: int, width: int, seed: int, vocab: int = 128):
    """Right-padded prompt+completion rows: input_ids, attention_mask, completion_mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (n, width), generator=g)
    attention = torch.zeros(n, width, dtype=torch.long)
    completion = torch.zeros(n, width, dtype=torch.long)
    for i in range(n):
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        length = int(torch.randint(prompt + 2, width + 1, (1,), generator=g))
        attention[i, :length] = 1
        completion[i, prompt:length] = 1
    return input_ids, attention, completion


def _our_logps(model, input_ids, attention, completion, average=False):
    labels = input_ids.masked_fill(completion == 0, LP.IGNORE_INDEX)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    return LP.sequence_logps(logits[:, :-1], labels[:, 1:], average=average)


# --------------------------------------------------------------------------- log-probabilities


def test_sequence_logps_matches_trl_get_batch_logps():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    torch.manual_seed(1)
    logits = torch.randn(4, 9, 37) * 3
    labels = torch.randint(0, 37, (4, 9))
    labels[:, :3] = -100
    labels[2, 6:] = -100
    for average in (False, True):
        ours, n = LP.sequence_logps(logits[:, :-1], labels[:, 1:], average=average)
        ref = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)  # shifts internally
        _close(ours, ref)
    assert n.tolist() == [6, 6, 3, 6]


def test_chunked_logps_match_full_logits_and_trl_kernel_with_gradients():
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(2)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 8))
    labels[0, :5] = -100
    labels[2, -2:] = -100

    full = LP.token_logps(hidden @ weight.T, labels)
    chunked = LP.token_logps_from_hidden(hidden, weight, labels, chunk_size=4)  # 4 does not divide 19 tokens
    _close(chunked, full)
    grads_full = torch.autograd.grad(full.sum(), (hidden, weight))
    grads_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(grads_full, grads_chunked, strict=True):
        _close(a, b)

    mask = labels != -100
    trl = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, 16)[0]
    _close(chunked[mask], trl)

    total, n = LP.sequence_logps_from_hidden(hidden, weight, labels, average=True, chunk_size=5)
    _close(total, full.sum(-1) / mask.sum(-1))
    assert n.tolist() == mask.sum(-1).tolist()

    # temperature matches dividing the logits; an all-ignored batch still backpropagates a zero
    _close(
        LP.token_logps_from_hidden(hidden, weight, labels, temperature=2.0),
        LP.token_logps(hidden @ weight.T, labels, temperature=2.0),
    )
    empty = LP.token_logps_from_hidden(hidden, weight, torch.full_like(labels, -100))
    empty.sum().backward()
    assert empty.abs().sum() == 0 and hidden.grad is not None


# --------------------------------------------------------------------------- DPO


def _dpo_trl_self(model, beta, loss_type, label_smoothing=0.0):
    return _trl_self(
        model=model,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        _total_train_tokens=0,
        _tp_size=1,
    )


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)]
)
def test_dpo_matches_trl_on_tiny_model(tiny_lm, loss_type, label_smoothing):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta, pairs = 0.1, 3
    input_ids, attention, completion = _sequences(2 * pairs, 12, seed=3)  # rows: chosen..., rejected...
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a reference near the policy keeps the losses off their flat tails
        ref = _our_logps(tiny_lm, input_ids, attention, completion)[0] + 3 * torch.randn(
            2 * pairs, generator=g
        )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    trl_self = _dpo_trl_self(tiny_lm, beta, loss_type, label_smoothing)
    params = [p for p in tiny_lm.parameters() if p.requires_grad]
    trl_loss = DPOTrainer._compute_loss(trl_self, tiny_lm, dict(inputs), return_outputs=False)
    trl_grads = torch.autograd.grad(trl_loss, params)

    logps, n_tokens = _our_logps(tiny_lm, input_ids, attention, completion)
    losses, chosen_r, rejected_r = L.dpo_loss(
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        beta,
        label_smoothing,
        loss_type,
        chosen_lengths=n_tokens[:pairs],
        rejected_lengths=n_tokens[pairs:],
    )
    ours = losses.mean()
    _close(ours, trl_loss)
    for a, b in zip(torch.autograd.grad(ours, params), trl_grads, strict=True):
        _close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()))
    metrics = trl_self._metrics["eval"]
    _close(chosen_r.mean(), metrics["rewards/chosen"][0])
    _close(rejected_r.mean(), metrics["rewards/rejected"][0])
    _close((chosen_r > rejected_r).float().mean(), metrics["rewards/accuracies"][0])


def test_dpo_label_smoothing_matches_loop_reference():
    """cDPO smoothing of the sigmoid loss: TRL 1.16 dropped it from DPO, so the reference is a loop."""
    torch.manual_seed(5)
    pc, pr, rc, rr = (torch.randn(6, dtype=torch.float64) * 4 - 30 for _ in range(4))
    pc.requires_grad_(True)
    beta, eps = 0.3, 0.15
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta, eps, "sigmoid")

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))

    for i in range(6):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert abs(losses[i].item() - expected) < 1e-9
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0


def test_dpo_ipo_without_lengths_takes_averaged_logps():
    torch.manual_seed(6)
    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    lc, lr = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([2, 2, 9, 1, 4])
    with_lengths, _, _ = L.dpo_loss(
        pc, pr, rc, rr, 0.5, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr
    )
    averaged, _, _ = L.dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, 0.5, loss_type="ipo")
    _close(with_lengths, averaged)


# --------------------------------------------------------------------------- SimPO, ORPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    torch.manual_seed(7)
    chosen = (-torch.rand(8) * 3).requires_grad_(True)
    rejected = -torch.rand(8) * 3
    beta, gamma_beta_ratio = 2.0, 0.5
    trl_self = _trl_self(
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma_beta_ratio * beta,
        label_smoothing=label_smoothing,
    )
    ref_losses, ref_c, ref_r = CPOTrainer.cpo_loss(trl_self, chosen, rejected)
    losses, c, r = L.simpo_loss(chosen, rejected, beta, gamma_beta_ratio, label_smoothing)
    for a, b in ((losses, ref_losses), (c, ref_c), (r, ref_r)):
        _close(a, b)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    (ref_grad,) = torch.autograd.grad(ref_losses.sum(), chosen)
    _close(grad, ref_grad)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    torch.manual_seed(8)
    # averages on both sides of -ln 2, where log1mexp switches formula
    chosen = (-torch.rand(10) * 2.5 - 0.01).requires_grad_(True)
    rejected = -torch.rand(10) * 2.5 - 0.01
    beta = 0.25
    ref_losses, _, _, _, ref_log_odds_mean = ORPOTrainer.odds_ratio_loss(
        _trl_self(beta=beta), chosen, rejected
    )
    losses, log_odds = L.orpo_loss(chosen, rejected, beta)
    _close(losses, -ref_losses)  # TRL returns beta*logsigmoid and subtracts it from the NLL
    _close(log_odds.mean(), ref_log_odds_mean)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    (ref_grad,) = torch.autograd.grad(-ref_losses.sum(), chosen)
    _close(grad, ref_grad)
    # a bf16-rounded certain reply (log p == 0) stays finite
    edge, _ = L.orpo_loss(torch.zeros(1, requires_grad=True), torch.tensor([-1.0]), beta)
    assert torch.isfinite(edge).all()


# --------------------------------------------------------------------------- KTO


def test_kto_mismatched_order_rotates_like_trl():
    completions = ["y1", "y2", "y3", "y4"]
    assert [completions[j] for j in L.kto_mismatched_order(4)] == ["y4", "y1", "y2", "y3"]
    assert L.kto_mismatched_order(1) == [0] and L.kto_mismatched_order(0) == []


def test_kto_matches_trl_on_tiny_model(tiny_lm):
    from trl.trainer.kto_trainer import KTOTrainer

    n, width, prompt_len = 6, 11, 4
    input_ids, attention, completion = _sequences(n, width, seed=9)
    completion[:, :prompt_len] = 0  # one prompt length so completions can be swapped between prompts
    # mismatched pairs: prompt i with completion order[i], both kept in the same width
    order = L.kto_mismatched_order(n)
    kl_ids = torch.cat([input_ids[:, :prompt_len], input_ids[order, prompt_len:]], dim=1)
    kl_attention = torch.cat([attention[:, :prompt_len], attention[order, prompt_len:]], dim=1)
    kl_completion = torch.cat([completion[:, :prompt_len], completion[order, prompt_len:]], dim=1)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0])
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():  # references near the policy, and below it on the mismatched pairs so z0 > 0
        ref_logps = _our_logps(tiny_lm, input_ids, attention, completion)[0] + 2 * torch.randn(n, generator=g)
        ref_kl_logps = (
            _our_logps(tiny_lm, kl_ids, kl_attention, kl_completion)[0] - 1 - torch.rand(n, generator=g)
        )
    beta, w_d, w_u = 0.2, 1.0, 1.33
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": desirable,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    trl_self = _trl_self(
        model=tiny_lm,
        calculate_KL=True,
        loss_type="kto",
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        beta=beta,
        desirable_weight=w_d,
        undesirable_weight=w_u,
        _total_train_tokens=0,
        _tp_size=1,
    )
    trl_self._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trl_self, model, batch)
    trl_loss = KTOTrainer._compute_loss(trl_self, tiny_lm, inputs, return_outputs=False)

    logps, _ = _our_logps(tiny_lm, input_ids, attention, completion)
    with torch.no_grad():
        kl_logps, _ = _our_logps(tiny_lm, kl_ids, kl_attention, kl_completion)
    z0 = L.kto_kl_estimate(kl_logps, ref_kl_logps)
    assert z0 > 0.5
    losses, rewards = L.kto_loss(logps, ref_logps, desirable, z0, beta, w_d, w_u)
    _close(losses.mean(), trl_loss)
    metrics = trl_self._metrics["eval"]
    _close(z0, metrics["kl"][0])
    _close(rewards[desirable.bool()].mean(), metrics["rewards/chosen"][0])
    _close(rewards[~desirable.bool()].mean(), metrics["rewards/rejected"][0], atol=1e-4)
    losses.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_lm.parameters() if p.grad is not None)
    tiny_lm.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- reward model


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import RewardTrainer

    from tests.helpers.tiny import tiny_config

    torch.manual_seed(11)
    model = AutoModelForSequenceClassification.from_config(
        tiny_config("llama", vocab_size=128, pad_token_id=0, num_labels=1)
    ).eval()
    pairs = 4
    input_ids, attention, _ = _sequences(2 * pairs, 10, seed=12)
    input_ids = input_ids.clamp(min=1).masked_fill(attention == 0, 0)  # the head reads the last non-pad token
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    margin = torch.tensor([0.5, 0.0, 1.0, 0.2]) if with_margin else None
    trl_inputs = dict(inputs, **({"margin": margin} if with_margin else {}))
    trl_self = _trl_self(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=center),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trl_loss = RewardTrainer.compute_loss(trl_self, model, trl_inputs)

    rewards = model(**inputs).logits.squeeze(-1)
    losses, correct, margins = L.bradley_terry_loss(rewards[:pairs], rewards[pairs:], margin, center)
    _close(losses.mean(), trl_loss)
    metrics = trl_self._metrics["eval"]
    _close(correct.mean(), metrics["accuracy"][0])
    _close(margins.mean(), metrics["margin"][0])
    losses.mean().backward()
    assert model.score.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize(
    ("kind", "beta", "trl_beta"),
    [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.3, 0.3), ("jsd", 0.0, 0.0)],
)
def test_distill_matches_trl_generalized_jsd(kind, beta, trl_beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(13)
    student = (torch.randn(3, 7, 40) * 2).requires_grad_(True)
    teacher = torch.randn(3, 7, 40) * 2
    labels = torch.randint(0, 40, (3, 7))
    labels[:, :2] = -100
    labels[1, 5:] = -100
    mask = labels != -100
    temperature = 2.0

    per_token = L.distill_loss(student, teacher, mask, kind, beta, temperature)
    assert per_token.shape == (3, 7) and (per_token[~mask] == 0).all() and (per_token[mask] > 0).all()
    ref_none = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, trl_beta, temperature, reduction="none"
    )
    _close(per_token[mask], ref_none.sum(-1))
    ref = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels, trl_beta, temperature, reduction="batchmean"
    )
    ours = per_token.sum() / mask.sum()
    _close(ours, ref)
    (grad,) = torch.autograd.grad(ours, student)
    (ref_grad,) = torch.autograd.grad(ref, student)
    _close(grad, ref_grad)


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_match_loop_reference():
    torch.manual_seed(14)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.3, 0.7])
    adv = L.group_advantages(rewards, group_size=4)
    expected = []
    for start in range(0, 12, 4):
        group = rewards[start : start + 4].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # stdev: n-1, as TRL's nanstd
        expected += [(r - mean) / (std + 1e-4) for r in group]
    _close(adv, torch.tensor(expected))
    assert (adv[4:8] == 0).all()  # a group that agrees carries no signal
    _close(L.group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    _close(L.group_advantages(rewards[:3], 1), torch.zeros(3))
    with pytest.raises(ValueError):
        L.group_advantages(rewards, group_size=5)


@pytest.mark.parametrize(("loss_type", "beta"), [("grpo", 0.04), ("dapo", 0.0), ("bnpo", 0.1), ("grpo", 0.0)])
def test_grpo_matches_trl_compute_loss(loss_type, beta):
    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(15)
    n, width = 6, 9
    logps = (-torch.rand(n, width) * 4).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(n, width)  # off-policy enough that both clip sides trigger
    ref = logps.detach() + 0.2 * torch.randn(n, width)
    mask = (torch.rand(n, width) > 0.25).long()
    mask[0] = 0  # a completion with no tokens must not produce NaN
    advantages = L.group_advantages(torch.rand(n), group_size=3)
    eps_low, eps_high = 0.2, 0.28

    trl_self = _trl_self(
        model=SimpleNamespace(training=True),
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=1,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    trl_loss = GRPOTrainer._compute_loss(trl_self, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    out = L.grpo_loss(logps, old, ref, advantages, mask, eps_low, eps_high, beta, loss_type)
    ours = out.loss_sum / out.n_units
    _close(ours, trl_loss)
    (grad,) = torch.autograd.grad(ours, logps)
    _close(grad, trl_grad)
    metrics = trl_self._metrics["train"]
    if beta:
        _close(out.metrics["kl"], metrics["kl"][0])
    for ours_key, trl_key in (("low", "low_mean"), ("high", "high_mean"), ("region", "region_mean")):
        _close(out.metrics[f"clip_ratio/{ours_key}"], metrics[f"clip_ratio/{trl_key}"][0])
    assert out.metrics["clip_ratio/low"] > 0 and out.metrics["clip_ratio/high"] > 0


def test_grpo_units_make_accumulation_equal_one_big_batch():
    """dapo sums tokens: two micro-batches divided by their total tokens equal the joint batch."""
    torch.manual_seed(16)
    logps = -torch.rand(8, 5) * 3
    old, ref = logps + 0.1 * torch.randn(8, 5), logps + 0.1 * torch.randn(8, 5)
    mask = (torch.rand(8, 5) > 0.3).long()
    adv = L.group_advantages(torch.rand(8), 4)
    for loss_type in ("grpo", "dapo"):
        whole = L.grpo_loss(logps, old, ref, adv, mask, beta=0.05, loss_type=loss_type)
        parts = [
            L.grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], beta=0.05, loss_type=loss_type)
            for s in (slice(0, 3), slice(3, 8))
        ]
        _close(sum(p.loss_sum for p in parts) / sum(p.n_units for p in parts), whole.loss_sum / whole.n_units)


# --------------------------------------------------------------------------- user errors


def test_unknown_options_raise_config_errors():
    x = torch.zeros(2)
    with pytest.raises(ConfigError, match="loss_type 'kto'"):
        L.dpo_loss(x, x, x, x, 0.1, loss_type="kto")
    with pytest.raises(ConfigError, match="label_smoothing"):
        L.dpo_loss(x, x, x, x, 0.1, label_smoothing=0.5, loss_type="robust")
    with pytest.raises(ConfigError, match="kind"):
        L.distill_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2), kind="kl")
    with pytest.raises(ConfigError, match="beta"):
        L.distill_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2), kind="jsd", beta=1.5)
    with pytest.raises(ConfigError, match="loss_type"):
        L.grpo_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), loss_type="ppo"
        )
