"""Example environments written outside the package (``steppo train env=examples.guess:GuessEnv``)."""
