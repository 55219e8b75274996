"""The allocator switch: training processes run on jemalloc where installed, and it can be turned off."""

import subprocess
import sys

import pytest

from tunery.train.memory import ALLOCATOR_ENV, JEMALLOC_CONF, allocator_env, find_jemalloc

PROBE = "from tunery.train.memory import active_allocator; print(active_allocator())"


def _allocator_of(env):
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True
    ).stdout.strip()


def test_system_allocator_when_turned_off():
    env = allocator_env({"PATH": "/usr/bin", ALLOCATOR_ENV: "system"})
    assert "LD_PRELOAD" not in env
    assert _allocator_of({**env, "PYTHONPATH": ":".join(sys.path)}) == "system"


@pytest.mark.skipif(find_jemalloc() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_spawned_processes_run_on_jemalloc_and_keep_user_settings():
    env = allocator_env({"PATH": "/usr/bin", "LD_PRELOAD": "", "PYTHONPATH": ":".join(sys.path)})
    assert env["LD_PRELOAD"] == find_jemalloc()
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    assert _allocator_of(env) == "jemalloc"
    mine = allocator_env({"MALLOC_CONF": "narenas:1"})  # a user's own jemalloc tuning wins
    assert mine["MALLOC_CONF"] == "narenas:1"
    assert allocator_env(env) == env  # already preloaded: unchanged
