"""Issue 26's input probes, run through train.py as a new user would, on the tiny fixture model: a data record
whose "answer" is null and a model whose chat template calls raise_exception or loops away each stop in one
line, before any answer is generated (the units: test_data.py, test_judge.py, test_model.py)."""
import json

import pytest

import data
import train
from conftest import tiny_flags
from test_model import RUNAWAY, model_with_template


def test_null_answer_stops_train_before_anything_is_written(tmp_path, tiny_model_dir):
    """`"answer": null` under --judge rule: one line naming file:line while the flags are checked; no run directory."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "What is 2 + 3?", "response": "5.", "answer": "5"},
        {"id": "b", "prompt": "What is None?", "response": "None.", "answer": None}]))
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"^train.py: --data {path}:2: 'answer' is null") as err:
        train.main(["--iter", "0", *tiny_flags(run, tiny_model_dir), "--data", str(path)])
    assert "\n" not in str(err.value) and not run.exists()


@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
     "the chat template cannot be rendered: it calls raise_exception: 'Conversation roles must alternate"),
    ("{% include 'default_system_prompt.jinja' %}", "it uses {% include %}, which is not allowed"),
    (RUNAWAY, "took over 0.5 s (a runaway loop?)"),
])
def test_bad_chat_template_stops_train_before_generation(tmp_path, tiny_model_dir, monkeypatch, template, reason):
    """train.py on a start model whose chat template raises, includes another template or loops away: one line
    naming the model directory when the tokenizer loads (train.main turns the ValueError into it), no answer
    generated, nothing of the iteration written, no hang."""
    monkeypatch.setattr(data, "CHAT_TEMPLATE_SECONDS", 0.5, raising=False)
    model_dir = model_with_template(tiny_model_dir, tmp_path, template)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        train.main(["--iter", "0", *tiny_flags(run, str(model_dir))])
    assert str(err.value).startswith(f"train.py: {model_dir}: ") and reason in str(err.value) and "\n" not in str(err.value)
    assert not (run / "iter0").exists()  # checked before config.json is written (train.main loads the tokenizer first)
