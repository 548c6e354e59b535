"""LightningModules: thin training wrappers over the plain models in t2i.models."""
