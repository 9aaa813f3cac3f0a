"""Scores of a simulation against its reference: the numbers of results.json, as pure functions of arrays.

    structure_vs_reference      g(r) (periodic, all images) / h(r) (molecules): Wright's factor, JSD, RDF MAE
    rdf_failure_hook            FaNE eq. 8 (windowed RDF deviation) as the MD engine's failure hook
    energy_force_violations     EGraFFBench's EV(t), FV(t) and their geometric means, per replica
    violations_vs_split         the same against a time-ordered dataset split (MD17 test files)
    diffusivity_per_element     windowed MSD slopes on each replica's stable part

A number is reported only where it can be computed honestly: otherwise the entry is ``na(reason)``,
``{"value": null, "not_applicable": "<reason>"}``. Per-replica numbers are summarised by
``replica_stats`` (mean and std over the replicas that have one, and every replica's own value).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Histogram defaults (METRIC_NOTES: bin width and range move WF a lot, so both are recorded).
DR = 0.05  # Å
RDF_R_MAX = 6.0  # Å, periodic g(r) (all images)
HR_R_MAX = 10.0  # Å, molecular h(r)
RDF_STABILITY = dict(window_fs=1000.0, threshold=1.0)  # FaNE: 1 ps window, Delta = 1.0 (LiPS)


def na(reason: str) -> dict[str, Any]:
    return {"value": None, "not_applicable": reason}


def replica_stats(values) -> dict[str, Any]:
    """Mean and std over the replicas with a finite value, and each replica's value (None where it has none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return {"mean": None, "std": None, "per_replica": [None if x is None else float(x) for x in values]}
    return {"mean": float(v.mean()), "std": float(v.std()), "per_replica": [None if x is None else float(x) for x in values]}


@dataclasses.dataclass
class BenchSettings:
    dr: float = DR
    rdf_r_max: float | None = None  # default RDF_R_MAX (periodic) / HR_R_MAX (molecules)
    msd_equilibration_fraction: float = 0.2
    msd_window_fraction: float = 0.5
    rdf_stability_window_fs: float = RDF_STABILITY["window_fs"]
    rdf_stability_threshold: float = RDF_STABILITY["threshold"]
    # None: the total g(r) (FaNE's LiPS criterion); 'all': every element pair, any one over the threshold
    # fails the replica (FaNE's water: O-O, H-H, H-O with Delta 3.0)
    rdf_stability_pairs: str | None = None
    # MSD windows of a fixed length (FaNE's water: 100 ps over stable runs of at least 100 ps) instead of
    # msd_window_fraction of each replica's stable frames
    msd_window_fs: float | None = None
    msd_min_stable_fs: float | None = None

    @staticmethod
    def from_protocol(proto) -> "BenchSettings":
        """The defaults with the protocol card's ``scoring:`` block applied (unknown keys named)."""
        from .errors import JaxbenchError

        fields = {f.name for f in dataclasses.fields(BenchSettings)}
        given = dict(proto.scoring)
        unknown = sorted(set(given) - fields)
        if unknown:
            raise JaxbenchError(f"protocol '{proto.name}': scoring: unknown keys {unknown} (known: {sorted(fields)})")
        return BenchSettings(**given)


def histogram_frames(positions, cell, pbc, species, settings, periodic):
    """Per-frame g(r) (periodic, all images) or h(r) (molecules) with the bench's bins."""
    from . import metrics as M

    r_max = settings.rdf_r_max or (RDF_R_MAX if periodic else HR_R_MAX)
    if periodic:
        return M.rdf_frames(positions, cell, pbc, species, r_max, settings.dr)
    return M.distance_histogram_frames(positions, r_max, settings.dr)


