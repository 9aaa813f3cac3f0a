"""ASE EMT generators: random fcc alloys (`hea-emt`), an fcc(100) slab with an adatom (`surface-emt`), and
bulk fcc Cu at two cell sizes (`bulk-emt-2`, `bulk-emt-4`). Labels (energy eV, forces eV/Å, stress eV/Å³, ASE
sign) are ASE's EMT on each written frame.
"""

from __future__ import annotations

import numpy as np

from .base import Generated, register

EMT_METALS = ("Cu", "Ni", "Pd", "Ag", "Au", "Pt")


def _label(images):
    from ase.calculators.emt import EMT

    from ..frames import voigt_to_full

    P, Z, C, B, E, F, S = [], [], [], [], [], [], []
    for a in images:
        a = a.copy()
        a.calc = EMT()
        E.append(a.get_potential_energy())
        F.append(a.get_forces())
        S.append(voigt_to_full(a.get_stress()) if a.pbc.all() else np.zeros((3, 3)))
        P.append(a.get_positions())
        Z.append(a.get_atomic_numbers())
        C.append(np.asarray(a.cell))
        B.append(a.get_pbc())
    return P, Z, C, B, np.asarray(E), F, S


def _md(atoms, temperature_K, steps, every, rng, timestep_fs=2.0, friction=0.02):
    """Langevin MD with EMT; returns snapshots every `every` steps."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    a = atoms.copy()
    a.calc = EMT()
    MaxwellBoltzmannDistribution(a, temperature_K=temperature_K, rng=rng)
    dyn = Langevin(a, timestep_fs * units.fs, temperature_K=temperature_K, friction=friction, rng=rng)
    out = []
    for _ in range(steps // every):
        dyn.run(every)
        out.append(a.copy())
    return out


def alloy_lattice(symbols) -> float:
    from ase.data import atomic_numbers, reference_states

    return float(np.mean([reference_states[atomic_numbers[s]]["a"] for s in symbols]))


DEFAULT_COMPOSITIONS = ("CuNiPdAgAu", "CuNiPdAgPt", "CuNi", "AuPt", "CuAgAu", "NiPdPt")


@register("hea-emt", default_frames=300, title="Random fcc alloys of EMT metals (ASE EMT)")
def hea_emt(frames: int, seed: int, log=None, compositions=DEFAULT_COMPOSITIONS, repeats=(2, 3),
            temperatures_K=(300, 800, 1500), md_every=10, strain=0.04, strained_fraction=0.25,
            timestep_fs=2.0) -> Generated:
    from ase.build import bulk
    from ase.symbols import string2symbols

    rng = np.random.default_rng(seed)
    comps = [list(dict.fromkeys(string2symbols(c))) for c in compositions]
    images, groups = [], []
    i = 0
    while len(images) < frames:
        els = comps[i % len(comps)]
        rep = repeats[(i // len(comps)) % len(repeats)]
        T = temperatures_K[(i // (len(comps) * len(repeats))) % len(temperatures_K)]
        i += 1
        a0 = alloy_lattice(els)
        atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat(rep)
        n = len(atoms)
        # equimolar random assignment (the remainder goes to random elements)
        sym = [els[k % len(els)] for k in range(n)]
        rng.shuffle(sym)
        atoms.set_chemical_symbols(sym)
        if rng.random() < strained_fraction:
            eps = rng.uniform(-strain, strain, (3, 3))
            eps = 0.5 * (eps + eps.T)
            atoms.set_cell(atoms.cell @ (np.eye(3) + eps), scale_atoms=True)
            kind = "strained"
        else:
            kind = "md"
        snaps = _md(atoms, T, steps=md_every * 4, every=md_every, rng=rng, timestep_fs=timestep_fs)
        for s in snaps[1:]:  # drop the first (closest to the ideal lattice)
            if len(images) < frames:
                images.append(s)
                groups.append(f"{''.join(els)}/{n}/{T}K/{kind}")
        if log and len(images) % 50 < 3:
            log(f"hea-emt: {len(images)}/{frames}")
    P, Z, C, B, E, F, S = _label(images)
    params = dict(compositions=list(compositions), repeats=list(repeats), temperatures_K=list(temperatures_K),
                  md_every_steps=md_every, snapshots_per_run=3, strain_max=strain, strained_fraction=strained_fraction,
                  timestep_fs=timestep_fs, langevin_friction=0.02, lattice="Vegard mean of ASE reference_states")
    return Generated(P, Z, C, B, E, F, S, force_field="ASE EMT", engine="ASE", params=params,
                     simulation={"temperature_K": list(temperatures_K), "timestep_fs": [timestep_fs]}, kind="periodic",
                     notes=("Random equimolar fcc alloys (conventional-cell supercells 2x2x2 = 32 and 3x3x3 = 108 atoms) at the "
                            "Vegard lattice constant; a fraction of cells strained by a random symmetric strain; 3 snapshots "
                            "from short EMT Langevin MD per cell and temperature. Frames are not time-ordered across cells."),
                     groups=groups)


def adatom_hop(metal="Cu", adatom="Cu", size=(3, 3, 3), vacuum=6.0, neb_images=7):
    """The hollow -> neighbouring hollow hop of an adatom on fcc(100) (ASE's diffusion tutorial): the end
    points relaxed with EMT (bottom layer fixed: ``FixAtoms`` kept on them) and the EMT climbing-image NEB
    path between them (``neb_images`` images including both ends). Deterministic: the dataset's NEB frames
    and the MS25 barrier task start from the same band."""
    from ase.build import add_adsorbate, fcc100
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.mep import NEB
    from ase.optimize import BFGS

    slab = fcc100(metal, size=size, vacuum=vacuum)
    add_adsorbate(slab, adatom, 1.7, "hollow")
    fix = FixAtoms(indices=list(range(size[0] * size[1])))  # bottom layer fixed
    initial = slab.copy()
    initial.set_constraint(fix)
    initial.calc = EMT()
    BFGS(initial, logfile=None).run(fmax=0.02)
    final = initial.copy()
    final.positions[-1, 0] += slab.cell[0, 0] / size[0]
    final.calc = EMT()
    BFGS(final, logfile=None).run(fmax=0.02)
    images = [initial] + [initial.copy() for _ in range(neb_images - 2)] + [final]
    for im in images[1:-1]:
        im.calc = EMT()
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate()
    BFGS(neb, logfile=None).run(fmax=0.05, steps=300)
    path = [im.copy() for im in images]
    ends = []
    for a in (initial, final):
        b = a.copy()
        b.set_constraint(fix)
        ends.append(b)
    return ends[0], ends[1], path


@register("surface-emt", default_frames=200, title="EMT fcc(100) slab with an adatom")
def surface_emt(frames: int, seed: int, log=None, metal="Cu", adatom="Cu", size=(3, 3, 3), temperature_K=500.0,
                neb_images=7, md_every=10, timestep_fs=2.0, vacuum=6.0) -> Generated:
    """Adatom on fcc(100): hollow -> neighbouring hollow hop (ASE's diffusion tutorial), frames along the NEB path
    (relaxed with EMT) plus MD snapshots."""
    rng = np.random.default_rng(seed)
    initial, final, path = adatom_hop(metal, adatom, size, vacuum, neb_images)
    fix = initial.constraints[0]
    for p in path:
        p.set_constraint()
    n_neb = min(len(path), frames)
    out, groups = path[:n_neb], ["neb"] * n_neb
    md_start = initial.copy()
    md_start.set_constraint(fix)
    need = frames - len(out)
    if need > 0:
        snaps = _md(md_start, temperature_K, steps=need * md_every, every=md_every, rng=rng, timestep_fs=timestep_fs)
        for s in snaps:
            s.set_constraint()
        out += snaps
        groups += ["md"] * len(snaps)
    P, Z, C, B, E, F, S = _label(out)
    e_neb = E[:n_neb]
    params = dict(metal=metal, adatom=adatom, size=list(size), vacuum_A=vacuum, temperature_K=temperature_K,
                  neb_images=neb_images, neb="climbing image, improved tangent, BFGS fmax 0.05 (max 300 steps)", md_every_steps=md_every,
                  timestep_fs=timestep_fs, fixed="bottom layer (MD only; labels are unconstrained EMT forces)")
    return Generated(P, Z, C, B, E, F, S, force_field="ASE EMT", engine="ASE", params=params,
                     simulation={"temperature_K": [temperature_K], "timestep_fs": [timestep_fs],
                                 "neb_barrier_eV": float(e_neb.max() - e_neb[0]), "neb_frames": n_neb},
                     kind="periodic",
                     notes=(f"{adatom} adatom on {metal}(100) {size} slab, periodic in x,y with {vacuum} Å vacuum (ASE pbc "
                            f"[T,T,F]). Frames 0..{n_neb - 1}: the relaxed climbing-image NEB path of the hollow-to-hollow hop "
                            f"(EMT barrier {e_neb.max() - e_neb[0]:.4f} eV); the rest: EMT Langevin MD snapshots at {temperature_K} K "
                            "with the bottom layer fixed. Stress not labelled (non-periodic z): zeros."),
                     groups=groups)


def _bulk(rep: int, frames: int, seed: int, log, metal="Cu", temperatures_K=(300, 900), md_every=10,
          timestep_fs=2.0, strain=0.03) -> Generated:
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    atoms = bulk(metal, "fcc", cubic=True).repeat(rep)
    images = []
    k = 0
    while len(images) < frames:
        T = temperatures_K[k % len(temperatures_K)]
        k += 1
        a = atoms.copy()
        eps = rng.uniform(-strain, strain)
        a.set_cell(a.cell * (1 + eps), scale_atoms=True)
        images += _md(a, T, steps=md_every * 5, every=md_every, rng=rng, timestep_fs=timestep_fs)
    images = images[:frames]
    P, Z, C, B, E, F, S = _label(images)
    params = dict(metal=metal, repeat=rep, temperatures_K=list(temperatures_K), md_every_steps=md_every,
                  timestep_fs=timestep_fs, isotropic_strain_max=strain)
    return Generated(P, Z, C, B, E, F, S, force_field="ASE EMT", engine="ASE", params=params,
                     simulation={"temperature_K": list(temperatures_K), "timestep_fs": [timestep_fs]}, kind="periodic",
                     notes=(f"fcc {metal}, {rep}x{rep}x{rep} conventional cells ({4 * rep**3} atoms), random isotropic strain "
                            f"within ±{strain:.0%}, 5 snapshots per short EMT Langevin run; for size extensivity with the other size."))


@register("bulk-emt-2", default_frames=200, title="Bulk fcc Cu 2x2x2 (EMT)")
def bulk_emt_2(frames: int, seed: int, log=None, **kw) -> Generated:
    return _bulk(2, frames, seed, log, **kw)


@register("bulk-emt-4", default_frames=200, title="Bulk fcc Cu 4x4x4 (EMT)")
def bulk_emt_4(frames: int, seed: int, log=None, **kw) -> Generated:
    return _bulk(4, frames, seed, log, **kw)
