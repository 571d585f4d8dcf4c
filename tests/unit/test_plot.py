"""`xtrainer plot`: a PNG of the loss / learning-rate / eval curves, for finished and in-progress runs."""

import json
import struct

import pytest

import xtrainer
from xtrainer.cli import main
from xtrainer.plotting import load_log_history, plot_training_curves

pytest.importorskip("matplotlib")


def _history(last_step: int) -> list[dict]:
    history = []
    for step in range(1, last_step + 1):
        history.append({"loss": 2.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3 * (1 - step / 20),
                        "epoch": step / 10, "step": step})
        if step % 4 == 0:
            history.append({"eval_loss": 2.2 / step, "eval_accuracy": step / 20, "eval_runtime": 0.1,
                            "eval_samples_per_second": 100.0, "epoch": step / 10, "step": step})
    return history


def _write_state(path, last_step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    xtrainer.TrainerState(global_step=last_step, log_history=_history(last_step)).save_to_json(str(path))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a complete file
    return struct.unpack(">II", data[16:24])


def test_finished_run_default_path(tmp_path):
    _write_state(tmp_path / "trainer_state.json", 20)
    _write_state(tmp_path / "checkpoint-8" / "trainer_state.json", 8)  # older: ignored
    assert main(["plot", str(tmp_path)]) == 0
    width, height = _png_size(tmp_path / "training_curves.png")
    # Loss, learning rate and eval_accuracy panels on a 2-column grid: wide, two rows.
    assert 1000 <= width <= 2000 and 600 <= height <= 1200
    history, source = load_log_history(str(tmp_path))
    assert source.endswith("trainer_state.json") and "checkpoint" not in source and history[-1]["step"] == 20


def test_in_progress_run_from_newest_checkpoint_and_dash_o(tmp_path, capsys):
    run = tmp_path / "run"
    _write_state(run / "checkpoint-4" / "trainer_state.json", 4)
    _write_state(run / "checkpoint-12" / "trainer_state.json", 12)
    (run / "tmp-checkpoint-16").mkdir()  # a save in progress: no state yet
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", str(run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _png_size(out)[0] > 500
    assert not (run / "training_curves.png").exists()
    history, source = load_log_history(str(run))
    assert "checkpoint-12" in source and history[-1]["step"] == 12


def test_in_progress_run_prefers_the_fresher_jsonl(tmp_path):
    _write_state(tmp_path / "checkpoint-4" / "trainer_state.json", 4)
    lines = [json.dumps(entry) for entry in _history(7)]
    (tmp_path / "log_history.jsonl").write_text("\n".join(lines) + '\n{"loss": 0.1, "st')  # torn last line
    history, source = load_log_history(str(tmp_path))
    assert source.endswith("log_history.jsonl") and history[-1]["step"] == 7
    path = plot_training_curves(str(tmp_path))
    assert _png_size(tmp_path / "training_curves.png")[1] > 300 and path.endswith("training_curves.png")


def test_errors_name_the_directory(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "trainer_state.json" in err and "log_history.jsonl" in err
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing"):
        plot_training_curves(str(missing))
    # A state with no curve yet (e.g. saved before the first log) is a clear error too.
    xtrainer.TrainerState(global_step=0, log_history=[]).save_to_json(str(empty / "trainer_state.json"))
    assert main(["plot", str(empty)]) == 1
    assert "holds no loss" in capsys.readouterr().err
