"""The web UI (`faceforge web`): job form, queue, job, sweep, model and dataset pages over the job store and MLflow."""

from faceforge.web.app import create_app
from faceforge.web.datasets import Dataset, confine, data_roots, describe, list_datasets

__all__ = ["Dataset", "confine", "create_app", "data_roots", "describe", "list_datasets"]
