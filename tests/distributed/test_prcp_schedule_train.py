"""A training step uses the KL_prcp schedule's coefficients (loss.prcp_schedule=linear).

One process, the tiny VLM: step k of a linearly annealed run logs loss/prcp_coef = the value
written out below, the update gets the scheduled gamma and entropy weights, and its loss equals
that of a constant-coefficient run whose coefficients are those values (same seed, same step).
"""

from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed
from tests.distributed.test_train import STEPS, recipe, shards  # noqa: F401 (shards: the fixture)

STEP = 2
# recipe(): prcp_coef 0.02 (default), entropy weights 0.01, STEPS = 8 -> span 4; at step 2 half way.
GAMMA = 0.02 * (1 - STEP / (STEPS // 2))
ETA = 0.01 * GAMMA / 0.02


def schedule_worker(train_dir: str, run_dir: str):
    from papo_mega import train
    from papo_mega.config import load_config
    from papo_mega.distributed import init_distributed

    seen = []
    real = train.papo_forward_backward

    def recording(chunks, groups, batches, loss_cfg, **kwargs):
        seen.append((loss_cfg.prcp_coef, loss_cfg.entropy_coef, loss_cfg.masked_entropy_coef))
        return real(chunks, groups, batches, loss_cfg, **kwargs)

    train.papo_forward_backward = recording
    groups = init_distributed({}, seed=1)
    base = [*recipe(Path(train_dir).parent), f"run.run_dir={run_dir}"]
    runs = {
        "linear": ["loss.prcp_schedule=linear", "loss.prcp_end_coef=0", "loss.prcp_anneal_fraction=0.5"],
        "constant": [f"loss.prcp_coef={GAMMA}", f"loss.entropy_coef={ETA}", f"loss.masked_entropy_coef={ETA}"],
    }
    out = {}
    for name, overrides in runs.items():
        seen.clear()
        trainer = train.PapoTrainer(load_config(None, [*base, *overrides]), groups)
        metrics = trainer.step(STEP)
        out[name] = {"metrics": metrics, "seen": list(seen)}
    return out


def test_a_step_trains_with_the_scheduled_coefficients(shards, tmp_path):  # noqa: F811
    out = run_distributed(schedule_worker, 1, args=(str(shards / "train"), str(tmp_path / "run")))[0]
    linear, constant = out["linear"], out["constant"]
    assert linear["seen"] and all(s == pytest.approx((GAMMA, ETA, ETA)) for s in linear["seen"])
    assert linear["metrics"]["loss/prcp_coef"] == pytest.approx(GAMMA)
    assert constant["metrics"]["loss/prcp_coef"] == pytest.approx(GAMMA)
    assert linear["metrics"]["loss/total"] == pytest.approx(constant["metrics"]["loss/total"], abs=1e-6)
    assert linear["metrics"]["loss/kl_prcp"] != 0.0  # the term is live: the equality above tests it
