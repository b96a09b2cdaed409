"""Post-training (spec 7): SFT, GRPO with verifiable rewards, and on-policy distillation of specialists into one
model; ``dsv4 posttrain`` runs them end to end on small verifiable domains (``tasks``)."""
