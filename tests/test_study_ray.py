"""The Ray backend runs a study's cells as Ray tasks; results land in the same study folder."""

from __future__ import annotations

import json

import pytest
import yaml

ray = pytest.importorskip("ray")


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_runs_the_study_and_reruns_nothing(tmp_path, tiny_dataset, local_ray):
    from lowlabel.study.runner import run_study

    study = tmp_path / "tiny.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "base": {
                    "data.dataset": str(tiny_dataset),
                    "data.patch_size": [16, 16, 16],
                    "data.n_test": 2,
                    "data.n_val": 1,
                    "model.levels": 3,
                    "model.channels": 4,
                    "train.steps": 2,
                    "train.val_every": 1,
                    "train.threads": 1,
                },
                "seeds": [0],
                "axes": {"data": {"full": {"data.budget": 0}, "low": {"data.budget": 2}}},
                "tables": {"t": {"title": "full vs low", "axes": ["data"]}},
            }
        )
    )
    out = tmp_path / "study"
    result = run_study(study, study_dir=out, backend="ray", jobs=2, progress=False)
    assert result.failed == {} and result.runs == result.ran == 2
    plan = json.loads((out / "plan.json").read_text())
    for cell in plan["cells"]:
        folder = out / "runs" / cell["run_dir"].split("/")[-1]
        res = json.loads((folder / "result.json").read_text())
        assert res["steps"] == 2 and 0.0 <= res["test"]["mean_dice"] <= 1.0
    assert "full vs low" in (out / "report.md").read_text()
    again = run_study(study, study_dir=out, backend="ray", jobs=2, progress=False, report=False)
    assert again.ran == 0 and again.skipped == 2
