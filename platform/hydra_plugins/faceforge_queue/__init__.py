"""Hydra launcher plugin `hydra/launcher=faceforge_queue`: sweep points become jobs in the faceforge queue."""
