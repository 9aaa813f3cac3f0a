"""The training block of a model card -> a frozen, validated :class:`TrainingConfig`; durations.

Every key is parsed and checked here, before anything is computed (the keys are listed in
:mod:`jaxbench.train`'s docstring).
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..errors import JaxbenchError

OPTIMIZERS = ("adam", "amsgrad", "adamw")
SCHEDULERS = ("reduce_on_plateau", "cosine", "constant")
LOSSES = ("mse", "huber", "weighted")
WEIGHT_KEYS = ("energy", "forces", "stress", "virials")


class ConfigError(JaxbenchError, ValueError):
    """An invalid value in a model card's training block or in the arguments of `train`."""


class TrainingDivergedError(JaxbenchError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message, step=None, run_dir=None):
        self.step, self.run_dir = step, run_dir
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def parse_duration(v) -> float | None:
    """'60m', '1.5h', '90s', '5 days', 3600 -> seconds; None / 'none' -> None."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        if v <= 0:
            raise ConfigError(f"a duration must be positive, got {v}")
        return float(v)
    s = str(v).strip().lower()
    if s in ("none", "inf", ""):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*?)s?", s)
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        raise ConfigError(f"cannot read duration {v!r}: use e.g. 90s, 60m, 1.5h, 5 days")
    val = float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1)
    if val <= 0:
        raise ConfigError(f"a duration must be positive, got {v!r}")
    return val


# ---------------------------------------------------------------------------------------------
# The training block
# ---------------------------------------------------------------------------------------------
def _num(block, key, default=None, *, positive=False, nonneg=False, where="training"):
    v = block.get(key, default)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: expected a number, got {v!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}.{key}: must be finite, got {v}")
    if positive and v <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {v}")
    if nonneg and v < 0:
        raise ConfigError(f"{where}.{key}: must be >= 0, got {v}")
    return v


def _weights(raw, where) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{energy: 1, forces: 10}}, got {raw!r}")
    unknown = set(raw) - set(WEIGHT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown loss term(s) {sorted(unknown)}; known: {', '.join(WEIGHT_KEYS)}")
    w = {k: _num(raw, k, 0.0, nonneg=True, where=where) for k in WEIGHT_KEYS}
    if not any(v > 0 for v in w.values()):
        raise ConfigError(f"{where}: all loss weights are zero; nothing would be trained")
    return w


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    optimizer: str
    learning_rate: float
    weight_decay: float
    weight_decay_on: tuple | None  # glob patterns over parameter paths; None: every parameter
    batch_size: int
    valid_batch_size: int
    loss: str  # mse | huber
    huber_delta: float
    energy_per_atom: bool
    weights: dict
    clip_grad: float | None
    ema: bool
    ema_decay: float
    ema_use_num_updates: bool
    scheduler: dict
    swa: dict | None  # {learning_rate, weights, start_fraction}
    max_epochs: int | None
    patience: int | None
    min_lr: float | None
    max_wall: float | None

    @staticmethod
    def from_card(card: dict) -> "TrainingConfig":
        name = card.get("name", "?")
        # a card read from a file (`jaxbench.cards.read_card`) records it: name the file, as other card errors do
        card_file = f" (file {card['_path']})" if card.get("_path") else ""
        t = card.get("training")
        if not isinstance(t, dict):
            raise ConfigError(f"model card '{name}'{card_file} has no training block")
        where = f"model card '{name}'{card_file}: training"
        opt = str(t.get("optimizer", "adam")).lower()
        if opt not in OPTIMIZERS:
            raise ConfigError(f"{where}.optimizer: unknown optimizer {opt!r}; known: {', '.join(OPTIMIZERS)}")
        lr = _num(t, "learning_rate", None, positive=True, where=where)
        if lr is None:
            raise ConfigError(f"{where}.learning_rate is missing")
        wd = _num(t, "weight_decay", 0.0, nonneg=True, where=where)
        wd_on = t.get("weight_decay_on")
        if wd_on is not None:
            if isinstance(wd_on, str):
                wd_on = [wd_on]
            if not isinstance(wd_on, (list, tuple)) or not wd_on or not all(isinstance(x, str) and x for x in wd_on):
                raise ConfigError(f"{where}.weight_decay_on: expected a non-empty list of parameter-path patterns, got {wd_on!r}")
            wd_on = tuple(wd_on)
        bs = t.get("batch_size", 1)
        if not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"{where}.batch_size: must be a positive integer, got {bs!r}")
        vbs = t.get("valid_batch_size", bs)
        if not isinstance(vbs, int) or vbs < 1:
            raise ConfigError(f"{where}.valid_batch_size: must be a positive integer, got {vbs!r}")
        loss = str(t.get("loss", "mse")).lower()
        if loss not in LOSSES:
            raise ConfigError(f"{where}.loss: unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        el = t.get("energy_loss", "per_atom" if loss == "weighted" else "total")
        if el not in ("per_atom", "total"):
            raise ConfigError(f"{where}.energy_loss: must be per_atom or total, got {el!r}")
        weights = _weights(t.get("loss_weights", {"energy": 1.0, "forces": 1.0}), f"{where}.loss_weights")
        clip = _num(t, "clip_grad", None, positive=True, where=where)
        ema_decay = _num(t, "ema_decay", None, where=where)
        ema = bool(t.get("ema", ema_decay is not None))
        if ema:
            ema_decay = 0.99 if ema_decay is None else ema_decay
            if not 0.0 < ema_decay < 1.0:
                raise ConfigError(f"{where}.ema_decay: must be in (0, 1), got {ema_decay}")
        sched = t.get("scheduler", {"name": "constant"})
        if isinstance(sched, str):
            sched = {"name": sched}
        sched = dict(sched)
        sname = str(sched.get("name", "constant")).lower()
        if sname not in SCHEDULERS:
            raise ConfigError(f"{where}.scheduler.name: unknown scheduler {sname!r}; known: {', '.join(SCHEDULERS)}")
        sw = f"{where}.scheduler"
        if sname == "reduce_on_plateau":
            factor = _num(sched, "factor", 0.8, positive=True, where=sw)
            if factor >= 1:
                raise ConfigError(f"{sw}.factor: must be in (0, 1), got {factor}")
            patience = sched.get("patience", 10)
            if not isinstance(patience, int) or patience < 0:
                raise ConfigError(f"{sw}.patience: must be a non-negative integer, got {patience!r}")
            sched = dict(name=sname, factor=factor, patience=patience, min_lr=_num(sched, "min_lr", 0.0, nonneg=True, where=sw),
                         threshold=_num(sched, "threshold", 1e-4, nonneg=True, where=sw),
                         # TorchMD-Net's lr_warmup_steps: lr x min(1, (step + 1) / warmup_steps) before the plateau logic
                         warmup_steps=_num(sched, "warmup_steps", 0.0, nonneg=True, where=sw))
        elif sname == "cosine":
            sched = dict(name=sname, warmup_epochs=_num(sched, "warmup_epochs", 0.0, nonneg=True, where=sw),
                         warmup_steps=_num(sched, "warmup_steps", 0.0, nonneg=True, where=sw),
                         min_lr=_num(sched, "min_lr", 0.0, nonneg=True, where=sw))
        else:
            sched = dict(name=sname)
        swa = None
        raw_swa = t.get("swa")
        if isinstance(raw_swa, dict) and raw_swa.get("enabled", True):
            ww = f"{where}.swa"
            swa = dict(
                learning_rate=_num(raw_swa, "learning_rate", lr, positive=True, where=ww),
                weights=_weights(raw_swa.get("loss_weights", t.get("loss_weights", {})), f"{ww}.loss_weights"),
                start_fraction=_num(raw_swa, "start_epoch_fraction", 0.75, positive=True, where=ww),
                use_average=raw_swa.get("use_average", False),
            )
            if not isinstance(swa["use_average"], bool):
                raise ConfigError(f"{ww}.use_average: must be true or false, got {swa['use_average']!r}")
            if swa["start_fraction"] > 1:
                raise ConfigError(f"{ww}.start_epoch_fraction: must be in (0, 1], got {swa['start_fraction']}")
        max_epochs = t.get("max_epochs")
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
            raise ConfigError(f"{where}.max_epochs: must be a positive integer, got {max_epochs!r}")
        es = t.get("early_stopping", {}) or {}
        patience = es.get("patience")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"{where}.early_stopping.patience: must be a positive integer, got {patience!r}")
        min_lr = _num(es, "min_lr", None, nonneg=True, where=f"{where}.early_stopping")
        try:
            max_wall = parse_duration(es.get("max_wall"))
        except ConfigError as e:
            raise ConfigError(f"{where}.early_stopping.max_wall: {e}") from None
        return TrainingConfig(
            optimizer=opt, learning_rate=lr, weight_decay=wd, weight_decay_on=wd_on, batch_size=bs, valid_batch_size=vbs,
            loss="huber" if loss == "huber" else "mse", huber_delta=_num(t, "huber_delta", 0.01, positive=True, where=where),
            energy_per_atom=el == "per_atom", weights=weights, clip_grad=clip, ema=ema,
            ema_decay=float(ema_decay) if ema else 0.0, ema_use_num_updates=bool(t.get("ema_use_num_updates", True)),
            scheduler=sched, swa=swa, max_epochs=max_epochs, patience=patience, min_lr=min_lr, max_wall=max_wall,
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
