"""`agecls-eval` ensembles: several checkpoints (a list, or an Optuna study's best trials) scored as one model
by their mean class probabilities. The checkpoints are built untrained (seeded weights), so no test fits."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import mlflow
import optuna
import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.eval import main, parse_args
from agecls.data.bins import AgeBins
from agecls.data.synthetic import generate_synthetic
from agecls.evaluation.ensemble import (
    Member,
    collect,
    decide,
    decision_rule,
    ensemble_proba,
    member_outputs,
    study_members,
)
from agecls.evaluation.evaluate import EvalError, UsageError, evaluate
from agecls.tasks.heads import CoralHead, CornHead, LabelDistributionHead, RegressionHead
from agecls.tasks.module import FaceClassifier

N_FRESH = 48


def _module(seed: int, *overrides: str) -> FaceClassifier:
    """An untrained FAST-config classifier with seeded weights (task and data from `overrides`)."""
    cfg = compose_train([*FAST_OVERRIDES, "tracking.experiment=ensemble-src", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(seed)
    names = AgeBins.from_config(cfg.bins).labels
    if cfg.task.target == "multitask":
        from agecls.tasks.multitask import task_class_names

        names = task_class_names(cfg.task, names)
    elif cfg.task.target != "age":
        from agecls.tasks.multitask import attribute_classes

        names = attribute_classes(str(cfg.task.target), names)
    module = FaceClassifier(resolved, names, age_stats={"mean": 33.0, "std": 19.0})
    with torch.no_grad():  # untrained BatchNorm statistics would make every face alike
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _save(module: FaceClassifier, path: Path) -> Path:
    """`module` as a Lightning checkpoint file FaceClassifier.load_from_checkpoint reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def ckpts(output_dir, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints: a, b, c (age, classification head, other weights), a_copy (a's file again), and
    members that differ from a in one predicted-or-read thing each."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {name: _save(_module(seed), root / name / "best.ckpt") for seed, name in enumerate("abc")}
    made["a_copy"] = root / "a_copy" / "best.ckpt"
    made["a_copy"].parent.mkdir()
    shutil.copy(made["a"], made["a_copy"])
    made["size24"] = _save(_module(3, "data.image_size=24"), root / "size24" / "best.ckpt")
    made["four_bins"] = _save(_module(4, "bins=four"), root / "four_bins" / "best.ckpt")
    made["regression"] = _save(_module(5, "task.head=regression"), root / "regression" / "best.ckpt")
    made["regression2"] = _save(_module(6, "task.head=regression"), root / "regression2" / "best.ckpt")
    made["multi_a"] = _save(_module(7, "task=multitask"), root / "multi_a" / "best.ckpt")
    made["multi_b"] = _save(_module(8, "task=multitask"), root / "multi_b" / "best.ckpt")
    return made


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("fresh") / "faces", N_FRESH, seed=12)


def _eval(*args: str) -> dict:
    return evaluate(parse_args([*args, "tracking.enabled=false", "eval.batch_size=16"]))


def test_ensemble_proba_is_the_mean_of_the_members_probabilities():
    modules = [_module(seed, "task=multitask") for seed in range(3)]
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    got = ensemble_proba(modules, x)
    assert set(got) == {"age", "gender", "ethnicity"}
    for attr, proba in got.items():
        each = [m.predict_proba(x)[attr] for m in modules]
        assert torch.allclose(proba, (each[0] + each[1] + each[2]) / 3, atol=1e-6)
        assert torch.allclose(proba.sum(dim=1), torch.ones(5), atol=1e-5)
    assert not torch.equal(modules[0].predict_proba(x)["age"], modules[1].predict_proba(x)["age"])


def test_each_decision_rule_decodes_one_model_as_its_head_does():
    bins = AgeBins.named("seed7")
    logits = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)) * 3
    corn = CornHead(7)
    assert torch.equal(decide("ordinal_median", corn.proba(logits)), corn.decode(logits))
    coral = CoralHead(7)  # its initial biases are decreasing: rank-consistent
    raw = coral(logits[:, :1])
    assert torch.equal(decide("ordinal_median", coral.proba(raw)), coral.decode(raw))
    reg = RegressionHead(bins, 33.0, 19.0)
    years = reg.years(logits[:, :1])
    assert torch.equal(decide("mean_years", reg.proba(logits[:, :1]), years, reg), reg.decode(logits[:, :1]))
    ldl = LabelDistributionHead(bins)
    wide = torch.randn(64, ldl.out_features, generator=torch.Generator().manual_seed(2))
    assert torch.equal(decide("mean_years", ldl.proba(wide), ldl.years(wide), ldl), ldl.decode(wide))

    assert decision_rule([reg, ldl]) == "mean_years"
    assert decision_rule([corn, coral]) == "ordinal_median"
    assert decision_rule([corn, reg]) == "argmax"  # mixed kinds: the mean probabilities' argmax
    # Two regression members: the mean predicted age, binned (not a vote of their one-hot probabilities).
    other = (years + 25).clamp(0, 116)
    assert torch.equal(decide("mean_years", None, (years + other) / 2, reg), reg.to_bins((years + other) / 2))


