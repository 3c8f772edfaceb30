"""harness.py: a model path cannot smuggle extra lm-eval model_args."""
import pytest

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
