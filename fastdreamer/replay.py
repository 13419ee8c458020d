"""Replay: N streams (one per env) in one preallocated ring, sampled on the training device without host syncs.

Every field is stored as (N, M, ...) with M = capacity // N steps per stream. add() writes one step for all N envs
at the head, a host-side int, so adding never reads a tensor. sample() draws (stream, start) pairs uniformly over
all windows of seq_len steps that lie inside written data in temporal order, so no sequence crosses the write head.
Sequences may cross episode boundaries; is_first marks them.

With online=True (the reference's `replay.online`), every stream's fresh chunk of seq_len steps (logical steps
[j * L, (j + 1) * L) of each stream, complete after the (j + 1) * L-th add) is queued, and sample() takes queued
windows first, each once, and fills the rest of the batch uniformly. All streams advance together, so the queue is
two host ints: entries produced ((count // L) * N, entry q = chunk q // N of stream q % N) and entries consumed.
"""

from __future__ import annotations

import math

import torch

GiB = 1024**3


def _device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on a CUDA device."""
    return torch.cuda.mem_get_info(device)


def _host_available() -> int:
    """Bytes of host RAM available to new allocations (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def _headroom(total: int) -> int:
    # Leave room for the model, activations and the CUDA graphs' private pools (or the rest of the process).
    return max(2 * GiB, total // 10)


def choose_location(nbytes: int, device: torch.device) -> str:
    """'cuda' if the buffer fits in free device memory, else 'pinned host' if it fits in host RAM; 'cpu' on CPU."""
    host = _host_available()
    host_fits = nbytes <= host - _headroom(host)
    if device.type == "cuda":
        free, total = _device_memory(device)
        if nbytes <= free - _headroom(total):
            return "cuda"
        if host_fits:
            return "pinned host"
        raise ValueError(
            f"replay of {nbytes / GiB:.2f} GiB fits neither in device memory ({free / GiB:.2f} GiB free) "
            f"nor in host memory ({host / GiB:.2f} GiB available); lower the replay capacity"
        )
    if host_fits:
        return "cpu"
    raise ValueError(
        f"replay of {nbytes / GiB:.2f} GiB does not fit in host memory ({host / GiB:.2f} GiB available); "
        "lower the replay capacity"
    )


class Replay:
    def __init__(
        self,
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
        capacity: int,
        num_envs: int,
        seq_len: int,
        device: torch.device | str,
        seed: int = 0,
        online: bool = False,
        place_for: int | None = None,
    ):
        """`place_for`: the capacity (>= capacity) whose size picks where the ring lives, when the ring may grow to it
        on a resume (a ring sized to a run's steps): the sampling generator lives with the ring, and a CUDA and a
        CPU generator draw different numbers and cannot take each other's state. Where that size fits nowhere,
        the ring's own size picks."""
        if num_envs < 1 or seq_len < 1:
            raise ValueError(f"replay needs num_envs >= 1 and seq_len >= 1, got {num_envs} and {seq_len}")
        self.length = capacity // num_envs  # M, steps per stream
        if seq_len > self.length:
            raise ValueError(
                f"replay capacity {capacity} over {num_envs} envs holds {self.length} steps per env, fewer than "
                f"seq_len {seq_len}; raise the capacity to at least {seq_len * num_envs}"
            )
        self.spec, self.num_envs, self.seq_len = dict(spec), num_envs, seq_len
        self.device = torch.device(device)
        self._step_bytes = num_envs * sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec.values()
        )
        self.nbytes = self._step_bytes * self.length
        try:
            self.location = choose_location(self._step_bytes * (max(place_for or 0, capacity) // num_envs), self.device)
        except ValueError:
            self.location = choose_location(self.nbytes, self.device)
        store = self._store()
        self._allocate(self.length)
        self.head = 0  # next slot written in every stream
        self.count = 0  # steps added per stream, total (not capped)
        self.online = online
        self.consumed = 0  # online queue entries taken so far (host int)
        self.generator = torch.Generator(device=store).manual_seed(seed)
        self._offsets = torch.arange(seq_len, device=store)  # (L,)
        self._staging: dict[int, tuple[list[dict[str, torch.Tensor]], list]] = {}  # batch -> pinned slots, events
        self._slot = 0

    def _store(self) -> torch.device:
        """Where the storage, its sampling generator and index arithmetic live."""
        return self.device if self.location == "cuda" else torch.device("cpu")

    def _allocate(self, length: int) -> None:
        """Zeroed (N, length, ...) storage for every field, where self.location says."""
        store, pin, n = self._store(), self.location == "pinned host", self.num_envs
        self.length, self.nbytes = length, self._step_bytes * length
        self.data = {
            k: torch.zeros((n, length, *shape), dtype=dt, device=store, pin_memory=pin)
            for k, (shape, dt) in self.spec.items()
        }
        self._flat = {k: v.view(n * length, *v.shape[2:]) for k, v in self.data.items()}  # (N * M, ...) for gathers
        self._writer = torch.empty(n * length, dtype=torch.int64, device=store)  # write()'s last writer per slot

    def __len__(self) -> int:
        return min(self.count, self.length) * self.num_envs

    def add(self, step: dict[str, torch.Tensor]) -> None:
        """Write one step for all N envs; step[k] is (N, *shape) for every key of the spec (extra keys ignored)."""
        n, h = self.num_envs, self.head
        dst, src = [], []
        for key, (shape, _) in self.spec.items():
            if key not in step:
                raise KeyError(f"replay step lacks '{key}'; it has {sorted(step)}")
            value = step[key]
            assert value.shape == (n, *shape), f"replay '{key}' expects {(n, *shape)}, got {tuple(value.shape)}"
            dst.append(self.data[key][:, h])
            src.append(value)
        if self.location != "pinned host":
            torch._foreach_copy_(dst, src, non_blocking=True)  # one fused launch for all fields on CUDA
        else:
            # Blocking: host-side sampling reads these slots right away, so a D2H copy must have landed.
            for d, s in zip(dst, src):
                d.copy_(s)
        self.head = (h + 1) % self.length
        self.count += 1

    def end_episodes(self) -> None:
        """Mark every stream's newest step as its episode's last (when the envs restart after it: a resume), so
        that no window reads on across the restart; the reference's replay marks such cuts in sampled batches."""
        if self.count and "is_last" in self.data:
            self.data["is_last"][:, (self.head - 1) % self.length] = True

    def ready(self) -> bool:
        """At least seq_len steps in every stream."""
        return self.count >= self.seq_len

    def windows(self) -> int:
        """Sequences of seq_len steps that sample() can draw from: the reference's len(replay)."""
        return self.num_envs * max(0, min(self.count, self.length) - self.seq_len + 1)

    def sample(self, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Draw B sequences of L steps: data[k] (B, L, *shape) on the device, idx (B, L) int64 flat slot indices."""
        assert self.ready(), (
            f"replay holds {min(self.count, self.length)} steps per env, fewer than seq_len {self.seq_len}"
        )
        store = self.generator.device
        stream, start = self._uniform(batch, self.generator)
        if self.online:
            first, k = self._take_online(batch)
            if k:  # the first k rows train on the queued fresh chunks; the uniform draws above are still consumed
                q = first + torch.arange(k, device=store)
                stream = torch.cat([q % self.num_envs, stream[k:]])
                start = torch.cat([(q // self.num_envs) * self.seq_len, start[k:]])  # logical; _slots wraps it
        idx = self._slots(stream, start)
        if self.location != "pinned host":
            flat = idx.view(-1)
            return {
                k: v.index_select(0, flat).view(batch, self.seq_len, *v.shape[1:]) for k, v in self._flat.items()
            }, idx
        out = self._gather_pinned(idx)
        return out, idx.to(self.device, non_blocking=True)

    def _uniform(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, physical start before the wrap) of B windows drawn uniformly over all written ones."""
        filled = min(self.count, self.length)
        windows = filled - self.seq_len + 1  # valid starts per stream
        oldest = (self.head - filled) % self.length  # physical slot of each stream's oldest step
        pick = torch.randint(self.num_envs * windows, (batch,), generator=generator, device=generator.device)  # (B,)
        stream = pick // windows
        return stream, pick - stream * windows + oldest

    def _slots(self, stream: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """(B, L) flat slot indices of the windows at (stream, start)."""
        return stream[:, None] * self.length + (start[:, None] + self._offsets) % self.length

    def peek(self, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """B windows drawn uniformly with a generator of their own, on the device: for reports. The replay's state
        (its generator, the online queue, the pinned staging slots) is left as it was, so a report never changes
        what training samples next."""
        assert self.ready(), f"replay holds {min(self.count, self.length)} steps per env, fewer than {self.seq_len}"
        generator = torch.Generator(device=self.generator.device).manual_seed(seed)
        stream, start = self._uniform(batch, generator)
        flat = self._slots(stream, start).view(-1)
        return {
            k: v.index_select(0, flat).view(batch, self.seq_len, *v.shape[1:]).to(self.device)
            for k, v in self._flat.items()
        }

    def _take_online(self, batch: int) -> tuple[int, int]:
        """(first entry, how many) of the online queue for a batch of `batch`, host arithmetic only. Entries whose
        chunk the ring has already overwritten are dropped (only when the updates fall a whole ring behind)."""
        n, length = self.num_envs, self.seq_len
        produced = (self.count // length) * n
        oldest_valid_chunk = -(-(self.count - min(self.count, self.length)) // length)  # ceil
        self.consumed = max(self.consumed, oldest_valid_chunk * n)
        k = max(0, min(produced - self.consumed, batch))
        first = self.consumed
        self.consumed += k
        return first, k

    def _gather_pinned(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        # Host gather into a pinned slot, then an async copy; two slots with events so a slot is refilled only after
        # its previous copy has finished.
        batch = idx.shape[0]
        if batch not in self._staging:
            slots = [
                {
                    k: torch.empty((batch * self.seq_len, *v.shape[1:]), dtype=v.dtype, pin_memory=True)
                    for k, v in self._flat.items()
                }
                for _ in range(2)
            ]
            self._staging[batch] = (slots, [torch.cuda.Event(), torch.cuda.Event()])
        slots, events = self._staging[batch]
        self._slot ^= 1
        events[self._slot].synchronize()
        flat, out = idx.view(-1), {}
        for key, src in self._flat.items():
            dst = slots[self._slot][key]
            torch.index_select(src, 0, flat, out=dst)
            out[key] = dst.to(self.device, non_blocking=True).view(batch, self.seq_len, *src.shape[1:])
        events[self._slot].record()
        return out

    def write(self, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Overwrite fields at idx (B, L') from sample(): values[k] is (B, L', *shape). Used to refresh latents.

        A slot overwritten by add() between sample() and write() gets the stale value; with M far above the steps
        taken per update this does not happen. Windows of one stream that start fewer than L steps apart share slots:
        each such slot takes the value of the last window that holds it (in batch order), on every device (CUDA's
        index_copy_ leaves which of several writes lands open)."""
        flat = idx.reshape(-1).to(self._offsets.device)
        src = self._last_writer(flat)
        for key, value in values.items():
            dst = self._flat[key]
            assert value.shape == (*idx.shape, *dst.shape[1:]), (
                f"replay write '{key}' expects {(*idx.shape, *dst.shape[1:])}, got {tuple(value.shape)}"
            )
            value = value.reshape(-1, *dst.shape[1:]).to(dst.device, dst.dtype)
            dst.index_copy_(0, flat, value.index_select(0, src.to(value.device)))  # duplicates write equal values

    def _last_writer(self, flat: torch.Tensor) -> torch.Tensor:
        """For each position of flat slot indices, the last position holding the same slot (a max is the same in
        any order of the writes, unlike a scatter of the positions). include_self=False: the slots read back are
        exactly those written here, so the ring-sized buffer needs no clearing per update."""
        pos = torch.arange(flat.numel(), device=flat.device)
        self._writer.scatter_reduce_(0, flat, pos, reduce="amax", include_self=False)
        return self._writer.index_select(0, flat)

    def state_dict(self) -> dict:
        """Everything for an exact resume: the buffers (live references; torch.save copies them), counters, RNG."""
        return {
            "data": self.data,
            "head": self.head,
            "count": self.count,
            "consumed": self.consumed,
            "generator": self.generator.get_state(),
            "shape": (self.num_envs, self.length, self.seq_len),
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict into a ring of the same N and L. Its length may differ (rings sized to a run's
        --steps): a longer or shorter ring takes a state that has never wrapped and whose steps fit, with logical
        step s in slot s in both, so the windows, the online queue and the draws are those of a ring that had this
        length all along; any other state brings its own length (this ring is reallocated)."""
        num_envs, length, seq_len = (int(x) for x in d["shape"])
        count = int(d["count"])
        if (num_envs, seq_len) != (self.num_envs, self.seq_len):
            raise ValueError(
                f"replay state has (num_envs, steps per env, seq_len) = {(num_envs, length, seq_len)}, "
                f"this replay has {(self.num_envs, self.length, self.seq_len)}"
            )
        if set(d["data"]) != set(self.data):
            raise ValueError(f"replay state has fields {sorted(d['data'])}, this replay has {sorted(self.data)}")
        regrow = length != self.length and count <= min(length, self.length)
        if length != self.length and not regrow:
            self._allocate(length)
        for key, value in d["data"].items():
            if regrow:
                self.data[key].zero_()
                self.data[key][:, :count].copy_(value[:, :count])
            else:
                self.data[key].copy_(value)
        self.head, self.count = (count % self.length if regrow else int(d["head"])), count
        # A checkpoint from before the online queue: treat its queue as drained.
        self.consumed = int(d.get("consumed", (self.count // self.seq_len) * self.num_envs))
        self.generator.set_state(d["generator"].cpu())  # set_state takes a CPU byte tensor, even for a CUDA generator
