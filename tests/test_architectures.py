"""Every decoder architecture Tunery trains, proven on tiny random models where Tunery does its own work.

Each architecture of `tests.helpers.tiny.DECODER_ARCHS` is built with its distinguishing feature switched
on and reachable by the test sequences (sliding windows of 8 tokens against examples of up to 37,
Gemma 2's attention and final-logit soft-capping at values the random scores reach, Phi-3's fused
projections, Qwen3's and OLMo 2's q/k norms, MoE routing). For each one:

- packed rows (Tunery's attention, every mode) give the logits of unpacked examples under the
  model's own attention;
- Tunery's supervised-only head gives the model's own loss;
- LoRA trained Tunery's way (packed, fused kernel, supervised head) gives peft's logits and gradients;
- the merged export equals base plus adapter;
- GGUF export round-trips through transformers' GGUF loader, or refuses with the architecture named;
- every method of the method matrix trains two steps through `tunery.train.run`.

The chat-template label mask does not depend on the architecture (the template does): it is checked
once per template family at the end. docs/models.md is the table these tests back.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as tf

from tests.helpers.tiny import DECODER_ARCHS, TINY_WINDOW, make_tiny_model_dir, tiny_tokenizer
from tunery.errors import ConfigError, ModelError
from tunery.export import export
from tunery.export.gguf_file import gguf_refusal
from tunery.modeling import attention
from tunery.modeling.forward import (
    IGNORE,
    SoftCappedHead,
    forward_kwargs,
    packed_inputs,
    split_lm,
    supervised_loss,
)
from tunery.train.lora_kernel import FusedLoraLinear, fuse_lora_layers

pytestmark = pytest.mark.usefixtures("one_thread")

# Lengths straddle the window (shorter, equal-ish, several times longer) so packed rows hold
# examples on both sides of it.
LENGTHS = (23, 6, 37, 9)
WINDOWED = {"mistral", "gemma2", "gemma3", "phi3"}
MOE = {"mixtral", "qwen2_moe"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model_dir(root / arch, arch) for arch in DECODER_ARCHS}


def _rows() -> tuple[list[list[int]], list[list[int]]]:
    """Token rows, and labels that leave each row's first third unsupervised (the prompt)."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 500, (n,), generator=gen).tolist() for n in LENGTHS]
    labels = [[IGNORE] * (len(r) // 3) + r[len(r) // 3 :] for r in rows]
    return rows, labels


def _load(path: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _per_example(packed: torch.Tensor, rows) -> list[torch.Tensor]:
    return list(packed[0].split([len(r) for r in rows]))


# --------------------------------------------------------------------------- the features are live


@pytest.mark.parametrize("arch", sorted(WINDOWED | {"gemma2"}))
def test_window_and_softcap_change_these_logits(arch, model_dirs):
    """Switching the feature off changes the reference logits: the tests below exercise it."""
    rows, _ = _rows()
    ids = torch.tensor([rows[2]])  # 37 tokens, beyond the window
    model = _load(model_dirs[arch])
    off = {"sliding_window": 4096} if arch in WINDOWED else {}
    if arch == "gemma2":
        off |= {"attn_logit_softcapping": None, "final_logit_softcapping": None}
    for key, value in off.items():
        plain_cfg = copy.deepcopy(model.config)
        setattr(plain_cfg, key, value)
        plain = tf.AutoModelForCausalLM.from_config(plain_cfg).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            diff = (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
        assert diff > 1e-3, f"{arch}: {key} does not change the logits ({diff})"


# --------------------------------------------------------------------------- packed attention


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_packed_logits_equal_unpacked(arch, model_dirs, monkeypatch):
    rows, _ = _rows()
    model = _load(model_dirs[arch])
    with torch.no_grad():  # the reference: the model's own attention, one example at a time
        expected = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]
        assert attention.use_packed_attention(model), arch
        batch = packed_inputs(rows)
        for mode in ("segments", "mask", "varlen"):  # varlen: the CPU reference of the GPU kernels' layout
            attention.use_packed_attention(model, mode)
            got = _per_example(model(**forward_kwargs(batch)).logits, rows)
            for k, (g, e) in enumerate(zip(got, expected, strict=True)):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=f"{arch} {mode} example {k}")
        # padded rows after the switch (evaluation batches) still take the model's masks
        attention.use_packed_attention(model, "auto")
        padded = model(input_ids=torch.tensor([rows[2]])).logits[0]
    torch.testing.assert_close(padded, expected[2], rtol=1e-4, atol=1e-5)


def _prefixed_rows() -> tuple[list[list[int]], list[list[int]]]:
    """Rows that start with one 20-token prompt (longer than the window, so windows reach across its
    end), each scored on its own later tokens only, as chat turns after a system prompt are."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 500, (20,), generator=gen).tolist()
    rows = [prompt + torch.randint(10, 500, (n,), generator=gen).tolist() for n in (3, 14, 30)]
    labels = [[IGNORE] * 21 + r[21:] for r in rows]
    return rows, labels


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_shared_prefix_equals_whole_examples(arch, model_dirs):
    """A packed row that lays the rows' common prompt once (modeling/prefix.py) gives the summed loss
    and the gradients of the model's own attention over each example whole, in every mode."""
    rows, labels = _prefixed_rows()
    model = _load(model_dirs[arch])
    expected = torch.zeros(())
    for r, lab in zip(rows, labels, strict=True):
        out = model(input_ids=torch.tensor([r]), labels=torch.tensor([lab]))
        expected = expected + out.loss * sum(t != IGNORE for t in lab[1:])
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    batch = packed_inputs(rows, labels, share_prefix=True)
    assert batch["shared_prefix"] == 20 and batch["input_ids"].shape[1] == 20 + 3 + 14 + 30
    assert attention.use_packed_attention(model), arch
    for mode in ("segments", "mask", "varlen"):  # varlen: a shared row takes the per-segment path
        attention.use_packed_attention(model, mode)
        model.zero_grad()
        loss, _, n = supervised_loss(model, batch)
        assert n == sum(sum(t != IGNORE for t in lab[1:]) for lab in labels)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4, msg=f"{arch} {mode}")
        loss.backward()
        for name, grad in want.items():
            got = dict(model.named_parameters())[name].grad
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-5, msg=f"{arch} {mode} {name}")


