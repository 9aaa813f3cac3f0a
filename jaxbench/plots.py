"""Figures of a benchmark run, drawn from its results and trajectories (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scoring import unwrapped_positions


def bench_figures(out: Path, results: dict, traj, ref_traj, structure) -> dict[str, str]:
    """The benchmark's figures in `out`: RDF / h(r) overlay, EV and FV against time, temperature and
    energy traces, MSD per element (periodic systems): ``{name: png path}`` (with the parity plot's path
    when the accuracy stage made one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    t_ps = np.asarray(traj["time"]) / 1000.0
    if structure is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(structure["r"], structure["g_ref"], "k-", lw=2, label="reference")
        for rep, g in enumerate(structure["g_model"]):
            if g is not None:
                ax.plot(structure["r"], g, lw=1, alpha=0.8, label=f"model, replica {rep}")
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g(r)" if results["periodic"] else "h(r) (1/Å)")
        ax.legend(fontsize=6)
        ax.set_title(f"{results['model']} on {results['dataset']}", fontsize=9)
        fig.tight_layout()
        paths["rdf"] = str(out / "rdf.png")
        fig.savefig(paths["rdf"], dpi=120)
        plt.close(fig)
    viol = results.get("violation", {})
    if viol.get("curves"):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for key, ax in zip(("EV", "FV"), axes):
            for rep, c in enumerate(viol["curves"][key]):
                if len(c):
                    ax.semilogy(t_ps[: len(c)], np.maximum(c, 1e-16), lw=1, label=f"replica {rep}")
            ax.set_xlabel("t (ps)")
            ax.set_ylabel(key)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=6)
        fig.suptitle(f"vs {viol['reference']}", fontsize=8)
        fig.tight_layout()
        paths["violation"] = str(out / "violation.png")
        fig.savefig(paths["violation"], dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for rep in range(np.asarray(traj["temperature"]).shape[0]):
        axes[0].plot(t_ps, traj["temperature"][rep], lw=1)
        axes[1].plot(t_ps, traj["potential_energy"][rep] - traj["potential_energy"][rep][0], lw=1)
    axes[0].set_xlabel("t (ps)")
    axes[0].set_ylabel("T (K)")
    axes[1].set_xlabel("t (ps)")
    axes[1].set_ylabel("E_pot - E_pot(0) (eV)")
    fig.tight_layout()
    paths["traces"] = str(out / "traces.png")
    fig.savefig(paths["traces"], dpi=120)
    plt.close(fig)
    if results["periodic"]:
        from . import metrics as M

        fig, ax = plt.subplots(figsize=(5, 3.5))
        species = np.asarray(traj["species"])
        for label, tr, style in (("model", traj, "-"), ("reference", ref_traj, "--")):
            if tr is None:
                continue
            pos = unwrapped_positions(tr)
            for z in sorted(set(species.tolist())):
                from ase.data import chemical_symbols

                m = np.mean([np.asarray(M.msd(p, species, z)) for p in pos], axis=0)
                ax.plot(np.asarray(tr["time"])[: len(m)] / 1000.0, m, style, label=f"{label} {chemical_symbols[z]}")
        ax.set_xlabel("t (ps)")
        ax.set_ylabel("MSD (Å²)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["msd"] = str(out / "msd.png")
        fig.savefig(paths["msd"], dpi=120)
        plt.close(fig)
    if results.get("accuracy", {}).get("parity_plot"):
        paths["parity"] = results["accuracy"]["parity_plot"]
    return paths
