"""bench/harness.py's bookkeeping: parameter counts, FLOPs per token, notes kept across runs."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("bench_harness", os.path.join(ROOT, "bench", "harness.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_matches_the_transformers_model(harness, name):
    cfg = harness.CONFIGS[name]
    model = harness.hf_model(cfg)
    assert harness.param_count(cfg) == sum(p.numel() for p in model.parameters())
    # MaxText's convention: 6 FLOPs per parameter per token plus the attention term
    assert harness.flops_per_token(cfg) == 6 * harness.param_count(cfg) + 12 * cfg["layers"] * cfg["hidden"] * cfg["seq"]


def test_hand_written_notes_survive_a_rewrite(harness, tmp_path):
    path = tmp_path / "RESULTS.md"
    assert harness.kept_notes(str(path)) == []  # no earlier file
    path.write_text("# Benchmark results\n\n| a | b |\n\n## Notes (by hand)\n\n- profile: dots dominate\n")
    kept = harness.kept_notes(str(path))
    assert kept == ["", "## Notes (by hand)\n\n- profile: dots dominate"]
    path.write_text("# Benchmark results\n\nno notes here\n")
    assert harness.kept_notes(str(path)) == []


def test_timed_windows_follow_the_warm_up(harness):
    cfg = dict(warmup=3, steps=4)
    assert harness.total_steps(cfg) == 3 + harness.WINDOWS * 4
    starts = [s for s in range(1, harness.total_steps(cfg) + 1) if harness.is_window_start(s, cfg)]
    assert starts == [3 + 4 * i for i in range(harness.WINDOWS)]  # the last step ends a window, never starts one
