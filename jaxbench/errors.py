"""Error types. Every message names the file, key, frame and atom at fault where they are known."""

from __future__ import annotations


class JaxbenchError(Exception):
    """Base class for errors a user can act on (bad input, missing data, bad configuration)."""


class DataError(JaxbenchError, ValueError):
    """Bad or inconsistent reference data.

    The message always starts with where the problem is (file, key, frame, atom), so that a user can
    go straight to the faulty record.
    """

    def __init__(self, message: str, *, file=None, key=None, frame=None, atoms=None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if key is not None:
            where.append(f"key '{key}'")
        if frame is not None:
            where.append(f"frame {frame}")
        if atoms is not None:
            if isinstance(atoms, (tuple, list)):
                where.append("atoms " + ", ".join(str(a) for a in atoms))
            else:
                where.append(f"atom {atoms}")
        self.file, self.key, self.frame, self.atoms = file, key, frame, atoms
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ChecksumError(DataError):
    """A file's sha256 differs from the one its dataset card records."""


class UnknownNameError(JaxbenchError, KeyError):
    """An unknown dataset / model / protocol name; the message suggests close names."""

    def __init__(self, kind: str, name: str, known):
        import difflib

        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if not close:
            close = [k for k in known if name.lower() in k.lower() or k.lower() in name.lower()][:3]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        self.kind, self.name, self.known, self.suggestions = kind, name, known, close
        super().__init__(f"unknown {kind} '{name}'.{hint} Known: {', '.join(known)}")

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class NeighborListError(JaxbenchError, ValueError):
    """A neighbor list cannot be built for this cell / cutoff, or has overflowed its capacity."""


class Interrupted(JaxbenchError):
    """A run stopped on SIGTERM / SIGINT after committing its work so far; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str):
        self.signum = int(signum)
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
