"""augment.mix (mixup / CutMix of training batches) and augment.tta (flip test-time augmentation): the mixing
maths, reproducibility, every head and multitask under mixing, TTA on every eval path, config errors, and
one short end-to-end run with both on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES, compose_train

from agecls.cli.args import UsageError
from agecls.data.batch_augment import MixSpec, cutmix_box, mix_batch, mix_spec, tta_mode
from agecls.tasks.classification import ETHNICITY_NAMES, GENDER_NAMES
from agecls.tasks.heads import AGE_HEADS
from agecls.tasks.module import FaceClassifier

AGE7 = ["0-2", "3-6", "7-14", "15-30", "31-40", "41-65", "66-116"]
NAMES = {"age": AGE7, "gender": list(GENDER_NAMES), "ethnicity": list(ETHNICITY_NAMES)}
EDGES = torch.tensor([3, 7, 15, 31, 41, 66])


def _module(*overrides: str, task: str = "age") -> FaceClassifier:
    cfg = OmegaConf.to_container(compose_train([*FAST_OVERRIDES, f"task={task}", *overrides]), resolve=True)
    names = NAMES if task == "multitask" else NAMES[task]
    return FaceClassifier(cfg, names, age_stats={"mean": 30.0, "std": 20.0})


def _batch(n: int = 8, *, multitask: bool = False, years: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=g)
    age_years = torch.randint(0, 100, (n,), generator=g)
    age = torch.bucketize(age_years, EDGES, right=True)
    if not multitask and not years:
        return x, age
    columns = [age]
    if multitask:
        ethnicity = torch.randint(0, 5, (n,), generator=g)
        ethnicity[:3] = -1  # three faces without ethnicity
        columns += [torch.randint(0, 2, (n,), generator=g), ethnicity]
    if years:
        columns.append(age_years)
    return x, torch.stack(columns, dim=1)


# ---- the mixing itself -------------------------------------------------------------------------------------


def test_mixup_blends_pairs_and_the_loss_is_the_lam_weighted_pair_of_losses():
    module = _module("augment.mix.mixup_alpha=0.4")
    x, y = _batch()
    torch.manual_seed(3)
    mixed, mix = mix_batch(x, module.mix)
    assert mix is not None and mix.kind == "mixup" and 0.0 <= mix.lam <= 1.0
    assert sorted(mix.perm.tolist()) == list(range(len(x)))
    assert torch.allclose(mixed, mix.lam * x + (1 - mix.lam) * x[mix.perm])
    out = module.outputs(mixed)
    total, parts = module.total_loss(out, module.targets(y), mix)
    head = module.heads["age"]
    expected = mix.lam * head.loss(out["age"], y) + (1 - mix.lam) * head.loss(out["age"], y[mix.perm])
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.equal(parts["age"]["labels"], y)  # training metrics score the faces' own labels


def test_cutmix_pastes_one_box_whose_area_is_one_minus_lam():
    n, h, w = 4, 20, 30
    x = torch.arange(n * h * w, dtype=torch.float32).reshape(n, 1, h, w)  # every pixel of every face differs
    spec = MixSpec(cutmix_alpha=1.0)
    checked = 0
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, mix = mix_batch(x, spec)
        assert mix is not None and mix.kind == "cutmix"
        for i in range(n):
            changed = (mixed[i] != x[i]).any(dim=0)
            j = int(mix.perm[i])
            if j == i:  # paired with itself: nothing changes
                assert not changed.any()
                continue
            area = int(changed.sum())
            assert area == pytest.approx((1 - mix.lam) * h * w, abs=1e-6)
            if area:
                rows, cols = changed.nonzero(as_tuple=True)  # one rectangle, taken from the partner
                assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                assert torch.equal(mixed[i][:, changed], x[j][:, changed])
                checked += 1
    assert checked > 20
    for lam in (0.0, 0.5, 1.0):  # the box is clipped to the image, so it is never larger than 1 - lam
        top, bottom, left, right = cutmix_box(h, w, lam)
        assert 0 <= top <= bottom <= h and 0 <= left <= right <= w
        assert (bottom - top) * (right - left) <= (1 - lam) * h * w + 1e-9


def test_prob_zero_never_mixes_and_mixing_off_draws_nothing():
    x, _ = _batch()
    for _ in range(50):
        out, mix = mix_batch(x, MixSpec(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0))
        assert mix is None and out is x
    torch.manual_seed(0)
    before = torch.get_rng_state()
    out, mix = mix_batch(x, MixSpec())
    assert mix is None and out is x and torch.equal(torch.get_rng_state(), before)


def test_switch_prob_picks_between_mixup_and_cutmix():
    x, _ = _batch()
    torch.manual_seed(0)
    kinds = [
        mix_batch(x, MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5))[1].kind for _ in range(60)
    ]
    assert 10 < kinds.count("cutmix") < 50
    assert {
        mix_batch(x, MixSpec(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=1.0))[1].kind for _ in range(10)
    } == {"cutmix"}


def test_mixing_is_reproducible_under_a_fixed_seed():
    module = _module("augment.mix.mixup_alpha=0.4", "augment.mix.cutmix_alpha=1.0")
    x, y = _batch()

    def step(seed: int) -> float:
        torch.manual_seed(seed)
        return float(module.training_step((x, y), 0).detach())

    module.log = lambda *a, **k: None  # no Trainer attached
    assert step(7) == step(7)
    assert step(7) != step(8)


# ---- every head and multitask under mixing -----------------------------------------------------------------


@pytest.mark.parametrize("head", AGE_HEADS)
def test_every_head_trains_a_mixed_step(head):
    years = head in ("regression", "label_distribution")
    module = _module(f"task.head={head}", "augment.mix.mixup_alpha=0.4", "augment.mix.cutmix_alpha=1.0")
    module.log = lambda *a, **k: None
    x, y = _batch(years=years)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    torch.manual_seed(0)
    loss = module.training_step((x, y), 0)
    assert loss.isfinite() and loss.requires_grad
    loss.backward()
    optimizer.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())


@pytest.mark.parametrize("head", ["classification", "regression"])
def test_multitask_mixing_counts_only_pairs_where_both_faces_have_the_attribute(head):
    years = head == "regression"
    module = _module(f"task.head={head}", "augment.mix.mixup_alpha=0.4", task="multitask")
    x, y = _batch(multitask=True, years=years)
    torch.manual_seed(1)
    mixed, mix = mix_batch(x, module.mix)
    targets = module.targets(y)
    out = module.outputs(mixed)
    total, parts = module.total_loss(out, targets, mix)
    assert total.isfinite()
    pairs = (targets["ethnicity"] >= 0) & (targets["ethnicity"][mix.perm] >= 0)
    assert len(parts["ethnicity"]["labels"]) == int(pairs.sum()) < len(x)
    assert len(parts["age"]["labels"]) == len(x) and len(parts["gender"]["labels"]) == len(x)
    head_e = module.heads["ethnicity"]
    eth = targets["ethnicity"]
    expected = mix.lam * head_e.loss(out["ethnicity"][pairs], eth[pairs]) + (1 - mix.lam) * head_e.loss(
        out["ethnicity"][pairs], eth[mix.perm][pairs]
    )
    assert float(parts["ethnicity"]["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # No pair with ethnicity on both sides: that attribute is left out, the others still train.
    y[:, 2] = torch.where(torch.arange(len(x)) % 2 == 0, -1, y[:, 2])
    perm = torch.arange(len(x)).roll(1)  # every face paired with a neighbour of the other parity
    _, parts = module.total_loss(out, module.targets(y), type(mix)(perm, 0.7, "mixup"))
    assert set(parts) == {"age", "gender"}


# ---- test-time augmentation --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", AGE_HEADS)
def test_flip_tta_averages_the_face_and_its_mirror_for_every_head(head):
    module = _module(f"task.head={head}", "augment.tta=flip")
    module.eval()
    x, _ = _batch()
    with torch.no_grad():
        got = module.outputs(x)["age"]
        module.tta = "none"
        plain, mirror = module.outputs(x)["age"], module.outputs(x.flip(-1))["age"]
        module.tta = "flip"
        assert torch.allclose(module.outputs(x.flip(-1))["age"], got, atol=1e-5)  # mirror-invariant
    h = module.heads["age"]
    if head in ("classification", "label_distribution"):  # mean probabilities
        assert torch.allclose(got.softmax(1), (plain.softmax(1) + mirror.softmax(1)) / 2, atol=1e-6)
    else:  # mean logits
        assert torch.allclose(got, (plain + mirror) / 2, atol=1e-5)
    if h.predicts_years:  # either way the predicted age is the mean of the two
        assert torch.allclose(h.years(got), (h.years(plain) + h.years(mirror)) / 2, atol=1e-3)
    assert torch.allclose(module.predict_proba(x)["age"], h.proba(got), atol=1e-6)
    assert torch.equal(module.predict(x)["age"], h.decode(got))


def test_tta_none_is_unchanged_and_training_is_never_flipped():
    module = _module("augment.tta=flip")
    x, _ = _batch()
    module.train()
    torch.manual_seed(0)  # the same dropout draws for both forwards
    got = module.outputs(x)["age"]
    torch.manual_seed(0)
    assert torch.equal(got, module.model(x))  # train mode: flip TTA does nothing
    module.tta = "none"
    module.eval()
    with torch.no_grad():
        plain = module.outputs(x)["age"]
        assert torch.equal(plain, module.model(x))  # none: the model's own logits
        module.tta = "flip"
        assert not torch.allclose(module.outputs(x)["age"], plain)


def test_every_eval_path_uses_tta():
    module = _module("augment.tta=flip", task="multitask")
    module.eval()
    x, y = _batch(multitask=True)
    with torch.no_grad():
        tta = module.outputs(x)
    expected = {a: module.heads[a].decode(o) for a, o in tta.items()}
    got = module.collect([(x, y)])
    for a in module.attributes:
        assert torch.equal(got[a]["preds"], expected[a])
        assert torch.equal(module.predict(x)[a], expected[a])
        assert torch.allclose(module.predict_proba(x)[a], module.heads[a].proba(tta[a]))
    calls = []
    module.log = lambda name, value, **k: calls.append((name, float(value)))
    with torch.no_grad():  # as Lightning runs it
        module.validation_step((x, y), 0)
    loss, _ = module.total_loss(tta, module.targets(y))
    assert dict(calls)["val/loss"] == pytest.approx(float(loss), rel=1e-6)


def test_a_saved_checkpoint_keeps_its_tta_and_an_old_one_has_none(tmp_path):
    import lightning as L

    module = _module("augment.tta=flip", "augment.mix.mixup_alpha=0.2")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = FaceClassifier.load_from_checkpoint(path, map_location="cpu")
    assert loaded.tta == "flip" and loaded.mix.mixup_alpha == 0.2
    # A checkpoint from before these keys: its augment node lacks them, both levers are off.
    cfg = OmegaConf.to_container(compose_train([*FAST_OVERRIDES]), resolve=True)
    del cfg["augment"]["mix"], cfg["augment"]["tta"]
    old = FaceClassifier(cfg, AGE7)
    assert old.tta == "none" and not old.mix.enabled
    del cfg["augment"]
    assert FaceClassifier(cfg, AGE7).tta == "none"


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["none", "seed", "strong", "strong_device"])
def test_every_augment_file_ships_both_levers_off(name):
    cfg = compose_train([f"augment={name}"])
    assert mix_spec(cfg.augment) == MixSpec() and tta_mode(cfg.augment) == "none"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("augment.mix.mixup_alpha=-0.1", r"augment\.mix\.mixup_alpha=-0\.1; valid: a number >= 0"),
        ("augment.mix.cutmix_alpha=-1", r"augment\.mix\.cutmix_alpha=-1; valid: a number >= 0"),
        ("augment.mix.prob=1.5", r"augment\.mix\.prob=1\.5; valid: a probability between 0 and 1"),
        ("augment.mix.switch_prob=-0.2", r"augment\.mix\.switch_prob=-0\.2; valid: a probability"),
        ("augment.mix.prob=often", r"augment\.mix\.prob='often'"),
        (
            "+augment.mix.mixup_alhpa=0.2",
            r"augment\.mix\.mixup_alhpa is not a key \(did you mean mixup_alpha",
        ),
        ("augment.mix=0.2", r"augment\.mix=0\.2; valid: a mapping with keys mixup_alpha, cutmix_alpha"),
        ("augment.tta=hflip", r"augment\.tta='hflip'; valid: none, flip, auto"),
    ],
)
def test_bad_keys_raise_naming_the_key_when_the_module_is_built(override, match):
    with pytest.raises(ValueError, match=match):
        _module(override)


def test_sweep_overrides_of_the_new_keys_compose():
    cfg = compose_train(["sweep=optuna_augment"])
    params = dict(cfg.optuna.params)
    assert "augment.mix.mixup_alpha" in params and "augment.tta" in params
    cfg = compose_train(["augment=strong", "augment.mix.cutmix_alpha=1.0", "augment.tta=flip"])
    assert mix_spec(cfg.augment).cutmix_alpha == 1.0 and tta_mode(cfg.augment) == "flip"


# ---- augment.tta=auto: chosen on validation after the fit -----------------------------------------------


class _Rec:
    def __init__(self):
        self.tags_, self.metrics_ = {}, {}

    def tags(self, d):
        self.tags_.update(d)

    def metrics(self, d):
        self.metrics_.update(d)


class _Val:
    def eval_dataloader(self, split):
        assert split == "val"  # never test
        return "loader"


def _auto_module(flip_helps: bool | None):
    """An auto-TTA gender module whose validation predictions are right on 9 of 10 faces with flip and on 6
    without (`flip_helps` False: the other way round; None: equal)."""
    module = _module("augment.tta=auto", task="gender")
    labels = torch.tensor([0, 1] * 5)

    def collect(loader):
        good = 7 if flip_helps is None else 9 if (module.tta == "flip") == flip_helps else 6
        preds = labels.clone()
        preds[good:] = 1 - preds[good:]
        return {"gender": {"preds": preds, "labels": labels}}

    module.collect = collect
    return module


def test_auto_starts_without_tta_and_is_not_a_mode_of_a_model():
    module = _module("augment.tta=auto")
    assert module.tta_auto and module.tta == "none"
    with pytest.raises(ValueError, match=r"augment\.tta='auto'; valid: none, flip$"):
        module.tta = "auto"
    assert not _module("augment.tta=flip").tta_auto


@pytest.mark.parametrize(("flip_helps", "chosen"), [(True, "flip"), (False, "none"), (None, "none")])
def test_choose_tta_keeps_the_better_mode_on_validation_and_writes_it_into_the_checkpoint(
    tmp_path, flip_helps, chosen
):
    from agecls.evaluation.splits import choose_tta

    module = _auto_module(flip_helps)
    best = tmp_path / "best.ckpt"
    state = {"hyper_parameters": {"cfg": {"augment": {"tta": "auto"}}}, "state_dict": {}}
    torch.save(state, best)
    rec = _Rec()
    got = choose_tta(module, _Val(), str(best), state, rec)
    assert got["chosen"] == chosen and module.tta == chosen
    assert set(got["val_macro_f1"]) == {"none", "flip"}
    # the chosen mode's validation predictions come back for evaluate_splits to reuse
    assert got["val_predicted"]["gender"]["preds"].eq(got["val_predicted"]["gender"]["labels"]).sum() == (
        7 if flip_helps is None else 9
    )
    if flip_helps is None:
        assert got["val_macro_f1"]["none"] == got["val_macro_f1"]["flip"]  # a tie keeps the cheaper none
    saved = torch.load(best, weights_only=False)
    assert saved["hyper_parameters"]["cfg"]["augment"]["tta"] == chosen
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind
    assert rec.tags_ == {"augment.tta_chosen": chosen}
    assert set(rec.metrics_) == {"tta_val/none/macro_f1", "tta_val/flip/macro_f1"}


# ---- end to end --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_mixing_and_flip_tta_trains_and_its_checkpoint_keeps_tta(
    output_dir, tmp_path, monkeypatch
):
    from agecls.cli.eval import parse_args
    from agecls.data.synthetic import generate_synthetic
    from agecls.evaluation.evaluate import evaluate
    from agecls.serving.predict import attribute_probs
    from agecls.training.train import train

    overrides = [
        *FAST_OVERRIDES,
        "data.synthetic.n=200",
        "trainer.max_epochs=2",
        "task=gender",
        "augment.mix.mixup_alpha=0.4",
        "augment.mix.cutmix_alpha=1.0",
        "augment.tta=flip",
        "tracking.experiment=mix-tta",
    ]
    results = train(compose_train(overrides))
    assert 0.0 <= results["test/macro_f1"] <= 1.0
    assert results["objective"] == pytest.approx(results["best_val/macro_f1"], abs=1e-6)
    model = FaceClassifier.load_from_checkpoint(Path(results["checkpoint"]), map_location="cpu")
    assert model.tta == "flip" and model.mix.cutmix_alpha == 1.0
    x = torch.rand(3, 1, 32, 32)
    probs = attribute_probs(model, x)["gender"]  # agecls-predict's path
    assert torch.allclose(probs, attribute_probs(model, x.flip(-1))["gender"], atol=1e-5)

    # agecls-eval loads the checkpoint and predicts through `outputs` in eval mode with its flip TTA.
    seen = []
    original = FaceClassifier.outputs

    def spy(self, x):
        seen.append((self.tta, self.training))
        return original(self, x)

    monkeypatch.setattr(FaceClassifier, "outputs", spy)
    folder = generate_synthetic(tmp_path / "faces", 24, seed=5)
    ckpt = results["checkpoint"]
    result = evaluate(parse_args([f"ckpt={ckpt}", f"data.root={folder}", "tracking.enabled=false"]))
    assert sum(map(sum, result["confusion_matrix"])) == 24
    assert seen and set(seen) == {("flip", False)}
    assert result["tta"] == "flip"

    # eval.tta overrides the checkpoint's choice for this evaluation (e.g. to measure what TTA adds).
    seen.clear()
    args = [f"ckpt={ckpt}", f"data.root={folder}", "tracking.enabled=false", "eval.tta=none"]
    assert evaluate(parse_args(args))["tta"] == "none"
    assert seen and set(seen) == {("none", False)}
    with pytest.raises(UsageError, match=r"eval\.tta='mirror'; valid: none, flip"):
        evaluate(parse_args([*args[:3], "eval.tta=mirror"]))


@pytest.mark.slow
def test_a_run_with_auto_tta_chooses_on_validation_and_writes_face_level_predictions(output_dir, monkeypatch):
    import pandas as pd

    from agecls.training.train import train

    calls = []
    original = FaceClassifier.collect

    def counting(self, loader):
        calls.append(self.tta)
        return original(self, loader)

    monkeypatch.setattr(FaceClassifier, "collect", counting)
    overrides = [*FAST_OVERRIDES, "trainer.max_epochs=2", "task=gender", "augment.tta=auto"]
    results = train(compose_train([*overrides, "tracking.experiment=tta-auto"]))
    tta = results["tta"]
    assert set(tta) == {"chosen", "val_macro_f1"}
    # validation none + flip, then train and test in the chosen mode: the chosen mode's validation
    # predictions are reused, not made a third time
    assert calls == ["none", "flip", tta["chosen"], tta["chosen"]]
    assert tta["chosen"] in ("none", "flip")
    # The reported validation score is the chosen mode's, and the run's objective follows it.
    assert results["best_val/macro_f1"] == pytest.approx(tta["val_macro_f1"][tta["chosen"]], abs=1e-6)
    assert results["objective"] >= tta["val_macro_f1"]["none"] - 1e-6
    model = FaceClassifier.load_from_checkpoint(Path(results["checkpoint"]), map_location="cpu")
    assert model.tta == tta["chosen"] and not model.tta_auto
    # predictions_{val,test}.csv: one line per face of the split, agreeing with the confusion matrices.
    run_dir = Path(results["run_dir"])
    for split in ("val", "test"):
        table = pd.read_csv(run_dir / f"predictions_{split}.csv")
        assert list(table.columns) == ["row", "path", "label", "pred", "p_male", "p_female"]
        assert len(table) == results["data_sizes"][split] and table["row"].is_unique
        proba = table[["p_male", "p_female"]].to_numpy()
        assert abs(proba.sum(axis=1) - 1).max() < 1e-4 and (proba.argmax(axis=1) == table["pred"]).all()
        cm = torch.zeros(2, 2, dtype=torch.long)
        for label, pred in zip(table["label"], table["pred"], strict=True):
            cm[label, pred] += 1
        assert cm.tolist() == results[f"confusion_{split}"]
    assert not (run_dir / "predictions_train.csv").exists()
