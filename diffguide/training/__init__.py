"""Training of the embedded networks: the shared loop, the recipes, guidance distillation, PPAP's experts."""
