"""seqio Task and Mixture registrations: importing `tasks` registers all of them."""

from tasks import bios  # noqa: F401  (the built-in knowledge base of the default experiment)
from tasks import cbqa  # noqa: F401  (closed-book QA: NQ, WebQuestions, TriviaQA and their mixtures)
from tasks import pretraining  # noqa: F401  (span corruption and salient span masking)
from tasks import synthetic  # noqa: F401  (offline tasks for tests and smoke runs)
from tasks import t0  # noqa: F401  (T0's prompted tasks, their rank-classification variants and mixtures)
