"""Biased dynamics: the protocol's metadynamics settings as a :class:`jaxbench.metadynamics.Metadynamics`.

The engine adds the bias to the model's energy (so bias forces come from the same ``jax.grad``), carries
each replica's hills in the scan carry and deposits inside the compiled chunk; the hills buffer has a
static size decided here, from the protocol.
"""

from __future__ import annotations

import numpy as np

from .protocol import KB_EV_PER_K, Protocol


def metadynamics_of(protocol: Protocol, n_atoms: int):
    """The protocol's bias, or None. Heights in eV, pace in steps, widths in rad (dihedrals are 2 pi periodic)."""
    from ..errors import JaxbenchError
    from ..metadynamics import KJ_PER_MOL_IN_EV, Metadynamics, dihedral_cv

    m = protocol.metadynamics
    if m is None:
        return None
    m = m.resolved(protocol)
    bad = [q for q in m.dihedrals if max(q) >= n_atoms]
    if bad:
        raise JaxbenchError(f"protocol '{protocol.name}': metadynamics.dihedrals {bad} name atoms beyond the "
                            f"system's {n_atoms}")
    n = len(m.dihedrals)
    return Metadynamics(
        cv_fn=dihedral_cv(*m.dihedrals), sigma=(float(m.sigma_rad),) * n, height=float(m.height_kJ_mol) * KJ_PER_MOL_IN_EV,
        pace=m.pace_steps(protocol), max_hills=int(m.max_hills), periodic=(2 * np.pi,) * n,
        bias_factor=None if m.bias_factor is None else float(m.bias_factor),
        kT=KB_EV_PER_K * float(protocol.temperature_K),
    )
