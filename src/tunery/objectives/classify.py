"""`classify`: a sequence-classification head, trained with cross-entropy over a label set.

The model is transformers' `AutoModelForSequenceClassification`, sized to the label set read from
the training file(s) (sorted, or `classify.labels` for an explicit order). The head reads:
- decoder LLMs: the hidden state of each row's last real token (our own forward, so rows may be
  packed and the position comes from the attention mask, not from guessing pad ids);
- encoders (BERT, RoBERTa, DeBERTa, MiniLM): the model's own forward, i.e. its pooled / first token.
Encoders never pack: packed rows are a causal-attention trick, so their rows are always padded.

Loss per example (single-label): w[y] * -log softmax(z)[y]; averaged over examples of the optimizer
step (the loop divides by the step's examples). With multi_label: the mean over classes c of
w[c] * BCE(sigmoid(z_c), y_c). `class_weights: balanced` is sklearn's N / (C * n_c).

The `head` hook loads that model; the head always trains: its module names go to
`modules_to_save` (LoRA & co.) or `freeze.modules`.
The label set is stored in the model config (id2label) and in tunery.json (`labels`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from tunery.data import load_dataset
from tunery.errors import ConfigError, DataError, ModelError
from tunery.methods import read_info
from tunery.models import load_model, resolve
from tunery.models.load import model_kind
from tunery.models.unwrap import unwrap
from tunery.objectives import register
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.objectives.common import collate_rows, last_token_hidden

DECODER_HEAD = "score"  # transformers' head name on decoder-only sequence classifiers
ENCODER_HEADS = ("classifier", "pre_classifier", "pooler")  # BERT-family heads (+ pooler)


class ClassifyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    multi_label: bool = Field(False, description="Each text may have several labels (sigmoid per label).")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Multi-label: probability above which a label is on."
    )
    class_weights: list[float] | Literal["balanced"] | None = Field(
        None, description="Loss weight per label (in label order), or 'balanced' (N / (C * n_c))."
    )
    labels: list[str] | None = Field(None, description="Explicit label order (default: sorted labels).")


# --------------------------------------------------------------------------- label set


def _train_paths(config: Any) -> list[str]:
    train = config.data.train
    return [train] if isinstance(train, str) else list(train or [])


def _examples(path: str) -> list[Any]:
    return load_dataset(path, kind="labeled").examples


def label_set(config: Any) -> list[str]:
    """The labels in head order: `classify.labels`, else the sorted labels of the training files;
    with continued training (`adapter`), the adapter's own labels (its head is reused)."""
    opts: ClassifyOptions = config.objective_options
    if config.init_from:
        saved = read_info(config.init_from).get("labels")
        if saved:
            return list(saved)
    seen: list[str] = []
    for path in _train_paths(config):
        for ex in _examples(path):
            if not opts.multi_label and len(ex.labels) != 1:
                raise DataError(
                    f"{len(ex.labels)} labels, but single-label classification needs exactly one.",
                    hint="Set classify.multi_label: true for texts with several labels.",
                    file=path,
                    line=ex.line,
                    field="labels",
                )
            for label in ex.labels:
                if opts.labels is not None and label not in opts.labels:
                    raise DataError(
                        f"Label {label!r} is not in classify.labels {opts.labels}.", file=path, line=ex.line
                    )
                if label not in seen:
                    seen.append(label)
    labels = list(opts.labels) if opts.labels is not None else sorted(seen)
    if len(labels) < 2 and not opts.multi_label:
        raise DataError(f"Classification needs at least two labels; the training data has {labels}.")
    return labels


def check_labels(path: str | Path, examples: list[Any], labels: list[str]) -> None:
    """Every label of `examples` (validation or test data) must be one the head knows."""
    known = set(labels)
    for ex in examples:
        for label in ex.labels:
            if label not in known:
                raise DataError(
                    f"Unknown label {label!r}: the model's labels are {labels}.",
                    hint="Validation and test labels must appear in the training data.",
                    file=str(path),
                    line=ex.line,
                    field="label",
                )


