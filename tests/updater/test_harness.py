"""The updater's test harness works end to end, and its models behave as their names say.

A real server process with the operator's keys published, a bundle pushed and signed into the image
targets, a device enrolled by the real CLI, an agent process serving v1 from its config and answering
inferences under load through a SIGKILL and a restart; and each test model, run by onnxruntime.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]
from updater._fleet import Fleet, models, wait_for

from edgefleet.agent.runtime import load_model
from edgefleet.agent.selftest import verify_bundle
from edgefleet.bundle import BundleReader, read_manifest
from edgefleet.errors import ModelError
from edgefleet.tufmeta import canonical_bytes


def test_every_model_has_the_same_interface_and_its_golden_self_test_says_what_its_kind_promises(
    update_models: dict[str, Path],
) -> None:
    expected_golden = {"good": True, "good2": True, "big": True, "slow": True, "errors_in_probation": True,
                       "bad_selftest": False}
    assert set(update_models) == set(expected_golden)
    for key, path in update_models.items():
        manifest = read_manifest(path)
        assert manifest.name == models.MODEL_NAME and path.name == f"digits-{manifest.version}.efb"
        assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [("x", "float32", [1, 64])], key
        assert [(t.name, t.dtype, t.shape) for t in manifest.outputs] == [("probs", "float32", [1, 10])], key
        report = verify_bundle(str(path))
        assert report["hashes"] == "ok", key
        assert report["golden"]["passed"] is expected_golden[key], (key, report["golden"])
    bad = verify_bundle(str(update_models["bad_selftest"]))["golden"]
    assert len(bad["failures"]) == models.GOLDEN and bad["max_abs_error"]["probs"] > 0.5  # every sample, far off


def test_good_versions_are_real_classifiers_with_different_weights_and_rebuild_to_the_same_bytes(
    update_models: dict[str, Path], tmp_path: Path
) -> None:
    v1, v2 = update_models["good"], update_models["good2"]
    assert models.accuracy(v1) > 0.85 and models.accuracy(v2) > 0.85
    x = models.sample_input(5)
    p1 = load_model(v1).predict({"x": x})["probs"]
    p2 = load_model(v2).predict({"x": x})["probs"]
    assert not np.allclose(p1, p2, atol=1e-3)
    assert np.isclose(p1.sum(), 1.0, atol=1e-5)
    again = models.bundle("good", "1.0.0", tmp_path)
    assert again.read_bytes() == v1.read_bytes()


def test_errors_in_probation_fails_in_onnxruntime_on_inputs_above_its_threshold_only(
    update_models: dict[str, Path],
) -> None:
    m = load_model(update_models["errors_in_probation"])
    good = load_model(update_models["good"])
    for i in range(20):  # every digit in [0, 1] passes
        m.predict({"x": models.sample_input(i)})
    with pytest.raises(ModelError, match="Gather"):
        m.predict({"x": models.failing_input()})
    good.predict({"x": models.failing_input()})  # the input itself is fine for the others


def test_slow_gives_good_outputs_with_big_matmuls_made_at_run_time_and_big_has_megabytes_of_weights(
    update_models: dict[str, Path], make_bundle: Callable[[str, str], Path]
) -> None:
    slow = update_models["slow"]
    version = read_manifest(slow).version
    good_same_version = make_bundle("good", version)
    x = models.sample_input(2)
    assert np.allclose(load_model(slow).predict({"x": x})["probs"],
                       load_model(good_same_version).predict({"x": x})["probs"], atol=1e-6)
    with BundleReader(slow) as r:
        graph = onnx.load_from_string(r.read("model.onnx")).graph
    assert sum(n.op_type == "MatMul" for n in graph.node) == 1 + models.MATMULS
    assert slow.stat().st_size < 100_000  # the matrices are made at run time, not stored
    assert update_models["big"].stat().st_size > 4_500_000


def test_wait_for_names_what_it_waited_for_with_the_last_error_and_the_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))

    def boom() -> bool:
        raise ConnectionError("refused")

    with pytest.raises(AssertionError) as e:
        wait_for(boom, 0.1, "the moon", [log])
    text = str(e.value)
    assert "the moon" in text and "ConnectionError: refused" in text and "line 99" in text
    assert "line 10\n" not in text  # only the tail


def test_a_fleet_serves_a_pushed_signed_bundle_to_an_enrolled_agent_that_survives_sigkill_under_load(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    # the operator's keys are published: the server serves the keyring's own root 1
    ours = (fleet.keys / "image" / "1.root.json").read_bytes()
    served = fleet.http.get("/tuf/image/1.root.json")
    assert served.status_code == 200
    assert canonical_bytes(Metadata[Root].from_bytes(served.content)) == ours

    # a bundle pushed is in the registry and signed into the image targets with its length and hash
    v1 = update_models["good"]
    pushed = fleet.push(v1)
    digest = hashlib.sha256(v1.read_bytes()).hexdigest()
    assert pushed["sha256"] == digest
    target = fleet.image_targets()[v1.name]
    assert (target.length, target.hashes["sha256"]) == (v1.stat().st_size, digest)

    # a device enrolled by the real CLI, running the real agent process with v1 from its config
    agent = fleet.agent(v1)
    assert agent.device_id and (agent.state_dir / "identity" / "identity.json").is_file()
    assert [d["id"] for d in fleet.cli("device", "list")] == [agent.device_id]
    assert fleet.events(agent.device_id) == []
    assert agent.served_version() == "1.0.0"
    expected = load_model(v1).predict({"x": models.sample_input(3)})["probs"]
    assert np.allclose(agent.probs(models.sample_input(3)), expected, atol=1e-6)
    assert agent.infer()["model_version"] == "1.0.0"

    # under load: SIGKILL (requests go unanswered), restart on the same port, answers again
    port = agent.port
    with agent.load(rate=50) as load:
        load.wait_answers(5)
        agent.kill()
        fleet.wait_for(lambda: load.unanswered(), 30, "a request sent while the agent is down")
        restarted = time.monotonic()
        agent.restart()
        load.wait_answers(5, after=restarted)
    assert agent.port == port and agent.starts == 2
    assert load.failures() == []  # every request was answered, or sent while nothing listened
    assert set(load.versions()) == {"1.0.0"}
    assert "=== start 2 ===" in agent.log.read_text()

    # assignments reach the server (a device with no agent running: this test leaves updates alone);
    # enrollment with the root file instead of a pin; upload without signing, sign, withdraw
    other = fleet.enroll(fleet.root / "devices" / "idle" / "state", trust="file")
    fleet.assign(other, "digits", "1.0.0")
    assert fleet.device(other)["desired"]["models"][0]["version"] == "1.0.0"
    v2 = update_models["good2"]
    fleet.push(v2, sign=False)
    assert v2.name not in fleet.image_targets()
    fleet.sign(v2)
    fleet.withdraw("digits", "1.0.0")
    assert set(fleet.image_targets()) == {v2.name}
    fleet.sign_targets(add=[v1])  # the harness's own signing, for targets the CLI would not sign
    assert set(fleet.image_targets()) == {v1.name, v2.name}

    # SIGTERM is a clean stop; close() leaves no process behind
    assert agent.stop() == 0
    agent.start()
    pids = [agent.pid, fleet.server.pid]
    fleet.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
