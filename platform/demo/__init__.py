"""The one-command closed-loop demo (`faceforge demo`): its stages, their sizes, data split and summary table."""

from faceforge.demo.loop import Demo, Stage, summary_table
from faceforge.demo.profile import FULL, PROFILES, RECIPE, TINY, Profile
from faceforge.demo.services import DemoError

__all__ = ["FULL", "PROFILES", "RECIPE", "TINY", "Demo", "DemoError", "Profile", "Stage", "summary_table"]
