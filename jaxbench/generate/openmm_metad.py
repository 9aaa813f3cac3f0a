"""Reference metadynamics of alanine dipeptide in OpenMM (`openmm.app.Metadynamics`), the oracle side of
FaNE's free-energy benchmark.

The bias is well-tempered metadynamics on phi and psi, the same variables, widths, heights and pace as
the jaxbench engine's run of a model (`jaxbench.metadynamics`); OpenMM keeps the bias on a grid (one
point per `grid` bins over [-pi, pi)), jaxbench as a sum of Gaussians: the difference is below the
grid spacing. FaNE ran GROMACS + PLUMED 2.8 with explicit water; here the solvent is the generator's
implicit GBn2 (see the alanine-dipeptide dataset card).
"""

from __future__ import annotations

import numpy as np

from .openmm_systems import KJMOL_TO_EV, NM_TO_A, alanine_system, openmm_modules

# 0-based atom indices in the generator's ACE-ALA-NME (ALANINE_DIPEPTIDE_PDB)
PHI = (4, 6, 8, 14)  # C(ACE) - N - CA - C
PSI = (6, 8, 14, 16)  # N - CA - C - N(NME)


def reference_metadynamics(positions_A, steps: int, *, temperature_K: float = 300.0, timestep_fs: float = 1.0,
                           height_kJ_mol: float = 1.2, sigma_rad: float = 0.35, pace_steps: int = 1000,
                           bias_factor: float = 6.0, friction_per_ps: float = 1.0, seed: int = 0, grid: int = 72,
                           save_every: int = 100, threads: int = 1) -> dict:
    """Well-tempered metadynamics on (phi, psi) from `positions_A` [22, 3].

    Returns ``phi``, ``psi`` [frames] (rad, every `save_every` steps), ``fes_eV`` [grid, grid] (index
    [i_psi, i_phi], OpenMM's layout, min 0), ``grid_rad`` [grid] (the grid's points) and the settings."""
    openmm, app, unit = openmm_modules()
    top, system, _ = alanine_system()
    variables = []
    for atoms in (PHI, PSI):
        torsion = openmm.CustomTorsionForce("theta")
        torsion.addTorsion(*atoms, [])
        variables.append(app.BiasVariable(torsion, -np.pi, np.pi, sigma_rad, periodic=True, gridWidth=grid))
    meta = app.Metadynamics(system, variables, temperature_K * unit.kelvin, bias_factor,
                            height_kJ_mol * unit.kilojoule_per_mole, pace_steps)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(int(seed) + 1)
    platform = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(top, system, integrator, platform, {"Threads": str(int(threads))})
    sim.context.setPositions(np.asarray(positions_A, float) / NM_TO_A)
    sim.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, int(seed) + 1)
    cv = []
    for _ in range(steps // save_every):
        meta.step(sim, save_every)
        cv.append(meta.getCollectiveVariables(sim))
    cv = np.asarray(cv, float).reshape(-1, 2)
    fes = np.asarray(meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole), float) * KJMOL_TO_EV
    return dict(phi=cv[:, 0], psi=cv[:, 1], fes_eV=fes - fes.min(), grid_rad=np.linspace(-np.pi, np.pi, grid),
                settings=dict(temperature_K=temperature_K, timestep_fs=timestep_fs, height_kJ_mol=height_kJ_mol,
                              sigma_rad=sigma_rad, pace_steps=pace_steps, bias_factor=bias_factor, steps=steps,
                              friction_per_ps=friction_per_ps, seed=seed, grid=grid,
                              engine=f"OpenMM {openmm.__version__} app.Metadynamics"))


def marginal_free_energy(fes_2d, kT: float, axis: int):
    """F(x) = -kT ln sum_y exp(-F(x, y) / kT) of a 2-D surface, shifted to min 0 (axis: the one summed out)."""
    f = np.asarray(fes_2d, float)
    m = f.min()
    out = -kT * np.log(np.sum(np.exp(-(f - m) / kT), axis=axis)) + m
    return out - out.min()
