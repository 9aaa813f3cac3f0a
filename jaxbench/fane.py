"""FaNE's alanine-dipeptide free-energy benchmark (Fu et al. 2023, Table 5, Figure 5) on arrays.

    fes_grid(meta, hills, grid)          the 2-D F(phi, psi) of a jaxbench metadynamics run, [psi, phi] layout
    marginals(fes_2d, kT)                F(phi), F(psi) by Boltzmann-summing the other angle out
    fes_scores(model, ref, grid, kT)     FaNE eq. 6-7: MAE of F(phi) and F(psi) in kJ/mol over [-pi, pi)
    sampled_fes(phi, psi, kT, grid)      F(phi, psi) = -kT ln p of unbiased samples (the dataset: FaNE Fig. 5c)
    local_minima(fes_2d, grid, n)        the n deepest local minima of a periodic surface (FaNE's six starts)
    frames_near(phi, psi, minima)        the dataset frame nearest to each minimum (on the torus)
    ramachandran_plot(path, ...)         reference and model surfaces side by side, with F(phi), F(psi)

Both surfaces use the same grid and layout as OpenMM's `Metadynamics.getFreeEnergy()` (index
[i_psi, i_phi] over `linspace(-pi, pi, n)`), so the reference and the model are compared point by point.
"""

from __future__ import annotations

import numpy as np

from .metadynamics import KJ_PER_MOL_IN_EV, fes, fes_mae

TWO_PI = 2.0 * np.pi


def fes_grid(meta, hills, grid_rad) -> np.ndarray:
    """F(phi, psi) [n_psi, n_phi] (eV, min 0) from the hills of one replica (CVs ordered phi, psi)."""
    phi, psi = np.meshgrid(grid_rad, grid_rad)  # [i_psi, i_phi]
    points = np.stack([phi.ravel(), psi.ravel()], axis=1)
    return np.asarray(fes(meta, hills, points)).reshape(len(grid_rad), len(grid_rad))


def marginals(fes_2d, kT: float) -> tuple[np.ndarray, np.ndarray]:
    """(F(phi), F(psi)), each shifted to min 0: F(x) = -kT ln sum_y exp(-F(x, y) / kT)."""
    f = np.asarray(fes_2d, float)
    m = f.min()
    w = np.exp(-(f - m) / kT)
    f_phi = -kT * np.log(w.sum(axis=0))
    f_psi = -kT * np.log(w.sum(axis=1))
    return f_phi - f_phi.min(), f_psi - f_psi.min()


def fes_scores(model_fes_2d, ref_fes_2d, grid_rad, kT: float) -> dict:
    """FaNE Table 5's F(phi) / F(psi) MAE in kJ/mol (eq. 6-7: integral of |F - F_hat| over [-pi, pi),
    divided by its length), from two 2-D surfaces in eV on the same grid. The grid's last point is
    -pi's periodic image and is left out."""
    grid = np.asarray(grid_rad, float)
    closed = np.isclose(grid[-1] - grid[0], TWO_PI)
    keep = slice(0, len(grid) - 1) if closed else slice(None)
    out = {}
    for name, f_model, f_ref in zip(("F(phi)", "F(psi)"), marginals(model_fes_2d, kT), marginals(ref_fes_2d, kT)):
        score = fes_mae(grid[keep], f_ref[keep] / KJ_PER_MOL_IN_EV, f_model[keep] / KJ_PER_MOL_IN_EV)
        out[name] = {"mae_kJ_mol": score["mean"], "integral_kJ_mol_rad": score["integral"]}
    return out


def sampled_fes(phi, psi, kT: float, grid_rad, smooth_rad: float = 0.15) -> np.ndarray:
    """F(phi, psi) [n_psi, n_phi] (eV, min 0) = -kT ln p of unbiased samples, p a periodic Gaussian kernel
    density (width `smooth_rad`) on the grid: smooth enough that its local minima are the basins, not
    sampling noise. Points no sample comes near get a large finite value (40 kT)."""
    grid = np.asarray(grid_rad, float)
    phi, psi = np.asarray(phi, float).ravel(), np.asarray(psi, float).ravel()

    def kernel(x):  # [G, S] periodic Gaussian weights
        d = (grid[:, None] - x[None, :] + np.pi) % TWO_PI - np.pi
        return np.exp(-0.5 * (d / smooth_rad) ** 2)

    density = kernel(psi) @ kernel(phi).T / len(phi)  # [i_psi, i_phi]
    floor = density.max() * np.exp(-40.0)
    f = -kT * np.log(np.maximum(density, floor))
    return f - f.min()


