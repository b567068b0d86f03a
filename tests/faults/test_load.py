"""Load: a 2,000-step tiny run (batch 1 x 16 tokens, byte vocabulary) checkpointing every 25 steps with
keep-last 2, SIGKILLed twice and resumed each time by the same `--resume-from auto --run-id L` line.

Every run directory's scalars hold exactly one row per step, none twice; the chain covers all steps;
where two runs of the chain both trained a step (between the checkpoint and the kill) they agree bit
for bit; checkpoint disk use stays bounded however long the run."""

from bitnet.run import checkpoint
from bitnet.run.directory import run_family
from tests.faults.harness import dir_bytes, logged_steps, losses, train
from tests.faults.scenarios import LOAD, LOAD_STEPS


def test_long_run_killed_twice_stays_bounded_and_never_logs_a_step_twice(scenario):
    r = scenario("load_chain")
    runs = r["runs"]
    assert all(s["returncode"] == -9 for s in r["stages"]), [s["stderr"] for s in r["stages"]]
    assert train(r["resume_flags"]) == 0  # the same command line a third time finishes the run
    chain = run_family(runs, "L")
    assert len(chain) == 3, chain
    chain.sort(key=lambda d: logged_steps(d)[0])

    ckpt_bytes = max(dir_bytes(d) for run in chain for _, d in checkpoint.list_checkpoints(run))
    first = 1
    for i, run in enumerate(chain):
        steps = logged_steps(run)
        assert steps == list(range(first, steps[-1] + 1)), f"{run.name}: duplicated or missing rows"
        if i + 1 < len(chain):
            # the next run starts right after the newest checkpoint this one had when it was killed
            resumed_at = logged_steps(chain[i + 1])[0] - 1
            assert resumed_at == r["stages"][i]["complete"][-1] and resumed_at % LOAD["checkpoint_interval"] == 0
            assert steps[-1] >= resumed_at  # steps after it (if any) were lost with the kill and redone
            mine, theirs = losses(run), losses(chain[i + 1])
            overlap = range(resumed_at + 1, steps[-1] + 1)
            assert [mine[s] for s in overlap] == [theirs[s] for s in overlap]
            first = resumed_at + 1
        # retention: keep-last 2 plus the milestones (0 of the fresh run, 999, 1000, 2000) this run reached, plus at most one
        # .tmp a kill left behind; never one directory per checkpoint taken (80 over the run)
        ckpt_dirs = list((run / "checkpoints").iterdir())
        milestones = [m for m in (999, 1000, LOAD_STEPS) if steps[0] <= m <= steps[-1]] + [0] * (i == 0)  # step 0: fresh run
        assert len(ckpt_dirs) <= LOAD["keep_last"] + len(milestones) + 1, sorted(d.name for d in ckpt_dirs)
        assert dir_bytes(run / "checkpoints") <= len(ckpt_dirs) * ckpt_bytes
    assert logged_steps(chain[-1])[-1] == LOAD_STEPS
