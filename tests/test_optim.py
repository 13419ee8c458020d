import math

import pytest
import torch

from fastdreamer.optim import LaProp

# lr well above DreamerV3's 4e-5 so that updates dwarf the fp32 rounding of the parameters they are added to.
HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-20, "agc": 0.3, "pmin": 1e-3, "warmup": 3}
SHAPES = [(7, 3), (5,), (3, 1, 2), (11,), (2, 5)]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    params[3] = params[3] * 1e-6  # |p| << pmin: the AGC threshold uses pmin instead of |p|
    return [p.requires_grad_() for p in params]


def make_grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen) * 0.01 for s in SHAPES]
    grads[0] = grads[0] * 1e4  # |g| >> 0.3 |p|: AGC clips this one
    return grads


def reference_laprop(params, grads_per_step, lr, beta1, beta2, eps, agc, pmin, warmup):
    """The four formulas, one parameter at a time, float64, no foreach: the spec the optimizer is checked against."""
    params = [p.detach().double().clone() for p in params]
    nu = [torch.zeros_like(p) for p in params]
    mu = [torch.zeros_like(p) for p in params]
    history = []
    for t, grads in enumerate(grads_per_step):
        lr_t = lr * min(1.0, t / warmup)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            g = g.double()
            g = g / max(1.0, g.norm().item() / (agc * max(pmin, p.norm().item())))
            nu[i] = beta2 * nu[i] + (1 - beta2) * g * g
            u = g / (torch.sqrt(nu[i] / (1 - beta2 ** (t + 1))) + eps)
            mu[i] = beta1 * mu[i] + (1 - beta1) * u
            p -= lr_t * mu[i] / (1 - beta1 ** (t + 1))
        history.append([p.clone() for p in params])
    return history


def run(opt, params, grads_per_step):
    history, metrics = [], []
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        metrics.append(opt.step())
        history.append([p.detach().clone() for p in params])
    return history, metrics


def test_matches_per_parameter_reference_for_five_steps():
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads = [make_grads(t) for t in range(5)]
    # Guard that the test exercises both AGC branches: clipping by |p| and the pmin floor.
    assert grads[0][0].norm() > 0.3 * start[0].norm()
    assert start[3].norm() < 1e-3 and grads[0][3].norm() > 0.3 * 1e-3
    ours, _ = run(LaProp(params, **HP), params, grads)
    ref = reference_laprop(start, grads, **HP)
    for t in range(5):
        for i, (a, b) in enumerate(zip(ours[t], ref[t], strict=True)):
            # Compare the displacement from the start. fp32 bias corrections (1 - 0.999 in fp32 is off by 1.3e-5
            # relative) and fp32 moments bound its relative error near 1e-5, so 1e-4 of it; plus storing an fp32
            # parameter rounds by up to 2^-24 |p| per step. A formula change moves it by >1e-2 and fails.
            da, db = a.double() - start[i].double(), b - start[i].double()
            tol = 1e-4 * db.abs().max().item() + (t + 1) * 2**-24 * b.abs().max().item()
            assert (da - db).abs().max().item() <= tol, f"step {t} param {i}: {(da - db).abs().max().item()} > {tol}"


def test_first_update_uses_lr_zero_and_warmup_ramps_linearly():
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads = [make_grads(t) for t in range(5)]
    history, metrics = run(LaProp(params, **HP), params, grads)
    for a, b in zip(history[0], start, strict=True):
        assert torch.equal(a, b), "the first update must use lr 0 (linear_schedule(0, lr, warmup) at count 0)"
    lrs = [m["lr"].item() for m in metrics]
    expected = [HP["lr"] * min(1.0, t / HP["warmup"]) for t in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=0.0)  # fp32 lr: 1e-6 relative is its rounding
    assert not torch.equal(history[1][0], history[0][0])


def test_metrics_are_global_norms_before_clipping():
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads = [make_grads(t) for t in range(2)]
    history, metrics = run(LaProp(params, **HP), params, grads)
    n = sum(p.numel() for p in start)
    gnorm = math.sqrt(sum(g.double().square().sum().item() for g in grads[1]))
    prms = math.sqrt(sum(p.double().square().sum().item() for p in history[0]) / n)
    urms = math.sqrt(sum((a.double() - b.double()).square().sum().item() for a, b in zip(history[1], history[0])) / n)
    m = metrics[1]
    assert all(v.dim() == 0 for v in m.values())
    # fp32 norms of ~60 elements: 1e-5 relative.
    assert m["grad_norm"].item() == pytest.approx(gnorm, rel=1e-5)
    assert m["param_rms"].item() == pytest.approx(prms, rel=1e-5)
    # urms is measured from differences of fp32 parameters (~1) moved by ~1e-2: 1e-7 / 1e-2 cancellation -> 1e-4.
    assert m["update_rms"].item() == pytest.approx(urms, rel=1e-4)