def local_minima(fes_2d, grid_rad, n: int = 6) -> list[tuple[float, float, float]]:
    """The `n` deepest strict local minima (phi, psi, F) of a periodic 2-D surface [i_psi, i_phi]."""
    f = np.asarray(fes_2d, float)
    grid = np.asarray(grid_rad, float)
    if np.isclose(grid[-1] - grid[0], TWO_PI):  # drop the duplicated periodic edge
        f, grid = f[:-1, :-1], grid[:-1]
    is_min = np.ones_like(f, bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                is_min &= f < np.roll(np.roll(f, di, axis=0), dj, axis=1)
    i, j = np.nonzero(is_min)
    order = np.argsort(f[i, j])[:n]
    return [(float(grid[j[k]]), float(grid[i[k]]), float(f[i[k], j[k]])) for k in order]


def frames_near(phi, psi, minima) -> list[int]:
    """Index of the frame nearest (on the torus) to each (phi, psi, ...) minimum."""
    phi, psi = np.asarray(phi, float), np.asarray(psi, float)
    out = []
    for m in minima:
        d_phi = (phi - m[0] + np.pi) % TWO_PI - np.pi
        d_psi = (psi - m[1] + np.pi) % TWO_PI - np.pi
        out.append(int(np.argmin(d_phi**2 + d_psi**2)))
    return out


def ramachandran_plot(path, grid_rad, ref_fes_2d, model_fes_2d, kT: float, model_name: str = "model",
                      ref_name: str = "reference", f_max_kJ_mol: float = 40.0, model_cv_rad=None, note: str = ""):
    """Reference and model F(phi, psi) (kJ/mol) side by side, with both marginals below.

    ``model_fes_2d`` None (no model run finished): the model panel shows the (phi, psi) the model visited
    before failing (``model_cv_rad`` [M, 2]) over the reference's contours, and ``note`` says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deg = np.degrees(np.asarray(grid_rad))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = [(axes[0], ref_fes_2d, ref_name)] + ([(axes[1], model_fes_2d, model_name)] if model_fes_2d is not None else [])
    for ax, f, title in panels:
        im = ax.contourf(deg, deg, np.minimum(np.asarray(f) / KJ_PER_MOL_IN_EV, f_max_kJ_mol), levels=20, cmap="viridis")
        ax.set(title=title, xlabel="phi (deg)", ylabel="psi (deg)", aspect="equal")
    if model_fes_2d is None:
        ax = axes[1]
        ax.contour(deg, deg, np.minimum(np.asarray(ref_fes_2d) / KJ_PER_MOL_IN_EV, f_max_kJ_mol), levels=10,
                   colors="0.7", linewidths=0.6)
        if model_cv_rad is not None and len(model_cv_rad):
            cv = np.degrees(np.asarray(model_cv_rad))
            ax.plot(cv[:, 0], cv[:, 1], "C3o", ms=4, label="frames before failure")
            ax.legend(loc="lower right", fontsize=7)
        ax.set(title=f"{model_name}: {note or 'no run finished'}", xlabel="phi (deg)", ylabel="psi (deg)",
               aspect="equal", xlim=(deg[0], deg[-1]), ylim=(deg[0], deg[-1]))
        ax.title.set_fontsize(8)
    fig.colorbar(im, ax=axes[:2], label="F (kJ/mol)")
    for ax, k, label in ((axes[2], 0, "phi"), (axes[3], 1, "psi")):
        curves = [(ref_fes_2d, ref_name, "k-")] + ([(model_fes_2d, model_name, "C1--")] if model_fes_2d is not None else [])
        for f, name, style in curves:
            ax.plot(deg, marginals(f, kT)[k] / KJ_PER_MOL_IN_EV, style, label=name)
        ax.set(xlabel=f"{label} (deg)", ylabel=f"F({label}) (kJ/mol)")
        ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)
