"""MoLEFlow: positional encoding → WhiteningAdapter[t] → SpatialMixer → base flow with LoRA[t] → DIA[t].

    x (B, H, W, C) ──prepare──► u (B, H, W, C') ──flow_forward──► z (B, H, W, C'), log|det J| (B, H, W)

`prepare` (positional encoding, whitening, spatial mixer) builds the flow's input; the density and
the invertibility contract are those of `flow_forward` = base flow (shared weights + LoRA[t] + task
bias[t]) followed by DIA[t]. C' = C, or C + pos_encoding_dim with pos_encoding "concat".

Tasks are integers 0, 1, ...; task t's modules live under the key str(t): `lora_A.t`, `lora_B.t`,
`task_bias.t` inside every LoRALinear, `whitening.t`, `dia.t`. Everything else is shared. The active
task is explicit: `with model.use_task(t): ...`; calling the model with tasks but without an active
task is an error.

Complete separation (V4.1): `set_trainable(0)` opens the shared part (flow weights, context convs and
α, spatial mixer) and task 0's own modules; `set_trainable(t ≥ 1)` opens task t's own modules only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from moleflow.model.adapters import DIA, SpatialMixer, StatsWhitening, WhiteningAdapter
from moleflow.config import ModelConfig
from moleflow.model.flow import BaseFlow
from moleflow.model.lora import LoRALinear
from moleflow.model.memory import NO_WEIGHT, PatchMemory, greedy_coreset, scale_sample
from moleflow.model.positional import PositionalEncoding


class MoLEFlow(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"MoLEFlow: channels must be >= 1, got {channels}")
        if cfg.dia_blocks < 0:
            raise ValueError(f"model.dia_blocks must be >= 0, got {cfg.dia_blocks}")
        self.cfg = cfg
        self.in_channels = channels
        self.pos = PositionalEncoding(cfg.pos_encoding, channels, cfg.pos_encoding_dim)
        self.channels = self.pos.out_channels  # the flow's (and z's) channel count
        if self.channels < 2:
            raise ValueError(f"MoLEFlow: the flow needs at least 2 channels, got {self.channels}")
        self.whitening = nn.ModuleDict()  # per task; stays empty with whitening off
        # Statistics whitening acts on the raw features, before the positional encoding; the notes'
        # LayerNorm adapter acts after it.
        self.stats_whitening = cfg.whitening and cfg.whitening_mode != "layernorm"
        self.mixer = SpatialMixer(self.channels) if cfg.spatial_mixer else None
        self.flow = BaseFlow(self.channels, cfg)
        self.dia = nn.ModuleDict()  # per task; stays empty with dia_blocks = 0
        self.memory = nn.ModuleDict()  # per task; stays empty with memory_share = 0
        self._task_keys: list[str] = []
        self._active: str | None = None

    # ------------------------------------------------------------------ tasks

    @property
    def task_keys(self) -> list[str]:
        return list(self._task_keys)

    @property
    def tasks(self) -> list[int]:
        return [int(k) for k in self._task_keys]

    @property
    def num_tasks(self) -> int:
        return len(self._task_keys)

    @property
    def active_task(self) -> int | None:
        return None if self._active is None else int(self._active)

    @property
    def device(self) -> torch.device:
        return self.flow.blocks[0].subnet.fc1.weight.device

    def _lora_layers(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def _key(self, t: int) -> str:
        key = str(int(t))
        if key not in self._task_keys:
            raise KeyError(f"task {t} does not exist in the model (tasks: {self.tasks}); add it with model.add_task({t})")
        return key

    def add_task(self, t: int) -> None:
        """Create task t's modules: LoRA experts and task biases, WhiteningAdapter[t], DIA[t]."""
        if isinstance(t, bool) or int(t) != t or t < 0:
            raise ValueError(f"task ids are integers >= 0, got {t!r}")
        key = str(int(t))
        if key in self._task_keys:
            raise ValueError(f"task {t} already exists in the model")
        ref = self.flow.blocks[0].subnet.fc1.weight
        for layer in self._lora_layers():
            layer.add_task(key)
        cfg = self.cfg
        if self.stats_whitening:
            self.whitening[key] = StatsWhitening(self.in_channels, cfg.whitening_mode, cfg.whitening_eps).to(
                device=ref.device, dtype=ref.dtype
            )
        elif cfg.whitening:
            self.whitening[key] = WhiteningAdapter(
                self.channels, int(t), cfg.whitening_gamma_min, cfg.whitening_gamma_max, cfg.whitening_beta_max
            ).to(device=ref.device, dtype=ref.dtype)
        if cfg.dia_blocks > 0:
            self.dia[key] = DIA(self.channels, cfg.dia_blocks, cfg.dia_hidden_ratio, cfg.clamp).to(
                device=ref.device, dtype=ref.dtype
            )
        if cfg.memory_share > 0:
            self.memory[key] = PatchMemory(self.in_channels).to(device=ref.device, dtype=ref.dtype)
        self._task_keys.append(key)

    def remove_task(self, t: int) -> None:
        """Drop task t's modules (e.g. after a failed training run)."""
        key = self._key(t)
        for layer in self._lora_layers():
            layer.remove_task(key)
        for d in (self.whitening, self.dia, self.memory):
            if key in d:
                del d[key]
        self._task_keys.remove(key)
        if self._active == key:
            self._set_active(None)

    def _set_active(self, key: str | None) -> None:
        self._active = key
        for layer in self._lora_layers():
            layer.active_task = key

    @contextlib.contextmanager
    def use_task(self, t: int) -> Iterator["MoLEFlow"]:
        """Make task t the active one inside the block (restores the previous one afterwards)."""
        key = self._key(t)
        previous = self._active
        self._set_active(key)
        try:
            yield self
        finally:
            self._set_active(previous)

    def _require_active(self) -> str:
        if self._active is None:
            raise RuntimeError(
                f"MoLEFlow called without an active task; wrap the call in `with model.use_task(t):` (tasks: {self.tasks})"
            )
        return self._active

    # ------------------------------------------------------------------ forward

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, H, W, C) -> flow input u (B, H, W, C'): positional encoding, whitening[t], mixer."""
        if x.dim() != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"MoLEFlow expects patch features (B, H, W, {self.in_channels}) channels-last, got {tuple(x.shape)}"
            )
        if self.stats_whitening:
            u = self.pos(self.whitening[self._require_active()](x))
        else:
            u = self.pos(x)
            if self.cfg.whitening:
                u = self.whitening[self._require_active()](u)
        if self.mixer is not None:
            u = self.mixer(u)
        return u

    def flow_forward(self, u: torch.Tensor, block_logdets: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, H, W, C') -> (z (B, H, W, C'), log|det J| (B, H, W)) through base flow + DIA[t].
        `block_logdets`, when given, receives each coupling block's log-det, then DIA's (analyses)."""
        z, log_det = self.flow(u, block_logdets=block_logdets)
        if self.cfg.dia_blocks > 0:
            z, ld = self.dia[self._require_active()](z)
            log_det = log_det + ld
            if block_logdets is not None:
                block_logdets.append(ld)
        return z, log_det

    def flow_inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inverse of flow_forward; returns (u, log|det| of the inverse map = −forward's)."""
        log_det = z.new_zeros(z.shape[:-1])
        if self.cfg.dia_blocks > 0:
            z, log_det = self.dia[self._require_active()].inverse(z)
        u, ld = self.flow.inverse(z)
        return u, log_det + ld

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the active task: x (B, H, W, C) -> (z (B, H, W, C'), log_det (B, H, W)).

        With statistics whitening its constant log-det is included, so ½‖z‖² − log_det is the NLL of
        the features x (comparable between tasks, as the hybrid router needs).
        """
        z, log_det = self.flow_forward(self.prepare(x))
        if self.stats_whitening:
            log_det = log_det + self.whitening[self._require_active()].log_det
        return z, log_det

    def fit_statistics(self, t: int, patches: torch.Tensor) -> None:
        """Fix task t's statistics whitening from its training patches (N, H, W, C); no-op otherwise."""
        if self.stats_whitening:
            self.whitening[self._key(t)].fit(patches)

    def fit_memory(self, t: int, patches: torch.Tensor, seed: int, flow_scale: bool = True) -> None:
        """Fill task t's patch memory with a greedy coreset of `model.memory_share` of its training
        patches (N, H, W, C); no-op without a memory. `flow_scale=False` skips the flow's ‖z‖ median
        (left at 1) for a throwaway model whose scores read the memory alone and whose flow never trained."""
        key = self._key(t)
        if key not in self.memory:
            return
        bank = patches.reshape(-1, patches.shape[-1]).to(device=self.device, dtype=torch.float32)  # (N·H·W, C)
        idx = greedy_coreset(bank, max(1, int(self.cfg.memory_share * len(bank))), seed)
        memory = self.memory[key]
        memory.bank = bank[idx].clone()
        # the scales: medians over (up to 32 of) the training images' patches, after the flow trained
        sample = patches[scale_sample(len(patches))]
        x = sample.to(device=self.device, dtype=torch.float32)  # (b, H, W, C)
        with torch.no_grad(), self.use_task(t):
            m_z = self(x)[0].norm(dim=-1).median() if flow_scale else x.new_ones(())
            memory.scale = torch.stack([m_z, memory.distance(x).median()]).clamp_min(1e-12)

    def memory_distance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under the active task: x (B, H, W, C) -> (distance to the nearest memory patch (B, H, W), the
        memory's scales (2,): flow ‖z‖ and distance medians over the task's training patches)."""
        key = self._require_active()
        if key not in self.memory:
            raise RuntimeError(f"task {key} has no patch memory (model.memory_share = 0 when it was built)")
        return self.memory[key].distance(x), self.memory[key].scale

    def set_memory_weight(self, t: int, weight: float) -> None:
        """Store task t's own blend weight (chosen when it trained; read by scoring.task_patch_scores)."""
        self.memory[self._key(t)].weight.fill_(weight)

    def memory_weight(self) -> float | None:
        """The active task's stored blend weight, or None when it has none (no memory, or none chosen)."""
        key = self._require_active()
        w = float(self.memory[key].weight) if key in self.memory else NO_WEIGHT
        return None if w < 0 else round(w, 6)  # stored in float32: 0.9 comes back as 0.9000000238

    def forward_routed(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image under its own task: one sub-batch per distinct task, results scattered back."""
        b = x.shape[0]
        if task_ids.dim() != 1 or task_ids.shape[0] != b:
            raise ValueError(f"forward_routed: task_ids must have shape ({b},), got {tuple(task_ids.shape)}")
        if b == 0:
            return x.new_zeros(0, *x.shape[1:3], self.channels), x.new_zeros(0, *x.shape[1:3])
        task_ids = task_ids.to(device=x.device, dtype=torch.long)
        unique = torch.unique(task_ids).tolist()
        if len(unique) == 1:
            with self.use_task(unique[0]):
                return self(x)
        zs, lds, idxs = [], [], []
        for t in unique:
            idx = (task_ids == t).nonzero(as_tuple=True)[0]  # (n_t,)
            with self.use_task(t):
                z, ld = self(x.index_select(0, idx))
            zs.append(z)
            lds.append(ld)
            idxs.append(idx)
        order = torch.cat(idxs)  # position in the concatenation -> original index
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=order.device)
        return torch.cat(zs).index_select(0, inverse), torch.cat(lds).index_select(0, inverse)

    # ------------------------------------------------------------------ training

    def _task_tensor_ids(self, key: str) -> set[int]:
        """ids of the parameters and buffers owned by task `key`."""
        tensors: list[torch.Tensor] = []
        for layer in self._lora_layers():
            tensors.extend(layer.task_parameters(key))
        for d in (self.whitening, self.dia, self.memory):
            if key in d:
                tensors.extend(d[key].state_dict(keep_vars=True).values())
        return {id(v) for v in tensors}

    def set_trainable(self, t: int) -> list[nn.Parameter]:
        """requires_grad only on what task t trains; returns those parameters (build the optimiser on them).

        Task 0: the shared part and task 0's modules. Task t ≥ 1: task t's modules only.
        """
        key = self._key(t)
        own = self._task_tensor_ids(key)
        if int(t) == 0:
            other = set().union(*(self._task_tensor_ids(k) for k in self._task_keys if k != key))
            trainable = [p for p in self.parameters() if id(p) in own or id(p) not in other]
        else:
            trainable = [p for p in self.parameters() if id(p) in own]
        chosen = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in chosen)
        return trainable

    def regularization(self, t: int) -> torch.Tensor:
        """Task 0's whitening identity regulariser (unweighted); 0 for other tasks or without whitening."""
        key = self._key(t)
        if int(t) == 0 and key in self.whitening and not self.stats_whitening:
            return self.whitening[key].identity_regularization()
        return torch.zeros((), device=self.device)

    def context_alphas(self) -> list[float]:
        """The global context weight α of every coupling block (empty with the gate or without context)."""
        out = []
        for block in self.flow.blocks:
            a = block.subnet.context_alpha()
            if a is not None:
                out.append(float(a.detach()))
        return out

    # ------------------------------------------------------------------ checkpoints

    def _owners(self) -> dict[str, str | None]:
        """state-dict name -> owning task key (None = shared)."""
        owner_of: dict[int, str] = {}
        for key in self._task_keys:
            for i in self._task_tensor_ids(key):
                owner_of[i] = key
        return {name: owner_of.get(id(v)) for name, v in self.state_dict(keep_vars=True).items()}

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that belongs to no task (shared flow, context, mixer, permutations)."""
        owners = self._owners()
        return {n: v.detach() for n, v in self.state_dict(keep_vars=True).items() if owners[n] is None}

    def task_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Exactly task t's tensors, under their full state-dict names."""
        key = self._key(t)
        owners = self._owners()
        return {n: v.detach() for n, v in self.state_dict(keep_vars=True).items() if owners[n] == key}

    def _load_into(self, names: list[str], sd: Mapping[str, torch.Tensor], what: str) -> None:
        expected, given = set(names), set(sd)
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
            raise KeyError(f"{what}: the tensors do not match the model: {'; '.join(parts)}; is the model config the same?")
        current = self.state_dict(keep_vars=True)
        for n in names:
            if tuple(current[n].shape) != tuple(sd[n].shape):
                raise ValueError(f"{what}: tensor '{n}' has shape {tuple(sd[n].shape)}, the model expects {tuple(current[n].shape)}")
        with torch.no_grad():
            for n in names:
                current[n].copy_(sd[n])

    def load_shared_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Strict: exactly the names of shared_state_dict()."""
        owners = self._owners()
        self._load_into([n for n, o in owners.items() if o is None], sd, "shared model state")

    def load_task_state_dict(self, t: int, sd: Mapping[str, torch.Tensor]) -> None:
        """Strict: exactly the names of task_state_dict(t); the task is created if it does not exist."""
        key = str(int(t))
        created = key not in self._task_keys
        if created:
            self.add_task(t)
        bank = sd.get(f"memory.{key}.bank")
        if key in self.memory and bank is not None:
            self.memory[key].resize(bank.shape[0])  # a memory's size is its training set's
        names = [n for n, o in self._owners().items() if o == key]
        weight = f"memory.{key}.weight"
        if weight not in sd and bank is not None:  # written before tasks chose their blend weight: stays NO_WEIGHT
            names.remove(weight)
        try:
            self._load_into(names, sd, f"task {t} model state")
        except (KeyError, ValueError):
            if created:
                self.remove_task(t)
            raise

    def shared_parameter_count(self) -> int:
        """Number of shared parameters (buffers such as the permutations not counted)."""
        owned = set().union(*(self._task_tensor_ids(k) for k in self._task_keys))
        return sum(p.numel() for p in self.parameters() if id(p) not in owned)

    def task_parameter_count(self, t: int) -> int:
        """Number of parameters task t adds."""
        own = self._task_tensor_ids(self._key(t))
        return sum(p.numel() for p in self.parameters() if id(p) in own)
