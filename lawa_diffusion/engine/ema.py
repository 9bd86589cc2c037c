"""``LAWAEMAModel``: diffusers' ``EMAModel`` that also keeps a LAWA window over its shadow weights.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from diffusers.training_utils import EMAModel

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.engine.lawa import LAWA
from lawa_diffusion.engine.zero3 import let_diffusers_gather

WEIGHT_CHOICES = ("ema", "lawa")


class LAWAEMAModel(EMAModel):
    """Drop-in ``EMAModel`` with ``lawa=LAWAConfig(...)``: ``step`` also feeds the LAWA engine.

    ``save_pretrained`` writes the EMA folder exactly as diffusers does; ``state_dict`` adds the
    LAWA state under ``"lawa"`` and ``load_state_dict`` takes it back (plain EMA dicts load too).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *args: Any,
                 lawa: LAWAConfig | dict | None = None, lawa_name: str = "lawa", **kwargs: Any):
        super().__init__(parameters, *args, **kwargs)
        self.lawa = LAWA(self, lawa, name=lawa_name)
        self.lawa.defer_source_wait = True

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False, lawa: LAWAConfig | dict | None = None) -> "LAWAEMAModel":
        ema = super().from_pretrained(path, model_cls, foreach=foreach)
        if lawa is not None:
            ema.lawa = LAWA(ema, lawa, name=ema.lawa.name)
            ema.lawa.defer_source_wait = True
        return ema

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.lawa.before_source_update()
        let_diffusers_gather()  # under ZeRO-3, diffusers' step gathers the partitioned parameters
        super().step(parameters)
        self.lawa.step(self.optimization_step)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter], weights: str = "ema") -> None:
        check(weights in WEIGHT_CHOICES, f"copy_to weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
        if weights == "ema":
            super().copy_to(parameters)
        else:
            self.lawa.copy_to(list(parameters))

    def ema_state_dict(self) -> dict:
        """The state diffusers' EMAModel has (no LAWA entries)."""
        return super().state_dict()

    def state_dict(self) -> dict:
        """diffusers' EMA state plus ``"lawa"`` once the window holds snapshots.

        An EMA that never snapshotted (e.g. the temporary one diffusers' load hooks build with
        ``from_pretrained``) adds nothing, so ``ema.load_state_dict(tmp.state_dict())`` keeps the
        real EMA's window.
        """
        state = super().state_dict()
        if self.lawa.num_snapshots > 0:
            state["lawa"] = self.lawa.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        lawa_state: Optional[dict] = state_dict.pop("lawa", None)
        if lawa_state is not None:  # refuse a window this engine cannot continue before the EMA is touched
            self.lawa.check_state(lawa_state)
        super().load_state_dict(state_dict)
        if lawa_state is not None:
            self.lawa.load_state_dict(lawa_state)

    def save_pretrained(self, path) -> None:
        # diffusers writes ``state_dict()`` minus shadow_params into config.json: keep LAWA out of it.
        self.state_dict = self.ema_state_dict  # type: ignore[method-assign]
        try:
            super().save_pretrained(path)
        finally:
            del self.state_dict

    def save_pretrained_from(self, path, weights: Sequence[torch.Tensor]) -> None:
        """Write the folder ``save_pretrained`` writes, with ``weights`` (full tensors in the order of
        ``shadow_params``) as its weights: how the gathered weights of a sharded EMA are saved."""
        from lawa_diffusion.engine.lawa import uninitialized_model

        check(self.model_cls is not None and self.model_config is not None,
              "EMAModel.save_pretrained needs the model class and config; create the EMAModel with model_cls= "
              "and model_config=")
        model = uninitialized_model(self.model_cls, self.model_config)
        params = list(model.parameters())
        check(len(params) == len(weights),
              f"EMAModel.save_pretrained got {len(weights)} weights for a {type(model).__name__} of {len(params)} "
              "parameters; create the EMAModel from the parameters of the model given as model_cls=/model_config=")
        state = self.ema_state_dict()
        state.pop("shadow_params", None)
        model.register_to_config(**state)
        with torch.no_grad():
            for param, weight in zip(params, weights):
                param.copy_(weight)
        model.save_pretrained(path)

    def save_lawa_pretrained(self, path) -> None:
        """Write the LAWA weights as a diffusers model folder."""
        self.lawa.save_pretrained(path)


class PowerEMAModel(EMAModel):
    """diffusers' ``EMAModel`` with EDM2's power-function decay ``β = (1 − 1/m)^(γ+1)`` (``m`` = updates counted
    from the first one, as ``lag.decays`` does): after ``t`` updates its weight on step ``s`` grows about like
    ``s^γ`` (``lag.profile`` gives it exactly).

    Give ``gamma`` or ``sigma_rel`` (``lag.gamma_of_sigma_rel``); every other ``EMAModel`` option keeps its
    meaning (``update_after_step``; ``decay`` caps β and defaults to 1, no cap). ``state_dict`` carries
    ``gamma``, so checkpoints resume the same track.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *args: Any, gamma: Optional[float] = None,
                 sigma_rel: Optional[float] = None, decay: float = 1.0, **kwargs: Any):
        from lawa_diffusion.maths import lag

        if gamma is None and sigma_rel is None:
            gamma = lag.gamma_of_sigma_rel(0.05)
        self.gamma = lag.power_ema(gamma=gamma, sigma_rel=sigma_rel).gamma
        super().__init__(parameters, *args, decay=decay, **kwargs)

    @property
    def sigma_rel(self) -> float:
        from lawa_diffusion.maths import lag

        return lag.sigma_rel_of_gamma(self.gamma)

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        value = (1.0 - 1.0 / (step + 1.0)) ** (self.gamma + 1.0)
        return max(min(value, self.decay), self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        let_diffusers_gather()  # under ZeRO-3, diffusers' step gathers partitioned parameters through this name
        super().step(parameters)

    @torch.no_grad()
    def step_parts(self, parts: list, trainable: list) -> None:
        """``step`` over this process's parts of the parameters (flat tensors, the shadow params being parts of the
        same shape): diffusers' foreach update, the same arithmetic element by element; ``trainable``: each
        parameter's ``requires_grad`` (a part of a frozen one is copied, as diffusers does)."""
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        frozen = [(s, p) for s, p, t in zip(self.shadow_params, parts, trainable) if not t]
        moving = [(s, p) for s, p, t in zip(self.shadow_params, parts, trainable) if t]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if moving:
            shadows, params = [s for s, _ in moving], [p for _, p in moving]
            torch._foreach_sub_(shadows, torch._foreach_sub(shadows, params), alpha=1 - decay)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gamma": self.gamma}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        gamma = state_dict.pop("gamma", None)
        if gamma is not None:
            check(isinstance(gamma, (int, float)) and gamma > 0, f"power EMA state gamma must be > 0, got {gamma!r}")
            self.gamma = float(gamma)
        super().load_state_dict(state_dict)