def test_bidirectional_attention_is_not_packed(model_dirs, caplog):
    model = _load(model_dirs["gemma3"])
    model.config.use_bidirectional_attention = True
    with caplog.at_level("INFO", logger="tunery.modeling.attention"):
        assert not attention.use_packed_attention(model)
    assert "gemma3_text" in caplog.text and "bidirectional" in caplog.text


# --------------------------------------------------------------------------- supervised-only head


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_supervised_head_equals_model_loss(arch, model_dirs):
    rows, labels = _rows()
    model = _load(model_dirs[arch])
    parts = split_lm(model)
    assert parts is not None, f"{arch} lost the supervised-only head"
    assert isinstance(parts[1], SoftCappedHead) == (arch == "gemma2")
    with torch.no_grad():
        expected, count = 0.0, 0
        for r, lab in zip(rows, labels, strict=True):
            out = model(input_ids=torch.tensor([r]), labels=torch.tensor([lab]))
            n = sum(t != IGNORE for t in lab[1:])
            expected, count = expected + out.loss * n, count + n
        attention.use_packed_attention(model)
        total, _, n_tokens = supervised_loss(model, packed_inputs(rows, labels))
    assert n_tokens == count
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- LoRA and the fused kernel


def _lora_pair(path: Path):
    """(peft reference, Tunery's training-time copy: packed attention + fused LoRA), B non-zero."""
    from tunery.methods import METHODS

    method = METHODS.get("lora")
    opts = method.options.model_validate({"r": 4})
    torch.manual_seed(0)
    ref = method.apply(_load(path), opts)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ours = copy.deepcopy(ref)
    assert attention.use_packed_attention(ours.get_base_model())
    return ref, ours, fuse_lora_layers(ours)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_lora_fused_packed_matches_peft(arch, model_dirs):
    rows, labels = _rows()
    ref, ours, n_fused = _lora_pair(model_dirs[arch])
    assert n_fused > 0 and sum(isinstance(m, FusedLoraLinear) for m in ours.modules()) == n_fused
    if arch == "phi3":  # LoRA lands on the fused projections themselves
        assert any(n.endswith("qkv_proj") for n, m in ours.named_modules() if isinstance(m, FusedLoraLinear))
    ref_loss, ref_logits = 0.0, []
    for r, lab in zip(rows, labels, strict=True):
        out = ref(input_ids=torch.tensor([r]), labels=torch.tensor([lab]))
        ref_loss = ref_loss + out.loss * sum(t != IGNORE for t in lab[1:])
        ref_logits.append(out.logits[0].detach())
    ref_loss.backward()
    batch = packed_inputs(rows, labels)
    loss, _, _ = supervised_loss(ours, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        got = _per_example(ours(**forward_kwargs(batch)).logits, rows)
    for g, e in zip(got, ref_logits, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    g_ref, g_ours = _lora_grads(ref), _lora_grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=f"{arch} {name}")


# --------------------------------------------------------------------------- merge and GGUF


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory) -> dict[str, Path]:
    """A PEFT LoRA adapter (random non-zero B) with its tokenizer, per architecture."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("arch-adapters")
    out = {}
    for arch, base in model_dirs.items():
        torch.manual_seed(1)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(_load(base), cfg).save_pretrained(root / arch)
        tf.AutoTokenizer.from_pretrained(base).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _reference_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(_load(base), adapter).eval()(ids).logits


IDS = torch.tensor([_rows()[0][2]])


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_merged_export_equals_base_plus_adapter(arch, model_dirs, adapters, tmp_path):
    out = export(None, str(adapters[arch]), "hf", tmp_path / "merged")
    merged = _load(out)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(IDS).logits
    # merging rounds each weight once in fp32: test_methods' 1e-4
    torch.testing.assert_close(
        got, _reference_logits(model_dirs[arch], adapters[arch], IDS), rtol=0, atol=1e-4
    )


GGUF_OK = {"llama", "qwen2", "qwen3"}


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_gguf_round_trips_or_refuses(arch, model_dirs, adapters, tmp_path):
    if arch not in GGUF_OK:
        assert gguf_refusal(_load(model_dirs[arch]).config) is not None
        with pytest.raises(ModelError, match=arch) as err:
            export(None, str(adapters[arch]), "gguf", tmp_path / "g", dtype="f32")
        assert "--format hf" in str(err.value.hint)
        assert not list(tmp_path.glob("g/*.gguf"))
        return
    out = export(None, str(adapters[arch]), "gguf", tmp_path / "g", dtype="f32")
    (gguf_file,) = out.glob("*.gguf")
    model = tf.AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(
        got, _reference_logits(model_dirs[arch], adapters[arch], IDS), rtol=0, atol=1e-4
    )


def test_mistral_without_a_window_exports_as_llama(tmp_path):
    """llama.cpp converts Mistral as a Llama; that is exact only while no window is shorter than the
    context, which is why the windowed tiny Mistral above is refused."""
    from tunery.export.gguf_file import write_gguf

    base = _load(make_tiny_model_dir(tmp_path / "m", "mistral", sliding_window=None))
    path = tmp_path / "mistral.gguf"
    write_gguf(base, tiny_tokenizer(), path, "f32")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert model.config.model_type == "llama"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, base(IDS).logits, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- the method matrix


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from tests.helpers.tiny import write_chat_jsonl

    return write_chat_jsonl(tmp_path_factory.mktemp("arch-data") / "train.jsonl", n=10)


def _method_cases():
    from tests.test_methods import CASES  # the one method matrix (tests/test_methods.py)

    return CASES


# Methods that refuse an architecture, with what their error says. UniPELT gates attention through
# q_proj, which Phi-3 fuses into qkv_proj.
REFUSED_METHODS = {("phi3", "unipelt"): "no q_proj linear layer"}


# llama is left out: tests/test_methods.py runs the whole matrix on it, with more checks.
@pytest.mark.parametrize("method", list(_method_cases()))
@pytest.mark.parametrize("arch", [a for a in DECODER_ARCHS if a != "llama"])
def test_every_method_trains(arch, method, model_dirs, train_file, tmp_path):
    import json

    from tests.helpers.tiny import quick_run_config
    from tunery.train import run
    from tunery.train.events import read_jsonl

    opts, _ = _method_cases()[method]
    sets = {f"{method}.{k}": json.dumps(v) for k, v in opts.items()}
    sets |= {"method": method, "hyperparameters.max_steps": 2, "hyperparameters.batch_size": 4}
    config = quick_run_config(model_dirs[arch], train_file, tmp_path / "run", **sets)
    if (arch, method) in REFUSED_METHODS:
        with pytest.raises(ConfigError, match=REFUSED_METHODS[arch, method]):
            run(config)
        return
    result = run(config)
    assert result.status == "succeeded"
    losses = [r["train_loss"] for r in read_jsonl(result.output_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses


# --------------------------------------------------------------------------- chat-template label mask

# Chat templates in the shape of each family's, over the tiny tokenizer's tokens: what the mask
# depends on is the template (how turns open and end, a role renamed, a system turn folded into the
# first user turn), never the architecture. ChatML (Qwen, SmolLM, the tiny models) and Llama-3
# headers are in tests/test_data_encode.py.
FAMILY_TEMPLATES = {
    # Gemma: the assistant is "model", no system role (folded into the first user turn)
    "gemma": (
        "{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
        "{% for m in messages if m['role'] != 'system' %}"
        "{{ '[SEP]' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
        "{{ (sys if loop.first else '') + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[SEP]model\n' }}{% endif %}"
    ),
    # Phi-3: <|role|> tags, an end token and a newline after each turn
    "phi3": (
        "{% for m in messages %}{{ '[CLS]' + m['role'] + '[MASK]\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[CLS]assistant[MASK]\n' }}{% endif %}"
    ),
    "chatml": None,  # the tiny tokenizer's own
}


@pytest.mark.parametrize("family", FAMILY_TEMPLATES)
def test_label_mask_covers_exactly_the_assistant_turns(family):
    from tunery.data import IGNORE_INDEX, encode_chat
    from tunery.data.types import Conversation

    tok = tiny_tokenizer()
    if FAMILY_TEMPLATES[family]:
        tok.chat_template = FAMILY_TEMPLATES[family]
    messages = [
        {"role": "system", "content": "You name colours."},
        {"role": "user", "content": "What colour is item 3?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And item 4?"},
        {"role": "assistant", "content": "green or blue"},
    ]
    feats = encode_chat(Conversation(messages, None), tok, None)
    runs, current = [], []
    for label in [*feats["labels"], IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    assert [tok.decode(r) for r in runs] == ["red<|im_end|>", "green or blue<|im_end|>"]
    assert tok.decode(feats["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)


def test_window_is_shorter_than_the_examples():
    assert TINY_WINDOW < max(LENGTHS)