def test_params_without_grad_are_skipped():
    params = make_params()
    frozen = params[2].detach().clone()
    opt = LaProp(params, **HP)
    for t in range(3):
        for i, (p, g) in enumerate(zip(params, make_grads(t), strict=True)):
            p.grad = None if i == 2 else g
        opt.step()
    assert torch.equal(params[2].detach(), frozen)
    assert torch.count_nonzero(opt.nu[2]) == 0 and torch.count_nonzero(opt.nu[0]) > 0


def test_state_dict_round_trip_resumes_exactly():
    grads = [make_grads(t) for t in range(6)]
    params_a = make_params()
    opt_a = LaProp(params_a, **HP)
    run(opt_a, params_a, grads[:3])
    saved_params = [p.detach().clone() for p in params_a]
    saved_state = opt_a.state_dict()
    after_a, _ = run(opt_a, params_a, grads[3:])

    params_b = make_params(seed=1)  # different values, overwritten from the "checkpoint"
    with torch.no_grad():
        for p, s in zip(params_b, saved_params, strict=True):
            p.copy_(s)
    opt_b = LaProp(params_b, lr=1.0, warmup=7)  # hparams and lr also come from the state
    opt_b.load_state_dict(saved_state)
    after_b, _ = run(opt_b, params_b, grads[3:])
    for xs, ys in zip(after_a, after_b, strict=True):
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)


def test_bf16_params_keep_fp32_moments():
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params()]
    opt = LaProp(params, **HP)
    for t in range(4):
        for p, g in zip(params, make_grads(t), strict=True):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    assert all(x.dtype == torch.float32 for x in opt.nu + opt.mu)
    assert all(p.dtype == torch.bfloat16 for p in params)
    # Each step is the fp32 step from the same bf16 values and gradients, rounded to bf16: within one bf16 ulp (the
    # update is rounded to bf16 before the add, so the sum is rounded twice).
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params()]
    ref = [p.detach().float().requires_grad_() for p in params]
    opt, ref_opt = LaProp(params, **HP), LaProp(ref, **HP)
    moved = 0
    for t in range(4):
        for p, r, g in zip(params, ref, make_grads(t), strict=True):
            p.grad, r.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        before = [p.detach().float().clone() for p in params]
        opt.step()
        ref_opt.step()
        for p, r, b in zip(params, ref, before, strict=True):
            got, want = p.detach().float(), r.detach().to(torch.bfloat16).float()
            mag = torch.maximum(got.abs(), want.abs()).clamp_min(1e-30)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
            assert ((got - want).abs() <= ulp).all(), t
            moved += int((p.detach().float() != b).sum())
            with torch.no_grad():
                r.copy_(p.float())  # the next step from the same bf16 values
    # Step 0 has the warmup's lr of 0; the other three move most bf16 values.
    assert moved > 0.5 * 3 * sum(p.numel() for p in params), moved


def test_step_never_reads_values_back_to_host(monkeypatch):
    params = make_params()
    opt = LaProp(params, **HP)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside LaProp.step")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for t in range(3):
        for p, g in zip(params, make_grads(t), strict=True):
            p.grad = g
        opt.step()
    monkeypatch.undo()
    assert opt.step_count.item() == 3


def test_compiled_step_matches_the_eager_step_and_updates_in_place():
    """fast.compile_optimizer (the graphs mode's LaProp step) against the eager step from the same state: parameters,
    moments and metrics over five steps through the warmup, AGC clipping both ways, and the very same tensors
    updated in place (a captured graph holds their addresses)."""
    from fastdreamer import fast

    grads = [make_grads(t) for t in range(5)]
    eager_params, fast_params = make_params(), make_params()
    start = [p.detach().clone() for p in eager_params]
    eager_opt, fast_opt = LaProp(eager_params, **HP), LaProp(fast_params, **HP)
    fast.compile_optimizer(fast_opt)
    fast.compile_optimizer(fast_opt)  # idempotent
    addresses = [p.data_ptr() for p in fast_params] + [x.data_ptr() for x in fast_opt.nu + fast_opt.mu]
    want, want_metrics = run(eager_opt, eager_params, grads)
    got, got_metrics = run(fast_opt, fast_params, grads)
    assert addresses == [p.data_ptr() for p in fast_params] + [x.data_ptr() for x in fast_opt.nu + fast_opt.mu]
    for t in range(5):
        for i, (a, b) in enumerate(zip(got[t], want[t], strict=True)):
            # The compiled norms sum in another order and the fused chain may contract multiply-adds: ~1e-6 of the
            # displacement, so 1e-5 of it (plus the parameter's own rounding); a formula change moves it by >1e-2.
            da, db = a.double() - start[i].double(), b.double() - start[i].double()
            tol = 1e-5 * db.abs().max().item() + (t + 1) * 2**-24 * b.abs().max().item()
            assert (da - db).abs().max().item() <= tol, f"step {t} param {i}: {(da - db).abs().max().item()} > {tol}"
        for name in want_metrics[t]:
            torch.testing.assert_close(got_metrics[t][name], want_metrics[t][name], rtol=1e-5, atol=0)
    for a, b in zip(fast_opt.nu + fast_opt.mu, eager_opt.nu + eager_opt.mu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    assert torch.equal(fast_opt.step_count, eager_opt.step_count)
