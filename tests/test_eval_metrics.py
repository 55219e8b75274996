"""Metrics against hand-computed values and against scikit-learn on random labels."""

from __future__ import annotations

import math
import random

import pytest

from tunery.errors import TuneryError
from tunery.evaluate import metrics as M


def test_normalize_and_exact_match():
    assert M.normalize("  Positive. ") == "positive"
    assert M.normalize('"Mixed"!') == "mixed"
    assert M.normalize("New   York") == "new york"
    assert M.exact_match(["Positive.", "no", "Paris!"], ["positive", "yes", "paris"]) == pytest.approx(2 / 3)


def test_hand_computed_confusion_matrix():
    refs = ["cat", "cat", "cat", "dog", "dog", "bird"]
    preds = ["cat", "dog", "cat", "dog", "cat", "bird"]
    res = M.classification_metrics(preds, refs)
    assert res["labels"] == ["bird", "cat", "dog"]
    # rows: reference bird/cat/dog, columns: prediction bird/cat/dog
    assert res["confusion_matrix"] == [[1, 0, 0], [0, 2, 1], [0, 1, 1]]
    assert res["accuracy"] == pytest.approx(4 / 6)
    cat = res["per_class"]["cat"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        3,
    )
    dog = res["per_class"]["dog"]
    assert dog["precision"] == pytest.approx(0.5) and dog["recall"] == pytest.approx(0.5)
    assert res["macro_f1"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert res["weighted_f1"] == pytest.approx((1 * 1 + 3 * 2 / 3 + 2 * 0.5) / 6)
    assert res["invalid"] == 0 and "binary" not in res


def test_unseen_labels_are_counted_and_listed():
    refs = ["positive", "negative", "positive", "negative", "positive"]
    preds = ["Positive.", "I think it is negative", "maybe", "negative", "maybe"]
    res = M.classification_metrics(preds, refs)
    assert res["invalid"] == 3
    assert res["invalid_replies"][0] == {"reply": "maybe", "count": 2}
    assert {"reply": "i think it is negative", "count": 1} in res["invalid_replies"]
    # Invalid replies are wrong answers: they lower recall but never appear in the matrix.
    assert res["accuracy"] == pytest.approx(2 / 5)
    assert sum(map(sum, res["confusion_matrix"])) == 2
    assert res["per_class"]["positive"]["recall"] == pytest.approx(1 / 3)
    assert res["per_class"]["positive"]["precision"] == pytest.approx(1.0)


def test_binary_positive_class_and_fbeta():
    refs = ["yes", "yes", "yes", "no", "no"]
    preds = ["yes", "no", "no", "yes", "no"]
    res = M.classification_metrics(preds, refs, betas=[0.5, 2])
    b = res["binary"]
    assert b["positive_class"] == "yes"  # picked by name
    p, r = 1 / 2, 1 / 3
    assert b["precision"] == pytest.approx(p) and b["recall"] == pytest.approx(r)
    assert b["f0.5"] == pytest.approx(1.25 * p * r / (0.25 * p + r))
    assert b["f2"] == pytest.approx(5 * p * r / (4 * p + r))
    flipped = M.classification_metrics(preds, refs, positive_class="No")["binary"]
    assert flipped["positive_class"] == "no" and flipped["precision"] == pytest.approx(1 / 3)
    with pytest.raises(TuneryError, match="Positive class"):
        M.classification_metrics(preds, refs, positive_class="maybe")


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 5)])
def test_agrees_with_sklearn_on_random_labels(seed, k):
    from sklearn import metrics as skm

    rng = random.Random(seed)
    labels = [f"class{i}" for i in range(k)]
    refs = [rng.choice(labels) for _ in range(200)]
    preds = [rng.choice(labels + ["garbage"]) for _ in range(200)]
    res = M.classification_metrics(preds, refs, labels=labels, betas=[2.0])
    assert res["accuracy"] == pytest.approx(skm.accuracy_score(refs, preds))
    assert res["confusion_matrix"] == skm.confusion_matrix(refs, preds, labels=labels).tolist()
    p, r, f, s = skm.precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        c = res["per_class"][label]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == (
            pytest.approx(p[i]),
            pytest.approx(r[i]),
            pytest.approx(f[i]),
            s[i],
        )
    assert res["macro_f1"] == pytest.approx(skm.f1_score(refs, preds, labels=labels, average="macro"))
    assert res["weighted_f1"] == pytest.approx(skm.f1_score(refs, preds, labels=labels, average="weighted"))
    assert res["invalid"] == preds.count("garbage")
    if k == 2:
        pos = res["binary"]["positive_class"]
        per_label = skm.fbeta_score(refs, preds, beta=2.0, labels=labels, average=None)
        assert res["binary"]["f2"] == pytest.approx(per_label[labels.index(pos)])