def test_collect_scores_the_mean_probabilities_and_each_member_alone():
    modules = [_module(seed) for seed in range(3)]
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, 1, 32, 32, generator=g)
    y = torch.randint(0, 7, (20,), generator=g)
    members = [Member(Path(f"{i}.ckpt"), m) for i, m in enumerate(modules)]
    ens, each, rules = collect(members, [(x[:12], y[:12]), (x[12:], y[12:])], ["age"], "cpu")
    assert rules == {"age": "argmax"}
    assert torch.equal(ens["age"]["preds"], ensemble_proba(modules, x)["age"].argmax(dim=1))
    assert torch.equal(ens["age"]["labels"], y)
    for module, got in zip(modules, each, strict=True):
        assert torch.equal(got["age"]["preds"], module.predict(x)["age"])  # its own decoded class

    reg = [_module(seed, "task.head=regression") for seed in (5, 6)]
    years = torch.randint(0, 100, (20,), generator=g)
    targets = torch.stack(
        [torch.bucketize(years, torch.tensor([3, 7, 15, 31, 41, 66]), right=True), years], 1
    )
    ens, each, rules = collect(
        [Member(Path(f"r{i}"), m) for i, m in enumerate(reg)], [(x, targets)], ["age", "age_years"], "cpu"
    )
    mean_years = (reg[0].predict_years(x)["age"] + reg[1].predict_years(x)["age"]) / 2
    assert rules == {"age": "mean_years"}
    assert torch.allclose(ens["age"]["years"], mean_years)
    assert torch.equal(ens["age"]["preds"], reg[0].heads["age"].to_bins(mean_years))
    assert torch.equal(each[1]["age"]["preds"], reg[1].predict(x)["age"])
    assert torch.equal(ens["age"]["true_years"], years)
    assert set(member_outputs(reg[0], x)["age"]) == {"proba", "years"}


def test_an_ensemble_reports_its_members_beside_it_and_records_one_run(ckpts, fresh, output_dir):
    a, b, c = (str(ckpts[k]) for k in "abc")
    result = evaluate(parse_args([f"ckpt=[{a},{b},{c}]", f"data.root={fresh}", "eval.batch_size=16"]))
    alone = {k: _eval(f"ckpt={ckpts[k]}", f"data.root={fresh}") for k in "abc"}

    block = result["ensemble"]
    assert result["checkpoint"] == [str(Path(p).resolve()) for p in (a, b, c)]
    assert result["n_images"] == N_FRESH and sum(map(sum, result["confusion_matrix"])) == N_FRESH
    assert block["n_members"] == 3 and block["decision"] == {"age": "argmax"} and block["study"] is None
    assert [m["checkpoint"] for m in block["members"]] == result["checkpoint"]
    for member, key in zip(block["members"], "abc", strict=True):
        assert member["macro_f1"] == pytest.approx(alone[key]["macro_f1"])  # as scored alone
        assert member["acc"] == pytest.approx(alone[key]["acc"])
    assert block["macro_f1"] == result["macro_f1"]
    assert block["best_member_macro_f1"] == max(alone[k]["macro_f1"] for k in "abc")
    assert block["gain_over_best_member"] == pytest.approx(result["macro_f1"] - block["best_member_macro_f1"])

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "ensemble-src-eval"
    assert run.data.params["ensemble.n_members"] == "3"
    assert run.data.params["ckpt"] == ",".join(result["checkpoint"])
    assert run.data.tags["eval.members"].splitlines() == result["checkpoint"]
    assert run.data.metrics["eval/macro_f1"] == pytest.approx(result["macro_f1"])
    assert run.data.metrics["eval/member1/macro_f1"] == pytest.approx(alone["b"]["macro_f1"])


