"""data=manifest: a run trains on exactly someone else's split CSV (no rescan, no re-split)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf
from tests.conftest import FAST_OVERRIDES

import agecls.training.train as train_mod
from agecls.data.manifest import ManifestError, load_manifest
from agecls.data.prepare import prepare_data
from agecls.data.records import DataError
from agecls.data.synthetic import MARKER_NAME, generate_synthetic

# FAST_OVERRIDES without the synthetic generator's keys (data=manifest has no data.synthetic).
FAST = [o for o in FAST_OVERRIDES if not o.startswith("data.synthetic.")]


@pytest.fixture(scope="module")
def split_csv(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A generated folder and a deliberately unusual split of it: 50/20/30 by name, no sha1 column."""
    base = tmp_path_factory.mktemp("external")
    faces = generate_synthetic(base / "faces", 240, seed=7)
    names = sorted(p.name for p in faces.iterdir() if p.name != MARKER_NAME)
    split = ["train" if i % 10 < 5 else "val" if i % 10 < 7 else "test" for i in range(len(names))]
    labels = [n.split("_")[:3] for n in names]
    table = pd.DataFrame(
        {
            "split": split,  # columns in another order than agecls writes them
            "path": names,
            "age": [a for a, _, _ in labels],
            "gender": [g for _, g, _ in labels],
            "ethnicity": [e for _, _, e in labels],
        }
    )
    csv = base / "my_split.csv"
    table.to_csv(csv, index=False)
    return csv, faces, table


def test_a_run_trains_on_exactly_the_imported_split(split_csv, compose_cfg, output_dir, monkeypatch):
    csv, faces, table = split_csv
    seen = []

    class Recording(train_mod.FaceDataModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(train_mod, "FaceDataModule", Recording)
    cfg = compose_cfg(
        [
            *FAST,
            "data=manifest",
            f"data.path={csv}",
            f"data.root={faces}",
            "trainer.max_epochs=1",
            "tracking.experiment=manifest-import",
        ]
    )
    results = train_mod.train(cfg)

    expected = table["split"].value_counts().to_dict()
    assert (
        results["data_sizes"]
        == {s: expected[s] for s in ("train", "val", "test")}
        == {
            "train": 120,
            "val": 48,
            "test": 72,
        }
    )
    imported = load_manifest(csv, root=faces)
    (datamodule,) = seen
    wanted = table.set_index("path")["split"]
    for split, rows in datamodule.indices.items():
        used = set(imported.df["path"].iloc[rows])
        assert used == set(wanted[wanted == split].index), split

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir}/mlflow.db")
    tags = client.get_run(results["mlflow_run_id"]).data.tags
    assert tags["data.manifest_hash"] == imported.hash
    assert Path(tags["data.root"]) == faces.resolve()
    assert tags["data.rows"] == "240"


def _data(tmp_path: Path):
    """The data=manifest node with data.path still unset, and paths under tmp_path."""
    return OmegaConf.create(
        {
            "data": {
                "name": "manifest",
                "path": "???",
                "root": None,
                "synthetic": None,
                "image_size": 16,
                "grayscale": True,
            },
            "paths": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
        }
    )


def test_missing_or_bad_data_path_names_the_key(split_csv, tmp_path):
    csv, faces, table = split_csv
    cfg = _data(tmp_path)
    with pytest.raises(DataError, match=r"data\.path is not set: data=manifest needs data\.path=FILE\.csv"):
        prepare_data(cfg.data, cfg.paths)
    cfg.data.path = str(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match=r"data\.path=.*nope\.csv: no such file"):
        prepare_data(cfg.data, cfg.paths)
    cfg.data.path = str(csv)
    cfg.data.root = str(tmp_path / "no-folder")
    with pytest.raises(DataError, match=r"data\.root=.*no-folder: no such folder"):
        prepare_data(cfg.data, cfg.paths)
    # Paths that exist nowhere under the root: named, with the fix.
    moved = tmp_path / "moved.csv"
    table.assign(sha1=[f"{i:040x}" for i in range(len(table))]).to_csv(moved, index=False)
    cfg.data.path, cfg.data.root = str(moved), None
    with pytest.raises(ManifestError, match=r"240 listed file\(s\) not found under .*set data\.root=DIR"):
        prepare_data(cfg.data, cfg.paths)
    # A bad value: file, line and column named, prefixed with the key.
    bad = tmp_path / "bad.csv"
    table.assign(split=["train", "holdout", *table["split"][2:]]).to_csv(bad, index=False)
    cfg.data.path, cfg.data.root = str(bad), str(faces)
    with pytest.raises(ManifestError, match=r"data\.path=.*bad\.csv: .*column 'split'.*line 3: 'holdout'"):
        prepare_data(cfg.data, cfg.paths)
