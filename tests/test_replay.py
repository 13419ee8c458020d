import pytest
import torch

from fastdreamer import replay as replay_mod
from fastdreamer.replay import GiB, Replay, choose_location

SPEC = {
    "t": ((), torch.int64),  # global step at which the row was added
    "env": ((), torch.int64),
    "vector": ((3,), torch.float32),
    "is_first": ((), torch.bool),
}


def _step(t: int, n: int) -> dict[str, torch.Tensor]:
    return {
        "t": torch.full((n,), t, dtype=torch.int64),
        "env": torch.arange(n),
        "vector": torch.full((n, 3), float(t)) + torch.arange(n)[:, None] * 1000,
        "is_first": torch.zeros(n, dtype=torch.bool),
    }


def _fill(r: Replay, steps: int) -> None:
    for t in range(steps):
        r.add(_step(t, r.num_envs))


@pytest.mark.parametrize("steps", [5, 12, 13, 37])  # before, at and past the first wrap, and several wraps
def test_replay_sequences_are_consecutive_within_one_stream_and_behind_the_head(steps):
    n, m, seq = 3, 12, 5
    r = Replay(SPEC, capacity=n * m + 2, num_envs=n, seq_len=seq, device="cpu", seed=1)  # +2: leftover is dropped
    assert r.length == m
    _fill(r, steps)
    data, idx = r.sample(512)
    t, env = data["t"], data["env"]  # (B, L)
    assert t.shape == (512, seq) and idx.shape == (512, seq) and idx.dtype == torch.int64
    assert (t[:, 1:] - t[:, :-1] == 1).all(), "every sequence is strictly consecutive in time"
    assert (env == env[:, :1]).all(), "a sequence stays in one stream"
    oldest = max(0, steps - m)
    assert t.min() >= oldest and t.max() <= steps - 1, "only written, not yet overwritten steps are sampled"
    assert (data["vector"] == (t.float() + env.float() * 1000)[..., None]).all()
    # idx points at exactly the slots the data came from
    assert (idx // m == env).all() and (idx % m == t % m).all()


def test_replay_is_not_ready_before_seq_len_steps():
    r = Replay(SPEC, capacity=20, num_envs=2, seq_len=4, device="cpu")
    _fill(r, 3)
    assert not r.ready()
    with pytest.raises(AssertionError, match="fewer than seq_len"):
        r.sample(2)
    r.add(_step(3, 2))
    assert r.ready()
    data, _ = r.sample(64)
    assert (data["t"] == torch.arange(4)).all(), "with exactly seq_len steps the only window is the whole stream"


def test_replay_sampling_covers_every_window_uniformly():
    n, m, seq = 2, 10, 3
    r = Replay(SPEC, capacity=n * m, num_envs=n, seq_len=seq, device="cpu", seed=0)
    _fill(r, 25)  # wrapped: streams hold t = 15..24, 8 windows each
    draws = 16000
    data, _ = r.sample(draws)
    key = data["env"][:, 0] * 100 + data["t"][:, 0]
    counts = torch.bincount(key, minlength=200).float()
    starts = [e * 100 + s for e in range(n) for s in range(15, 23)]
    assert counts.sum() == draws and counts[starts].sum() == draws, "starts only where a full window fits"
    expected = draws / len(starts)  # 1000 per window; 5 sigma of a binomial count is ~160
    assert (counts[starts] - expected).abs().max() < 160


def test_replay_write_round_trip():
    r = Replay(SPEC, capacity=40, num_envs=4, seq_len=6, device="cpu", seed=3)
    _fill(r, 23)
    data, idx = r.sample(8)
    # Overlapping samples share slots, so write a function of the slot: duplicates then agree.
    new = idx[..., None].float() * torch.tensor([1.0, -1.0, 0.5])  # (B, L, 3)
    r.write(idx[:, 1:4], {"vector": new[:, 1:4]})  # a sub-window, as the replay-context refresh does
    again = {k: v.view(-1, *v.shape[2:])[idx] for k, v in r.data.items()}  # (B, L, ...) read straight from storage
    assert torch.equal(again["vector"][:, 1:4], new[:, 1:4])
    assert torch.equal(again["t"], data["t"]), "write touches only the fields it is given"
    untouched = ~torch.isin(idx, idx[:, 1:4])  # (B, L) slots no sample's written window covers
    assert untouched.any()
    assert torch.equal(again["vector"][untouched], data["vector"][untouched])


def test_a_slot_in_several_written_windows_takes_the_last_ones_value():
    r = Replay(SPEC, capacity=40, num_envs=4, seq_len=6, device="cpu", seed=3)
    _fill(r, 23)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 40, (64, 5), generator=g)  # (B, L') with many slots in several rows
    flat = idx.reshape(-1)
    want = [max(j for j in range(len(flat)) if flat[j] == flat[i]) for i in range(len(flat))]  # plain loops
    assert r._last_writer(flat).tolist() == want
    assert len(set(flat.tolist())) < len(flat), "the case has duplicates"
    new = torch.randn(64, 5, 3, generator=g)  # different values for one slot in different rows
    r.write(idx, {"vector": new})
    stored = r.data["vector"].view(-1, 3)
    for i, slot in enumerate(flat.tolist()):
        if want[i] == i:
            assert torch.equal(stored[slot], new.view(-1, 3)[i])


