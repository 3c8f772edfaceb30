"""harness.py: a model path cannot smuggle extra lm-eval model_args; Table 1 columns average as App. C says."""
import pytest

import data
import eval as ev
import harness


@pytest.mark.parametrize("model", ["runs/a,trust_remote_code=True/model", "runs/a=b/model"])
def test_comma_or_equals_in_the_model_path_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="cannot carry a model path containing ',' or '='") as err:
        harness.benchmark_commands(model, "out")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="eval.py benchmarks: .*rename it"):
        ev.main(["benchmarks", model, "--dry-run", "--out-dir", str(tmp_path)])


def test_plain_model_path_is_one_model_arg():
    cmd = harness.benchmark_commands("runs/demo/iter2/model", "out")[0][1]
    assert cmd[cmd.index("--model_args") + 1] == "pretrained=runs/demo/iter2/model"


def test_arc_and_truthfulqa_average_as_the_paper_says(tmp_path):
    """App. C: ARC is the mean of easy and challenge (acc_norm), TruthfulQA the mean of mc1 and mc2, not the
    leaderboard's challenge-only / mc2-only; the columns come in Table 1's order."""
    results = {"arc": {"arc_challenge": {"acc,none": 0.1, "acc_norm,none": 0.58}, "arc_easy": {"acc_norm,none": 0.82}},
               "truthfulqa": {"truthfulqa_mc1": {"acc,none": 0.26}, "truthfulqa_mc2": {"acc,none": 0.42}}}
    for name, res in results.items():
        data.write_json(tmp_path / name / "m" / "results_1.json", {"results": res})
    row = harness.benchmark_table(tmp_path)
    assert list(row) == ["ARC", "TruthfulQA", "Winogrande", "GSM8K", "HellaSwag", "MMLU", "Average"]
    assert row["ARC"] == pytest.approx(0.70) and row["TruthfulQA"] == pytest.approx(0.34)
    assert row["Winogrande"] is None and row["Average"] is None
