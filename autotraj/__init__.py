"""autotraj: repair and reward tool-use trajectories for tool-integrated reasoning."""

__version__ = "0.1.0"