def test_replay_state_dict_resumes_exactly():
    a = Replay(SPEC, capacity=30, num_envs=3, seq_len=4, device="cpu", seed=7)
    _fill(a, 17)
    a.sample(5)  # advance the sampler's RNG before saving
    state = a.state_dict()
    b = Replay(SPEC, capacity=30, num_envs=3, seq_len=4, device="cpu", seed=99)
    b.load_state_dict(state)
    for t in range(17, 20):  # adding after the resume continues at the same head
        a.add(_step(t, 3))
        b.add(_step(t, 3))
    for _ in range(3):
        (da, ia), (db, ib) = a.sample(9), b.sample(9)
        assert torch.equal(ia, ib)
        for k in SPEC:
            assert torch.equal(da[k], db[k])
    other = Replay(SPEC, capacity=40, num_envs=3, seq_len=4, device="cpu", seed=5)
    other.load_state_dict(state)  # wrapped, so it cannot regrow: the ring takes the state's own length
    same = Replay(SPEC, capacity=30, num_envs=3, seq_len=4, device="cpu")
    same.load_state_dict(state)
    assert other.length == 10 and torch.equal(other.sample(9)[1], same.sample(9)[1])
    with pytest.raises(ValueError, match="seq_len"):
        Replay(SPEC, capacity=40, num_envs=3, seq_len=5, device="cpu").load_state_dict(state)


@pytest.mark.parametrize("full", [False, True])
def test_replay_state_regrows_into_a_longer_ring_while_unwrapped(full):
    # A run sized its ring to its --steps (config.replay_capacity) and is resumed with more: the state moves into a
    # longer ring, which then samples exactly what a ring of that length all along would have sampled.
    n, seq, written = 3, 4, 8 if full else 6
    small = Replay(SPEC, capacity=n * 8, num_envs=n, seq_len=seq, device="cpu", seed=7, online=True)
    always = Replay(SPEC, capacity=n * 20, num_envs=n, seq_len=seq, device="cpu", seed=7, online=True)
    for r in (small, always):
        _fill(r, written)
        r.sample(5)  # the RNG and the online queue move on before the save
    grown = Replay(SPEC, capacity=n * 20, num_envs=n, seq_len=seq, device="cpu", seed=0, online=True)
    for k in SPEC:
        grown.data[k].fill_(-1)  # slots past the state's steps must come back empty, as in a fresh ring
    grown.load_state_dict(small.state_dict())
    for k in SPEC:
        assert torch.equal(grown.data[k], always.data[k])
    assert (grown.head, grown.count, grown.consumed) == (always.head, always.count, always.consumed)
    for t in range(written, 19):  # past the small ring's length: it would have wrapped, the grown one does not
        grown.add(_step(t, n))
        always.add(_step(t, n))
        (dg, ig), (da, ia) = grown.sample(7), always.sample(7)
        assert torch.equal(ig, ia)
        for k in SPEC:
            assert torch.equal(dg[k], da[k])
    state = always.state_dict()  # 19 steps per env written
    kept = Replay(SPEC, capacity=n * 12, num_envs=n, seq_len=seq, device="cpu")  # too short: the state's length
    kept.load_state_dict(state)  # (a run resumed with fewer --steps than it has taken)
    assert kept.length == 20 and all(torch.equal(kept.data[k], always.data[k]) for k in SPEC)
    assert torch.equal(kept.sample(7)[1], always.sample(7)[1])
    shrunk = Replay(SPEC, capacity=n * 19, num_envs=n, seq_len=seq, device="cpu")  # they still fit: taken
    shrunk.load_state_dict(state)
    assert torch.equal(shrunk.data["t"], always.data["t"][:, :19]) and shrunk.head == 0


