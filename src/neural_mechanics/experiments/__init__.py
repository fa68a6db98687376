"""The experiment harness behind `nmech`: what a run is made of, one concept per module.

Registries (policy as data): `models` (presets), `specs` (MODEL strings), `optimizers` (OptimizerSpec),
`datasets` (DatasetSpec, the built-ins and the deterministic loader), `configs/` (the shipped YAML runs).
The config schema: `config` (TrainConfig, overrides, files) over `schema` (mapping -> dataclass).
A run: `train.run_training` assembles `rundir` (the directory's rules), `checkpoint` (what a checkpoint holds),
`distributed` (processes and their random streams) and `loop` (the step loop and its events) with the
`callbacks` (metrics, evaluation, checkpoints, progress bar). `checks` and `demo` are what `nmech check`,
`nmech symmetries` and `nmech demo` compute.
"""
