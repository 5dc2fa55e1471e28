"""compute_papo_loss against a naive per-token reference written from papo.md.

The reference below walks the tokens one by one in Python floats (float64) and writes each term
and its derivative out by hand, branch by branch: nothing is shared with papo_mega.algo.losses
but the config object. Inputs are built so that ratios fall on every side of the clip bounds,
KL_prcp on both sides of prcp_clip and of the k3 clamp, and masks hold padding on both ends.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from papo_mega.algo.losses import LossInputError, compute_papo_loss
from papo_mega.config import LossConfig
from papo_mega.errors import ConfigError

B, T = 4, 8
CLIP_LOW, CLIP_HIGH = 0.2, 0.3
# Target log-ratios log(pi/pi_old), one of each per row (shuffled): far below the log-ratio clamp,
# below 1 - clip_low, just inside both bounds, above 1 + clip_high, above clip_dual = 3, and far
# above the clamp.
LOG_RATIOS = [-25.0, math.log(0.5), math.log(0.7), math.log(0.95), math.log(1.1), math.log(1.6), math.log(4.0), 25.0]
# masked_logp - logp: k3 below and above prcp_clip=0.05, and past the k3 clamp of 10 on both sides.
MASKED_SHIFTS = [-25.0, -1.0, -0.3, 0.05, -0.02, 0.5, 2.0, 3.5]
MASK = [
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1, 1, 1],
]
ADV_ROWS = [1.3, -0.7, 0.0, -2.1]


# ----------------------------------------------------------------------------------------------
# The naive reference
# ----------------------------------------------------------------------------------------------

def _clamp(x: float, lo: float, hi: float) -> tuple[float, float]:
    """Clamped value and its derivative (1 strictly inside, 0 outside)."""
    if x > hi:
        return hi, 0.0
    if x < lo:
        return lo, 0.0
    return x, 1.0


def _k3(p: float, q: float) -> tuple[float, float, float]:
    """k3 estimate of KL(p||q) from sampled log-probs, with d/dp and d/dq (papo.md)."""
    d, dd = _clamp(q - p, -20.0, 20.0)
    value = math.exp(d) - d - 1.0
    slope = math.exp(d) - 1.0
    value, dv = _clamp(value, -10.0, 10.0)
    return value, -slope * dd * dv, slope * dd * dv


def naive_papo(cfg: LossConfig, logp, old, adv, mask, masked=None, ref=None, num_tokens=None, ent=None, ment=None):
    """Value, gradients (d loss / d input) and metrics of the PAPO token-mean loss, token by token."""
    def rows(x):
        return None if x is None else x.detach().double().tolist()

    logp, old, mask, masked, ref, ent, ment = map(rows, (logp, old, mask, masked, ref, ent, ment))
    adv = adv.detach().double().tolist()
    full = cfg.entropy_estimator == "full"
    zeros = [[0.0] * len(logp[0]) for _ in logp]
    grads = {name: [row[:] for row in zeros] for name in ("logp", "masked_logp", "ref_logp", "entropy", "masked_entropy")}
    sums = dict.fromkeys(("loss", "pg_loss", "kl_ref", "kl_prcp", "entropy", "masked_entropy", "clip_frac_high",
                          "clip_frac_low", "clip_frac_dual", "ratio_mean", "approx_kl_old"), 0.0)
    ratios = []
    count = 0
    for b, t in itertools.product(range(len(logp)), range(len(logp[0]))):
        if not mask[b][t]:
            continue
        count += 1
        a = adv[b] if not isinstance(adv[b], list) else adv[b][t]
        lp = logp[b][t]
        g = 0.0  # d loss_t / d logp
        # Policy term: PPO clip, dual clip for negative advantages.
        log_ratio, dlr = _clamp(lp - old[b][t], -20.0, 20.0)
        r = math.exp(log_ratio)
        ratios.append(r)
        if a > 0 and r > 1 + cfg.clip_high:
            pg, dpg = -a * (1 + cfg.clip_high), 0.0
            sums["clip_frac_high"] += 1
        elif a < 0 and r < 1 - cfg.clip_low:
            pg, dpg = -a * (1 - cfg.clip_low), 0.0
            sums["clip_frac_low"] += 1
        else:
            pg, dpg = -a * r, -a * r * dlr
        if a < 0 and cfg.clip_dual is not None and pg > -a * cfg.clip_dual:
            pg, dpg = -a * cfg.clip_dual, 0.0
            sums["clip_frac_dual"] += 1
        term = pg
        g += dpg
        sums["pg_loss"] += pg
        sums["ratio_mean"] += r
        sums["approx_kl_old"] += old[b][t] - lp
        # Reference KL.
        if ref is not None:
            q = ref[b][t]
            if cfg.kl_estimator == "k1":
                kl, dp, dq = lp - q, 1.0, -1.0
            elif cfg.kl_estimator == "k2":
                kl, dp, dq = 0.5 * (lp - q) ** 2, lp - q, q - lp
            else:
                kl, dp, dq = _k3(lp, q)
            sums["kl_ref"] += kl
            term += cfg.kl_coef * kl
            g += cfg.kl_coef * dp
            grads["ref_logp"][b][t] += cfg.kl_coef * dq
        # Implicit perception loss (maximised) and the masked-view entropy penalty.
        if masked is not None:
            m = masked[b][t]
            kl, dp, dq = _k3(lp, m)
            sums["kl_prcp"] += kl
            if cfg.prcp_clip is not None:
                kl, dc = _clamp(kl, 0.0, cfg.prcp_clip)
                dp, dq = dp * dc, dq * dc
            term -= cfg.prcp_coef * kl
            g -= cfg.prcp_coef * dp
            grads["masked_logp"][b][t] -= cfg.prcp_coef * dq
            if not full:
                sums["masked_entropy"] += -m
                term -= cfg.masked_entropy_coef * m
                grads["masked_logp"][b][t] -= cfg.masked_entropy_coef
            elif ment is not None:
                sums["masked_entropy"] += ment[b][t]
                term += cfg.masked_entropy_coef * ment[b][t]
                grads["masked_entropy"][b][t] += cfg.masked_entropy_coef
        # Entropy penalty on the original view.
        if full:
            if ent is not None:
                sums["entropy"] += ent[b][t]
                term += cfg.entropy_coef * ent[b][t]
                grads["entropy"][b][t] += cfg.entropy_coef
        else:
            sums["entropy"] += -lp
            term -= cfg.entropy_coef * lp
            g -= cfg.entropy_coef
        sums["loss"] += term
        grads["logp"][b][t] = g
    denom = max(float(num_tokens) if num_tokens is not None else float(count), 1.0)
    metrics = {k: v / denom for k, v in sums.items()}
    if ref is None:
        del metrics["kl_ref"]
    if masked is None:
        del metrics["kl_prcp"], metrics["masked_entropy"]
    if full and ent is None:
        del metrics["entropy"]
    if full and ment is None:
        metrics.pop("masked_entropy", None)
    if ratios:
        metrics["ratio_max"], metrics["ratio_min"] = max(ratios), min(ratios)
    metrics["response_tokens"] = float(count)
    metrics["empty_batches"] = float(count == 0)
    grads = {k: [[x / denom for x in row] for row in v] for k, v in grads.items()}
    return metrics, grads


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_inputs(seed: int = 0, adv_dim: int = 1, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def shuffled(values):
        out = torch.empty(B, T, dtype=torch.float64)
        for b in range(B):
            out[b] = torch.tensor(values, dtype=torch.float64)[torch.randperm(T, generator=gen)]
        return out

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    logp = uniform(-4.0, -0.05, B, T)
    # Small jitter keeps every value away from a bound, so each branch is unambiguous.
    old = logp - (shuffled(LOG_RATIOS) + uniform(-0.02, 0.02, B, T))
    masked = logp + shuffled(MASKED_SHIFTS) * uniform(0.95, 1.05, B, T)
    ref = logp + 0.7 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    if adv_dim == 1:
        adv = torch.tensor(ADV_ROWS, dtype=torch.float64)
    else:
        adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
        adv[0, 3] = 0.0
    return {
        "logp": logp.to(dtype),
        "old_logp": old.to(dtype),
        "advantages": adv.to(dtype),
        "response_mask": torch.tensor(MASK, dtype=dtype),
        "masked_logp": masked.to(dtype),
        "ref_logp": ref.to(dtype),
        "entropy": uniform(0.1, 5.0, B, T).to(dtype),
        "masked_entropy": uniform(0.1, 5.0, B, T).to(dtype),
    }


def leaves(inputs: dict, names=("logp", "masked_logp", "ref_logp", "entropy", "masked_entropy")) -> dict:
    out = dict(inputs)
    for name in names:
        if out.get(name) is not None:
            out[name] = out[name].detach().clone().requires_grad_(True)
    return out


def run_loss(cfg: LossConfig, inputs: dict, num_tokens=None):
    return compute_papo_loss(
        inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["response_mask"], cfg,
        masked_logp=inputs.get("masked_logp"), ref_logp=inputs.get("ref_logp"), num_tokens=num_tokens,
        entropy=inputs.get("entropy"), masked_entropy=inputs.get("masked_entropy"),
    )


def run_naive(cfg: LossConfig, inputs: dict, num_tokens=None):
    return naive_papo(cfg, inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["response_mask"],
                      masked=inputs.get("masked_logp"), ref=inputs.get("ref_logp"), num_tokens=num_tokens,
                      ent=inputs.get("entropy"), ment=inputs.get("masked_entropy"))


def check_against_naive(cfg: LossConfig, inputs: dict, num_tokens=None, atol=1e-10, what="", naive_cfg=None):
    """compute_papo_loss under `cfg` against the naive reference under `naive_cfg` (default: cfg)."""
    inputs = leaves(inputs)
    loss, metrics = run_loss(cfg, inputs, num_tokens)
    want, want_grads = run_naive(naive_cfg or cfg, inputs, num_tokens)
    assert loss.dim() == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(want["loss"], abs=atol, rel=atol), f"loss {what}"
    for name, value in want.items():
        assert name in metrics, f"metric {name} missing {what}"
        assert metrics[name].item() == pytest.approx(value, abs=atol, rel=atol), f"metric {name} {what}"
        assert not metrics[name].requires_grad
    loss.backward()
    for name, want_grad in want_grads.items():
        tensor = inputs.get(name)
        if tensor is None:
            continue
        got = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        expected = torch.tensor(want_grad, dtype=torch.float64)
        diff = (got.double() - expected).abs().max().item()
        assert diff <= atol, f"d loss / d {name} off by {diff:.3g} {what}\n got {got}\n want {expected}"
    return loss, metrics, want


# ----------------------------------------------------------------------------------------------
# Values and gradients over the config grid
# ----------------------------------------------------------------------------------------------

COEF_SETS = {
    "none": dict(kl_coef=0.0, prcp_coef=0.0, entropy_coef=0.0, masked_entropy_coef=0.0),
    "kl": dict(kl_coef=0.05, prcp_coef=0.0, entropy_coef=0.0, masked_entropy_coef=0.0),
    "prcp": dict(kl_coef=0.0, prcp_coef=0.3, entropy_coef=0.0, masked_entropy_coef=0.0),
    "ent": dict(kl_coef=0.0, prcp_coef=0.0, entropy_coef=0.07, masked_entropy_coef=0.0),
    "ment": dict(kl_coef=0.0, prcp_coef=0.0, entropy_coef=0.0, masked_entropy_coef=0.11),
    "all": dict(kl_coef=0.05, prcp_coef=0.3, entropy_coef=0.07, masked_entropy_coef=0.11),
}


@pytest.mark.parametrize("num_tokens", [None, 37])
@pytest.mark.parametrize("adv_dim", [1, 2])
@pytest.mark.parametrize("entropy_estimator", ["sampled", "full"])
@pytest.mark.parametrize("coefs", list(COEF_SETS))
@pytest.mark.parametrize("prcp_clip", [None, 0.05])
@pytest.mark.parametrize("clip_dual", [3.0, None])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_loss_matches_naive(kl_estimator, clip_dual, prcp_clip, coefs, entropy_estimator, adv_dim, num_tokens):
    cfg = LossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, clip_dual=clip_dual, kl_estimator=kl_estimator,
                     prcp_clip=prcp_clip, entropy_estimator=entropy_estimator, **COEF_SETS[coefs])
    inputs = make_inputs(seed=10 * ["k1", "k2", "k3"].index(kl_estimator) + adv_dim, adv_dim=adv_dim)
    if entropy_estimator == "sampled":
        inputs["entropy"] = inputs["masked_entropy"] = None
    check_against_naive(cfg, inputs, num_tokens)


@pytest.mark.parametrize("entropy_estimator", ["sampled", "full"])
@pytest.mark.parametrize("present", ["none", "ref", "masked"])
def test_optional_inputs_absent(present, entropy_estimator):
    """GRPO without a reference, PAPO-D (no reference), GRPO with a reference but no masked view."""
    cfg = LossConfig(entropy_estimator=entropy_estimator, **COEF_SETS["all"])
    inputs = make_inputs(seed=5)
    if present != "ref":
        inputs["ref_logp"] = None
    if present != "masked":
        inputs["masked_logp"] = inputs["masked_entropy"] = None
    if entropy_estimator == "sampled":
        inputs["entropy"] = inputs["masked_entropy"] = None
    _, metrics, _ = check_against_naive(cfg, inputs)
    assert ("kl_ref" in metrics) == (present == "ref")
    assert ("kl_prcp" in metrics) == (present == "masked")


def test_full_entropy_metrics_without_entropy_tensors_when_unweighted():
    """entropy_estimator=full with zero entropy weights may omit the entropy tensors."""
    cfg = LossConfig(entropy_estimator="full", entropy_coef=0.0, masked_entropy_coef=0.0, prcp_coef=0.3)
    inputs = make_inputs(seed=6)
    inputs["entropy"] = inputs["masked_entropy"] = None
    _, metrics, _ = check_against_naive(cfg, inputs)
    assert "entropy" not in metrics and "masked_entropy" not in metrics


def test_float32_inputs():
    cfg = LossConfig(prcp_clip=0.05, **COEF_SETS["all"])
    inputs = make_inputs(seed=3, adv_dim=2, dtype=torch.float32)
    loss, _, _ = check_against_naive(cfg, inputs, atol=2e-5)
    assert loss.dtype == torch.float32


def test_every_clip_branch_is_exercised():
    """The inputs above hit each clip (otherwise the grid would not test them)."""
    for adv_dim in (1, 2):
        inputs = make_inputs(seed=20 + adv_dim, adv_dim=adv_dim)
        _, metrics = run_loss(LossConfig(clip_dual=3.0, prcp_clip=0.05), inputs)
        for name in ("clip_frac_high", "clip_frac_low", "clip_frac_dual"):
            assert metrics[name].item() > 0, (name, adv_dim)
        assert metrics["ratio_max"].item() > 3.0 and metrics["ratio_min"].item() < 0.8
        # Without the dual clip nothing is counted as dual-clipped.
        _, metrics = run_loss(LossConfig(clip_dual=None), inputs)
        assert metrics["clip_frac_dual"].item() == 0.0
    # KL_prcp on both sides of prcp_clip and beyond the k3 clamp.
    inputs = make_inputs(seed=0)
    valid = inputs["response_mask"].bool()
    d = (inputs["masked_logp"] - inputs["logp"])[valid]
    k3 = torch.exp(d) - d - 1
    assert (k3 < 0.05).any() and (k3 > 0.05).any() and (k3 > 10).any()


def test_clip_bounds_are_configurable():
    inputs = make_inputs(seed=1)
    for clip_low, clip_high in [(0.1, 0.28), (0.0, 0.0), (0.5, 1.0)]:
        cfg = LossConfig(clip_low=clip_low, clip_high=clip_high, clip_dual=2.5, **COEF_SETS["all"])
        check_against_naive(cfg, inputs, what=f"clip {clip_low}/{clip_high}")


def test_dual_clip_bounds_negative_advantage_loss():
    """For A < 0 the per-token policy loss never exceeds -clip_dual * A; without dual clip it can."""
    inputs = make_inputs(seed=2, adv_dim=2)
    inputs["response_mask"] = torch.ones(B, T, dtype=torch.float64)
    for clip_dual in (3.0, None):
        cfg = LossConfig(clip_dual=clip_dual, kl_coef=0.0, prcp_coef=0.0)
        adv = inputs["advantages"]
        worst = 0.0
        for b, t in itertools.product(range(B), range(T)):
            mask = torch.zeros(B, T, dtype=torch.float64)
            mask[b, t] = 1
            loss, _ = run_loss(cfg, {**inputs, "response_mask": mask})
            if adv[b, t] < 0:
                worst = max(worst, loss.item() / (-adv[b, t].item()))
        if clip_dual is None:
            assert worst > 3.0
        else:
            assert worst <= 3.0 + 1e-12


# ----------------------------------------------------------------------------------------------
# Normalisation, accumulation, empty and padded batches
# ----------------------------------------------------------------------------------------------

def test_num_tokens_normalises_the_token_sum():
    cfg = LossConfig(**COEF_SETS["all"])
    inputs = make_inputs(seed=4)
    count = float(inputs["response_mask"].sum())
    loss_default, _ = run_loss(cfg, inputs)
    for num_tokens in (count, int(count), torch.tensor(count), 2 * count, 100):
        loss, metrics = run_loss(cfg, inputs, num_tokens=num_tokens)
        assert loss.item() == pytest.approx(loss_default.item() * count / float(num_tokens), rel=1e-12)
        assert metrics["response_tokens"].item() == count


@pytest.mark.parametrize("entropy_estimator", ["sampled", "full"])
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_micro_batches_add_up_to_the_whole_batch(adv_dim, entropy_estimator):
    cfg = LossConfig(prcp_clip=0.05, entropy_estimator=entropy_estimator, **COEF_SETS["all"])
    inputs = make_inputs(seed=7, adv_dim=adv_dim)
    total = inputs["response_mask"].sum()
    whole = leaves(inputs)
    loss_whole, metrics_whole = run_loss(cfg, whole)
    loss_whole.backward()

    parts = leaves(inputs)
    loss_sum, metrics_parts = 0.0, []
    for rows in (slice(0, 1), slice(1, 4)):  # unequal halves: token counts differ
        piece = {k: (v[rows] if v is not None else None) for k, v in parts.items()}
        loss, metrics = run_loss(cfg, piece, num_tokens=total)
        loss_sum = loss_sum + loss
        metrics_parts.append(metrics)
    loss_sum.backward()
    assert loss_sum.item() == pytest.approx(loss_whole.item(), abs=1e-12)
    for name in ("logp", "masked_logp", "ref_logp", "entropy", "masked_entropy"):
        if whole[name].grad is not None or parts[name].grad is not None:
            assert torch.allclose(parts[name].grad, whole[name].grad, atol=1e-12, rtol=0), name
    for name, value in metrics_whole.items():
        values = torch.stack([m[name] for m in metrics_parts])
        if name.endswith("_max"):
            combined = values.max()
        elif name.endswith("_min"):
            combined = values.min()
        elif name == "empty_batches":
            continue
        else:
            combined = values.sum()
        assert combined.item() == pytest.approx(value.item(), abs=1e-12), name


@pytest.mark.parametrize("num_tokens", [None, 12])
def test_all_empty_mask(num_tokens):
    cfg = LossConfig(**COEF_SETS["all"])
    inputs = make_inputs(seed=8)
    inputs["response_mask"] = torch.zeros(B, T, dtype=torch.float64)
    inputs = leaves(inputs)
    loss, metrics = run_loss(cfg, inputs, num_tokens=num_tokens)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None and loss.requires_grad
    loss.backward()
    assert inputs["logp"].grad is not None and bool((inputs["logp"].grad == 0).all())
    assert metrics["empty_batches"].item() == 1.0
    assert metrics["response_tokens"].item() == 0.0
    for name in ("pg_loss", "kl_ref", "kl_prcp", "entropy", "clip_frac_high", "ratio_mean", "approx_kl_old"):
        assert metrics[name].item() == 0.0, name
    # A non-empty batch reports no empty batch.
    _, metrics = run_loss(cfg, make_inputs(seed=8))
    assert metrics["empty_batches"].item() == 0.0


def test_response_mask_dtypes_agree():
    cfg = LossConfig(**COEF_SETS["all"])
    inputs = make_inputs(seed=9)
    ref_loss, _ = run_loss(cfg, inputs)
    for dtype in (torch.bool, torch.int64, torch.float32):
        loss, _ = run_loss(cfg, {**inputs, "response_mask": inputs["response_mask"].to(dtype)})
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12), dtype


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("entropy_estimator", ["sampled", "full"])
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_non_finite_values_on_padding_are_ignored(kl_estimator, entropy_estimator, adv_dim):
    """NaN / inf on masked-out positions change neither the loss, nor the metrics, nor the gradients."""
    cfg = LossConfig(kl_estimator=kl_estimator, entropy_estimator=entropy_estimator, prcp_clip=0.05,
                     **COEF_SETS["all"])
    clean = make_inputs(seed=10, adv_dim=adv_dim)
    dirty = {k: v.clone() for k, v in clean.items()}
    pad = ~clean["response_mask"].bool()
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    names = ["logp", "old_logp", "masked_logp", "ref_logp", "entropy", "masked_entropy"]
    if adv_dim == 2:
        names.append("advantages")
    for i, name in enumerate(names):
        values = dirty[name]
        idx = pad.nonzero()
        for j, (b, t) in enumerate(idx.tolist()):
            values[b, t] = junk[(i + j) % 3]
    runs = []
    for inputs in (clean, dirty):
        inputs = leaves(inputs)
        loss, metrics = run_loss(cfg, inputs)
        loss.backward()
        runs.append((inputs, loss, metrics))
    (c_in, c_loss, c_metrics), (d_in, d_loss, d_metrics) = runs
    assert torch.isfinite(d_loss) and d_loss.item() == pytest.approx(c_loss.item(), abs=1e-12)
    for name, value in c_metrics.items():
        assert d_metrics[name].item() == pytest.approx(value.item(), abs=1e-12), name
    for name in ("logp", "masked_logp", "ref_logp", "entropy", "masked_entropy"):
        c_grad, d_grad = c_in[name].grad, d_in[name].grad
        if c_grad is None:
            continue
        # The gradient reaches the logits backward: a NaN on padding would poison the weights.
        assert torch.isfinite(d_grad).all(), f"non-finite d loss / d {name} on padding: {d_grad}"
        assert torch.equal(d_grad[pad], torch.zeros_like(d_grad[pad])), name
        assert torch.allclose(d_grad, c_grad, atol=1e-12, rtol=0), name


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_shape_mismatch():
    inputs = make_inputs()
    with pytest.raises(LossInputError, match=r"old_logp has shape \(4, 7\) but response_mask has \(4, 8\)"):
        run_loss(LossConfig(), {**inputs, "old_logp": inputs["old_logp"][:, :7]})
    with pytest.raises(LossInputError, match=r"masked_logp has shape"):
        run_loss(LossConfig(), {**inputs, "masked_logp": inputs["masked_logp"].unsqueeze(0)})
    with pytest.raises(LossInputError, match=r"response_mask has shape \(32,\); expected \[B, T\]"):
        run_loss(LossConfig(), {k: (v.reshape(-1) if k != "advantages" else v) for k, v in inputs.items()})


def test_wrong_advantages_shape():
    inputs = make_inputs()
    with pytest.raises(LossInputError, match=r"advantages has 3 rows but the batch has 4; pass \[B\] or \[B, T\]"):
        run_loss(LossConfig(), {**inputs, "advantages": inputs["advantages"][:3]})
    with pytest.raises(LossInputError, match=r"advantages has shape \(4, 7\); expected"):
        run_loss(LossConfig(), {**inputs, "advantages": torch.zeros(4, 7, dtype=torch.float64)})
    with pytest.raises(LossInputError, match=r"advantages has shape \(4, 8, 1\)"):
        run_loss(LossConfig(), {**inputs, "advantages": torch.zeros(4, 8, 1, dtype=torch.float64)})
    with pytest.raises(LossInputError, match=r"advantages has dtype torch.int64"):
        run_loss(LossConfig(), {**inputs, "advantages": torch.tensor([1, -1, 0, 2])})


def test_integer_logp():
    inputs = make_inputs()
    with pytest.raises(LossInputError, match=r"logp has dtype torch.int64; log-probs and entropies must be floating"):
        run_loss(LossConfig(), {**inputs, "logp": inputs["logp"].long()})


@pytest.mark.parametrize("name", ["logp", "old_logp", "masked_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_on_a_response_token(name, bad):
    inputs = make_inputs(adv_dim=2)
    inputs[name] = inputs[name].clone()
    inputs[name][1, 2] = bad  # a response token (MASK[1][2] == 1)
    with pytest.raises(LossInputError, match=rf"{name} has NaN or inf on response tokens"):
        run_loss(LossConfig(), inputs)


def test_full_entropy_needs_entropy_tensors():
    inputs = make_inputs()
    cfg = LossConfig(entropy_estimator="full", entropy_coef=0.05)
    with pytest.raises(LossInputError, match=r"entropy_estimator=full needs `entropy`"):
        run_loss(cfg, {**inputs, "entropy": None})
    cfg = LossConfig(entropy_estimator="full", masked_entropy_coef=0.05)
    with pytest.raises(LossInputError, match=r"entropy_estimator=full needs `masked_entropy`"):
        run_loss(cfg, {**inputs, "masked_entropy": None})


@pytest.mark.parametrize("bad", [
    dict(clip_low=-0.1), dict(clip_low=1.0), dict(clip_high=-0.01), dict(clip_dual=1.0), dict(clip_dual=0.5),
    dict(kl_estimator="k4"), dict(kl_estimator="K3"), dict(entropy_estimator="exact"),
    dict(kl_coef=-0.01), dict(prcp_coef=-0.02), dict(entropy_coef=-1.0), dict(masked_entropy_coef=-0.1),
    dict(prcp_clip=0.0), dict(prcp_clip=-0.2), dict(temperature=0.0), dict(temperature=-1.0),
])
def test_loss_config_rejects_bad_values(bad):
    (key, value), = bad.items()
    with pytest.raises(ConfigError, match=rf"loss\.{key}={value!r}|loss\.{key}={value}"):
        LossConfig(**bad)


def test_loss_config_accepts_published_settings():
    LossConfig()  # PAPO-G
    LossConfig(kl_coef=0.0, clip_high=0.28, prcp_coef=0.01, entropy_coef=0.03, masked_entropy_coef=0.03)  # PAPO-D
    LossConfig(clip_dual=None, prcp_clip=0.2, entropy_estimator="full", kl_estimator="k1", temperature=0.7)
