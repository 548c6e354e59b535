"""Plain nn.Module models with dataclass configs; no Lightning here."""
