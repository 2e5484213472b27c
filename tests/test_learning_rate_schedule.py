"""The learning-rate schedule of training.train (--warm-up, --decay): its values, its checks, that
a run trains and resumes with it, and that weights.json records it."""

import json
import math

import pytest

from training.train import parse_args, scheduled_learning_rate

REQUIRED = ["--stage", "segmentation", "--run", "r"]


def test_warm_up_rises_linearly_to_the_rate_then_holds_it():
    rates = [scheduled_learning_rate(step, 1e-4, warm_up=4) for step in range(6)]
    assert rates == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])


def test_decay_is_a_half_cosine_from_the_rate_to_the_final_rate():
    def rate(step):
        return scheduled_learning_rate(step, 1e-4, warm_up=0, decay=(100, 300), final_rate=1e-6)

    assert rate(0) == rate(99) == rate(100) == 1e-4
    assert rate(200) == pytest.approx(0.5 * (1e-4 + 1e-6))  # half way down
    assert rate(150) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert rate(300) == rate(5000) == 1e-6
    falling = [rate(step) for step in range(100, 301)]
    assert all(a > b for a, b in zip(falling, falling[1:]))


def test_without_a_schedule_the_rate_is_constant():
    assert {scheduled_learning_rate(step, 3e-4) for step in (0, 1, 10_000)} == {3e-4}


@pytest.mark.parametrize("extra, message", [
    (["--decay", "10", "20"], "--decay and --final-learning-rate go together"),
    (["--final-learning-rate", "1e-6"], "--decay and --final-learning-rate go together"),
    (["--decay", "20", "20", "--final-learning-rate", "1e-6"], "--decay 20 20: needs"),
    (["--warm-up", "50", "--decay", "10", "100", "--final-learning-rate", "1e-6"],
     "--decay 10 100: needs --warm-up (50) <= FROM < TO"),
    (["--warm-up", "-1"], "--warm-up: -1 iterations, must be >= 0"),
    (["--decay", "10", "20", "--final-learning-rate=-1e-6"],
     "--final-learning-rate: -1e-06, must be >= 0"),
])
def test_inconsistent_schedules_are_refused(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + extra)
    assert message in capsys.readouterr().err
    parse_args(REQUIRED + ["--warm-up", "10", "--decay", "10", "20",
                           "--final-learning-rate", "0"])  # the consistent neighbour is taken


def test_a_scheduled_run_resumes_on_its_schedule_and_is_recorded(tmp_path):
    """Two processes, the second resumed from the first's checkpoint: the optimizer ends at the
    rate the schedule gives the last step, and weights.json records warm-up and decay."""
    import tensorflow as tf

    from training.provenance import run_summary
    from training.train import main

    run = tmp_path / "run"
    common = ["--stage", "segmentation", "--run", str(run), "--generated", "2",
              "--generated-size", "64", "--validation", "0", "--crop-size", "32", "32", "32",
              "--checkpoint-every", "1", "--precision", "float32", "--workers", "1",
              "--learning-rate", "1e-3", "--warm-up", "2", "--decay", "2", "5",
              "--final-learning-rate", "1e-5"]
    main(common + ["--iterations", "2"])
    main(common + ["--iterations", "4"])
    reader = tf.train.load_checkpoint(str(run / "checkpoints"))
    names = [name for name in reader.get_variable_to_shape_map()
             if name.startswith("optimizer/") and "learning_rate" in name]
    assert len(names) == 1
    expected = scheduled_learning_rate(3, 1e-3, 2, (2, 5), 1e-5)
    assert expected not in (1e-3, 1e-5)
    assert float(reader.get_tensor(names[0])) == pytest.approx(expected, rel=1e-6)
    summary = run_summary(run)
    assert summary["iterations"] == 4
    assert summary["warm_up_iterations"] == 2
    assert summary["learning_rate_decay"] == {"cosine_from_iteration": 2, "to_iteration": 5,
                                              "final_learning_rate": 1e-5}
    assert json.loads((run / "args.json").read_text())["decay"] == [2, 5]


def test_a_run_at_one_rate_records_no_schedule(tmp_path):
    from training.provenance import learning_rate_schedule

    assert learning_rate_schedule({"learning_rate": 1e-4}) == {}  # an args.json older than both
    assert learning_rate_schedule({"learning_rate": 1e-4, "warm_up": 0, "decay": None,
                                   "final_learning_rate": None}) == {}