def test_online_queue_trains_every_fresh_chunk_once_before_uniform_samples():
    n, seq = 3, 4
    r = Replay(SPEC, capacity=n * 40, num_envs=n, seq_len=seq, device="cpu", seed=3, online=True)
    u = Replay(SPEC, capacity=n * 40, num_envs=n, seq_len=seq, device="cpu", seed=3)  # same draws, no queue
    _fill(r, 9)  # chunks [0, 4) and [4, 8) of each stream are complete; [8, 12) is not
    _fill(u, 9)
    d1, _ = r.sample(4)
    u.sample(4)
    # Queue order: chunk 0 of streams 0, 1, 2, then chunk 1 of stream 0; each row is the whole chunk.
    assert d1["env"][:, 0].tolist() == [0, 1, 2, 0]
    assert d1["t"].tolist() == [[0, 1, 2, 3]] * 3 + [[4, 5, 6, 7]]
    d2, i2 = r.sample(5)
    assert d2["env"][:2, 0].tolist() == [1, 2] and d2["t"][:2].tolist() == [[4, 5, 6, 7]] * 2
    d2u, i2u = u.sample(5)
    assert torch.equal(i2[2:], i2u[2:]), "rows past the queue are the uniform draws, the RNG stream unchanged"
    d3, i3 = r.sample(5)
    assert torch.equal(i3, u.sample(5)[1]), "an empty queue leaves the batch uniform"
    r.add(_step(9, n))
    r.add(_step(10, n))
    r.add(_step(11, n))  # completes chunk [8, 12) of every stream
    d4, _ = r.sample(6)
    assert d4["env"][:3, 0].tolist() == [0, 1, 2] and d4["t"][:3].tolist() == [[8, 9, 10, 11]] * 3
    assert (d4["t"][:, 1:] - d4["t"][:, :-1] == 1).all() and (d4["env"] == d4["env"][:, :1]).all()


def test_online_queue_skips_chunks_the_ring_has_overwritten():
    n, m, seq = 2, 10, 4
    r = Replay(SPEC, capacity=n * m, num_envs=n, seq_len=seq, device="cpu", seed=0, online=True)
    _fill(r, 25)  # steps 15..24 are in the ring: chunks [0, 4) .. [12, 16) are (partly) gone; [16, 20), [20, 24) remain
    data, _ = r.sample(6)
    assert data["t"][:, 0].tolist()[:4] == [16, 16, 20, 20] and data["env"][:4, 0].tolist() == [0, 1, 0, 1]
    assert data["t"].min() >= 15, "nothing overwritten is sampled"


