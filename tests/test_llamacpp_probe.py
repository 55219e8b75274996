"""The llama.cpp probe (serve/engines/llamacpp_probe.py): a child process that crashes on the extra CPU
buffer types turns them off for that tensor type on this machine, once; anything else leaves them on."""

from __future__ import annotations

import json
import logging

import pytest

from tunery.serve.engines import llamacpp_probe as probe

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_model_dir
    from tunery.serve.engines.gguf_forms import ensure_base

    root = tmp_path_factory.mktemp("probe")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNERY_CACHE", str(root / "cache"))
    try:
        yield ensure_base(str(make_tiny_model_dir(root / "tiny")), "f32").gguf
    finally:
        mp.undo()


def _verdicts(cache):
    return [json.loads(p.read_text()) for p in sorted(cache.glob("extra-buffers-*.json"))]


def test_a_crashing_probe_turns_the_buffers_off_once_per_type(tmp_path, monkeypatch, caplog, f32_gguf):
    # the child dies of SIGSEGV, as llama.cpp's AMX kernel did on a machine with AMX-INT8
    monkeypatch.setattr(probe, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with caplog.at_level(logging.WARNING, logger="tunery.serve"):
        assert probe.extra_buffers_safe(f32_gguf, "q8_0", tmp_path) is False
    assert "crashed a probe for q8_0 weights" in caplog.text
    assert _verdicts(tmp_path) == [{"safe": False, "gguf_type": "q8_0", "exit": -11}]
    # the verdict is kept: a child that would now pass is not asked again
    monkeypatch.setattr(probe, "_CHILD", "raise SystemExit(0)")
    assert probe.extra_buffers_safe(f32_gguf, "q8_0", tmp_path) is False
    # another tensor type is probed on its own
    assert probe.extra_buffers_safe(f32_gguf, "f32", tmp_path) is True
    assert len(_verdicts(tmp_path)) == 2


def test_the_real_child_decodes_a_gguf(tmp_path, f32_gguf):
    """The child as shipped loads and decodes a real GGUF (f32 weights never take the AMX path)."""
    assert probe.extra_buffers_safe(f32_gguf, "f32", tmp_path) is True
    assert _verdicts(tmp_path) == [{"safe": True, "gguf_type": "f32", "exit": 0}]


def test_a_file_llama_cpp_cannot_load_is_left_to_the_real_load(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    assert probe.extra_buffers_safe(bad, "q8_0", tmp_path) is True  # the real load names the error
    assert _verdicts(tmp_path) == []  # nothing about this CPU was learnt