def class_weight_vector(config: Any, labels: list[str]) -> list[float] | None:
    opts: ClassifyOptions = config.objective_options
    if opts.class_weights is None:
        return None
    if opts.class_weights == "balanced":
        counts: Counter[str] = Counter()
        n = 0
        for path in _train_paths(config):
            for ex in _examples(path):
                counts.update(ex.labels)
                n += 1
        return [n / (len(labels) * max(1, counts[label])) for label in labels]
    if len(opts.class_weights) != len(labels):
        raise ConfigError(
            f"classify.class_weights has {len(opts.class_weights)} values for {len(labels)} labels {labels}.",
            param="classify.class_weights",
        )
    return [float(w) for w in opts.class_weights]


# --------------------------------------------------------------------------- the model


@functools.lru_cache(maxsize=32)
def _is_encoder_spec(spec: str) -> bool:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve(spec).path)
    return model_kind(cfg.model_type, cfg.architectures) == "encoder"


def is_encoder(model: torch.nn.Module) -> bool:
    cfg = unwrap(model).config
    return model_kind(cfg.model_type, None) == "encoder"


def scoring_only(model: torch.nn.Module) -> torch.nn.Module:
    """Adapter methods wrap models as causal LMs (peft's CAUSAL_LM task), which looks up the
    generation hook at wrap time; a classifier has none, so it gets one that explains why."""

    def no_generation(*args: Any, **kwargs: Any) -> Any:
        raise ModelError("A classification model labels text; it cannot generate.", param="model")

    model.prepare_inputs_for_generation = no_generation
    return model


def load_classification_model(
    spec: str, labels: list[str], *, multi_label: bool = False, dtype: Any = None, **kwargs: Any
) -> torch.nn.Module:
    """`AutoModelForSequenceClassification` of `spec` with a head over `labels` (fresh if the base
    has none of that size), labels recorded in its config."""
    # `spec` is the base model both when training and when a trained adapter is loaded onto it.
    model = load_model(spec, dtype=dtype, **classifier_kwargs(labels), **kwargs)
    return _labelled(model, labels, multi_label)


def classifier_kwargs(labels: list[str]) -> dict[str, Any]:
    """`load_model` arguments for a sequence classifier over `labels` (a fresh head if needed)."""
    return {"task": "sequence-classification", "num_labels": len(labels), "new_head": True}


def _labelled(model: torch.nn.Module, labels: list[str], multi_label: bool) -> torch.nn.Module:
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    return scoring_only(model)


