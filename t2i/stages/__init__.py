"""LightningModules: thin training wrappers over the plain models in t2i.models.

Importing this package registers the stages' config schemas with Hydra (t2i.stages.configs), which
conf/stage/*.yaml name in their defaults lists: anything that composes train.yaml imports it first."""

import t2i.stages.configs  # noqa: F401  (registers the schemas)
