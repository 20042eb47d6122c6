"""Bad input fails in the CLI before any heavy work, naming the setting."""

import pytest

from tailor.cli import main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--profile", "nope"], "unknown profile 'nope'; allowed:"),
        (
            ["run", "--profile", "smoke", "--set", "prune.num_layers=4"],
            "prune.num_layers=4 not allowed for a 4-layer model; allowed: 1..3",
        ),
        (
            ["run", "--profile", "smoke", "--set", "prune.strategy=indices", "--set", "prune.indices=[0, 9]"],
            "prune.indices [9] out of range; allowed: 0..3",
        ),
        (
            ["run", "--profile", "smoke", "--set", "eval.tasks=[arc_easy, hellaswagg]"],
            "unknown lm-eval task 'hellaswagg'; close matches: hellaswag",
        ),
        (["run", "--profile", "smoke", "--set", "data.auto_pull=false"], "data.data_dir="),
        (
            [
                "run",
                "--profile",
                "smoke",
                "--set",
                "model.source=hf",
                "--set",
                "model.name_or_path=no-such-org/no-such-model",
            ],
            "model.name_or_path='no-such-org/no-such-model' is neither a local folder nor in the Hugging Face cache",
        ),
    ],
)
def test_bad_input_is_a_clear_error(argv, needle, capsys, tmp_path):
    code = main([*argv, "--set", f"work_dir={tmp_path}"] if "nope" not in argv else argv)
    assert code == 2
    assert needle in capsys.readouterr().err


def test_unreachable_tracking_server_fails_fast(capsys, tmp_path, unit_data):
    code = main(
        [
            "run",
            "--profile",
            "smoke",
            "--set",
            f"work_dir={tmp_path}",
            "--set",
            f"data.data_dir={unit_data}",
            "--set",
            "tracking.tracking_uri=http://127.0.0.1:9",
        ]
    )
    assert code == 2
    assert "MLflow tracking store 'http://127.0.0.1:9' is not reachable" in capsys.readouterr().err
