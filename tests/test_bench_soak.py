"""The arithmetic of bench/soak.py: growth after warm-up, as % of peak, judged against the 2% target.

Pure functions on made-up RSS series, so this runs in milliseconds; the soak itself trains and serves
real models for an hour and is run by hand (`python bench/soak.py --model tiny ...` for a smoke run).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # noqa: E402

STEPS = list(range(1, 1001))


def test_issue_20_growth_fails_and_flat_memory_passes() -> None:
    # Issue 20's run: +55 MB a step from 1.2 GB. Per 1,000 steps that is 55 GB, far over 2% of the peak.
    leaking = soak.growth(STEPS, [1200 + 55 * s for s in STEPS], per=1000)
    assert leaking["slope_mb"] == pytest.approx(55)
    assert leaking["growth_mb"] == pytest.approx(55_000)
    assert leaking["peak_mb"] == 1200 + 55_000
    assert leaking["growth_pct"] == pytest.approx(100 * 55_000 / 56_200)
    assert not leaking["target_met"]
    # Flat with step-to-step noise of +-40 MB (shapes vary): no trend, so the target is met.
    flat = soak.growth(STEPS, [1200 + 40 * math.sin(s) for s in STEPS], per=1000)
    assert abs(flat["growth_pct"]) < 0.1 and flat["target_met"]


def test_the_batch_size_is_told_apart_from_growth() -> None:
    """At batch 8 the RSS after a step follows that step's batch. Batches that happen to grow towards
    the end of 200 steps read as growth in a plain fit; with the batch size as a second variable
    the slope is the growth at a fixed size: none here, and a real leak is still found."""
    steps = list(range(1, 201))
    sizes = [800 + 6 * s + 700 * ((s * 37) % 11) / 10 for s in steps]  # drifts upward, and varies
    flat = [1200 + 0.2 * z for z in sizes]  # RSS follows the batch only
    plain = soak.growth(steps, flat, per=1000)
    assert not plain["target_met"]  # the batch order alone fails the target in a plain fit
    adjusted = soak.growth(steps, flat, per=1000, sizes=sizes)
    assert adjusted["slope_mb"] == pytest.approx(0, abs=1e-9) and adjusted["target_met"]
    assert adjusted["unadjusted_slope_mb"] == pytest.approx(plain["slope_mb"])
    assert adjusted["adjusted_for"] == "batch_positions"
    leak = soak.growth(steps, [y + 0.5 * s for y, s in zip(flat, steps, strict=True)], per=1000, sizes=sizes)
    assert leak["slope_mb"] == pytest.approx(0.5) and not leak["target_met"]
    # sizes that cannot be told apart from the step give no figure, never a pass
    same = soak.growth(steps, flat, per=1000, sizes=[float(s) for s in steps])
    assert same["growth_pct"] is None and not same["target_met"]


def test_a_process_sample_goes_with_the_step_in_flight() -> None:
    """A sample of the process tree taken during step x+1 (x: the last step logged) holds that step's
    activations. Long examples that happen to come late read as growth in a plain fit of the samples;
    fitted with the size of the step in flight there is none, and a real leak is still found. A part
    recorded before the sizes were logged keeps the plain fit."""
    steps = list(range(1, 401))
    sizes = [100 + 800 * ((s * 37) % 13 == 0) + 600 * (s > 300 and s % 5 == 0) for s in steps]
    series = {"step": steps, "rss_mb": [1800.0] * len(steps), "batch_positions": sizes}
    size_of = dict(zip(steps, sizes, strict=True))
    # a sample every 3rd step, taken while the next step runs: the tree holds its size's activations
    samples = [{"x": x, "total_mb": 1800 + 0.9 * size_of.get(x + 1, 0)} for x in range(0, 400, 3)]
    fits = soak.train_fits(series, samples, soak.WARMUP_FRACTION)
    plain = soak.growth([s["x"] for s in samples], [s["total_mb"] for s in samples], per=1000)
    assert not plain["target_met"]  # the late long examples alone fail the target in a plain fit
    assert fits["sampled"]["slope_mb"] == pytest.approx(0, abs=1e-9) and fits["sampled"]["target_met"]
    assert fits["per_step"]["target_met"] and fits["sampled_note"] is None
    leaking = [{**s, "total_mb": s["total_mb"] + 0.5 * s["x"]} for s in samples]
    assert soak.train_fits(series, leaking, soak.WARMUP_FRACTION)["sampled"]["slope_mb"] == pytest.approx(0.5)
    old = {k: v for k, v in series.items() if k != "batch_positions"}
    assert "adjusted_for" not in soak.train_fits(old, samples, soak.WARMUP_FRACTION)["sampled"]


def test_growth_is_a_percentage_of_the_peak_per_1000_steps() -> None:
    # 0.03 MB a step from 1,000 MB over 500 steps: 30 MB per 1,000 steps, peak 1,015 MB -> 2.96%: fails,
    # though the run itself only grew 15 MB (the figure is per 1,000 steps, whatever the run's length).
    xs = list(range(1, 501))
    g = soak.growth(xs, [1000 + 0.03 * x for x in xs], per=1000)
    assert g["growth_mb"] == pytest.approx(30)
    assert g["growth_pct"] == pytest.approx(100 * 30 / 1015)
    assert not g["target_met"]
    # Half the slope: 15 MB per 1,000 steps on a 1,007.5 MB peak -> 1.49%: passes.
    assert soak.growth(xs, [1000 + 0.015 * x for x in xs], per=1000)["target_met"]


def test_warm_up_is_left_out_of_the_fit_but_not_of_the_peak() -> None:
    # Loading and the allocator's first arenas: 500 -> 1,500 MB over the first 50 steps, flat after.
    ys = [500 + 20 * s if s <= 50 else 1500 for s in STEPS]
    g = soak.growth(STEPS, ys, per=1000)
    assert g["warmup_end"] == 100 and g["points"] == 901  # steps 100..1000
    assert g["growth_mb"] == pytest.approx(0) and g["target_met"]
    assert g["peak_mb"] == 1500
    # With no warm-up the climb would be read as growth.
    assert not soak.growth(STEPS, ys, per=1000, warmup_fraction=0)["target_met"]


def test_rss_at_warm_up_end_middle_and_end() -> None:
    g = soak.growth(STEPS, [1000 + s / 10 for s in STEPS], per=1000)
    assert g["rss_warmup_end_mb"] == pytest.approx(1010)  # step 100
    assert g["rss_middle_mb"] == pytest.approx(1055)  # step 550, halfway from 100 to 1,000
    assert g["rss_end_mb"] == pytest.approx(1100)


def test_serving_growth_is_over_all_the_requests() -> None:
    # Samples every few seconds against requests answered: 0.02 MB a request from 800 MB is 10 MB over
    # 500 requests, 1.23% of the 810 MB peak; 0.05 MB a request is 25 MB, 3.03%.
    xs = [0, 0, 30, 60, 110, 160, 220, 280, 330, 390, 440, 500, 500]
    ok = soak.growth(xs, [800 + 0.02 * x for x in xs], per=500)
    assert ok["growth_pct"] == pytest.approx(100 * 10 / 810) and ok["target_met"]
    bad = soak.growth(xs, [800 + 0.05 * x for x in xs], per=500)
    assert bad["growth_pct"] == pytest.approx(100 * 25 / 825) and not bad["target_met"]


def test_target_is_strictly_under_two_percent_and_needs_a_figure() -> None:
    assert soak.meets_target(1.99) and soak.meets_target(-3.0)  # shrinking memory passes
    assert not soak.meets_target(2.0) and not soak.meets_target(None)
    # One sample after warm-up gives no slope: no figure, so no pass.
    few = soak.growth([0, 0, 100], [900, 950, 1000], per=1000)
    assert few["points"] == 1 and few["growth_pct"] is None and not few["target_met"]
    assert not soak.growth([], [], per=1000)["target_met"]
    with pytest.raises(ValueError):
        soak.growth([1, 2], [1.0], per=1000)


def test_soak_set_is_deterministic_and_varied() -> None:
    rows = soak.build_soak_set(1000, seed=0)
    assert rows == soak.build_soak_set(1000, seed=0) != soak.build_soak_set(1000, seed=1)
    stats = soak.length_stats(rows)
    assert stats["examples"] == 1000 and 200 < stats["multi_turn"] < 600
    assert stats["chars"]["min"] < 150 and 2500 < stats["chars"]["max"] <= soak.MAX_CHARS
    for row in rows:  # what tunery's validator expects of a chat example
        roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles


def test_parts_left_out_are_kept_from_the_previous_soak_json() -> None:
    assert soak.selected_parts(soak.parse_args([])) == ["b1", "b8", "serve"]
    assert soak.selected_parts(soak.parse_args(["--only", "b8"])) == ["b8"]
    assert soak.selected_parts(soak.parse_args(["--steps-b1", "0", "--skip-serve"])) == ["b8"]
    assert soak.selected_parts(soak.parse_args(["--requests", "0", "--only", "b1", "serve"])) == ["b1"]
    previous = {
        "model": "m",
        "data": {"examples": 3},
        "warmup_fraction": 0.1,
        "train": [{"batch": 1, "when": "then"}, {"batch": 8, "error": "stopped by hand after 13 steps"}],
        "serve": {"requests": 500, "when": "then"},
    }
    now = {"model": "m", "data": {"examples": 3}, "warmup_fraction": 0.1}
    train, serve = soak.kept_parts(previous, now, ["b8"], Path("out"))
    assert train == [{"batch": 1, "when": "then"}] and serve == {"requests": 500, "when": "then"}
    # Parts of another model (or data, or warm-up) are not merged into this run's report.
    with pytest.raises(SystemExit, match="model"):
        soak.kept_parts(previous, {**now, "model": "tiny"}, ["b8"], Path("out"))
    assert soak.kept_parts(previous, {**now, "model": "tiny"}, list(soak.PARTS), Path("out")) == ([], None)
    # `--only b8 serve` stopped during b8: the serving part it never reached keeps its old result.
    stopped = {
        **now,
        "train": [{"batch": 1}, {"batch": 8, "error": "stopped by hand after 2 steps"}],
        "serve": None,
    }
    soak.restore_unreached(stopped, previous)
    assert stopped["serve"] == previous["serve"] and stopped["train"][1]["error"].endswith("2 steps")


def test_a_missing_figure_says_why_and_is_no_pass() -> None:
    row = soak.table_row("train, batch 1 (process tree)", "1000", soak.growth([], [], per=1000), "lost")
    assert row.endswith("| n/a: lost | n/a | n/a | n/a |") and "no |" not in row
    one = soak.table_row("x", "5", soak.growth([0, 0, 100], [900, 950, 1000], per=1000))
    assert "1 points after warm-up, too few for a slope" in one
    assert soak.not_sampled({"samples": []}) == "no process-tree samples were kept with this part"
    assert soak.sampled_note([], soak.growth([], [], per=1000)).startswith("no sample")
    flat = soak.growth(STEPS, [1000.0] * 1000, per=1000)
    run = {"batch": 1, "per_step": flat, "sampled": soak.growth([], [], per=1000)}
    assert soak.verdicts({"train": [run]}) == {"train_b1": None}  # incomplete, not failed
    assert soak.verdicts({"train": [{**run, "sampled": flat}]}) == {"train_b1": True}
    assert soak.verdicts({"train": [{**run, "error": "exit code 1"}]}) == {"train_b1": False}


def test_markdown_names_the_run_of_each_part() -> None:
    flat = soak.growth(STEPS, [1000.0] * 1000, per=1000)
    stamp = {"bench_command": "python bench/soak.py --only b8", "when": "2026-12-07 09:00:00"}
    report = {
        "model": "m",
        "when": "2026-12-07 09:00:00",
        "warmup_fraction": 0.1,
        "sample_seconds": 3.0,
        "data": soak.length_stats(soak.build_soak_set(20)),
        "train": [
            {
                "batch": 1,
                "steps": 1000,
                "steps_done": 1000,
                "wall_s": 1845.0,
                "per_step": flat,
                "sampled": flat,
                "bench_command": "python bench/soak.py --skip-serve",
                "when": "2026-12-06 10:39:00",
            },
            {
                "batch": 8,
                "steps": 200,
                "steps_done": 200,
                "wall_s": 2400.0,
                "per_step": flat,
                "sampled": flat,
                "load_average": [2.0, 2.0, 2.0],
                **stamp,
            },
        ],
        "serve": None,
        "machine": {"cpu": {"model": "cpu", "flags": []}, "cpus": 2, "torch": "2", "threads": 2},
        "matmul_gflops": {"fp32": 1.0},
    }
    md = soak.markdown(report)
    assert "Measured 2026-12-06 10:39:00, by `python bench/soak.py --skip-serve`" in md
    assert (
        "Measured 2026-12-07 09:00:00, load average at its start [2.0, 2.0, 2.0], "
        "by `python bench/soak.py --only b8`" in md
    )
