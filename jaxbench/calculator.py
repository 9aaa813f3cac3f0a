"""ASE calculator for any jaxbench potential, so ASE's MD, optimisers, EOS and NEB tools work with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from .frames import full_to_voigt
from .graph import DEFAULT_POLICY, PaddingPolicy, build_graphs
from .io import frames_from_atoms
from .potential import Potential, cast_params


class JaxbenchCalculator(Calculator):
    """Energy, free energy (= energy), forces and stress (periodic cells) of a `Potential`.

    Each call builds the neighbour list on the host and evaluates one jitted function; padded sizes
    come from the padding policy, so an MD run or an optimisation compiles a handful of times at most.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, potential: Potential, params, dtype=None, policy: PaddingPolicy = DEFAULT_POLICY, **kw):
        """`dtype`: float64 when JAX's x64 mode is on (the default for physics checks), else float32."""
        super().__init__(**kw)
        if dtype is None:
            dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        self.potential = potential
        self.dtype = dtype
        self.params = cast_params(params, dtype)
        self.policy = policy
        self._fn = jax.jit(potential.__call__, static_argnums=2)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        want_stress = "stress" in properties
        if want_stress and not atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        self.potential.check_species(atoms.get_atomic_numbers(), where="ase.Atoms given to JaxbenchCalculator")
        frames = frames_from_atoms(atoms.copy(), validate=False)
        frames = frames.replace(energy=None, forces=None, stress=None)
        graph = build_graphs(frames, self.potential.r_max).batch([0], policy=self.policy)
        graph = graph.replace(positions=np.asarray(graph.positions, dtype=self.dtype))
        out = self._fn(self.params, graph, bool(atoms.pbc.all()))
        n = len(atoms)
        energy = float(out["energy"][0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = np.asarray(out["forces"][:n], dtype=np.float64)
        if atoms.pbc.all():
            self.results["stress"] = full_to_voigt(np.asarray(out["stress"][0], dtype=np.float64))