def test_identical_members_score_as_the_checkpoint_alone(ckpts, fresh):
    same = ("macro_f1", "acc", "confusion_matrix", "per_class", "class_names", "n_images")
    single = _eval(f"ckpt={ckpts['a']}", f"data.root={fresh}")
    assert "ensemble" not in single and single["checkpoint"] == str(ckpts["a"].resolve())
    twice = _eval(f"ckpt=[{ckpts['a']},{ckpts['a_copy']}]", f"data.root={fresh}")
    assert {k: twice[k] for k in same} == {k: single[k] for k in same}
    assert twice["ensemble"]["gain_over_best_member"] == 0.0
    listed_once = _eval(f"ckpt=[{ckpts['a']}]", f"data.root={fresh}")  # a list of one: the plain path
    assert listed_once == {**single, "seconds": listed_once["seconds"]}

    reg = _eval(f"ckpt=[{ckpts['regression']},{ckpts['regression2']}]", f"data.root={fresh}")
    assert reg["ensemble"]["decision"] == {"age": "mean_years"}
    assert "mae" in reg and all("mae" in m for m in reg["ensemble"]["members"])


def test_a_multitask_ensemble_scores_every_attribute(ckpts, fresh):
    result = _eval(f"ckpt=[{ckpts['multi_a']},{ckpts['multi_b']}]", f"data.root={fresh}")
    attrs = {"age", "gender", "ethnicity"}
    assert result["ensemble"]["decision"] == dict.fromkeys(["age", "gender", "ethnicity"], "argmax")
    assert set(result["attributes"]) == attrs and result["objective_attribute"] == "age"
    alone = _eval(f"ckpt={ckpts['multi_b']}", f"data.root={fresh}")
    member = result["ensemble"]["members"][1]
    assert set(member["attributes"]) == attrs
    for attr in attrs:
        assert member["attributes"][attr]["macro_f1"] == pytest.approx(alone["attributes"][attr]["macro_f1"])


def test_members_that_predict_differently_are_refused_naming_the_key(ckpts, fresh):
    a = ckpts["a"]
    cases = {
        "size24": r"data.image_size is 24 there and 32 in the first",
        "four_bins": r"class_names.age is \[.*\] there and \['0-2', '3-6'",
    }
    for key, message in cases.items():
        with pytest.raises(EvalError, match=message) as err:
            _eval(f"ckpt=[{a},{ckpts['b']},{ckpts[key]}]", f"data.root={fresh}")
        assert f"ensemble member {ckpts[key]} does not predict like the first member {a}" in str(err.value)