def structure_vs_reference(traj, ref_positions, ref_cells, pbc, species, stable_frames, settings, periodic):
    """g(r) (periodic, all images) or h(r) (molecules) of each replica's stable part vs the reference:
    ``(results section, arrays for the plot)``."""
    import jax.numpy as jnp

    from . import metrics as M

    r_max = settings.rdf_r_max or (RDF_R_MAX if periodic else HR_R_MAX)
    dr = settings.dr
    pos = np.asarray(traj["position"])  # [R, T, N, 3]
    R = pos.shape[0]

    def hist_frames(p, cell):
        return histogram_frames(p, cell, pbc, species, settings, periodic)

    r, g_ref_frames = hist_frames(ref_positions, ref_cells)
    g_ref = np.asarray(jnp.mean(g_ref_frames, axis=0))
    # the reference against itself (its two halves): how far two samples of the same state point differ
    half = len(ref_positions) // 2
    floor = None
    if half >= 2:
        a, b = np.asarray(g_ref_frames[:half]).mean(0), np.asarray(g_ref_frames[half:]).mean(0)
        floor = dict(wright_factor_pct=float(M.wright_factor(a, b)), jsd_nats=float(M.jensen_shannon(a, b)),
                     rdf_mae=float(M.rdf_mae(a, b, dr)))
    per = {"wright_factor_pct": [], "wright_factor_unrooted_pct": [], "jsd_nats": [], "rdf_mae": []}
    g_model, g_model_frames = [], []
    for rep in range(R):
        _, gf = hist_frames(pos[rep], traj["cell"])
        g_model_frames.append(np.asarray(gf))
        n_ok = int(stable_frames[rep])
        if n_ok < 1:
            for k in per:
                per[k].append(None)
            g_model.append(None)
            continue
        g = np.asarray(gf[:n_ok]).mean(0)
        g_model.append(g)
        per["wright_factor_pct"].append(float(M.wright_factor(g, g_ref)))
        per["wright_factor_unrooted_pct"].append(float(M.wright_factor(g, g_ref, root=False)))
        per["jsd_nats"].append(float(M.jensen_shannon(g, g_ref)))
        per["rdf_mae"].append(float(M.rdf_mae(g, g_ref, dr)))
    out = {
        "kind": "g(r), total, all periodic images" if periodic else "h(r), all pairs (FaNE eq. 1)",
        "r_max_A": r_max, "dr_A": dr,
        "reference_frames": int(len(ref_positions)),
        "units": {"wright_factor_pct": "%", "wright_factor_unrooted_pct": "% (EGraFFBench eq. 2 as printed)",
                  "jsd_nats": "nats", "rdf_mae": "Å (g) / 1 (h)"},
        "noise_floor_reference_halves": floor,
    }
    out.update({k: replica_stats(v) for k, v in per.items()})
    if periodic and settings.rdf_stability_pairs:
        out["rdf_mae_per_pair"] = pair_rdf_mae(pos, traj["cell"], ref_positions, ref_cells, pbc, species, stable_frames,
                                               r_max, dr)
    arrays = dict(r=np.asarray(r), g_ref=g_ref, g_model=g_model, g_model_frames=g_model_frames)
    return out, arrays


def pair_rdf_mae(pos, cell, ref_positions, ref_cells, pbc, species, stable_frames, r_max: float, dr: float) -> dict:
    """FaNE Table 8's RDF(O,O), RDF(H,H), RDF(H,O): the RDF MAE of each element pair's g(r) over each
    replica's stable frames against the reference's, ``{"O-O": replica_stats, ...}``."""
    from ase.data import chemical_symbols

    from . import metrics as M

    pairs = M.species_pairs(species)
    _, g_ref = M.rdf_frames(ref_positions, ref_cells, pbc, species, r_max, dr, pairs="all")
    g_ref = np.asarray(g_ref).mean(0)  # [P, nbins]
    per = {f"{chemical_symbols[a]}-{chemical_symbols[b]}": [] for a, b in pairs}
    for rep in range(pos.shape[0]):
        n_ok = int(stable_frames[rep])
        g = np.asarray(M.rdf_frames(pos[rep, :n_ok], cell, pbc, species, r_max, dr, pairs="all")[1]).mean(0) \
            if n_ok else None
        for k, name in enumerate(per):
            per[name].append(None if g is None else float(M.rdf_mae(g[k], g_ref[k], dr)))
    return {name: replica_stats(v) for name, v in per.items()}


