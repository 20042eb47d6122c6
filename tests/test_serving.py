"""The registered model is usable: it loads from the registry and answers over `mlflow models serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tailor.models.tiny import build_tiny_gemma3
from tailor.registry import tracking
from tailor.store.checkpoint import save_model, write_checkpoint

pytestmark = pytest.mark.integration
NAME = "tailor-serving-test"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_tokenizer):
    work = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    model = build_tiny_gemma3(tiny_tokenizer, num_layers=2)
    ref = write_checkpoint(work / "checkpoint", lambda tmp: save_model(model, tiny_tokenizer, tmp))
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "serving", work / "artifacts")
    run = tracking.start_run(client, exp, "register")
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    version = tracking.register_checkpoint(uri, run, ref.path, ref.fingerprint, NAME, "champion", {})
    tracking.end_run(client, run)
    # Registration must not leave this store as the process-wide default for later runs.
    assert {k: os.environ.get(k) for k in before} == before
    return uri, version


def test_registering_the_same_checkpoint_again_replaces_its_evaluation_tags(tmp_path, tiny_tokenizer):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = build_tiny_gemma3(tiny_tokenizer, num_layers=1)
    ref = write_checkpoint(tmp_path / "checkpoint", lambda tmp: save_model(model, tiny_tokenizer, tmp))
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "retag", tmp_path / "artifacts")
    first = {"tailor.acc.arc_easy": "0.5", "tailor.acc.hellaswag": "0.4", "tailor.promotion.decision": "promoted"}
    versions = []
    for tags in (first, {"tailor.acc.arc_easy": "0.6"}):
        run = tracking.start_run(client, exp, "register")
        versions.append(tracking.register_checkpoint(uri, run, ref.path, ref.fingerprint, "retag", "latest-eval", tags))
        tracking.end_run(client, run)
    assert versions[0] == versions[1]
    tags = client.get_model_version("retag", versions[1]).tags
    assert {k: v for k, v in tags.items() if k.startswith("tailor.")} == {"tailor.acc.arc_easy": "0.6"}
    assert tags["checkpoint_fingerprint"] == ref.fingerprint


def test_registered_version_has_a_signature_and_loads_and_generates(champion, monkeypatch):
    import mlflow

    uri, _ = champion
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature is not None and info.signature.params is not None
    assert "max_new_tokens" in [p.name for p in info.signature.params.params]
    assert info.saved_input_example_info is not None
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    out = pipe("The capital of", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("The capital of")


def test_mlflow_models_serve_answers_a_generation_request(champion, tmp_path):
    uri, _ = champion
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server not up after 240 s"
                time.sleep(1)
        body = json.dumps({"inputs": ["The capital of"], "params": {"max_new_tokens": 3}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 200
            predictions = json.loads(r.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert len(predictions) == 1 and predictions[0].startswith("The capital of")