def head(config: Any, load: Callable[..., torch.nn.Module]) -> tuple[torch.nn.Module, list[str]]:
    """The `head` hook: the label set from the training data, unknown validation labels refused
    before any model is loaded, then the classifier (f32) and its head's module names."""
    labels = label_set(config)
    val = config.data.validation
    for path in [val] if isinstance(val, str) else val or []:  # one file, or one per task
        check_labels(path, _examples(path), labels)
    class_weight_vector(config, labels)  # refuse a wrong-length list before loading the model
    model = load(dtype=torch.float32, **classifier_kwargs(labels))
    model = _labelled(model, labels, config.objective_options.multi_label)
    return model, head_modules(model)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the head modules (trained in full under any method)."""
    base = unwrap(model)
    names = [n for n in (DECODER_HEAD, *ENCODER_HEADS) if isinstance(getattr(base, n, None), torch.nn.Module)]
    if is_encoder(base):  # the pooler sits inside the body (bert.pooler)
        body = getattr(base, base.base_model_prefix, None)
        if body is not None and isinstance(getattr(body, "pooler", None), torch.nn.Module):
            names.append("pooler")
    if not names:
        raise ConfigError(f"No classification head found on this {base.config.model_type!r} model.")
    return list(dict.fromkeys(names))


def save_info(model: torch.nn.Module, config: Any) -> dict[str, Any]:
    cfg = unwrap(model).config
    opts: ClassifyOptions = config.objective_options
    return {
        "labels": [cfg.id2label[i] for i in range(cfg.num_labels)],
        "multi_label": opts.multi_label,
        "threshold": opts.threshold,
    }


def setup(model: torch.nn.Module, config: Any, tokenizer: Any) -> dict[str, Any]:
    cfg = unwrap(model).config
    labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
    weights = class_weight_vector(config, labels)
    return {"label_index": {label: i for i, label in enumerate(labels)}, "class_weights": weights}


# --------------------------------------------------------------------------- features and forward


def encode_text(text: str, tokenizer: Any, max_length: int, encoder: bool) -> dict[str, Any]:
    enc = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = list(enc["input_ids"])
    return {"input_ids": ids, "truncated": len(ids) >= max_length, "encoder": encoder}


def encode(example: Any, tokenizer: Any, config: Any) -> dict[str, Any]:
    # Labels stay strings: the tokenized cache does not key on the label order, the loss maps them.
    feats = encode_text(
        example.text, tokenizer, config.hyperparameters.max_length, _is_encoder_spec(config.model)
    )
    feats["labels"] = list(example.labels)
    return feats


def collate(features: list[dict[str, Any]], pad_id: int, packed: bool) -> dict[str, Any]:
    rows = [f["input_ids"] for f in features]
    # encoders attend both ways: packing (causal, per-segment attention) does not apply to them
    batch = collate_rows(rows, None, pad_id, packed and not any(f.get("encoder") for f in features))
    batch["class_labels"] = [f.get("labels", []) for f in features]
    batch["n_units"] = len(features)
    return batch


def class_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """`[n_rows, n_labels]` float32 logits of a packed or padded batch."""
    base = unwrap(model)
    if is_encoder(base):
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()
    last = last_token_hidden(base, batch)
    head = getattr(base, DECODER_HEAD)
    return head(last.to(next(head.parameters()).dtype)).float()


def targets(batch: dict[str, Any], index: dict[str, int], multi_label: bool, device: Any) -> torch.Tensor:
    rows = batch["class_labels"]
    if multi_label:
        y = torch.zeros((len(rows), len(index)), dtype=torch.float32, device=device)
        for i, labels in enumerate(rows):
            for label in labels:
                y[i, index[label]] = 1.0
        return y
    return torch.tensor([index[labels[0]] for labels in rows], dtype=torch.long, device=device)


def classification_loss(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, multi_label: bool, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example losses, per-example correctness) as the module docstring's formula says."""
    if multi_label:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if weights is not None:
            bce = bce * weights
        correct = ((torch.sigmoid(logits) > threshold).float() == y).all(-1)
        return bce.mean(-1), correct
    nll = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    if weights is not None:
        nll = nll * weights[y]
    return nll, logits.argmax(-1) == y


def loss(model: torch.nn.Module, batch: dict[str, Any], ctx: Context) -> StepOutput:
    o: ClassifyOptions = ctx.options
    logits = class_logits(model, batch)
    y = targets(batch, ctx.extra["label_index"], o.multi_label, logits.device)
    w = ctx.extra.get("class_weights")
    weights = torch.tensor(w, dtype=torch.float32, device=logits.device) if w is not None else None
    losses, correct = classification_loss(logits, y, weights, o.multi_label, o.threshold)
    return StepOutput(losses.sum(), {"accuracy": float(correct.sum())})


register(
    Objective(
        name="classify",
        description="Classification head (last token of LLMs, pooled token of encoders), cross-entropy.",
        options=ClassifyOptions,
        data_kind="labeled",
        encode=encode,
        collate=collate,
        loss=loss,
        setup=setup,
        head=head,
        save_info=save_info,
    )
)
