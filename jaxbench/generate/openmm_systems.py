"""OpenMM generators: flexible SPC/Fw water (64 / 512 molecules) and alanine dipeptide (amber14 + GBn2).

Units: OpenMM works in nm, kJ/mol, ps; everything written is Å, eV, eV/Å
(1 kJ/mol = 0.0103642688 eV, 1 nm = 10 Å). OpenMM is imported lazily (``pip install openmm``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import DataError
from .base import Generated, register

KJMOL_TO_EV = 0.0103642688
NM_TO_A = 10.0
KCAL_TO_KJ = 4.184

# SPC/Fw (Wu, Tepper & Voth, J. Chem. Phys. 124, 024503 (2006)), Table I. The paper writes the
# intramolecular energy as (k_b/2)(r - r0)^2 + (k_a/2)(theta - theta0)^2, the convention of OpenMM's
# HarmonicBondForce / HarmonicAngleForce, so k_b and k_a go in as they are.
SPCFW = dict(
    r0_A=1.012, kb_kcal_mol_A2=1059.162, theta0_deg=113.24, ka_kcal_mol_rad2=75.90,
    qO=-0.82, qH=0.41, sigma_OO_A=3.165492, eps_OO_kcal_mol=0.1554253,
)


def openmm_modules():
    """(openmm, openmm.app, openmm.unit), with a clear error when OpenMM is not installed."""
    try:
        import openmm
        from openmm import app, unit
    except ImportError:
        raise DataError("the OpenMM generators need OpenMM: pip install openmm") from None
    return openmm, app, unit


def _platform(openmm, threads: int):
    plat = openmm.Platform.getPlatformByName("CPU")
    return plat, {"Threads": str(int(threads))}


# ---------------------------------------------------------------------------------------------
# water
# ---------------------------------------------------------------------------------------------
def water_system(n_molecules: int, box_nm: float, cutoff_nm: float, pme_tol: float = 5e-4, dispersion: bool = True,
                 electrostatics: str = "pme"):
    """The SPC/Fw System for `n_molecules` waters (atom order O, H, H per molecule) in a cubic box."""
    openmm, app, unit = openmm_modules()
    p = SPCFW
    sys_ = openmm.System()
    sys_.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*(box_nm if i == j else 0.0 for j in range(3))) for i in range(3)))
    bonds = openmm.HarmonicBondForce()
    angles = openmm.HarmonicAngleForce()
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod({"pme": openmm.NonbondedForce.PME, "ewald": openmm.NonbondedForce.Ewald}[electrostatics])
    nb.setCutoffDistance(cutoff_nm)
    nb.setEwaldErrorTolerance(pme_tol)
    nb.setUseDispersionCorrection(dispersion)
    nb.setUseSwitchingFunction(False)
    kb = p["kb_kcal_mol_A2"] * KCAL_TO_KJ * 100.0  # kJ/mol/nm^2
    ka = p["ka_kcal_mol_rad2"] * KCAL_TO_KJ
    sig, eps = p["sigma_OO_A"] / NM_TO_A, p["eps_OO_kcal_mol"] * KCAL_TO_KJ
    for m in range(n_molecules):
        o = sys_.addParticle(15.9994)
        h1 = sys_.addParticle(1.008)
        h2 = sys_.addParticle(1.008)
        nb.addParticle(p["qO"], sig, eps)
        nb.addParticle(p["qH"], 1.0, 0.0)
        nb.addParticle(p["qH"], 1.0, 0.0)
        bonds.addBond(o, h1, p["r0_A"] / NM_TO_A, kb)
        bonds.addBond(o, h2, p["r0_A"] / NM_TO_A, kb)
        angles.addAngle(h1, o, h2, np.deg2rad(p["theta0_deg"]), ka)
        for a, b in ((o, h1), (o, h2), (h1, h2)):
            nb.addException(a, b, 0.0, 1.0, 0.0)  # intramolecular pairs excluded
    for f in (bonds, angles, nb):
        sys_.addForce(f)
    return sys_


def _water_start(n_molecules: int, box_A: float, rng) -> np.ndarray:
    """Molecules on a cubic grid with random orientations at the SPC/Fw geometry, [3n, 3] Å."""
    k = int(np.ceil(n_molecules ** (1 / 3) - 1e-9))
    a = box_A / k
    r0, th = SPCFW["r0_A"], np.deg2rad(SPCFW["theta0_deg"])
    local = np.array([[0, 0, 0], [r0, 0, 0], [r0 * np.cos(th), r0 * np.sin(th), 0]])
    from scipy.spatial.transform import Rotation

    out = []
    sites = [(i, j, l) for i in range(k) for j in range(k) for l in range(k)][:n_molecules]
    rots = Rotation.random(len(sites), random_state=rng)
    for s, R in zip(sites, rots):
        out.append(R.apply(local) + (np.array(s) + 0.5) * a)
    return np.concatenate(out)


_ELEC_NOTE = {
    "ewald": ("plain Ewald summation (OpenMM NonbondedForce.Ewald, same error tolerance as PME would use): bitwise "
              "reproducible from the seed on the CPU platform, unlike CPU PME whose FFT plans vary run to run."),
    "pme": ("PME (OpenMM CPU); runs with the same seed agree only to rounding at first (the FFT plan varies between "
            "runs) and then diverge chaotically: the same seed gives statistically, not bitwise, identical data."),
}


def default_electrostatics(n_molecules: int) -> str:
    """Ewald (bitwise reproducible) for small boxes, PME (N log N) for large ones."""
    return "ewald" if n_molecules <= 128 else "pme"


def _run_frames(sim, n_frames: int, every: int, log, what: str):
    """Sample n_frames states (positions Å, energy eV, forces eV/Å) every `every` steps."""
    _, _, unit = openmm_modules()
    pos, en, frc = [], [], []
    for i in range(n_frames):
        sim.step(every)
        st = sim.context.getState(getPositions=True, getEnergy=True, getForces=True)
        pos.append(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * NM_TO_A)
        en.append(st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJMOL_TO_EV)
        frc.append(st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) * KJMOL_TO_EV / NM_TO_A)
        if log and n_frames >= 10 and (i + 1) % max(1, n_frames // 10) == 0:
            log(f"{what}: frame {i + 1}/{n_frames}")
    return pos, np.asarray(en), frc


def _water(n_molecules: int, frames: int, seed: int, log=None, temperature_K: float = 300.0, timestep_fs: float = 1.0,
           frame_every_steps: int = 10, equil_npt_ps: float = 20.0, equil_nvt_ps: float = 5.0, pressure_bar: float = 1.01325,
           density_g_cm3: float = 0.997, cutoff_A: float | None = None, friction_per_ps: float = 1.0,
           pme_tolerance: float = 5e-4, threads: int = 1, electrostatics: str | None = None) -> Generated:
    openmm, app, unit = openmm_modules()
    electrostatics = electrostatics or default_electrostatics(n_molecules)
    rng = np.random.default_rng(seed)
    mass = 18.0154 / 0.602214076  # g/mol -> amu per Å^3 at 1 g/cm^3
    box_A = (n_molecules * mass / density_g_cm3) ** (1 / 3)
    # the barostat changes the box: keep the cutoff well below half the smallest box it can reach
    cutoff = float(cutoff_A) if cutoff_A is not None else min(9.0, round(0.42 * box_A, 2))
    system = water_system(n_molecules, box_A / NM_TO_A, cutoff / NM_TO_A, pme_tolerance, electrostatics=electrostatics)
    baro = openmm.MonteCarloBarostat(pressure_bar * unit.bar, temperature_K * unit.kelvin, 25)
    baro.setRandomNumberSeed(int(rng.integers(1, 2**31 - 1)))
    system.addForce(baro)
    integ = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond)
    integ.setRandomNumberSeed(int(rng.integers(1, 2**31 - 1)))
    top = app.Topology()
    plat, props = _platform(openmm, threads)
    ctx_sim = app.Simulation(top, system, integ, plat, props)
    x0 = _water_start(n_molecules, box_A, rng)
    ctx_sim.context.setPositions(x0 / NM_TO_A)
    ctx_sim.minimizeEnergy(maxIterations=500)
    ctx_sim.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, int(rng.integers(1, 2**31 - 1)))
    n_npt = int(round(equil_npt_ps * 1000 / timestep_fs))
    vols = []
    chunk = max(1, n_npt // 50)
    for _ in range(0, n_npt, chunk):
        ctx_sim.step(chunk)
        box = ctx_sim.context.getState().getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        vols.append(float(np.linalg.det(box)) * 1000.0)
    # NVT at the mean volume of the second half of the NPT run
    v_mean = float(np.mean(vols[len(vols) // 2 :])) if vols else box_A**3
    L = v_mean ** (1 / 3)
    if cutoff >= 0.5 * L:
        raise DataError(f"cutoff {cutoff} Å is not below half the equilibrated box {L:.3f} Å", key="cutoff_A")
    state = ctx_sim.context.getState(getPositions=True, getVelocities=True, enforcePeriodicBox=False)
    old = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)[0, 0] * NM_TO_A
    pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * NM_TO_A
    # scale molecule centres (not bonds) to the mean volume
    pos = pos.reshape(n_molecules, 3, 3)
    com = pos[:, :1]
    pos = (pos - com + com * (L / old)).reshape(-1, 3)
    nvt = water_system(n_molecules, L / NM_TO_A, cutoff / NM_TO_A, pme_tolerance, electrostatics=electrostatics)
    integ2 = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond)
    integ2.setRandomNumberSeed(int(rng.integers(1, 2**31 - 1)))
    sim = app.Simulation(top, nvt, integ2, plat, props)
    sim.context.setPositions(pos / NM_TO_A)
    sim.context.setVelocities(state.getVelocities())
    sim.step(int(round(equil_nvt_ps * 1000 / timestep_fs)))
    P, E, F = _run_frames(sim, frames, frame_every_steps, log, f"water-{n_molecules}")
    cell = np.eye(3) * L
    numbers = np.tile([8, 1, 1], n_molecules)
    density = n_molecules * mass / v_mean
    params = dict(n_molecules=n_molecules, temperature_K=temperature_K, timestep_fs=timestep_fs,
                  frame_every_steps=frame_every_steps, equil_npt_ps=equil_npt_ps, equil_nvt_ps=equil_nvt_ps,
                  pressure_bar=pressure_bar, start_density_g_cm3=density_g_cm3, cutoff_A=cutoff,
                  friction_per_ps=friction_per_ps, electrostatics=electrostatics, ewald_error_tolerance=pme_tolerance, dispersion_correction=True,
                  barostat_interval_steps=25, threads=threads, spcfw=dict(SPCFW),
                  equilibrated_box_A=round(L, 6), equilibrated_density_g_cm3=round(density, 5),
                  openmm_version=openmm.__version__, platform="CPU", minimize_max_iterations=500)
    return Generated(
        positions=P, numbers=[numbers] * frames, cells=[cell] * frames, pbc=[np.ones(3, bool)] * frames,
        energy=E, forces=F, stress=None, force_field=f"SPC/Fw (Wu, Tepper & Voth 2006), {electrostatics.upper()} electrostatics", engine=f"OpenMM {openmm.__version__} CPU",
        params=params,
        simulation={"temperature_K": [temperature_K], "timestep_fs": [timestep_fs], "ensemble": "NVT (Langevin middle) at the NPT-equilibrated volume",
                    "frame_interval_fs": frame_every_steps * timestep_fs},
        kind="periodic", frame_interval_fs=frame_every_steps * timestep_fs,
        notes=(f"{n_molecules} flexible SPC/Fw waters, OpenMM CPU. Equilibrated {equil_npt_ps} ps NPT (MonteCarloBarostat, "
               f"{pressure_bar} bar, {temperature_K} K) to a mean box of {L:.4f} Å ({density:.4f} g/cm^3, second half of the NPT run), "
               f"then {equil_nvt_ps} ps NVT, then sampled NVT (LangevinMiddleIntegrator, friction {friction_per_ps}/ps) at that fixed "
               f"volume, one frame every {frame_every_steps * timestep_fs} fs. Electrostatics: {_ELEC_NOTE[electrostatics]} Energies include the reciprocal space and the LJ dispersion "
               f"correction (a constant at fixed volume). Positions are not wrapped (molecules stay whole)."),
    )


@register("water-64", default_frames=2000, title="SPC/Fw water, 64 molecules")
def water_64(frames: int, seed: int, log=None, **kw) -> Generated:
    return _water(64, frames, seed, log, **kw)


@register("water-512", default_frames=500, title="SPC/Fw water, 512 molecules")
def water_512(frames: int, seed: int, log=None, **kw) -> Generated:
    return _water(512, frames, seed, log, **kw)


# ---------------------------------------------------------------------------------------------
# alanine dipeptide
# ---------------------------------------------------------------------------------------------
# ACE-ALA-NME with AMBER atom names (the usual tleap geometry); minimized before use.
ALANINE_DIPEPTIDE_PDB = """\
ATOM      1 HH31 ACE A   1       2.000   1.000   0.000  1.00  0.00           H
ATOM      2  CH3 ACE A   1       2.000   2.090   0.000  1.00  0.00           C
ATOM      3 HH32 ACE A   1       1.486   2.454   0.890  1.00  0.00           H
ATOM      4 HH33 ACE A   1       1.486   2.454  -0.890  1.00  0.00           H
ATOM      5  C   ACE A   1       3.427   2.641   0.000  1.00  0.00           C
ATOM      6  O   ACE A   1       4.391   1.877   0.000  1.00  0.00           O
ATOM      7  N   ALA A   2       3.555   3.970   0.000  1.00  0.00           N
ATOM      8  H   ALA A   2       2.733   4.556   0.000  1.00  0.00           H
ATOM      9  CA  ALA A   2       4.853   4.614   0.000  1.00  0.00           C
ATOM     10  HA  ALA A   2       5.403   4.319   0.895  1.00  0.00           H
ATOM     11  CB  ALA A   2       5.661   4.221  -1.232  1.00  0.00           C
ATOM     12  HB1 ALA A   2       5.074   4.399  -2.138  1.00  0.00           H
ATOM     13  HB2 ALA A   2       5.959   3.175  -1.204  1.00  0.00           H
ATOM     14  HB3 ALA A   2       6.587   4.790  -1.298  1.00  0.00           H
ATOM     15  C   ALA A   2       4.713   6.129   0.000  1.00  0.00           C
ATOM     16  O   ALA A   2       3.601   6.653   0.000  1.00  0.00           O
ATOM     17  N   NME A   3       5.846   6.835   0.000  1.00  0.00           N
ATOM     18  H   NME A   3       6.729   6.342   0.018  1.00  0.00           H
ATOM     19  CH3 NME A   3       5.846   8.284   0.000  1.00  0.00           C
ATOM     20 HH31 NME A   3       4.852   8.684  -0.209  1.00  0.00           H
ATOM     21 HH32 NME A   3       6.533   8.656  -0.761  1.00  0.00           H
ATOM     22 HH33 NME A   3       6.164   8.650   0.977  1.00  0.00           H
TER
END
"""

ALANINE_FF = ("amber14-all.xml", "implicit/gbn2.xml")


def alanine_system():
    """(topology, system, positions nm) of ACE-ALA-NME with amber14 + GBn2, no constraints, no cutoff."""
    import io

    openmm, app, unit = openmm_modules()
    pdb = app.PDBFile(io.StringIO(ALANINE_DIPEPTIDE_PDB))
    ff = app.ForceField(*ALANINE_FF)
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    return pdb.topology, system, pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def _alanine_chain(frames: int, integrator_seed: int, velocity_seed: int, temperature_K: float, timestep_fs: float,
                   frame_every_ps: float, equil_ps: float, friction_per_ps: float, threads: int, log=None, what=""):
    """One independent Langevin chain (minimize, equilibrate, sample): (positions, energy, forces) arrays."""
    openmm, app, unit = openmm_modules()
    top, system, x0 = alanine_system()
    integ = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond)
    integ.setRandomNumberSeed(int(integrator_seed))
    plat, props = _platform(openmm, threads)
    sim = app.Simulation(top, system, integ, plat, props)
    sim.context.setPositions(x0)
    sim.minimizeEnergy(maxIterations=1000)
    sim.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, int(velocity_seed))
    sim.step(int(round(equil_ps * 1000 / timestep_fs)))
    every = int(round(frame_every_ps * 1000 / timestep_fs))
    P, E, F = _run_frames(sim, frames, every, log, what or "alanine-dipeptide")
    return np.asarray(P), np.asarray(E), np.asarray(F)


def _walker_frames(frames: int, walkers: int) -> list[int]:
    return [frames // walkers + (1 if i < frames % walkers else 0) for i in range(walkers)]


@register("alanine-dipeptide", default_frames=1000, title="Alanine dipeptide (ACE-ALA-NME), amber14 + GBn2")
def alanine_dipeptide(frames: int, seed: int, log=None, temperature_K: float = 300.0, timestep_fs: float = 1.0,
                      frame_every_ps: float = 0.5, equil_ps: float = 50.0, friction_per_ps: float = 1.0,
                      threads: int = 1, walkers: int = 2, processes: int | None = None) -> Generated:
    """`walkers` independent chains (own seeds and equilibration), their frames concatenated in walker order, so a
    contiguous split takes whole stretches of one chain. OpenMM's CPU platform spends ~1 ms a step on 22 atoms
    whatever the thread count, so chains in parallel processes (`processes`, default min(walkers, cores)) are
    what makes a 2000-frame set take minutes; the data depend on `walkers` and the seed, never on `processes`."""
    import os

    openmm, app, unit = openmm_modules()
    walkers = int(walkers)
    if walkers < 1 or walkers > max(1, frames):
        raise DataError(f"alanine-dipeptide: walkers={walkers} must be between 1 and the number of frames ({frames})",
                        key="walkers")
    rng = np.random.default_rng(seed)
    seeds = [(int(rng.integers(1, 2**31 - 1)), int(rng.integers(1, 2**31 - 1))) for _ in range(walkers)]
    counts = _walker_frames(frames, walkers)
    kw = dict(temperature_K=temperature_K, timestep_fs=timestep_fs, frame_every_ps=frame_every_ps, equil_ps=equil_ps,
              friction_per_ps=friction_per_ps, threads=threads)
    nproc = max(1, min(walkers, int(processes) if processes else (os.cpu_count() or 1)))
    chains: list = [None] * walkers
    if nproc == 1:
        for i in range(walkers):
            chains[i] = _alanine_chain(counts[i], *seeds[i], log=log, what=f"alanine-dipeptide walker {i + 1}/{walkers}", **kw)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # Walker 0 runs here (its progress is logged); the others in spawned processes (fork is unsafe once JAX
        # or OpenMM threads exist in this process).
        with cf.ProcessPoolExecutor(max_workers=nproc - 1, mp_context=mp.get_context("spawn")) as pool:
            futs = {i: pool.submit(_alanine_chain, counts[i], *seeds[i], **kw) for i in range(1, walkers)}
            chains[0] = _alanine_chain(counts[0], *seeds[0], log=log, what=f"alanine-dipeptide walker 1/{walkers}", **kw)
            for i, f in futs.items():
                chains[i] = f.result()
                if log:
                    log(f"alanine-dipeptide: walker {i + 1}/{walkers} done")
    P = [x for c in chains for x in c[0]]
    E = np.concatenate([c[1] for c in chains])
    F = [f for c in chains for f in c[2]]
    top, _, _ = alanine_system()
    numbers = np.array([a.element.atomic_number for a in top.atoms()])
    params = dict(temperature_K=temperature_K, timestep_fs=timestep_fs, frame_every_ps=frame_every_ps, equil_ps=equil_ps,
                  friction_per_ps=friction_per_ps, threads=threads, walkers=walkers, frames_per_walker=counts,
                  force_field_files=list(ALANINE_FF), constraints=None,
                  nonbonded="NoCutoff", openmm_version=openmm.__version__, platform="CPU", minimize_max_iterations=1000,
                  atom_names=[f"{a.residue.name}:{a.name}" for a in top.atoms()])
    ns = frames * frame_every_ps / 1000
    return Generated(
        positions=P, numbers=[numbers] * frames, cells=[np.zeros((3, 3))] * frames, pbc=[np.zeros(3, bool)] * frames,
        energy=E, forces=F, stress=None, force_field="AMBER ff14SB (amber14-all.xml) + GBn2 implicit solvent (implicit/gbn2.xml)",
        engine=f"OpenMM {openmm.__version__} CPU", params=params,
        simulation={"temperature_K": [temperature_K], "timestep_fs": [timestep_fs], "ensemble": "NVT (Langevin middle)",
                    "frame_interval_fs": frame_every_ps * 1000},
        kind="molecule", frame_interval_fs=frame_every_ps * 1000,
        groups=[f"walker-{i}" for i, c in enumerate(counts) for _ in range(c)],
        notes=(f"ACE-ALA-NME (22 atoms, PDB text built into jaxbench, minimized), amber14 + GBn2 from OpenMM's own files, no "
               f"cutoff. No constraints (all bonds, including X-H, are flexible, as a model that sees every atom needs) hence a "
               f"{timestep_fs} fs Langevin step instead of FaNE's 2 fs with H-bond constraints. {walkers} independent "
               f"chain(s) (frames {counts} in that order), each minimized, {equil_ps} ps of equilibration, "
               f"then one frame every {frame_every_ps} ps: {frames} frames = {ns:g} ns in all (FaNE: one frame every 2 ps, "
               f"50,000 frames from 100 ns; --param frame_every_ps=2 gives FaNE's spacing at 4x the cost). FaNE "
               f"simulated explicit water and learned an implicit solvent from the solute's frames; here the solvent is implicit "
               f"(GBn2) in the reference itself, the honest CPU-sized variant: energies/forces are the solute's in GBn2."),
    )


# ---------------------------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------------------------
class OpenMMOracle:
    """Reference force field of an OpenMM generator, as an ASE calculator and a batch evaluator.

    ``evaluate_frames(positions [T,N,3] Å, cells [T,3,3] | [3,3] | None) -> (energy [T] eV, forces [T,N,3] eV/Å)``.
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, name: str, make_system: Callable, numbers: np.ndarray, periodic: bool, threads: int = 1,
                 platform: str = "CPU"):
        self.name, self.numbers, self.periodic = name, np.asarray(numbers), periodic
        self.make_system, self.threads, self.platform = make_system, threads, platform
        self._contexts: dict[bytes, Any] = {}
        self.results: dict[str, Any] = {}

    def context(self, cell_A):
        """An OpenMM Context for this cell: Ewald/PME parameters (alpha, k-vectors or grid) and the
        dispersion correction are fixed when a context is made, so each distinct cell gets its own."""
        openmm, _, _ = openmm_modules()
        key = b"" if cell_A is None else np.asarray(cell_A, float).tobytes()
        if key not in self._contexts:
            if len(self._contexts) > 8:
                self._contexts.clear()
            system = self.make_system(None if cell_A is None else np.asarray(cell_A, float))
            plat = openmm.Platform.getPlatformByName(self.platform)
            props = {"Threads": str(int(self.threads))} if self.platform == "CPU" else {}
            integ = openmm.VerletIntegrator(0.001)
            self._contexts[key] = (openmm.Context(system, integ, plat, props), integ)
        return self._contexts[key][0]

    def _one(self, x_A: np.ndarray, cell_A: np.ndarray | None):
        openmm, _, unit = openmm_modules()
        if self.periodic:
            if cell_A is None or not np.any(cell_A):
                raise DataError(f"oracle {self.name}: a periodic system needs a cell")
            c = np.asarray(cell_A, float)
            if not np.allclose(c, np.diag(np.diag(c))):
                raise DataError(f"oracle {self.name}: only orthorhombic cells are supported, got {c.tolist()}")
            ctx = self.context(c)
        else:
            ctx = self.context(None)
        ctx.setPositions(np.asarray(x_A, float) / NM_TO_A)
        st = ctx.getState(getEnergy=True, getForces=True)
        e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJMOL_TO_EV
        f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) * KJMOL_TO_EV / NM_TO_A
        return e, np.asarray(f)

    def evaluate_frames(self, positions, cells=None):
        pos = np.asarray(positions, float)
        if pos.ndim == 2:
            pos = pos[None]
        if pos.shape[1:] != (len(self.numbers), 3):
            raise DataError(f"oracle {self.name}: positions have shape {pos.shape}, expected [T, {len(self.numbers)}, 3]")
        cells = None if cells is None else np.asarray(cells, float)
        if cells is not None and cells.ndim == 2:
            cells = np.broadcast_to(cells, (len(pos), 3, 3))
        E, F = np.empty(len(pos)), np.empty(pos.shape)
        for t in range(len(pos)):
            if not np.all(np.isfinite(pos[t])):
                raise DataError(f"oracle {self.name}: frame {t} has non-finite positions")
            E[t], F[t] = self._one(pos[t], None if cells is None else cells[t])
        return E, F

    # ASE calculator interface (what jaxbench.oracle accepts)
    def get_potential_energy(self, atoms=None, force_consistent=False):
        self._calc(atoms)
        return self.results["energy"]

    def get_forces(self, atoms=None):
        self._calc(atoms)
        return self.results["forces"].copy()

    def _calc(self, atoms):
        if not np.array_equal(atoms.get_atomic_numbers(), self.numbers):
            raise DataError(f"oracle {self.name}: atoms' species differ from the reference system's")
        e, f = self._one(atoms.get_positions(), np.asarray(atoms.cell) if self.periodic else None)
        self.results = {"energy": e, "forces": f}


