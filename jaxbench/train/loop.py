"""The host loop: epochs, schedules, EMA / SWA, validation, early stopping, budget, checkpoints.

:func:`train` is the composition ``plan_run -> prepare -> write_run_files -> Loop.run``. The loop keeps
its host-side state (step, epoch, learning rate, plateau counters, best metric, ...) in one dict, `host`,
which is what every checkpoint's metadata holds: a resume restores it and continues exactly there.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import compiled, runs
from .config import TrainingDivergedError
from .setup import Prepared, RunPlan, plan_run, prepare, write_run_files
from .step import add_sums, cast_graph, combine, init_params, make_optimizer, step_functions, swa_update

CHECKPOINTS = ("last", "last.prev", "best", "best.prev")


class Loop:
    """One training run from its first (or resumed) step to its stop reason."""

    def __init__(self, plan: RunPlan, prep: Prepared, *, checkpoint_every_s, pause_after_checkpoint: float,
                 progress: bool):
        self.plan, self.prep, self.cfg, self.out = plan, prep, plan.cfg, plan.out
        self.checkpoint_every_s, self.pause_after_checkpoint, self.progress = (
            checkpoint_every_s, pause_after_checkpoint, progress)
        cfg, dtype, bs = self.cfg, plan.dtype, prep.batch_size
        init_graph = cast_graph(prep.fg_train.batch(np.arange(bs), n_graph=bs), dtype)
        self.tx = make_optimizer(cfg)
        self.step_fn, self.eval_fn, init_fn = step_functions(prep.pot, cfg, self.tx, prep.compute_stress, prep.n_dev)
        params = init_params(prep.pot, init_fn, jax.random.PRNGKey(plan.seed), init_graph, jnp.dtype(dtype))
        self.state = dict(params=params, opt_state=self.tx.init(params))
        if cfg.ema:
            self.state["ema_params"] = params
        if cfg.swa:
            self.state["swa_params"] = params  # placeholder until the first second-phase epoch (swa_count 0)
        self.host = dict(step=0, epoch=0, batch_in_epoch=0, phase=1, lr=cfg.learning_rate, swa_count=0,
                         plateau=dict(best=None, bad_epochs=0), best_metric=None, best_epoch=None,
                         epochs_since_best=0, elapsed_s=0.0, epoch_sums={}, epoch_time_s=0.0)
        self.use_swa_average = bool(cfg.swa and cfg.swa["use_average"])
        vbs, fg_val = prep.valid_batch_size, prep.fg_val
        self.val_batches = [cast_graph(fg_val.batch(np.arange(i, min(i + vbs, len(fg_val))), n_graph=vbs), dtype)
                            for i in range(0, len(fg_val), vbs)]
        self.pending = None  # (loss, sums, step, epoch, batch) of the last step dispatched, not yet checked
        self.stop_reason = None
        self.interrupted = lambda: None  # train() sets the deferred SIGTERM / SIGINT check

    # -- the run directory ---------------------------------------------------------------------
    def log(self, **event):
        runs.append_jsonl(self.out / "log.jsonl", dict(event, time=time.time()))

    def start_or_resume(self):
        """Fresh start (logged) or the last complete checkpoint's state and host counters."""
        plan, prep = self.plan, self.prep
        runs.remove_stale_temporaries(self.out)
        # resumed before its first checkpoint (killed in setup or in its first steps): the same run from step 0
        fresh = plan.resume and not any(runs.checkpoint_dir(self.out, w).exists() for w in CHECKPOINTS)
        if not plan.resume or fresh:
            self.log(event="start", model=plan.card["name"], dataset=plan.dataset, seed=plan.seed,
                     n_train=len(prep.train_frames), n_val=len(prep.val_frames), dtype=plan.dtype,
                     parameters=prep.pot.num_parameters(self.state["params"]), **({"resumed": True} if fresh else {}))
            return
        path, meta = runs.find_checkpoint(self.out, CHECKPOINTS)
        try:
            self.state = runs.load_checkpoint(path, target=self.state)
        except runs.CheckpointError as e:  # decodes badly although its hash matched: try the others
            import warnings

            warnings.warn(str(e), stacklevel=2)
            order = [w for w in CHECKPOINTS if runs.checkpoint_dir(self.out, w) != path]
            path, meta = runs.find_checkpoint(self.out, order)
            self.state = runs.load_checkpoint(path, target=self.state)
        for k in self.host:
            if k in meta:
                self.host[k] = meta[k]
        h = self.host
        self.log(event="resume", checkpoint=path.name, step=h["step"], epoch=h["epoch"], batch_in_epoch=h["batch_in_epoch"])

    def meta(self):
        plan = self.plan
        return dict(self.host, ema=self.cfg.ema, swa_average=self.use_swa_average, dtype=plan.dtype,
                    rng=dict(seed=plan.seed, epoch=self.host["epoch"]), model=plan.card["name"], dataset=plan.dataset,
                    time=time.time())

    def save(self, which):
        runs.save_checkpoint(self.out, which, jax.device_get(self.state), self.meta())

    # -- validation and schedules --------------------------------------------------------------
    def inference_params(self):
        """The weights validation, `best` and `last` stand for (runs.load_potential reads the same choice)."""
        if self.use_swa_average and self.host["swa_count"] > 0:
            return self.state["swa_params"]
        return self.state["ema_params"] if self.cfg.ema else self.state["params"]

    def validate(self, weights):
        p = self.inference_params()
        if self.prep.n_dev > 1:  # the step leaves the weights replicated on every device; evaluate on one
            p = jax.device_put(p, jax.local_devices()[0])
        acc = {}
        for g in self.val_batches:
            add_sums(acc, jax.device_get(self.eval_fn(p, g)))
        c = {k: float(v) for k, v in combine(acc, weights).items()}
        ne, nf = max(acc["n_energy"], 1), max(acc["n_forces"], 1)
        c.update(energy_mae_meV=1000 * acc["energy_abs"] / ne, energy_mae_meV_atom=1000 * acc["energy_atom_abs"] / ne,
                 forces_mae_meV_A=1000 * acc["forces_abs"] / nf, forces_rmse_meV_A=1000 * math.sqrt(acc["forces_sq"] / nf))
        return c

    def lr_at(self, step):
        cfg, host, sc = self.cfg, self.host, self.cfg.scheduler
        if host["phase"] == 2:
            return cfg.swa["learning_rate"]
        if sc["name"] == "cosine":
            total = self.plan.max_epochs * self.prep.steps_per_epoch
            warm = sc["warmup_steps"] or sc["warmup_epochs"] * self.prep.steps_per_epoch
            if step < warm:
                return cfg.learning_rate * (step + 1) / warm
            frac = min(1.0, (step - warm) / max(total - warm, 1))
            return sc["min_lr"] + 0.5 * (cfg.learning_rate - sc["min_lr"]) * (1 + math.cos(math.pi * frac))
        if sc.get("warmup_steps") and step < sc["warmup_steps"]:
            return host["lr"] * (step + 1) / sc["warmup_steps"]
        return host["lr"]

    def elapsed(self):
        return time.perf_counter() - self.t_start

    def settle(self):
        """Check the last dispatched step's loss (NaN stops the run, naming that step) and add its sums
        to the epoch's; returns its loss (None if nothing was pending). Runs before anything is saved."""
        if self.pending is None:
            return None
        loss_d, sums_d, step_k, epoch_k, batch_k = self.pending
        self.pending = None
        loss = float(loss_d)
        if not math.isfinite(loss):
            self.log(event="nan", step=step_k, epoch=epoch_k, batch=batch_k, loss=str(loss))
            raise TrainingDivergedError(
                f"loss is {loss} at step {step_k} (epoch {epoch_k}, batch {batch_k}); stopped. "
                f"The last good checkpoint in {self.out / 'checkpoints'} is kept.", step=step_k, run_dir=str(self.out))
        self.host["epoch_sums"] = add_sums(dict(self.host["epoch_sums"]), jax.device_get(sums_d))
        return loss

    def maybe_enter_phase2(self):
        cfg, host, prep = self.cfg, self.host, self.prep
        if not cfg.swa or host["phase"] == 2:
            return False
        if (prep.swa_epoch is not None and host["epoch"] >= prep.swa_epoch) or (
                prep.swa_time is not None and self.elapsed() >= prep.swa_time):
            host.update(phase=2, lr=cfg.swa["learning_rate"], plateau=dict(best=None, bad_epochs=0),
                        best_metric=None, epochs_since_best=0)
            self.log(event="phase2", epoch=host["epoch"], step=host["step"], lr=host["lr"], weights=cfg.swa["weights"])
            return True
        return False

    # -- one epoch -----------------------------------------------------------------------------
    def run_batches(self, weights, t_epoch):
        """The epoch's remaining batches; sets ``stop_reason = 'budget'`` when the budget ends inside it."""
        cfg, host, prep, plan = self.cfg, self.host, self.prep, self.plan
        bs, budget_s = prep.batch_size, plan.budget_s
        order = runs.epoch_order(len(prep.fg_train), plan.seed, host["epoch"])
        for b in range(host["batch_in_epoch"], prep.steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            if prep.n_dev > 1:
                graph = cast_graph(prep.fg_train.sharded_batch(idx, prep.n_dev, n_graph=bs), plan.dtype)
            else:
                graph = cast_graph(prep.fg_train.batch(idx, n_graph=bs), plan.dtype)
            lr = self.lr_at(host["step"])
            # the SWA average is not an input of the step (it changes once per epoch, on the host side)
            trained = {k: v for k, v in self.state.items() if k != "swa_params"}
            new_state, loss, sums = self.step_fn(trained, graph, lr, weights, float(host["step"] + 1))
            # the previous step's loss is read while this one runs: no host round trip between steps
            last_loss = self.settle()
            self.pending = (loss, sums, host["step"] + 1, host["epoch"], b)
            self.state = dict(self.state, **new_state)
            host["step"] += 1
            host["batch_in_epoch"] = b + 1
            host["lr"] = lr if cfg.scheduler["name"] == "cosine" else host["lr"]
            host["elapsed_s"] = self.elapsed()
            host["epoch_time_s"] = time.perf_counter() - t_epoch
            self.progress_bar(last_loss, lr)
            if budget_s is not None and self.elapsed() >= budget_s:
                self.stop_reason = "budget"
                return
            if b + 1 < prep.steps_per_epoch and self.interrupted() is not None:
                self.settle()
                self.save("last")
                self.stop_interrupted()
            if b + 1 < prep.steps_per_epoch and (
                (plan.checkpoint_every and host["step"] % plan.checkpoint_every == 0)
                or (self.checkpoint_every_s and time.perf_counter() - self.t_last_ckpt >= self.checkpoint_every_s)
            ):
                self.settle()
                self.save("last")
                self.t_last_ckpt = time.perf_counter()
                if self.pause_after_checkpoint:
                    time.sleep(self.pause_after_checkpoint)

    def stop_interrupted(self):
        """SIGTERM / SIGINT arrived: `last` holds the state after the last step; say so and stop."""
        from ..errors import Interrupted

        host, sig = self.host, self.interrupted()
        self.log(event="interrupted", signal=sig, step=host["step"], epoch=host["epoch"],
                 batch_in_epoch=host["batch_in_epoch"], elapsed_s=self.elapsed())
        raise Interrupted(sig, f"training run {self.out} stopped after step {host['step']} (epoch {host['epoch']}, "
                          f"batch {host['batch_in_epoch']}; signal {sig}); its state is checkpointed: continue with "
                          f"resume=True / `jaxbench train --out {self.out} --resume`")

    def progress_bar(self, last_loss, lr):
        host, budget_s, bar = self.host, self.plan.budget_s, self.bar
        bar.update(1)
        if budget_s is not None:
            # the budget, not max_epochs, ends this run: size the bar (and its ETA) by it
            rate = (host["step"] - self.step0) / max(time.perf_counter() - self.t_session, 1e-9)
            est = host["step"] + int(rate * max(budget_s - self.elapsed(), 0.0))
            bar.total = min(est, self.total_steps) if self.total_steps else est
        post = dict(ep=host["epoch"], loss="-" if last_loss is None else f"{last_loss:.4g}", lr=f"{lr:.2e}", ph=host["phase"])
        if budget_s is not None:
            post["left"] = f"{max(budget_s - self.elapsed(), 0) / 60:.1f}m"
        bar.set_postfix(post, refresh=False)

    def stop_inside_epoch(self, weights):
        """The budget ended a partial epoch: keep the position so that a resume with a larger budget continues it."""
        host = self.host
        val = self.validate(weights)
        improved = host["best_metric"] is None or val["loss"] < host["best_metric"]
        self.log(event="budget", epoch=host["epoch"], step=host["step"], batch_in_epoch=host["batch_in_epoch"], val=val,
                 best=improved, elapsed_s=self.elapsed())
        if improved:
            host.update(best_metric=val["loss"], best_epoch=host["epoch"])
            self.save("best")
        self.save("last")

    def end_epoch(self, weights, t_epoch):
        """Average (SWA), validate, schedule, log, checkpoint; then the stopping rules."""
        cfg, host = self.cfg, self.host
        if host["phase"] == 2:
            self.state = dict(self.state, swa_params=swa_update(self.state["swa_params"], self.state["params"],
                                                                host["swa_count"]))
            host["swa_count"] += 1
        val = self.validate(weights)
        tr = {k: float(v) for k, v in combine(host["epoch_sums"], weights).items()}
        improved = host["best_metric"] is None or val["loss"] < host["best_metric"]
        if improved:
            host.update(best_metric=val["loss"], best_epoch=host["epoch"], epochs_since_best=0)
        else:
            host["epochs_since_best"] += 1
        sc = cfg.scheduler
        if host["phase"] == 1 and sc["name"] == "reduce_on_plateau":
            pl = host["plateau"]
            if pl["best"] is None or val["loss"] < pl["best"] * (1 - sc["threshold"]):
                pl.update(best=val["loss"], bad_epochs=0)
            else:
                pl["bad_epochs"] += 1
                if pl["bad_epochs"] > sc["patience"]:
                    host["lr"] = max(host["lr"] * sc["factor"], sc["min_lr"])
                    pl["bad_epochs"] = 0
        lr = self.lr_at(host["step"])
        self.log(event="epoch", epoch=host["epoch"], step=host["step"], phase=host["phase"], lr=lr, train=tr, val=val,
                 best=improved, epoch_time_s=time.perf_counter() - t_epoch, elapsed_s=self.elapsed())
        if self.progress:
            self.bar.write(f"epoch {host['epoch']}: train loss {tr['loss']:.4g}  val loss {val['loss']:.4g}  "
                           f"E MAE {val['energy_mae_meV']:.2f} meV  F MAE {val['forces_mae_meV_A']:.2f} meV/Å  lr {lr:.2e}")
        host.update(epoch=host["epoch"] + 1, batch_in_epoch=0, epoch_sums={}, epoch_time_s=0.0, elapsed_s=self.elapsed())
        if improved:
            self.save("best")
        self.save("last")
        self.t_last_ckpt = time.perf_counter()
        if self.stop_reason is None:
            if cfg.patience is not None and host["epochs_since_best"] >= cfg.patience:
                self.stop_reason = "patience"
            elif cfg.min_lr is not None and self.lr_at(host["step"]) < cfg.min_lr:
                self.stop_reason = "min_lr"
            elif self.plan.budget_s is not None and self.elapsed() >= self.plan.budget_s:
                self.stop_reason = "budget"

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        plan, prep, host = self.plan, self.prep, self.host
        self.total_steps = plan.max_epochs * prep.steps_per_epoch if plan.max_epochs is not None else None
        # the training clock (budget, second-phase start) runs from here, after setup and any resume
        self.t_start = time.perf_counter() - host["elapsed_s"]
        self.bar = tqdm(total=self.total_steps, initial=host["step"], disable=not self.progress, unit="step",
                        dynamic_ncols=True, desc=f"{plan.card['name']} {plan.dataset}")
        self.t_session, self.step0 = time.perf_counter(), host["step"]
        self.t_last_ckpt = time.perf_counter()
        try:
            while self.stop_reason is None:
                if self.interrupted() is not None:  # arrived during the last epoch's end: `last` is that epoch's
                    self.stop_interrupted()
                if plan.max_epochs is not None and host["epoch"] >= plan.max_epochs:
                    self.stop_reason = "max_epochs"
                    break
                self.maybe_enter_phase2()
                weights = prep.phase_weights[host["phase"] - 1]
                t_epoch = time.perf_counter() - host["epoch_time_s"]
                self.run_batches(weights, t_epoch)
                self.settle()
                if self.stop_reason == "budget" and host["batch_in_epoch"] < prep.steps_per_epoch:
                    self.stop_inside_epoch(weights)
                    break
                self.end_epoch(weights, t_epoch)
        finally:
            self.bar.close()
        summary = dict(run_dir=str(self.out), step=host["step"], epoch=host["epoch"], batch_in_epoch=host["batch_in_epoch"],
                       stop_reason=self.stop_reason, best_metric=host["best_metric"], best_epoch=host["best_epoch"],
                       elapsed_s=self.elapsed(), phase=host["phase"], lr=self.lr_at(host["step"]),
                       swa_count=host["swa_count"])
        self.log(event="stop", **summary)
        return summary


def train(
    model=None,
    dataset: str | None = None,
    budget="60m",
    max_epochs: int | None = None,
    seed: int = 0,
    out=None,
    resume: bool = False,
    dtype="float32",
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    train_split: str = "train",
    val_split: str = "val",
    training: dict | None = None,
    statistics=None,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float | None = 600.0,
    progress: bool = True,
    data_dir=None,
    pause_after_checkpoint: float = 0.0,
    devices: int | None = None,
    swa_on_budget: bool = True,
) -> dict[str, Any]:
    """Train `model` (card name or card dict) on `dataset`; write the run directory `out` (see `jaxbench.runs`).

    `budget` (e.g. '60m', None for none) and `max_epochs` bound the run (either may be None; the card's
    max_epochs / early_stopping.max_wall apply when not given). `n_train` / `n_val` take the first
    frames of the splits (tests, budgets). `training` is merged over the card's training block.
    `checkpoint_every` (steps) / `checkpoint_every_s` (seconds) also write `last` inside an epoch.
    With `resume`, the run in `out` continues exactly where its last complete checkpoint left it
    (budget / max_epochs may be raised; a run stopped before its first checkpoint starts again from step 0).
    SIGTERM / SIGINT finish the step in flight, checkpoint `last` and raise
    :class:`jaxbench.errors.Interrupted` (a second signal acts at once). `devices`: split every batch over this many local devices
    (data-parallel, same updates as one device up to summation order; default: all local devices, at
    most the batch size; on a CPU see `jaxbench.use_cpu_devices`). `swa_on_budget`: the second phase
    starts at the card's fraction of the budget too (default), or only at its fraction of max_epochs
    (False: the card's schedule, cut where the budget ends). Returns a summary dict (run_dir, step, epoch, stop_reason,
    best_metric, elapsed_s).
    """
    compiled.check()  # before this run compiles (see jaxbench.compiled)
    plan = plan_run(model, dataset, budget, max_epochs, seed, out, resume, dtype, n_train=n_train, n_val=n_val,
                    train_split=train_split, val_split=val_split, training=training, statistics=statistics,
                    checkpoint_every=checkpoint_every, swa_on_budget=swa_on_budget, devices=devices,
                    data_dir=data_dir)
    from ..interrupts import deferred

    with runs.locked(plan.out, "training run"), deferred() as interrupted:
        prep = prepare(plan, data_dir)
        write_run_files(plan, prep, checkpoint_every_s)
        loop = Loop(plan, prep, checkpoint_every_s=checkpoint_every_s, pause_after_checkpoint=pause_after_checkpoint,
                    progress=progress)
        loop.interrupted = interrupted
        loop.start_or_resume()
        return loop.run()
