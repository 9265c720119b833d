"""``cptrain merge``: the interpolation of a run's start and final weights, its table and plot,
and the sibling runs drawn beside it. The runs merged are the reference runs of tests/conftest.py,
trained once per module."""

import json
import shutil

import pytest
import torch

from cptrain.errors import CheckpointError, ConfigError
from cptrain.merge import domains, parse_lambdas


def test_parse_lambdas_reads_a_comma_list_and_refuses_anything_else():
    assert parse_lambdas("0, 0.5,1,") == [0.0, 0.5, 1.0]
    assert parse_lambdas("-0.5,1.5") == [-0.5, 1.5]  # extrapolation is the user's to ask
    for bad in ("", ",", "a,b", "0,nan", "inf"):
        with pytest.raises(ConfigError, match="--lambdas"):
            parse_lambdas(bad)


def test_domains_are_the_eval_only_tasks_else_the_first_task():
    assert domains({"tasks": ["a", "b", "c"]}) == (["a"], ["b", "c"])
    assert domains({"tasks": ["a", "b"], "eval_only": ["z"]}) == (["z"], ["a", "b"])
    assert domains({"tasks": ["a"], "eval_only": []}) == (["a"], ["a"])


def test_merge_endpoints_reproduce_start_and_final_losses(reference, tmp_path):
    from cptrain import cli

    cfg, summary = reference("sequential")
    sibling, _ = reference("replay")
    run = tmp_path / "runs" / "seq"
    skip = shutil.ignore_patterns("checkpoints", "replay")
    shutil.copytree(cfg.run_dir, run, ignore=skip)
    shutil.copytree(sibling.run_dir, tmp_path / "runs" / "replay", ignore=skip)
    assert cli.main(["merge", str(run), "--lambdas", "0,0.5,1"]) == 0
    result = json.loads((run / "merge" / "merge.json").read_text())
    by = {r["lambda"]: r["val_loss"] for r in result["rows"]}
    assert by[0.0] == summary["loss_before"]
    assert [by[1.0][c] for c in result["columns"]] == summary["loss_matrix"][-1]
    assert (run / "merge" / "merge.png").stat().st_size > 0
    assert [s["run"] for s in result["siblings"]] == ["replay"]
    assert result["old_domain"] == ["email"] and result["new_domain"] == ["xml", "asyncio"]
    # a run from random weights: the table says λ = 0 holds no earlier knowledge
    assert result["from_scratch"] and "started from random weights" in (
        run / "merge" / "merge.md").read_text()


def test_merge_interior_lambdas_match_an_independent_interpolation(reference, tmp_path):
    """Each λ starts from the start weights, not from the previous λ's merge: λ = 0.5 after
    λ = 0.25 is the true midpoint (the endpoints alone cannot show this)."""
    from cptrain.evaluation.losses import evaluate_tasks
    from cptrain.merge import merge_losses
    from cptrain.models.build import load_pretrained, model_for_run
    from cptrain.train.data import TrainingData

    cfg, _ = reference("sequential")
    run = tmp_path / "seq"
    shutil.copytree(cfg.run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "replay"))
    got = {r["lambda"]: r["val_loss"] for r in merge_losses(run, [0.25, 0.5])["rows"]}
    data = TrainingData(cfg)
    start = model_for_run("tiny", None, data.vocab_size, seed=cfg.seed, seq_len=32)
    (final_dir,) = sorted((run / "models").glob("after_2_*"))
    final = dict(load_pretrained(final_dir).named_parameters())
    first = {n: p.detach().clone() for n, p in start.named_parameters()}
    for lam in (0.25, 0.5):
        with torch.no_grad():
            for n, p in start.named_parameters():
                p.copy_(first[n] + lam * (final[n].detach() - first[n]))
        want = evaluate_tasks(start, data.val_sets, window_len=data.window_len,
                              windows=cfg.eval.windows, batch_size=cfg.eval.batch_size)
        assert got[lam] == pytest.approx(want, abs=1e-5), lam


def test_merge_plots_only_siblings_of_the_same_start_and_checks_the_start(reference, tmp_path):
    import yaml

    from cptrain import cli

    cfg, _ = reference("sequential")
    sibling, _ = reference("replay")
    skip = shutil.ignore_patterns("checkpoints", "replay")
    run = tmp_path / "runs" / "seq"
    shutil.copytree(cfg.run_dir, run, ignore=skip)
    shutil.copytree(sibling.run_dir, tmp_path / "runs" / "replay", ignore=skip)
    unrelated = tmp_path / "runs" / "other-budget"
    shutil.copytree(sibling.run_dir, unrelated, ignore=skip)
    s = json.loads((unrelated / "summary.json").read_text())
    s["config"]["data"]["tokens_per_task"] *= 10  # same task names, another experiment
    (unrelated / "summary.json").write_text(json.dumps(s))
    assert cli.main(["merge", str(run), "--lambdas", "0.5"]) == 0
    result = json.loads((run / "merge" / "merge.json").read_text())
    assert [s["run"] for s in result["siblings"]] == ["replay"]
    assert [r["lambda"] for r in result["rows"]] == [0.5]
    # a start that is not the run's (here: another seed's initialisation) is refused
    c = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**c, "seed": 1}))
    with pytest.raises(CheckpointError, match=r"are not those .* started from: \w+ loss"):
        from cptrain.merge import merge_losses

        merge_losses(run, [0.5])
