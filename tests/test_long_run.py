"""benchmarks/long_run.py: the corpus packing (which files become documents, which are held out), the plan of
a call's seconds, the warm-up, a whole call on the CPU (corpus, kill, resume, report) and the reports of the
2026-12-06 archives (177M and 300M tokens)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "long_run.py"


def load_script():
    if "long_run" not in sys.modules:  # registered: the pack's worker processes find its functions by name
        spec = importlib.util.spec_from_file_location("long_run", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["long_run"] = module
        spec.loader.exec_module(module)
    return sys.modules["long_run"]


def make_tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    for i in range(6):
        (root / "pkg" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (i + 1))
    (root / "pkg" / "sub" / "README.md").write_text("# title\n\ntext\n")
    (root / "pkg" / "sub" / "api.h").write_text("int f(void);\n")
    (root / "pkg" / "copy.py").write_text((root / "pkg" / "m0.py").read_text())  # exact duplicate
    (root / "pkg" / "empty.txt").write_text("  \n")
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / "pkg" / "data.json").write_text("{}")  # not a text suffix
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "m1.py")  # the same file twice


def test_pack_corpus_keeps_unique_utf8_text_files_and_holds_out_the_first(tmp_path):
    long_run = load_script()
    make_tree(tmp_path / "root")
    out = tmp_path / "corpus.jsonl"
    info = long_run.pack_corpus([str(tmp_path / "root"), str(tmp_path / "missing")], out, eval_chars=40)
    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert info["files_found"] == 11  # 6 + README.md + api.h + copy.py + empty.txt + latin1.txt (link = m1.py)
    assert info["skipped"] == {"too_large": 0, "not_utf8": 1, "empty": 1, "duplicate": 1}
    assert info["documents"] == len(docs) == 8
    assert sorted(docs) == sorted([f"def f{i}():\n    return {i}\n" * (i + 1) for i in range(6)]
                                  + ["# title\n\ntext\n", "int f(void);\n"])
    assert info["roots"] == [str(tmp_path / "root")]
    # held out: the fewest leading documents that reach eval_chars
    lengths = [len(d) for d in docs]
    n = info["eval_docs"]
    assert sum(lengths[:n]) >= 40 > sum(lengths[:n - 1])
    assert info["eval_chars"] == sum(lengths[:n])
    # the order is a fixed shuffle: the same files give the same corpus
    again = tmp_path / "again.jsonl"
    long_run.pack_corpus([str(tmp_path / "root")], again, eval_chars=40)
    assert again.read_bytes() == out.read_bytes()


def test_pack_workers_write_the_same_corpus(tmp_path):
    long_run = load_script()
    make_tree(tmp_path / "root")
    for i in range(200):  # enough files for several chunks per worker
        (tmp_path / "root" / "pkg" / f"gen{i}.md").write_text(f"# doc {i}\n\n" + "text " * (i % 17 + 1))
    one, four = tmp_path / "one.jsonl", tmp_path / "four.jsonl"
    a = long_run.pack_corpus([str(tmp_path / "root")], one, eval_chars=300, workers=1)
    b = long_run.pack_corpus([str(tmp_path / "root")], four, eval_chars=300, workers=4)
    assert one.read_bytes() == four.read_bytes() and b["pack_workers"] == 4 and a["pack_workers"] == 1
    drop = ("pack_s", "walk_s", "pack_workers")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["documents"] == 208 and a["skipped"]["duplicate"] == 1


def test_plan_adds_up_and_names_the_steps_that_fit(capsys):
    long_run = load_script()
    plan = long_run.plan_budget(9200, "bitnet", "NVIDIA H100 80GB HBM3", corpus_reused=False, warmup=True,
                                kill_after=40, tokens_per_step=32768)
    parts = plan["parts_s"]
    assert plan["total_s"] == sum(parts.values()) and plan["tok_s"] == long_run.STEP_TOK_S["H100"]["bitnet"]
    assert parts["steps (9,200 at 653k tok/s)"] == 9200 * 32768 / 653_100
    assert parts["checkpoints (4)"] == 4 * long_run.COST_S["checkpoint"]
    bf16 = long_run.plan_budget(9200, "bf16", "NVIDIA H200", corpus_reused=True, warmup=False, kill_after=40,
                                tokens_per_step=32768, caches_warm=True)
    assert bf16["parts_s"]["corpus build"] == 0 and bf16["parts_s"]["quant stats (21)"] == 0
    long_run.print_plan(plan, budget_s=585, reserve_s=20, steps=9200, tokens_per_step=32768)
    out = capsys.readouterr().out
    over = plan["total_s"] - 565
    fits = 9200 - int(over / plan["step_s"]) - 1
    assert f"over by {over:.0f} s" in out and f"--steps {fits} would end it on schedule" in out
    long_run.print_plan(bf16, budget_s=585, reserve_s=20, steps=9200, tokens_per_step=32768)
    assert f"{565 - bf16['total_s']:.0f} s to spare: 9,200 steps = 301.5M tokens" in capsys.readouterr().out


def cpu_call(tmp_path: Path, kind: str, steps: int, *flags: str):
    """`long_run.py run` on the tiny model on the CPU over a small tree of text files, killed 4 steps past the
    boundary: (the process result, work dir, out dir, env)."""
    root = tmp_path / "root"
    make_tree(root)
    for i in range(30):
        (root / "pkg" / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(400)))
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "run", "--kind", kind, "--device", "cpu", "--preset", "tiny",
                        "--seq-len", "32", "--batch-size", "2", "--steps", str(steps), "--kill-after", "4",
                        "--log-interval", "2", "--eval-sequences", "2", "--roots", str(root), "--eval-chars", "3000",
                        "--work", str(work), "--out", str(out), "--workers", "2", "--budget-s", "500", *flags],
                       capture_output=True, text=True, env=env, timeout=600)
    return r, work, out, env


def test_a_whole_call_on_the_cpu_kills_resumes_and_reports(tmp_path):
    """The driver end to end on the tiny model: corpus, the kill past the boundary, --resume-from auto, the
    status of both legs, the archive, then `report` on that archive."""
    r, work, out, env = cpu_call(tmp_path, "bitnet", 40)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "plan (H100 rates" in r.stdout and "tokens reached: 2,560 of 2,560 planned (step 40 of 40)" in r.stdout
    summary = json.loads((work / "summary_bitnet.json").read_text())
    assert summary["tokens"] == 40 * 2 * 32 and summary["resumed_after_kill"] and summary["resume_step"] == 20
    assert 24 <= summary["killed_at_step"] < 40 and summary["run_dirs"] == ["long_bitnet", "long_bitnet_r20"]
    driver = json.loads((work / "driver_bitnet.json").read_text())
    assert driver["warmups"] == [] and driver["plan"]["total_s"] == sum(driver["plan"]["parts_s"].values())
    status = (work / "status_bitnet.txt").read_text()
    assert "(2 legs)" in status and "FINISHED" in status
    archive = out / "long_run_bitnet.tar.gz"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "driver_bitnet.json" in names and "runs/long_bitnet_r20/metrics/scalars.jsonl" in names
    assert not any(n.endswith(".pt") for n in names)
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "report", str(archive), "--json", str(report), "--png", "",
                        "--extract-dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(report.read_text())["runs"]["bitnet"]["tokens"] == 2560


def test_report_of_the_2026_12_06_archives_is_the_committed_json(tmp_path):
    """The report reads the archives of the 177M-token runs as it did: long_run.json comes out the same."""
    results = ROOT / "benchmarks" / "results"
    archives = [results / "2026-12-06" / f"long_run_{kind}.tar.gz" for kind in ("bitnet", "bf16")]
    out = tmp_path / "long_run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(SCRIPT), "report", *map(str, archives), "--json", str(out), "--png", "",
                        "--extract-dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == json.loads((results / "2026-12-06" / "long_run_177m.json").read_text())
    assert "eval gap bitnet vs bf16: +3.19% (goal: within 5%)" in r.stdout


def test_the_warm_up_runs_through_the_trainers_checks(tmp_path, monkeypatch):
    """The warm-up is a real trainer run: on 2026-12-06 (300M-token call) its two steps failed the stage-boundary
    check (exit 2), so the trainer compiled cold. It must exit 0 and leave the marker a later call reads."""
    import argparse

    long_run = load_script()
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(preset="tiny", device="cpu", batch_size=2, seq_len=32)
    warms = [long_run.start_warmup(args, tmp_path, kind) for kind in ("bitnet", "bf16")]
    done = [long_run.finish_warmup(w, 300, tmp_path) for w in warms]
    assert [d["rc"] for d in done] == [0, 0], [d["last_line"] for d in done]
    assert long_run.warm_marker(tmp_path, "bitnet").exists() and long_run.warm_marker(tmp_path, "bf16").exists()
    assert not any(w["runs"].exists() for w in warms)  # its run directory (checkpoints) is gone


def test_report_of_the_300m_token_archives_is_the_committed_json(tmp_path):
    """The 300M-token runs (2026-12-06, one H100): BitNet's guard-stopped leg was finished by hand from the
    guard's checkpoint; the report finds that third leg through its provenance and merges all three."""
    results = ROOT / "benchmarks" / "results"
    archives = [results / "2026-12-06-300m" / f"long_run_{kind}.tar.gz" for kind in ("bitnet", "bf16")]
    out = tmp_path / "long_run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(SCRIPT), "report", *map(str, archives), "--json", str(out), "--png", "",
                        "--extract-dir", str(tmp_path / "x"), "--leg-wall", "long_bitnet_r9106=21.2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got == json.loads((results / "long_run.json").read_text())
    bitnet = got["runs"]["bitnet"]
    assert bitnet["run_dirs"] == ["long_bitnet", "long_bitnet_r4580", "long_bitnet_r9106"]
    assert bitnet["untimed_legs"] == ["long_bitnet_r9106"] and bitnet["wall"]["legs_s"][2] == 21.2
    assert bitnet["steps"] == 9160 and bitnet["final_eval_step"] == 9160 and bitnet["resume_step"] == 4580
    assert [c["step"] for c in bitnet["curve"]] == sorted({c["step"] for c in bitnet["curve"]})  # no step twice
    assert "eval gap bitnet vs bf16: +2.46% (goal: within 5%)" in r.stdout
    for bad, message in (("long_bitnet_r4580=9", "--leg-wall long_bitnet_r4580: no leg of that run id was finished"),
                         ("long_bitnet_r9106=soon", "--leg-wall 'long_bitnet_r9106=soon': expected RUN_ID=SECONDS")):
        r = subprocess.run([sys.executable, str(SCRIPT), "report", str(archives[0]), "--json", str(tmp_path / "b.json"),
                            "--png", "", "--extract-dir", str(tmp_path / "y"), "--leg-wall", bad],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {message}"), r.stderr


def test_a_run_stopped_by_sigterm_is_finished_by_finish(tmp_path):
    """What the guard did to BitNet's 300M-token call, on schedule (--sigterm-at): the resumed trainer stops with
    a checkpoint, `run` says the run is not finished, and `finish` resumes it in a third, timed leg to its
    last step; a second `finish` has nothing to do, and one without a checkpoint to resume fails."""
    r, work, out, env = cpu_call(tmp_path, "bf16", 60, "--sigterm-at", "40")
    common = ["--work", str(work), "--out", str(out)]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stopped = json.loads((work / "summary_bf16.json").read_text())
    assert 40 <= stopped["steps"] < 60 and "--sigterm-at, SIGTERM at step" in r.stdout
    assert ("not finished: on the same machine, `PYTHONPATH=src python benchmarks/long_run.py finish --kind bf16 "
            f"--work {work}") in r.stdout
    r = subprocess.run([sys.executable, str(SCRIPT), "finish", "--kind", "bf16", *common],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = json.loads((work / "summary_bf16.json").read_text())
    assert done["steps"] == 60 and done["tokens"] == 60 * 2 * 32 and done["final_eval_step"] == 60
    assert done["run_dirs"] == ["long_bf16", "long_bf16_r30", f"long_bf16_r{stopped['steps']}"]
    assert done["untimed_legs"] == [] and len(done["wall"]["legs_s"]) == 3  # the finishing leg was timed
    assert [c["step"] for c in done["curve"]] == sorted({c["step"] for c in done["curve"]})
    assert "tokens reached: 3,840 of 3,840 planned (step 60 of 60)" in r.stdout and "(3 legs)" in r.stdout
    assert done["wall"]["driver_s"] > sum(done["wall"]["legs_s"][:2])  # run's call and finish's
    assert done["tok_s_sustained_incl_corpus_build"] < done["tok_s_sustained"]
    with tarfile.open(out / "long_run_bf16.tar.gz") as tar:
        assert f"runs/long_bf16_r{stopped['steps']}/metrics/scalars.jsonl" in tar.getnames()
    r = subprocess.run([sys.executable, str(SCRIPT), "finish", "--kind", "bf16", *common],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "nothing to finish: the bf16 run reached step 60 of 60" in r.stdout
    r = subprocess.run([sys.executable, str(SCRIPT), "finish", "--kind", "bitnet", *common],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "error: no bitnet run in" in r.stderr
    # the run cut short again, its checkpoints gone: the resume fails in setup, and finish says so
    driver = json.loads((work / "driver_bf16.json").read_text())
    (work / "driver_bf16.json").write_text(json.dumps({**driver, "steps_planned": 80}))
    for pt in (work / "runs").glob("long_bf16*/checkpoints"):
        shutil.rmtree(pt)
    r = subprocess.run([sys.executable, str(SCRIPT), "finish", "--kind", "bf16", *common],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "error: the resumed trainer exited 2" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "not finished: its last trainer exited 2" in r.stdout


@pytest.mark.parametrize("step", ["50", "100", "95", "7"])
def test_sigterm_at_outside_the_resumed_leg_is_refused_before_any_work(tmp_path, capsys, step):
    """100 steps resume at the boundary, step 50, and log every 10: a SIGTERM at or before the resume step would
    never fire in the resumed leg, one after its last row before the end (90) only at the end."""
    rc = load_script().main(["run", "--kind", "bf16", "--steps", "100", "--device", "cpu", "--work",
                             str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--sigterm-at", step])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        f"error: --sigterm-at {step} must fall in the resumed leg before its last log row: steps 51..90 (it resumes "
        f"at the stage boundary's checkpoint, step 50; rows every --log-interval 10)")
    assert not (tmp_path / "w" / "corpus").exists()


def test_a_leg_finished_by_hand_keeps_its_place_before_a_later_finish(tmp_path):
    """The guard stopped the resumed leg (r30); someone resumed it by hand (r45), which stopped early too; `finish`
    resumed that (r55). The hand leg goes between the driver's legs, not after the last one (where it was lost)."""
    lr = load_script()
    runs = tmp_path / "runs"

    def leg_dir(name, resumed_from=None, start=100.0):
        (runs / name / "meta").mkdir(parents=True)
        prov = {"start_time": start, "process_start_time": start - 5,
                "resumed_from": str(runs / resumed_from / "checkpoints" / "step_000010") if resumed_from else None}
        (runs / name / "meta" / "provenance.json").write_text(json.dumps(prov))
        (runs / name / "metrics").mkdir()
        (runs / name / "metrics" / "scalars.jsonl").write_text(json.dumps({"step": 1, "time": start + 7}) + "\n")

    leg_dir("long_bf16")
    leg_dir("long_bf16_r30", "long_bf16")
    leg_dir("long_bf16_r45", "long_bf16_r30", start=300.0)
    leg_dir("long_bf16_r55", "long_bf16_r45")
    leg_dir("long_bf16_r60", "long_bf16_r55", start=500.0)  # and one more by hand after the finish
    driver = [{"run_id": "long_bf16", "pid": 1}, {"run_id": None, "pid": 2}, {"run_id": "long_bf16_r30", "pid": 3},
              {"run_id": "long_bf16_r55", "pid": 4}]
    ordered = lr.with_finishing_legs(tmp_path, "bf16", driver)
    assert [leg["run_id"] for leg in ordered] == ["long_bf16", None, "long_bf16_r30", "long_bf16_r45",
                                                  "long_bf16_r55", "long_bf16_r60"]
    hand = ordered[3]
    assert hand["untimed"] and (hand["start"], hand["end"]) == (295.0, 307.0)  # process start to its last row