def test_label_set_detection():
    assert M.is_label_set(["positive", "negative", "Positive.", "mixed", "negative", "mixed"])
    assert not M.is_label_set(["Paris is the capital.", "It has four legs.", "Blue."])
    assert not M.is_label_set(["same"] * 5)


def test_chrf_and_rouge_l_by_hand():
    assert M.chrf(["the cat"], ["the cat"]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc": unigrams P=2/2 R=2/3, bigrams P=1/1 R=1/2, trigrams only in the reference.
    p, r = (1 + 1) / 2, (2 / 3 + 1 / 2) / 2
    assert M.chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    # LCS("the cat sat", "the black cat sat down") = 3 words: P = 3/3, R = 3/5.
    assert M.rouge_l(["The cat sat."], ["the black cat sat down"]) == pytest.approx(100 * 2 * 0.6 / 1.6)
    assert M.rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(50.0)


def test_perplexity_helper():
    assert M.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert M.perplexity(1.0, 0) == float("inf")


def test_sequence_nll_matches_model_loss(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (5, 9, 14):
        ids = torch.randint(0, 500, (n,), generator=g).tolist()
        seqs.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    nll, count = M.sequence_nll(model, seqs, batch_size=2, autocast=False)
    ref, ref_count = 0.0, 0
    for s in seqs:
        out = model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]]))
        k = sum(1 for x in s["labels"][1:] if x != -100)
        ref, ref_count = ref + out.loss.item() * k, ref_count + k
    assert count == ref_count
    assert nll == pytest.approx(ref, rel=1e-5)


def test_text_perplexity_scores_each_token_once(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "The quick brown fox jumps over the lazy dog. " * 20
    n_ids = len(tok(text, add_special_tokens=False)["input_ids"])
    res = M.text_perplexity(model, tok, text, window=64, stride=32)
    assert res["tokens"] == n_ids - 1
    whole = M.text_perplexity(model, tok, text, window=512, stride=512)
    assert whole["tokens"] == n_ids - 1 and math.isfinite(res["perplexity"])


# --- metrics against hand-computed values and reference libraries, on fixed inputs -------------------
HYPS = ["the cat sat on the mat", "a quick brown fox", "Hello, world!", "nothing alike", "data data data"]
REFS = ["the cat is on the mat", "the quick brown fox jumps", "hello world", "completely different", "data"]


def test_chrf_matches_sacrebleu():
    from sacrebleu.metrics import CHRF

    chrf = CHRF()  # chrF2: character 6-grams, beta 2, whitespace removed
    assert M.chrf(HYPS, REFS) == pytest.approx(chrf.corpus_score(HYPS, [REFS]).score, abs=1e-6)
    for h, r in zip(HYPS, REFS, strict=True):  # one sentence is a corpus of one
        assert M.chrf([h], [r]) == pytest.approx(chrf.corpus_score([h], [[r]]).score, abs=1e-6), (h, r)


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    reference = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS, strict=True)]
    assert M.rouge_l(HYPS, REFS) == pytest.approx(100 * sum(reference) / len(reference), abs=1e-9)