def test_bad_ensemble_arguments_exit_2_naming_the_problem(ckpts, tmp_path, output_dir, capsys):
    a = ckpts["a"]
    cases = [
        ([f"ckpt=[{a},{a}]", f"data.root={tmp_path}"], f"lists {a} more than once"),
        (
            [f"ckpt=[{a},{tmp_path / 'gone.ckpt'}]", f"data.root={tmp_path}"],
            "gone.ckpt: no such checkpoint file",
        ),
        (
            [f"ckpt={a}", "ensemble.study=s", f"data.root={tmp_path}"],
            "ckpt=... or ensemble.study=..., not both",
        ),
        (["ensemble.study=s", "ensemble.top_k=0", f"data.root={tmp_path}"], "ensemble.top_k=0: valid"),
        (["ensemble.study=s"], "data.root=... is required"),
        (
            ["ensemble.study=s", f"ensemble.storage=sqlite:///{tmp_path}/none.db", f"data.root={tmp_path}"],
            "none.db: no such Optuna storage",
        ),
        # the default storage: optuna.storage as agecls-train composes it (no such study there)
        (
            ["ensemble.study=nope", f"data.root={tmp_path}"],
            f"ensemble.storage=sqlite:///{output_dir}/optuna.db",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)


def _study(storage: str, name: str, direction: str, trials: list[tuple[str, float | None, str | None]]):
    """A study whose trials are (state, value, checkpoint user attribute)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    for state, value, ckpt in trials:
        attrs = {"checkpoint": ckpt, "mlflow_run_id": f"run-{ckpt}"} if ckpt else {}
        study.add_trial(
            create_trial(
                state=TrialState[state],
                value=value,
                params={"lr": 0.001},
                distributions={"lr": FloatDistribution(1e-4, 1e-2)},
                user_attrs={**attrs, "test/macro_f1": 0.99 if value == 0.2 else 0.1},  # never used
            )
        )
    return study


def test_study_top_k_picks_the_best_complete_trials_by_validation_value(ckpts, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    a, b, c = (str(ckpts[k]) for k in "abc")
    gone = str(tmp_path / "moved" / "best.ckpt")
    _study(
        storage,
        "maxi",
        "maximize",
        [
            ("COMPLETE", 0.4, a),
            ("COMPLETE", 0.2, gone),  # the best test score, the worst validation value
            ("PRUNED", None, None),
            ("COMPLETE", 0.6, c),
            ("FAIL", None, None),
            ("COMPLETE", 0.5, b),
        ],
    )
    _study(storage, "mini", "minimize", [("COMPLETE", 0.4, a), ("COMPLETE", 0.2, b), ("COMPLETE", 0.6, c)])

    top = study_members(storage, "maxi", 3)
    assert [(m.trial, m.value, str(m.checkpoint)) for m in top] == [(3, 0.6, c), (5, 0.5, b), (0, 0.4, a)]
    assert top[0].mlflow_run_id == f"run-{c}"
    assert [m.trial for m in study_members(storage, "mini", 2)] == [1, 0]  # lower is better there

    with pytest.raises(EvalError, match=rf"trial 1 of study 'maxi' .*its checkpoint {gone} is missing"):
        study_members(storage, "maxi", 4)
    with pytest.raises(UsageError, match=r"ensemble.top_k=5: study 'maxi' has only 4 COMPLETE trial\(s\)"):
        study_members(storage, "maxi", 5)
    with pytest.raises(
        UsageError, match=r"ensemble.study=maxx: no such study in .*; studies there: maxi, mini"
    ):
        study_members(storage, "maxx", 2)


def test_an_ensemble_of_a_studys_top_trials_scores_their_checkpoints(ckpts, fresh, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    _study(storage, "s", "maximize", [("COMPLETE", 0.7, str(ckpts["b"])), ("COMPLETE", 0.9, str(ckpts["c"]))])
    result = _eval(
        "ensemble.study=s", "ensemble.top_k=2", f"ensemble.storage={storage}", f"data.root={fresh}"
    )
    listed = _eval(f"ckpt=[{ckpts['c']},{ckpts['b']}]", f"data.root={fresh}")
    assert result["checkpoint"] == listed["checkpoint"]  # best first
    assert result["macro_f1"] == listed["macro_f1"]
    assert result["ensemble"]["study"] == {"name": "s", "storage": storage, "top_k": 2}
    assert [(m["trial"], m["value"]) for m in result["ensemble"]["members"]] == [(1, 0.9), (0, 0.7)]
    best = _eval("ensemble.study=s", "ensemble.top_k=1", f"ensemble.storage={storage}", f"data.root={fresh}")
    alone = _eval(f"ckpt={ckpts['c']}", f"data.root={fresh}")
    assert best["checkpoint"] == [alone["checkpoint"]] and best["ensemble"]["members"][0]["trial"] == 1
    assert best["macro_f1"] == alone["macro_f1"] and best["confusion_matrix"] == alone["confusion_matrix"]
