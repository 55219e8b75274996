"""`distill`: knowledge distillation from a teacher model over logits, on the student's SFT data.

At every supervised position the student's next-token distribution is pulled towards the teacher's
(forward KL, reverse KL or generalised JSD, at a temperature; `losses.distill_loss`), optionally
mixed with the usual cross-entropy on the data (`sft_weight`). The teacher runs the same packed
batch under no_grad. Logits are compared token id by token id, so the teacher must share the
student's tokenizer: a mismatch is refused, with the reason, before the first step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.checkpoint import checkpoint

from tunery.errors import ConfigError
from tunery.methods import load_trained
from tunery.modeling.attention import use_packed_attention
from tunery.modeling.forward import IGNORE, decoder_hidden, split_lm
from tunery.models import load_tokenizer
from tunery.models.unwrap import unwrap
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import LOGIT_CHUNK, full_logits
from tunery.objectives.losses import distill_loss
from tunery.objectives.sft import collate, encode


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # `names` marks fields the server's resolver checks (serve/resolver.py): on a server, a teacher is
    # an alias or an ft: model the key owns, never an arbitrary path.
    teacher: str | None = Field(
        None,
        description="Teacher model: alias, directory, hub id or .gguf (on a server: alias or ft: model).",
        json_schema_extra={"names": "model", "adapter": "teacher_adapter"},
    )
    teacher_adapter: str | None = Field(
        None,
        description="A saved model/adapter dir applied on the teacher (on a server: an ft: model).",
        json_schema_extra={"names": "adapter"},
    )
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher||student); reverse_kl; jsd = generalised JSD."
    )
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation weight of the teacher.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both distributions.")
    sft_weight: float = Field(0.0, ge=0, description="Weight of the cross-entropy on the data's tokens.")


def check_tokenizers(student: Any, teacher: Any, teacher_spec: str) -> None:
    """Refuse a teacher whose token ids mean something else than the student's."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    only_s = len(set(s_vocab) - set(t_vocab))
    moved = sum(1 for tok, i in s_vocab.items() if tok in t_vocab and t_vocab[tok] != i)
    raise ConfigError(
        f"The teacher {teacher_spec!r} uses a different tokenizer than the student: "
        f"{len(t_vocab)} vs {len(s_vocab)} tokens, {only_s} student tokens unknown to the teacher, "
        f"{moved} with other ids. Logit distillation compares distributions id by id, so both "
        "models must share one vocabulary.",
        hint="Pick a teacher from the student's model family (same tokenizer), or distill through "
        "generated text instead: generate replies with the teacher and train on them with sft.",
        param="distill.teacher",
    )


def setup(model: torch.nn.Module, config: Any, tokenizer: Any) -> dict[str, Any]:
    o: DistillOptions = config.objective_options
    if not o.teacher and not o.teacher_adapter:
        raise ConfigError(
            "distill needs a teacher model.", hint="Set distill.teacher: SPEC.", param="distill.teacher"
        )
    # The tokenizer first: a mismatch is reported before the teacher's weights are loaded.
    if o.teacher:
        check_tokenizers(tokenizer, load_tokenizer(o.teacher), o.teacher)
    teacher, teacher_tok = load_trained(o.teacher, o.teacher_adapter, dtype=torch.float32)
    check_tokenizers(tokenizer, teacher_tok, o.teacher or o.teacher_adapter or "")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    base = unwrap(teacher)
    packed_ok = use_packed_attention(base)
    device = next(model.parameters()).device
    return {"teacher": teacher.to(device), "teacher_packed": packed_ok}


def _heads_divergence(
    s_head: torch.nn.Module, t_logits: torch.Tensor, h: torch.Tensor, vocab: int, o: DistillOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    s_logits = s_head(h).float()[..., :vocab]
    mask = torch.ones((1, h.shape[0]), dtype=torch.bool, device=h.device)
    div = distill_loss(s_logits[None], t_logits[None], mask, o.kind, o.beta, o.temperature)[0]
    return div, s_logits.argmax(-1)


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: DistillOptions = ctx.options
    teacher = ctx.extra["teacher"]
    if "cu_seq_lens" in batch and not ctx.extra.get("teacher_packed", True):
        raise ConfigError(
            "The teacher's architecture cannot run packed rows.",
            hint="Set hyperparameters.packing: false.",
            param="hyperparameters.packing",
        )
    labels = batch["labels"]
    sel = labels != IGNORE
    targets = labels[sel]
    with torch.no_grad():
        t_parts = split_lm(teacher)
        if t_parts is None or batch.get("generic"):
            t_logits = full_logits(teacher, batch)[sel].float()
        else:
            t_logits = t_parts[1](decoder_hidden(teacher, batch)[sel]).float()
    s_parts = split_lm(model)
    generic = s_parts is None or batch.get("generic")
    if generic:
        s_source = full_logits(model, batch)[sel]
        s_head = torch.nn.Identity()
    else:
        s_source = decoder_hidden(model, batch)[sel]
        s_head = s_parts[1]
    vocab = min(t_logits.shape[-1], len(ctx.tokenizer)) if generic else t_logits.shape[-1]
    vocab = min(vocab, s_head.out_features if hasattr(s_head, "out_features") else vocab)
    t_logits = t_logits[..., :vocab]
    div_sum = s_source.new_zeros((), dtype=torch.float32)
    ce_sum = s_source.new_zeros((), dtype=torch.float32)
    correct = 0
    for start in range(0, targets.numel(), LOGIT_CHUNK):
        chunk = slice(start, start + LOGIT_CHUNK)
        args = (s_head, t_logits[chunk], s_source[chunk], vocab, o)
        if torch.is_grad_enabled() and s_source.requires_grad and not generic:
            div, pred = checkpoint(_heads_divergence, *args, use_reentrant=False)
        else:
            div, pred = _heads_divergence(*args)
        div_sum = div_sum + div.sum()
        correct += int((pred == targets[chunk]).sum())
        if o.sft_weight:
            logits = s_head(s_source[chunk]).float()
            ce_sum = ce_sum + torch.nn.functional.cross_entropy(logits, targets[chunk], reduction="sum")
    total = div_sum + o.sft_weight * ce_sum
    return StepOutput(total, {"divergence": float(div_sum.detach()), "mean_token_accuracy": float(correct)})


register(
    Objective(
        name="distill",
        description="Distillation: match a teacher's next-token distributions (forward/reverse KL, JSD).",
        options=DistillOptions,
        data_kind="chat",
        encode=encode,
        collate=collate,
        token_level=True,
        loss=loss,
        setup=setup,
    )
)
