"""Training, above data and share: the loop (`loop.train`), checkpoints, the run folder (`outputs`) and the run's
identity, validation grids, and StyleDrop round 2's library part (`styledrop`)."""
