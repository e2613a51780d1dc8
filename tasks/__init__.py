"""seqio Task and Mixture registrations: importing `tasks` registers all of them."""

from tasks import synthetic  # noqa: F401  (offline tasks for tests and smoke runs)
