"""Single source of truth for the raw Ali-CCP log layout and the processed Parquet layout.

Jobs, readers and tests import column names and Spark types from here; no bare column strings elsewhere.
"""
from schemas.raw import *  # noqa: F401,F403
from schemas.dataset import *  # noqa: F401,F403