def rdf_failure_hook(start, ref_pos, ref_cells, proto, settings):
    """FaNE eq. 8 as the MD engine's failure hook (windowed RDF deviation from the reference g(r)):
    ``(hook, window in frames)``, or ``(None, reason)`` when the run cannot hold one window."""
    from . import metrics as M

    dt_frame = proto.timestep_fs * proto.save_every
    window = int(round(settings.rdf_stability_window_fs / dt_frame))
    n_frames = proto.steps // proto.save_every + 1
    if window < 1 or window > n_frames:
        return None, (f"the RDF criterion needs a {settings.rdf_stability_window_fs:g} fs window ({window} frames); "
                      f"the run saves {n_frames} frames")
    r_max = settings.rdf_r_max or RDF_R_MAX
    pairs = settings.rdf_stability_pairs
    _, g_ref_frames = M.rdf_frames(ref_pos, ref_cells, start.pbc, start.numbers, r_max, settings.dr, pairs=pairs)
    g_ref = np.asarray(g_ref_frames).mean(0)
    hook = M.rdf_stability_hook(g_ref, start.cell, start.pbc, start.numbers, r_max, settings.dr, window,
                                settings.rdf_stability_threshold, pairs=pairs)
    return hook, window


def rdf_window_deviation(pos, cell, pbc, species, ref_positions, ref_cells, first_frames, failed, window: int,
                         settings) -> dict[str, Any]:
    """Which element pair broke FaNE eq. 8: for each replica, the RDF MAE of each pair's g(r) averaged over
    one window against the reference's (the window the engine stopped the replica at, ``[first, first +
    window)``, for a replica the criterion ``failed``; its last full window otherwise), as the engine's
    hook computes it. ``{"window_deviation_per_pair": {"O-O": [R], ...}, "pairs_over_threshold": [R][...]}``."""
    from ase.data import chemical_symbols

    from . import metrics as M

    r_max = settings.rdf_r_max or RDF_R_MAX
    sel = settings.rdf_stability_pairs
    pairs = M.species_pairs(species) if sel == "all" else [tuple(int(z) for z in p) for p in sel]
    names = [f"{chemical_symbols[a]}-{chemical_symbols[b]}" for a, b in pairs]
    _, g_ref = M.rdf_frames(ref_positions, ref_cells, pbc, species, r_max, settings.dr, pairs=pairs)
    g_ref = np.asarray(g_ref).mean(0)
    per = {n: [] for n in names}
    over = []
    n_saved = pos.shape[1]
    for rep in range(pos.shape[0]):
        lo = int(first_frames[rep]) if failed[rep] else max(0, n_saved - window)
        frames = np.asarray(pos[rep, lo: lo + window])
        frames = frames[np.all(np.isfinite(frames), axis=(1, 2))]
        if not len(frames):
            for n in names:
                per[n].append(None)
            over.append([])
            continue
        g = np.asarray(M.rdf_frames(frames, cell, pbc, species, r_max, settings.dr, pairs=pairs)[1]).mean(0)
        dev = [float(M.rdf_mae(g[k], g_ref[k], settings.dr)) for k in range(len(names))]
        for n, d in zip(names, dev):
            per[n].append(d)
        over.append([n for n, d in zip(names, dev) if d > settings.rdf_stability_threshold])
    return {"window_deviation_per_pair": per, "pairs_over_threshold": over}


def energy_force_violations(e_model, f_model, e_ref, f_ref, n_valid, source: str) -> dict[str, Any]:
    """EV(t), FV(t) per replica over its first n_valid frames, geometric means, mean/std over replicas."""
    from . import metrics as M

    ev_gm, fv_gm, curves = [], [], {"EV": [], "FV": []}
    for rep in range(len(e_model)):
        n = int(n_valid[rep])
        if n < 1:
            ev_gm.append(None)
            fv_gm.append(None)
            curves["EV"].append([])
            curves["FV"].append([])
            continue
        ev = np.asarray(M.energy_violation(e_model[rep, :n], e_ref[rep, :n]))
        fv = np.asarray(M.force_violation(f_model[rep, :n], f_ref[rep, :n]))
        curves["EV"].append(ev.tolist())
        curves["FV"].append(fv.tolist())
        # t = 0 is the shared start: EV = FV = 0 there only if the model is exact; a zero would
        # make the geometric mean 0, so the mean runs over t > 0 when there is more than one frame.
        sl = slice(1, None) if n > 1 else slice(None)
        ev_gm.append(float(M.geometric_mean(np.maximum(ev[sl], 1e-30))))
        fv_gm.append(float(M.geometric_mean(np.maximum(fv[sl], 1e-30))))
    return {"reference": source, "EV": replica_stats(ev_gm), "FV": replica_stats(fv_gm),
            "units": {"EV": "1 (EGraFFBench Table 3 prints EV x 1e5)", "FV": "1"},
            "frames_compared": [int(n) for n in n_valid], "curves": curves}


