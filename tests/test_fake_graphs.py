"""Graphs mode on the CPU, with CUDA's graph, stream and generator calls faked: the code around a capture
(fast._Graph's warmups, generator rewind, static inputs and outputs; make_update's snapshot and restore before the
capture; make_act's carry and obs buffers and clones; the trainer's handling of outputs that every replay overwrites)
must reproduce eager. CI has no GPU, so without this that code runs nowhere but on a lent GPU.

The fake capture runs the function (a real capture only records it), so whatever the run changed is undone when the
capture ends: the state an update's snapshot covers (fast._snapshot) and the generator. A replay runs the function
again on the static inputs and copies its results into the captured outputs, as a real replay rewrites them. What
this cannot see: Python state frozen at capture (a real replay does not run Python), and the CUDA kernels
themselves; the CUDA tests (test_fast.py, `cuda` parameters) cover those on a GPU. Compilation is left out (its own
tests compare it with eager), so these run in seconds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_train import tiny_config

from bench.common import tiny_agent, tiny_batch
from fastdreamer import fast
from fastdreamer.train import Trainer, update_step


def _tree_copy(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        assert dst.keys() == src.keys()
        for k in dst:
            _tree_copy(dst[k], src[k])
    else:
        assert len(dst) == len(src)
        for a, b in zip(dst, src):
            _tree_copy(a, b)


@pytest.fixture
def fake_graphs(monkeypatch):
    """Graphs mode allowed on the CPU, with torch.cuda's graph API faked on the CPU generator."""
    undo: list = []  # the latest snapshot maker (make_update's agent and optimizer)
    real_snapshot = fast._snapshot

    def snapshot(agent, opt):
        undo[:] = [lambda: real_snapshot(agent, opt)]
        return real_snapshot(agent, opt)

    class Graph:
        def replay(self):
            _tree_copy(self.owner.out, self.owner.fn(self.owner.static))

    @contextlib.contextmanager
    def graph(g):
        restore = undo[0]() if undo else None
        rng = torch.get_rng_state()
        yield
        if restore is not None:
            restore()
        torch.set_rng_state(rng)

    real_init = fast._Graph.__init__

    def init(self, fn, example, warmup=3, before_capture=None, device=None):
        self.fn = fn
        real_init(self, fn, example, warmup, before_capture, device)
        self.graph.owner = self

    class Stream:
        def wait_stream(self, other):
            pass

    real_resolve = fast.resolve_mode
    monkeypatch.setattr(fast, "_snapshot", snapshot)
    monkeypatch.setattr(fast._Graph, "__init__", init)
    monkeypatch.setattr(
        fast, "resolve_mode", lambda mode, device: "graphs" if mode == "graphs" else real_resolve(mode, device)
    )
    monkeypatch.setattr(fast, "compile_agent", lambda agent: None)
    monkeypatch.setattr(fast, "compile_optimizer", lambda opt: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: torch.set_rng_state(state))
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def _run(mode: str):
    """3 updates, 3 acting steps and 2 imagination rollouts of one agent in `mode`; copies of what each returned."""
    agent, opt = tiny_agent("cpu")
    update = fast.make_update(update_step, agent, opt, mode, "fp32")
    torch.manual_seed(1)
    updates = []
    for k in range(3):
        metrics, latents = update(tiny_batch(k))
        updates.append(({n: v.clone() for n, v in metrics.items()}, {n: v.clone() for n, v in latents.items()}))
    act = fast.make_act(agent, mode, "fp32")
    carry, actions = agent.initial(3, "cpu"), []
    for s in range(3):
        data = tiny_batch(50 + s, B=3, L=1)
        torch.manual_seed(10 + s)
        action, carry = act(carry, {"vector": data["vector"][:, 0], "is_first": data["is_first"][:, 0]})
        actions.append((action, carry))
    imagine = fast.make_imagine(agent, mode, "fp32")
    gen = torch.Generator().manual_seed(7)
    deter = torch.randn(8, agent.rssm.deter, generator=gen)
    stoch = torch.nn.functional.one_hot(torch.randint(0, agent.rssm.classes, (8, agent.rssm.stoch), generator=gen))
    rollouts = []
    for s in range(2):
        torch.manual_seed(3 + s)
        feats, acts = imagine(deter + s, stoch.float())
        rollouts.append((feats.clone(), acts.clone()))
    return agent, opt, updates, actions, rollouts


def test_graphs_mode_reproduces_eager_updates_acting_and_imagination(fake_graphs):
    """The warmups before each capture leave no trace (the snapshot is complete and the generator rewound), every
    replay reads its new inputs, and the outputs a replay overwrites are copied where callers keep them."""
    want, got = _run("eager"), _run("graphs")
    tol = dict(rtol=0, atol=1e-6)  # the same eager operations; the capture's extra run must change nothing
    for k, ((wm, wl), (gm, gl)) in enumerate(zip(want[2], got[2])):
        for name in wm:
            torch.testing.assert_close(
                gm[name], wm[name], **tol, msg=lambda m, k=k, name=name: f"update {k} {name}: {m}"
            )
        for name in wl:
            torch.testing.assert_close(gl[name], wl[name], **tol)
    for (name, w), g in zip(want[0].state_dict().items(), got[0].state_dict().values()):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"parameter {name}: {m}")
    assert int(got[1].step_count) == int(want[1].step_count) == 3
    for s, ((wa, wc), (ga, gc)) in enumerate(zip(want[3], got[3])):
        assert torch.equal(ga, wa), s
        for w, g in zip(wc, gc):
            torch.testing.assert_close(g, w, **tol)
    assert got[3][0][0] is not got[3][1][0], "each acting step returns its own action, not the graph's buffer"
    for (wf, wa), (gf, ga) in zip(want[4], got[4]):
        torch.testing.assert_close(gf, wf, **tol)
        assert torch.equal(ga, wa)


def test_a_trainer_in_graphs_mode_trains_as_in_eager(fake_graphs, tmp_path):
    """The training loop around graphed updates and acting: the replay's latent write-back from the update's static
    outputs, the metrics read between updates, and a report in between (which runs eagerly on the same agent)."""

    def run(mode):
        cfg = tiny_config(tmp_path / mode, mode=mode, seed=3, report_context=2, precision="fp32")
        trainer = Trainer(cfg, log=lambda *_: None)
        while trainer.updates < 5:
            trainer.act()
            while trainer.updates_due >= 1:
                trainer.update()
                if trainer.updates == 2:
                    trainer.report()
        out = trainer.read_metrics(), {k: v.clone() for k, v in trainer.agent.state_dict().items()}
        out += ({k: v.clone() for k, v in trainer.replay.data.items()},)
        trainer.close()
        return out

    torch.backends.cudnn.allow_tf32 = True  # torch's default; a trainer turns it off (fp32 convolutions in fp32)
    (want_metrics, want_state, want_replay), (got_metrics, got_state, got_replay) = run("eager"), run("graphs")
    assert not torch.backends.cudnn.allow_tf32
    assert got_metrics.keys() == want_metrics.keys()
    for name in want_metrics:
        assert got_metrics[name] == pytest.approx(want_metrics[name], rel=1e-5, abs=1e-6, nan_ok=True), name
    for name in want_state:
        torch.testing.assert_close(got_state[name], want_state[name], rtol=0, atol=1e-6)
    for name in want_replay:
        torch.testing.assert_close(got_replay[name], want_replay[name], rtol=0, atol=1e-6)