def oracle(name: str, n_molecules: int | None = None, cutoff_A: float | None = None, box_A: float | None = None,
           threads: int = 1, electrostatics: str | None = None, platform: str = "CPU") -> OpenMMOracle:
    """The oracle of generator `name` ("water-64", "water-512", "alanine-dipeptide"). For water, cutoff and
    electrostatics must match the dataset's (its card's ``generated.parameters``: ``cutoff_A``,
    ``electrostatics``); the defaults are the generator's. ``platform="Reference"`` evaluates in double
    precision (CPU mixes single precision into the nonbonded terms: ~1e-6 relative in the energy)."""
    if name in ("water-64", "water-512"):
        n = n_molecules or int(name.split("-")[1])
        if cutoff_A is None:
            box = box_A or (n * 18.0154 / 0.602214076 / 0.997) ** (1 / 3)
            cutoff_A = min(9.0, round(0.42 * box, 2))
        el = electrostatics or default_electrostatics(n)

        def make(cell):
            s = water_system(n, cell[0, 0] / NM_TO_A, cutoff_A / NM_TO_A, electrostatics=el)
            s.setDefaultPeriodicBoxVectors(*(_vec(row / NM_TO_A) for row in cell))
            return s

        return OpenMMOracle(name, make, np.tile([8, 1, 1], n), True, threads, platform)
    if name == "alanine-dipeptide":
        top, _, _ = alanine_system()
        return OpenMMOracle(name, lambda cell: alanine_system()[1], np.array([a.element.atomic_number for a in top.atoms()]),
                            False, threads, platform)
    raise DataError(f"no OpenMM oracle called {name!r}; known: water-64, water-512, alanine-dipeptide")


def _vec(row):
    openmm, _, _ = openmm_modules()
    return openmm.Vec3(*map(float, row))