def test_ece_by_hand():
    from tunery.evaluate.classify import calibration

    conf = [0.95, 0.92, 0.85, 0.62, 0.58, 0.55, 0.3, 0.0]
    ok = [True, False, True, True, False, True, False, False]
    res = calibration(conf, ok, n_bins=10)
    # bins (0.9,1]: 2 at mean .935, accuracy 1/2; (0.8,.9]: 1 at .85, 1; (0.6,.7]: 1 at .62, 1;
    # (0.5,.6]: 2 at .565, 1/2; (0.2,.3]: 1 at .3, 0; [0,.1]: 1 at 0, 0
    expected = (2 * abs(0.5 - 0.935) + abs(1 - 0.85) + abs(1 - 0.62) + 2 * abs(0.5 - 0.565) + 0.3) / 8
    assert res["ece"] == pytest.approx(expected, abs=1e-12)
    counts = {round(b["low"], 1): b["count"] for b in res["bins"]}
    assert counts == {0.0: 1, 0.1: 0, 0.2: 1, 0.3: 0, 0.4: 0, 0.5: 2, 0.6: 1, 0.7: 0, 0.8: 1, 0.9: 2}
    assert calibration([0.7] * 10, [True] * 7 + [False] * 3)["ece"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classifier_log_loss_matches_sklearn(tmp_path, tiny_llama, multi_label):
    import torch
    from sklearn.metrics import log_loss
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.helpers.tiny import write_jsonl
    from tunery.evaluate.classify import evaluate_classifier

    torch.manual_seed(0)
    labels = ["a", "b", "c"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=3).eval()
    with torch.no_grad():  # a random head far from uniform, so the probabilities differ
        model.score.weight.normal_(0, 2.0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model.config.pad_token_id = tok.pad_token_id
    if multi_label:
        rows = [{"text": f"example {i} " * (1 + i % 3), "labels": labels[: 1 + i % 3]} for i in range(9)]
    else:
        rows = [{"text": f"example {i} " * (1 + i % 3), "label": labels[i % 3]} for i in range(9)]
    data = write_jsonl(tmp_path / "labeled.jsonl", rows)
    res = evaluate_classifier(model, tok, data, labels, multi_label=multi_label)
    probs = [[p["probabilities"][lab] for lab in labels] for p in res["predictions"]]
    if multi_label:  # the mean binary cross-entropy over every (example, label)
        truth = [int(lab in r["labels"]) for r in rows for lab in labels]
        expected = log_loss(truth, [p for row in probs for p in row], labels=[0, 1])
    else:
        expected = log_loss([r["label"] for r in rows], probs, labels=labels)
    assert res["log_loss"] == pytest.approx(expected, rel=1e-6)


def _reference_strided_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Straight from the definition: windows start every `stride` tokens; each token after the first
    is scored once, in the first window that reaches it, from the full model's logits."""
    import torch

    total, count, done = 0.0, 0, 1  # token 0 has no context: never scored
    for start in range(0, len(ids), stride):
        piece = ids[start : start + window]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([piece])).logits[0].float(), -1)
        for t in range(max(done, start + 1), start + len(piece)):
            total -= float(logp[t - start - 1, ids[t]])
            count += 1
        done = max(done, start + len(piece))
        if done == len(ids):
            break
    return total, count


def test_strided_perplexity_and_forgetting_match_the_definition(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunery.evaluate.run import forgetting

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "The quick brown fox jumps over the lazy dog; then it naps in the sun. " * 30
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 600  # several windows of 512 at stride 256
    for window, stride in ((64, 32), (64, 48), (512, 256)):
        nll, n = _reference_strided_nll(model, ids, window, stride)
        res = M.text_perplexity(model, tok, text, window=window, stride=stride)
        assert res["tokens"] == n == len(ids) - 1
        assert res["loss"] == pytest.approx(nll / n, rel=1e-4)
        assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # forgetting is this perplexity on a reference text file, with the defaults (window 512, stride 256)
    path = tmp_path / "english.txt"
    path.write_text(text, encoding="utf-8")
    nll, n = _reference_strided_nll(model, ids, 512, 256)
    res = forgetting(model, tok, path)
    assert res["tokens"] == n and res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
