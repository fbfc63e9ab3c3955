"""The one turn pipeline: what a turn continues, its plan, the running turn and the engine."""