def violations_vs_split(dataset, ordered, start, proto, e_model, f_model, fail_frames, data_dir):
    """EV / FV against the ground-truth frames of a time-ordered split (``ordered``: the data card's
    ``trajectory:``) that follow each replica's start frame, while they last."""
    from . import data

    interval = float(ordered["frame_interval_fs"])
    dt_frame = proto.timestep_fs * proto.save_every
    ratio = dt_frame / interval
    if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
        return na(f"saved frames every {dt_frame:g} fs do not fall on the reference frames ({interval:g} fs apart)")
    ratio = int(round(ratio))
    ref = data.load(dataset, ordered["split"], data_dir=data_dir)
    if ref.energy is None or ref.forces is None:
        return na(f"split '{ordered['split']}' lacks energies or forces")
    n_atoms = start.n_atoms
    R, T = e_model.shape
    e_ref, f_ref = np.zeros((R, T)), np.zeros((R, T, n_atoms, 3))
    n_valid = np.zeros(R, int)
    starts = list(start.frame_indices or [0] * R)
    forces = np.asarray(ref.forces).reshape(len(ref), n_atoms, 3)
    for rep in range(R):
        idx = starts[rep] + ratio * np.arange(T)
        ok = idx < len(ref)
        n = int(min(ok.sum(), fail_frames[rep]))
        n_valid[rep] = n
        e_ref[rep, :n] = np.asarray(ref.energy)[idx[:n]]
        f_ref[rep, :n] = forces[idx[:n]]
    out = energy_force_violations(e_model, f_model, e_ref, f_ref, n_valid,
                                  f"dataset '{dataset}' split '{ordered['split']}' as a trajectory ({interval:g} fs per frame)")
    out["note"] = ("each replica is compared with the ground-truth frames that follow its start frame, while they "
                   "last; replicas started near the end of the split have few or no frames to compare")
    return out


def oracle_on_frames(oracle, traj):
    """Oracle energies [R, T] and forces [R, T, N, 3] on the saved model frames."""
    from .oracle import evaluate_frames

    ref = evaluate_frames(oracle, traj)
    return np.asarray(ref["energy"]), np.asarray(ref["forces"])


def unwrapped_positions(traj):
    """Positions [R, T, N, 3] of every replica, unwrapped across the periodic boundaries (for the MSD)."""
    from . import metrics as M

    pos = np.asarray(traj["position"])
    return np.stack([np.asarray(M.unwrap(p, traj["cell"], traj["pbc"])) for p in pos])


def diffusivity_per_element(traj, stable_frames, dt_frame_fs, settings, species) -> dict[str, Any]:
    """Diffusivity (cm²/s) of each element from windowed MSD slopes over each replica's stable frames."""
    from ase.data import chemical_symbols

    from . import metrics as M

    pos = unwrapped_positions(traj)
    out = {}
    for z in sorted(set(np.asarray(species).tolist())):
        vals = []
        for rep in range(pos.shape[0]):
            n = int(stable_frames[rep])
            eq = int(settings.msd_equilibration_fraction * n)
            if settings.msd_window_fs is not None:
                window = int(round(settings.msd_window_fs / dt_frame_fs))
                too_short = (n - 1) * dt_frame_fs < (settings.msd_min_stable_fs or 0.0) or window > n - eq - 1
                window = 0 if too_short else window
            else:
                window = int(settings.msd_window_fraction * (n - eq))
            if window < 3:
                vals.append(None)
                continue
            vals.append(float(M.diffusivity(pos[rep, :n], dt_frame_fs, window, eq, species=species, select=z)))
        out[chemical_symbols[z]] = replica_stats(vals)
    return out


def reference_observables(spec) -> dict:
    """Published reference observables from the dataset card (`observables:`), e.g. LiPS's Li diffusivity."""
    from .cards import read_card

    return read_card(spec.card_path).get("observables") or {}
