import os

from hypothesis import settings

# CI explores the same examples on every run, so that a red CI is a regression, not a new draw;
# a developer's run draws new examples each time (and keeps failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
