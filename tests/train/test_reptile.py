"""Reptile takes effect: hand computations of θ₀ + ε(θ − θ₀) against real training runs."""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from cptrain.config_base import build_config
from cptrain.errors import CheckpointError, ConfigError
from cptrain.models.build import build_model
from cptrain.train.reptile import Reptile, ReptileConfig

VOCAB = 64
T = 16


def batch(step: int, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (rows, T + 1), generator=g)


def loss_of(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), rows[:, 1:].reshape(-1))


def train_step(model, opt, step: int, autocast: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_of(model, batch(step))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def tiny(seed: int = 0) -> torch.nn.Module:
    return build_model("tiny", VOCAB, seed=seed, max_positions=64)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict, *, exact: bool = False, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


def max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def hand_reptile(anchor: dict, theta: dict, eps: float) -> dict:
    return {n: anchor[n] + eps * (theta[n] - anchor[n]) for n in anchor}


def cfg(**kw) -> ReptileConfig:
    return ReptileConfig(enabled=True, **kw)


def with_reptile(model, opt, *, track_displacement: bool = False, **kw) -> Reptile:
    r = Reptile(model.named_parameters(), cfg(**kw), track_displacement=track_displacement)
    r.attach(opt)
    return r


# --------------------------------------------------------------------------- (a), (b) proofs
def _proof(make_opt, autocast: bool, k: int = 3, eps: float = 0.25) -> None:
    a, b = tiny(), tiny()
    opt_a, opt_b = make_opt(a), make_opt(b)
    reptile = with_reptile(a, opt_a, k=k, epsilon=eps)
    theta0 = weights(a)
    for step in range(k):
        train_step(a, opt_a, step, autocast)
        train_step(b, opt_b, step, autocast)
    assert reptile.updates == 1 and reptile.steps_since_anchor == 0
    expected = hand_reptile(theta0, weights(b), eps)
    assert_same(weights(a), expected, atol=1e-7)
    # The update moved the weights a long way compared with the tolerance: it took effect.
    assert max_diff(weights(a), weights(b)) > 1e-3
    # Every param stays fp32 and so does the anchor (never a bf16 autocast copy).
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert all(t.dtype == torch.float32 for t in reptile.state_dict()["anchor"].values())
    assert_same(reptile.state_dict()["anchor"], weights(a), exact=True)  # re-anchored

    # Step k+1 must start from the interpolated weights, with the optimizer state untouched.
    c = tiny(seed=1)
    c.load_state_dict(expected, strict=False)
    opt_c = make_opt(c)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    for name, p in a.named_parameters():  # Adam's moments are left alone (paper default)
        pb = dict(b.named_parameters())[name]
        for key, val in opt_a.state.get(p, {}).items():
            assert torch.equal(val, opt_b.state[pb][key]), (name, key)
    train_step(a, opt_a, k, autocast)
    train_step(c, opt_c, k, autocast)
    assert_same(weights(a), weights(c), atol=2e-6)
    train_step(b, opt_b, k, autocast)
    assert max_diff(weights(a), weights(b)) > 1e-3


def test_sgd_meta_update_sticks_and_next_step_starts_from_it():
    _proof(lambda m: torch.optim.SGD(m.parameters(), lr=0.5), autocast=False)


def test_adamw_bf16_autocast_meta_update_sticks():
    _proof(
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
        autocast=True,
    )


# --------------------------------------------------------------------------- (c) ε = 1
def test_epsilon_one_is_bit_identical_to_no_reptile():
    a, b = tiny(), tiny()
    opt_a = torch.optim.AdamW(a.parameters(), lr=3e-3)
    opt_b = torch.optim.AdamW(b.parameters(), lr=3e-3)
    reptile = with_reptile(a, opt_a, k=2, epsilon=1.0, track_displacement=True)
    for step in range(7):
        train_step(a, opt_a, step)
        train_step(b, opt_b, step)
    assert reptile.updates == 3
    assert_same(weights(a), weights(b), exact=True)


def test_meta_update_period_counts_optimizer_steps():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reptile = with_reptile(model, opt, k=4)
    counts = []
    for step in range(9):
        train_step(model, opt, step)
        counts.append((reptile.updates, reptile.steps_since_anchor))
    assert counts[3] == (1, 0) and counts[7] == (2, 0) and counts[8] == (2, 1)
    reptile.detach()
    train_step(model, opt, 9)
    assert reptile.steps_since_anchor == 1  # detached: no longer counting


# --------------------------------------------------------------------------- (d) resume
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_mid_period_is_bit_identical():
    kw = dict(k=3, epsilon=0.3)
    full = tiny()
    opt_full = torch.optim.AdamW(full.parameters(), lr=3e-3)
    r_full = with_reptile(full, opt_full, track_displacement=True, **kw)
    for step in range(8):
        train_step(full, opt_full, step)

    first = tiny()
    opt_first = torch.optim.AdamW(first.parameters(), lr=3e-3)
    r_first = with_reptile(first, opt_first, track_displacement=True, **kw)
    for step in range(4):  # one meta-update done, one step into the next period
        train_step(first, opt_first, step)
    state = {"model": first.state_dict(), "opt": opt_first.state_dict()}
    saved = _roundtrip(dict(state, reptile=r_first.state_dict()))

    def resume(load_reptile: bool) -> tuple[torch.nn.Module, Reptile]:
        model = tiny(seed=7)
        model.load_state_dict(saved["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        opt.load_state_dict(saved["opt"])
        reptile = Reptile(model.named_parameters(), cfg(**kw), track_displacement=True)
        if load_reptile:
            reptile.load_state_dict(saved["reptile"])
        reptile.attach(opt)
        for step in range(4, 8):
            train_step(model, opt, step)
        return model, reptile

    model, reptile = resume(load_reptile=True)
    assert_same(weights(model), weights(full), exact=True)
    counters = (reptile.updates, reptile.steps_since_anchor)
    assert counters == (r_full.updates, r_full.steps_since_anchor)
    assert reptile.last_displacement_cosine == r_full.last_displacement_cosine
    # Without the saved anchor the resumed run differs: the test can tell.
    model_fresh, _ = resume(load_reptile=False)
    assert max_diff(weights(model_fresh), weights(full)) > 1e-4


# --------------------------------------------------------------------------- (e) shards
class _Shard:
    """One 'rank': Parameters that alias a slice of each full parameter, like FSDP2 local shards."""

    def __init__(self, model: torch.nn.Module, rank: int, frac: float = 0.6):
        self.pairs = []
        for name, p in model.named_parameters():
            cut = math.ceil(p.numel() * frac)
            lo, hi = (0, cut) if rank == 0 else (cut, p.numel())
            shard = torch.nn.Parameter(p.detach().view(-1)[lo:hi])
            self.pairs.append((name, p, shard, lo, hi))

    def named(self):
        return [(n, s) for n, _, s, _, _ in self.pairs]

    def shards(self):
        return [s for _, _, s, _, _ in self.pairs]

    def take_grads(self) -> None:
        for _, p, s, lo, hi in self.pairs:
            s.grad = p.grad.view(-1)[lo:hi].clone()


def test_reptile_on_disjoint_shards_equals_full_application():
    kw = dict(k=2, epsilon=0.2)
    full, sharded = tiny(), tiny()
    opt_full = torch.optim.SGD(full.parameters(), lr=0.5)
    with_reptile(full, opt_full, **kw)
    ranks = [_Shard(sharded, 0), _Shard(sharded, 1)]
    opt_sh = torch.optim.SGD([s for r in ranks for s in r.shards()], lr=0.5)
    reptiles = [Reptile(r.named(), cfg(**kw)) for r in ranks]
    for r in reptiles:
        r.attach(opt_sh)
    for step in range(5):
        train_step(full, opt_full, step)
        loss_of(sharded, batch(step)).backward()
        for r in ranks:
            r.take_grads()
        opt_sh.step()
        opt_sh.zero_grad(set_to_none=True)
        sharded.zero_grad(set_to_none=True)
    assert all(r.updates == 2 for r in reptiles)
    assert_same(weights(sharded), weights(full), exact=True)
    total = sum(r.anchor_bytes() for r in reptiles)
    assert total == 4 * sum(p.numel() for p in full.parameters())


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = tiny()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        reptile = with_reptile(model, opt, k=2, epsilon=0.3, track_displacement=True)
        for step in range(5):
            rows = batch(step)
            half = rows.shape[0] // world
            loss_of(model, rows[rank * half : (rank + 1) * half]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = reptile.state_dict()
        dcp_save({"reptile": state}, checkpoint_id=os.path.join(os.path.dirname(out), "dcp"))
        fresh = Reptile(
            model.named_parameters(), cfg(k=2, epsilon=0.3), track_displacement=True
        )
        fresh_state = fresh.state_dict()
        dcp_load({"reptile": fresh_state}, checkpoint_id=os.path.join(os.path.dirname(out), "dcp"))
        fresh.load_state_dict(fresh_state)
        result = {
            "weights": {n: p.full_tensor() for n, p in model.named_parameters()},
            "anchor": {n: t.full_tensor() for n, t in state["anchor"].items()},
            "reloaded": {n: t.full_tensor() for n, t in fresh.state_dict()["anchor"].items()},
            "cos": reptile.last_displacement_cosine,
            "updates": reptile.updates,
            "shapes": [tuple(p.to_local().shape) for p in model.parameters()],
        }
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # leave together: gloo can abort a rank that tears down while one is busy
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_process():
    mp = pytest.importorskip("torch.multiprocessing")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        res = torch.load(out, weights_only=True)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reptile = with_reptile(model, opt, k=2, epsilon=0.3, track_displacement=True)
    for step in range(5):
        train_step(model, opt, step)
    assert res["updates"] == reptile.updates == 2
    assert any(s[0] < p.shape[0] for s, p in zip(res["shapes"], model.parameters(), strict=True))
    assert_same(res["weights"], weights(model), atol=2e-5)
    assert_same(res["anchor"], reptile.state_dict()["anchor"], atol=2e-5)
    assert_same(res["reloaded"], res["anchor"], exact=True)
    assert res["cos"] == pytest.approx(reptile.last_displacement_cosine, abs=1e-4)


# --------------------------------------------------------------------------- options
def test_anchor_dtypes_and_devices():
    base = tiny()
    n = sum(p.numel() for p in base.parameters())
    results = {}
    for dtype, size in (("float32", 4), ("float64", 8), ("bfloat16", 2)):
        model = copy.deepcopy(base)
        reptile = Reptile(
            model.named_parameters(), cfg(k=1, epsilon=0.4, anchor_dtype=dtype, anchor_device="cpu")
        )
        assert reptile.anchor_bytes() == size * n
        anchor = {k: v.clone() for k, v in reptile.state_dict()["anchor"].items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        theta = weights(model)
        reptile.meta_update()
        expected = hand_reptile({k: v.float() for k, v in anchor.items()}, theta, 0.4)
        assert_same(weights(model), expected, atol=1e-6)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        results[dtype] = weights(model)
    assert max_diff(results["float32"], results["float64"]) < 1e-6
    assert max_diff(results["float32"], results["bfloat16"]) > 1e-5  # bf16 anchor is coarser


def test_only_trainable_parameters_are_anchored():
    model = tiny()
    model.model.embed_tokens.weight.requires_grad_(False)
    reptile = Reptile(model.named_parameters(), cfg())
    names = set(reptile.state_dict()["anchor"])
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert reptile.anchor_bytes() == 4 * trainable


def test_displacement_cosine_matches_hand_computation():
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    reptile = Reptile([("a", params[0]), ("b", params[1])], cfg(k=1), track_displacement=True)
    g = torch.Generator().manual_seed(0)
    deltas = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    cosines = []
    for delta in deltas:
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True):
                p.add_(d)
        reptile.meta_update()
        cosines.append(reptile.last_displacement_cosine)
    flat = [torch.cat([d.reshape(-1) for d in delta]).double() for delta in deltas]
    assert cosines[0] is None
    for i in (1, 2):
        expected = F.cosine_similarity(flat[i], flat[i - 1], dim=0).item()
        assert cosines[i] == pytest.approx(expected, abs=1e-6)  # fp32 weights
    assert reptile.memory_bytes() == 2 * reptile.anchor_bytes()


def test_displacement_is_tracked_only_when_asked():
    p = torch.nn.Parameter(torch.zeros(3))
    reptile = Reptile([("a", p)], cfg(k=1))
    for _ in range(3):
        with torch.no_grad():
            p.add_(1.0)
        reptile.meta_update()
    assert reptile.last_displacement_cosine is None
    assert reptile.memory_bytes() == reptile.anchor_bytes()
    assert reptile.state_dict()["prev_displacement"] is None
    # The switch is diagnostics.every in the run config, no longer a reptile key.
    with pytest.raises(ConfigError, match="diagnostics_every: unknown key"):
        build_config(ReptileConfig, {"diagnostics_every": 5}, "reptile")


def test_reset_optimizer_moments_option():
    for reset in (False, True):
        model = tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with_reptile(model, opt, k=2, reset_optimizer_moments=reset)
        for step in range(2):
            train_step(model, opt, step)
        moments = [opt.state[p]["exp_avg"].abs().sum().item() for p in model.parameters()]
        steps = [opt.state[p]["step"].item() for p in model.parameters()]
        if reset:
            assert max(moments) == 0.0 and max(steps) == 0
        else:
            assert min(moments) > 0.0 and min(steps) == 2


def test_task_boundary_reanchors_only_when_asked():
    for reset in (False, True):
        model = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        reptile = with_reptile(model, opt, k=10, reset_at_task_boundary=reset)
        start = weights(model)
        train_step(model, opt, 0)
        reptile.on_task_boundary(opt)
        anchor = reptile.state_dict()["anchor"]
        if reset:
            assert_same(anchor, weights(model), exact=True)
            assert reptile.steps_since_anchor == 0
        else:
            assert_same(anchor, start, exact=True)
            assert reptile.steps_since_anchor == 1


# --------------------------------------------------------------------------- (f) bad input
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize(
    ("key", "value"), [("k", 0), ("k", -3), ("epsilon", 0.0), ("epsilon", -0.1), ("epsilon", 1.5)]
)
def test_bad_config_values_are_one_line_config_errors(key, value):
    with pytest.raises(ConfigError) as exc:
        build_config(ReptileConfig, {"enabled": True, key: value}, "reptile")
    assert key in _one_line(exc)
    with pytest.raises(ConfigError):
        Reptile(tiny().named_parameters(), {key: value})


def test_valid_edges_accepted():
    assert build_config(ReptileConfig, {"k": 1, "epsilon": 1.0}).epsilon == 1.0


def test_optimizer_without_hooks_is_config_error():
    class Bare:
        def __init__(self, params):
            self.param_groups = [{"params": list(params)}]

        def step(self):
            pass

    model = tiny()
    reptile = Reptile(model.named_parameters(), cfg())
    with pytest.raises(ConfigError) as exc:
        reptile.attach(Bare(model.parameters()))
    assert "register_step_post_hook" in _one_line(exc)


def test_optimizer_over_other_parameters_is_config_error():
    model = tiny()
    reptile = Reptile(model.named_parameters(), cfg())
    with pytest.raises(ConfigError) as exc:
        reptile.attach(torch.optim.SGD(tiny().parameters(), lr=0.1))
    assert "not stepped by the optimizer" in _one_line(exc)


def test_bad_checkpoint_states_are_checkpoint_errors():
    model = tiny()
    good = Reptile(model.named_parameters(), cfg()).state_dict()
    reptile = Reptile(model.named_parameters(), cfg())
    missing_one = dict(good, anchor={k: v for k, v in list(good["anchor"].items())[1:]})
    wrong_shape = dict(good, anchor={k: v.reshape(-1) for k, v in good["anchor"].items()})
    bad_counter = dict(good, steps_since_anchor=-1)
    newer = dict(good, version=99)
    for state in (
        {},
        {"steps_since_anchor": 3},
        dict(good, anchor=None),
        missing_one,
        wrong_shape,
        bad_counter,
        newer,
    ):
        with pytest.raises(CheckpointError) as exc:
            reptile.load_state_dict(state)
        _one_line(exc)
    reptile.load_state_dict(good)  # and the good one loads
