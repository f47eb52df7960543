"""Training CSC-CTRL models: figures of what a model has learned."""

from .figures import atom_grid, effective_atoms, save_atom_figures

__all__ = ["atom_grid", "effective_atoms", "save_atom_figures"]