def test_online_queue_position_resumes_exactly():
    a = Replay(SPEC, capacity=60, num_envs=3, seq_len=4, device="cpu", seed=7, online=True)
    _fill(a, 13)
    a.sample(2)  # part of the queue taken before the checkpoint
    b = Replay(SPEC, capacity=60, num_envs=3, seq_len=4, device="cpu", seed=1, online=True)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(a.sample(4)[1], b.sample(4)[1])
    old = {k: v for k, v in a.state_dict().items() if k != "consumed"}  # a checkpoint from before the queue
    c = Replay(SPEC, capacity=60, num_envs=3, seq_len=4, device="cpu", seed=7, online=True)
    c.load_state_dict(old)
    assert c.consumed == (13 // 4) * 3, "an old checkpoint resumes with its queue drained"


def test_replay_rejects_seq_len_longer_than_a_stream():
    with pytest.raises(
        ValueError, match=r"holds 4 steps per env, fewer than seq_len 5; raise the capacity to at least 40"
    ):
        Replay(SPEC, capacity=35, num_envs=8, seq_len=5, device="cpu")


def test_replay_add_checks_keys_and_shapes():
    r = Replay(SPEC, capacity=20, num_envs=2, seq_len=2, device="cpu")
    step = _step(0, 2)
    del step["env"]
    with pytest.raises(KeyError, match="lacks 'env'"):
        r.add(step)
    with pytest.raises(AssertionError, match="expects"):
        r.add(_step(0, 3))


def test_replay_nbytes_counts_every_field():
    r = Replay(SPEC, capacity=20, num_envs=2, seq_len=2, device="cpu")
    assert r.nbytes == 20 * (8 + 8 + 12 + 1) == sum(v.numel() * v.element_size() for v in r.data.values())
    assert r.location == "cpu"


def _fake_memory(monkeypatch, device_free: float, device_total: float, host: float) -> None:
    monkeypatch.setattr(replay_mod, "_device_memory", lambda device: (int(device_free * GiB), int(device_total * GiB)))
    monkeypatch.setattr(replay_mod, "_host_available", lambda: int(host * GiB))


def test_replay_placement_prefers_device_then_pinned_host_then_refuses(monkeypatch):
    cuda = torch.device("cuda")
    _fake_memory(monkeypatch, device_free=60, device_total=80, host=100)
    assert choose_location(50 * GiB, cuda) == "cuda"
    assert choose_location(53 * GiB, cuda) == "pinned host", "keeps 10% of the device (8 GiB) as headroom"
    _fake_memory(monkeypatch, device_free=3, device_total=16, host=100)
    assert choose_location(int(0.9 * GiB), cuda) == "cuda"
    assert choose_location(int(1.1 * GiB), cuda) == "pinned host", "keeps at least 2 GiB of the device free"
    assert choose_location(89 * GiB, cuda) == "pinned host"
    with pytest.raises(
        ValueError, match=r"replay of 91.00 GiB fits neither in device memory \(3.00 GiB free\) nor in host"
    ):
        choose_location(91 * GiB, cuda)


def test_replay_placement_follows_the_capacity_it_may_grow_to(monkeypatch):
    # A ring sized to a run's --steps lives where the whole --replay-size ring would (the sampling generator lives
    # with it, and a resume may grow it), unless that fits nowhere.
    asked = []

    def choose(nbytes, device):
        asked.append(nbytes)
        if nbytes > 1000:
            raise ValueError("fits nowhere")
        return "cpu"

    monkeypatch.setattr(replay_mod, "choose_location", choose)
    step = 3 * (8 + 8 + 12 + 1)  # bytes of one step of the 3 envs
    Replay(SPEC, capacity=3 * 5, num_envs=3, seq_len=4, device="cpu", place_for=3 * 10)
    assert asked == [10 * step]
    Replay(SPEC, capacity=3 * 5, num_envs=3, seq_len=4, device="cpu", place_for=3 * 100)
    assert asked[1:] == [100 * step, 5 * step]


def test_replay_refuses_a_buffer_larger_than_host_memory_on_cpu(monkeypatch):
    _fake_memory(monkeypatch, device_free=0, device_total=0, host=2.5)
    spec = {"image": ((64, 64, 3), torch.uint8)}
    with pytest.raises(ValueError, match=r"replay of 1.14 GiB does not fit in host memory \(2.50 GiB available\)"):
        Replay(spec, capacity=100_000, num_envs=4, seq_len=64, device="cpu")  # 100k * 12 KiB = 1.14 GiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("location", ["cuda", "pinned host"])
def test_replay_on_cuda_matches_the_contract(monkeypatch, location):
    monkeypatch.setattr(replay_mod, "choose_location", lambda nbytes, device: location)
    r = Replay(SPEC, capacity=36, num_envs=3, seq_len=5, device="cuda", seed=1)
    assert r.location == location
    for t in range(29):
        r.add({k: v.cuda() for k, v in _step(t, 3).items()})
    for _ in range(3):  # exercises both pinned staging slots
        data, idx = r.sample(64)
        assert data["t"].is_cuda and idx.is_cuda
        assert (data["t"][:, 1:] - data["t"][:, :-1] == 1).all() and data["t"].min() >= 29 - 12
    r.write(idx, {"vector": torch.zeros(64, 5, 3, device="cuda")})
    assert (r.data["vector"].view(-1, 3)[idx.cpu()] == 0).all()
