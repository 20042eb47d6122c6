"""Fault injection (issue 24): ``tailor run`` killed with SIGKILL at every boundary between two
stages, in the middle of distillation and in the middle of the evaluation, then run again; the
report, the registered version and the checkpoints equal an uninterrupted run's, and after every
kill nothing that a reader can see (a final name) is half-written.

No product hooks: the flow is the real command line in its own process group; the stage lines
it prints (``[k/N] <stage> ...``, ``tailor.common.console.Stages``) say where it is, and for the
two kills inside a stage the files it writes there do (a distillation's resume state after its
first optimiser step, ``distill.checkpoint_every=1``; the evaluation's stored answers).

Progressive, to stay cheap: one work folder; each run continues from what the killed runs left
and is killed one step further on, so every heavy stage is computed once, in the run after the
one killed at its start; the last run completes and one more is served from cache. An
uninterrupted run in a second work folder runs meanwhile, for the comparison.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tailor.store.digested import sha256_file

# The whole flow several times through Prefect and MLflow: the integration tier. The pyproject
# timeout (1200 s) is for one flow; this is fifteen of them, each bounded by RUN_TIMEOUT_S.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

PROFILE = "smoke"
SETTINGS = (
    # A resume state after every optimiser step, so a kill inside distillation has one to resume from.
    "distill.checkpoint_every=1",
    # "auto" picks the teacher's precision from a speed probe of this machine, taken per work folder:
    # two folders could then distil with different numerics; the comparison needs the same ones.
    "distill.teacher_dtype=float32",
)
RUN_TIMEOUT_S = 900  # one flow run, start to finish, on a busy 2-core machine
STAGE_LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+) (\.\.\.|done in)")
# Temporary names: checkpoint folders being written (write_checkpoint), files being written
# (write_file_atomically), damaged checkpoints being removed (_set_aside).
TEMPORARY = re.compile(r"\.partial|\.stale-")
HEAVY = (
    "materialize-model",
    "tokenise-corpus",
    "prune-model",
    "distill-model",
    "score-heldout-original",
    "score-heldout-pruned",
    "score-heldout-distilled",
    "evaluate-models",
    "measure-speed",
)


@dataclass(frozen=True)
class Kill:
    """Where a run is killed: as ``stage`` starts, or (``new_file``, a glob in the work folder)
    during ``stage``, as soon as such a file appears that was not there when the run started."""

    stage: str
    new_file: str | None = None

    def __str__(self) -> str:
        return f"{self.stage} (when {self.new_file} appears)" if self.new_file else f"start of {self.stage}"


@dataclass
class Run:
    """One ``tailor run`` process and what it printed (stdout and stderr, in order)."""

    proc: subprocess.Popen
    work: Path
    started: float
    lines: list[str] = field(default_factory=list)
    queue: queue.Queue = field(default_factory=queue.Queue)
    killed: bool = False
    ended: float | None = None  # when its output ended (it exited, or was killed)
    done: bool = False  # waited for, and its process group seen empty
    seconds: float = 0.0
    reader: threading.Thread | None = None

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def stage_lines(self) -> list[tuple[str, str]]:
        """(stage, "..." or "done in") of each stage line printed."""
        return [(m.group(3), m.group(4)) for m in map(STAGE_LINE.search, self.lines) if m]


class Flows:
    """Starts ``tailor run`` processes, each in a session (process group) of its own, and makes
    sure none outlives the test: every group is killed on the way out, whatever happened."""

    def __init__(self, data: Path):
        self.data = data
        self.tailor = shutil.which("tailor") or pytest.fail("the tailor command is not installed")
        self.runs: list[Run] = []

    def __enter__(self) -> Flows:
        return self

    def __exit__(self, *exc) -> None:
        # A run not followed to its end (a failed assertion, a timeout): its group is still ours
        # (its leader not yet waited for), so killing it by group id cannot hit anyone else.
        left = [run for run in self.runs if not run.done]
        for run in left:
            _kill_group(run.proc.pid)
        for run in left:
            try:
                run.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _wait_group_gone(run.proc.pid, 30)

    def start(self, work: Path, out: Path) -> Run:
        env = {
            **os.environ,
            # What `tailor run` chooses itself when no Prefect server is configured; explicit so
            # that a Prefect profile on this machine cannot point the runs elsewhere.
            "PREFECT_HOME": str(work / "prefect-home"),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PREFECT_API_URL", None)
        cmd = [self.tailor, "run", "--profile", PROFILE, "--out", str(out)]
        for setting in (f"work_dir={work}", f"data.data_dir={self.data}", *SETTINGS):
            cmd += ["--set", setting]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
            env=env,
            cwd=work.parent,
        )
        run = Run(proc, work, time.monotonic())
        self.runs.append(run)

        def read() -> None:
            for line in proc.stdout:
                run.queue.put(line)
            run.ended = time.monotonic()
            run.queue.put(None)

        run.reader = threading.Thread(target=read, daemon=True)
        run.reader.start()
        return run

    def watch(self, run: Run, kill: Kill | None = None) -> Run:
        """Follow ``run`` to its end, or kill its whole process group with SIGKILL at ``kill``."""
        deadline = run.started + RUN_TIMEOUT_S
        pattern = kill.new_file if kill else None
        there_before = set(run.work.glob(pattern)) if pattern else set()
        armed = False
        while True:
            try:
                line = run.queue.get(timeout=0.02)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                run.lines.append(line)
                m = STAGE_LINE.search(line)
                if kill and m and m.group(3) == kill.stage and m.group(4) == "...":
                    armed = True
            if kill and armed and (not pattern or set(run.work.glob(pattern)) - there_before):
                _kill_group(run.proc.pid)
                run.killed = True
                break
            if not line and time.monotonic() > deadline and run.proc.poll() is None:
                _kill_group(run.proc.pid)
                pytest.fail(f"tailor run did not finish in {RUN_TIMEOUT_S} s:\n{run.tail()}")
        run.proc.wait(timeout=60)
        run.reader.join(timeout=60)  # what it printed before it died is still in the pipe
        while (line := _next(run.queue)) is not None:
            run.lines.append(line)
        run.seconds = (run.ended or time.monotonic()) - run.started
        # Killed or finished, nothing of it is left running (its temporary Prefect server included).
        _wait_group_gone(run.proc.pid, 30)
        run.done = True
        return run


def _next(q: queue.Queue):
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes in process group ``pgid``, as ``pid command``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rfind(")")
        fields = text[comm_end + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(f"{stat.parent.name} {text[text.find('(') + 1 : comm_end]}")
    return members


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        _kill_group(pgid)
        pytest.fail(f"processes of a tailor run were left running: {left}")


# ---------------------------------------------------------------------------------------------
# What a reader can see


def _temporary(rel: Path) -> bool:
    return any(TEMPORARY.search(part) for part in rel.parts)


def assert_nothing_half_written(work: Path, out: Path, after: str) -> list[str]:
    """Every checkpoint folder with a final name is complete (its files hash to its FINGERPRINT),
    every JSON file with a final name parses (Prefect's cached results included), every token
    file matches its digest and every resume state loads: only temporary names may be
    incomplete. Returns the temporary names left, relative to ``work`` or ``out``."""
    import torch

    from tailor.store.checkpoint import FINGERPRINT_FILE, CheckpointRef

    problems, temporary = [], []
    checkpoints = work / "checkpoints"
    for entry in sorted(checkpoints.iterdir()) if checkpoints.is_dir() else []:
        if _temporary(Path(entry.name)):
            continue
        if entry.is_dir():
            stored = entry / FINGERPRINT_FILE
            if not stored.exists():
                problems.append(f"{entry.name}: a checkpoint folder under its final name without {FINGERPRINT_FILE}")
                continue
            try:
                CheckpointRef(str(entry), stored.read_text().strip()).verify(contents=True)
            except (OSError, RuntimeError) as exc:
                problems.append(f"{entry.name}: {exc}")
        elif entry.suffix == ".pt":  # a distillation's resume state
            try:
                torch.load(entry, weights_only=True)
            except Exception as exc:  # any failure to load is a torn file
                problems.append(f"{entry.name}: {type(exc).__name__}: {exc}")
    for root in (work, out):
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            rel = path.relative_to(root)
            if _temporary(rel):
                temporary.append(f"{root.name}/{rel}")
                continue
            if not path.is_file():
                continue
            result_record = path.parent == work / "prefect-home" / "storage" and not path.suffix
            if path.suffix == ".json" or result_record:
                try:
                    json.loads(path.read_text())
                except (ValueError, UnicodeDecodeError) as exc:
                    problems.append(f"{root.name}/{rel}: not whole JSON ({exc})")
            elif path.name.endswith(".safetensors.sha256"):
                data = path.with_name(path.name.removesuffix(".sha256"))
                if not data.exists() or sha256_file(data) != path.read_text().split()[0]:
                    problems.append(f"{root.name}/{rel}: its token file is missing or does not match it")
    assert not problems, f"after {after}, half-written files under final names:\n" + "\n".join(problems)
    return temporary


def checkpoint_fingerprints(work: Path) -> dict[str, str]:
    """{folder name: FINGERPRINT} of the complete checkpoints in a work folder."""
    folders = (work / "checkpoints").iterdir()
    return {
        f.name: (f / "FINGERPRINT").read_text().strip()
        for f in folders
        if f.is_dir() and not _temporary(Path(f.name)) and (f / "FINGERPRINT").exists()
    }


# ---------------------------------------------------------------------------------------------
# What must equal an uninterrupted run's


def deterministic_report(report: dict) -> dict:
    """report.json without what differs between two runs of the same inputs: timings and
    everything derived from them, run ids, paths, and how much work this run did itself."""
    r = copy.deepcopy(report)
    for key in ("stages", "mlflow", "flow_seconds_before_report", "speed_tie"):
        r.pop(key, None)
    r["config"].pop("work_dir")
    for model in r["models"].values():
        for key in ("run_times_s", "gen_time_mean_s", "gen_time_std_s", "tokens_per_s"):
            model.pop(key, None)
    for versus in r["vs_original"].values():
        for key in ("speedup", "speedup_ci95", "tokens_per_s_ratio"):
            versus.pop(key, None)
    r["checkpoints"] = {
        name: {"folder": Path(c["path"]).name, "fingerprint": c["fingerprint"]} for name, c in r["checkpoints"].items()
    }
    if r["pruning"].get("plot"):
        r["pruning"]["plot"] = Path(r["pruning"]["plot"]).name
    for key in ("train_seconds", "train_tokens_per_s", "resumed_at_step", "precision_probe"):
        r["distillation"].pop(key, None)
    # What this run scored itself (answers stored before a kill are not scored again) and, for
    # those models, the layers it shared while scoring them.
    r["evaluation"].pop("scored_requests")
    r["evaluation"].pop("trunk_depths")
    promotion = r.get("promotion")
    if promotion:
        # The gate's inputs hash and the speed criterion hold measured speeds.
        promotion.pop("time", None)
        promotion.pop("inputs", None)
        promotion["reasons"] = [x for x in promotion["reasons"] if "speed-up" not in x]
    return r


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'the killed runs' if key in a else 'the uninterrupted run'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} (killed runs) != {b!r} (uninterrupted)"]


def registry_state(work: Path, model_name: str) -> dict:
    """The registered versions of ``model_name`` in a work folder's MLflow store: their number,
    the challenger alias, the version's tags that depend only on the inputs, and the sha256 of
    the weights the registry holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{model_name}'")
    challenger = client.get_model_version_by_alias(model_name, "challenger")
    measured = ("speedup", "time", "record", "reasons", "parent_run_id")  # speeds, clocks, run ids
    tags = {k: v for k, v in challenger.tags.items() if not any(m in k for m in measured)}
    model_id = challenger.source.removeprefix("models:/")
    weights = sorted(p for d in (work / "mlartifacts").rglob(model_id) for p in d.rglob("*.safetensors"))
    assert weights, f"no registered weights for {challenger.source} under {work / 'mlartifacts'}"
    return {
        "versions": sorted(str(v.version) for v in versions),
        "challenger": str(challenger.version),
        "status": challenger.status,
        "tags": tags,
        "weights": {p.name: sha256_file(p) for p in weights},
    }


def prefect_task_states(work: Path) -> list[tuple[str, dict[str, str]]]:
    """Per flow run in the work folder's Prefect database (in the order they were created):
    (flow run state, {heavy stage: its task run's state})."""
    db = sqlite3.connect(work / "prefect-home" / "prefect.db")
    try:
        flow_runs = db.execute("SELECT id, state_name FROM flow_run ORDER BY created").fetchall()
        states = []
        for run_id, state in flow_runs:
            tasks = db.execute("SELECT name, state_name FROM task_run WHERE flow_run_id = ?", (run_id,)).fetchall()
            stages = {}
            for name, task_state in tasks:
                stage = next((h for h in HEAVY if name.startswith(h)), None)
                if stage:
                    stages[stage] = task_state
            states.append((state, stages))
        return states
    finally:
        db.close()


def printed_result(run: Run) -> dict:
    """The JSON `tailor run` prints last (its stdout; the stage lines are stderr)."""
    start = max(i for i, line in enumerate(run.lines) if line.rstrip() == "{")
    return json.JSONDecoder().raw_decode("".join(run.lines[start:]))[0]


# ---------------------------------------------------------------------------------------------


def kill_plan(stages: list[str]) -> list[Kill]:
    """The start of every stage but the first (the boundary after each stage), and inside
    distillation and inside the evaluation, in the order the flow reaches them."""
    plan = []
    for stage in stages[1:]:
        plan.append(Kill(stage))
        if stage == "distill":
            # After the first optimiser step's resume state is written, before the student is saved.
            plan.append(Kill(stage, "checkpoints/*.resume-*.pt"))
        elif stage == "evaluate":
            # After the scored answers are stored, before the per-model results are.
            plan.append(Kill(stage, "evals/answers/*.json"))
    assert {k.stage for k in plan if k.new_file} == {"distill", "evaluate"}, stages
    return plan


def compare_with_uninterrupted(
    killed: Path, killed_out: Path, whole: Path, whole_out: Path, model_name: str
) -> list[str]:
    """Everything that must equal the uninterrupted run's, as a list of failures (empty: all
    equal), so that one run of this long test names every difference at once."""
    failures = []
    killed_report = json.loads((killed_out / "report.json").read_text())
    whole_report = json.loads((whole_out / "report.json").read_text())

    # The report: every figure that depends only on the inputs is the uninterrupted run's.
    diff = differences(deterministic_report(killed_report), deterministic_report(whole_report))
    if diff:
        failures.append("report.json differs from the uninterrupted run's:\n  " + "\n  ".join(diff))
    # The kills inside the stages happened where meant: distillation resumed after its first
    # step; the evaluation kept answers stored before it was killed.
    resumed = (killed_report["distillation"]["resumed_at_step"], whole_report["distillation"]["resumed_at_step"])
    if resumed != (1, 0):
        failures.append(
            f"distillation resumed at step {resumed[0]} (killed runs), {resumed[1]} (uninterrupted); expected 1, 0"
        )
    scored, whole_scored = killed_report["evaluation"]["scored_requests"], whole_report["evaluation"]["scored_requests"]
    if not sum(scored.values()) < sum(whole_scored.values()):
        failures.append(f"the evaluation after the kill inside it scored everything again: {scored} vs {whole_scored}")

    # The registered version: one version, READY, holding the distilled weights, with the
    # uninterrupted run's tags (checkpoint fingerprint included) and weights.
    registry, whole_registry = registry_state(killed, model_name), registry_state(whole, model_name)
    if diff := differences(registry, whole_registry):
        failures.append("the registered version differs:\n  " + "\n  ".join(diff))
    if (registry["versions"], registry["status"]) != (["1"], "READY"):
        failures.append(f"registered versions {registry['versions']} ({registry['status']}); expected one, READY")
    distilled = killed_report["checkpoints"]["distilled"]
    if registry["tags"].get("checkpoint_fingerprint") != distilled["fingerprint"]:
        failures.append("the registered version's checkpoint_fingerprint tag is not the distilled checkpoint's")
    if registry["weights"].get("model.safetensors") != sha256_file(Path(distilled["path"]) / "model.safetensors"):
        failures.append("the registered weights are not the distilled checkpoint's")

    # The checkpoints: the same folders with the same fingerprints (each verified by contents
    # after every run), and no resume state left once distillation finished.
    ours, theirs = checkpoint_fingerprints(killed), checkpoint_fingerprints(whole)
    if diff := differences(ours, theirs):
        files = [
            f"{name}/{f.name}"
            for name in sorted(set(ours) & set(theirs))
            if ours[name] != theirs[name]
            for f in sorted((killed / "checkpoints" / name).iterdir())
            if f.name != "FINGERPRINT"
            and (
                not (whole / "checkpoints" / name / f.name).is_file()
                or sha256_file(f) != sha256_file(whole / "checkpoints" / name / f.name)
            )
        ]
        failures.append("checkpoint fingerprints differ:\n  " + "\n  ".join(diff) + f"\n  files that differ: {files}")
    if left := list(killed.glob("checkpoints/*.resume-*.pt")):
        failures.append(f"resume state left after distillation finished: {left}")

    # Progress was kept: every heavy stage was computed once, in the run after the one killed at
    # (or in) it, and served from cache by every later run; the last two runs computed none.
    flow_runs = prefect_task_states(killed)
    computed = {}
    for i, (_, tasks) in enumerate(flow_runs):
        for stage, state in tasks.items():
            if stage in computed and state != "Cached":
                failures.append(f"run {i + 1}: {stage} {state}, not Cached (computed in run {computed[stage] + 1})")
            elif stage not in computed and state == "Completed":
                computed[stage] = i
    if set(computed) != set(HEAVY):
        failures.append(f"heavy stages never computed: {sorted(set(HEAVY) - set(computed))}")
    for i, (state, tasks) in enumerate(flow_runs[-2:], len(flow_runs) - 1):
        if state != "Completed" or tasks != dict.fromkeys(HEAVY, "Cached"):
            failures.append(f"run {i}: {state}, stages {tasks}; expected Completed, every heavy stage Cached")
    return failures


def test_runs_killed_at_every_stage_boundary_end_where_an_uninterrupted_run_does(tmp_path, shared_data):
    from flows.tailor_flow import stage_names
    from tailor.config.settings import load_config

    began = time.monotonic()
    cfg = load_config(PROFILE, [*SETTINGS, f"data.data_dir={shared_data}"])
    stages = stage_names(cfg)
    plan = kill_plan(stages)
    killed_work, killed_out = tmp_path / "killed", tmp_path / "killed-out"
    whole_work, whole_out = tmp_path / "uninterrupted", tmp_path / "uninterrupted-out"
    killed_work.mkdir()
    whole_work.mkdir()
    timings, leftovers = [], {}

    with Flows(shared_data) as flows:
        uninterrupted = flows.start(whole_work, whole_out)  # meanwhile, in a folder of its own

        for kill in plan:
            run = flows.watch(flows.start(killed_work, killed_out), kill)
            timings.append((f"killed at {kill}", run.seconds))
            printed = run.stage_lines()
            assert run.killed, f"the run to be killed at {kill} ended first (exit {run.proc.returncode}):\n{run.tail()}"
            assert {m.group(2) for m in map(STAGE_LINE.search, run.lines) if m} == {str(len(stages))}, run.tail()
            # Killed where it was meant to be: the stage started and did not finish.
            assert (kill.stage, "...") in printed and (kill.stage, "done in") not in printed, (kill, printed)
            leftovers[str(kill)] = assert_nothing_half_written(killed_work, killed_out, f"a kill at {kill}")

        completed = flows.watch(flows.start(killed_work, killed_out))
        timings.append(("re-run to the end", completed.seconds))
        assert completed.proc.returncode == 0, completed.tail()
        # Each killed writer's temporary was removed by the next writer of its name.
        assert assert_nothing_half_written(killed_work, killed_out, "the completed re-run") == [], leftovers
        report_completed = deterministic_report(json.loads((killed_out / "report.json").read_text()))

        again = flows.watch(flows.start(killed_work, killed_out))
        timings.append(("second re-run", again.seconds))
        assert again.proc.returncode == 0, again.tail()
        assert_nothing_half_written(killed_work, killed_out, "the second re-run")

        flows.watch(uninterrupted)
        timings.append(("uninterrupted (alongside the first runs)", uninterrupted.seconds))
        assert uninterrupted.proc.returncode == 0, uninterrupted.tail()
        assert_nothing_half_written(whole_work, whole_out, "the uninterrupted run")

    print("\n" + "\n".join(f"{s:7.1f} s  {what}" for what, s in timings))
    print(f"{time.monotonic() - began:7.1f} s  in all")
    print("temporary names left after each kill:", json.dumps({k: v for k, v in leftovers.items() if v}, indent=1))

    model_name = cfg.tracking.registered_model
    failures = compare_with_uninterrupted(killed_work, killed_out, whole_work, whole_out, model_name)
    # Both re-runs report the registered version, and the second one the same report.
    for run in (completed, again):
        result = printed_result(run)
        if (result["registered_model"], str(result["version"])) != (model_name, "1"):
            failures.append(f"a re-run reported {result['registered_model']} version {result['version']}")
    if report_completed != deterministic_report(json.loads((killed_out / "report.json").read_text())):
        failures.append("the second re-run's report differs from the first completed re-run's")
    assert not failures, "\n".join(failures)
