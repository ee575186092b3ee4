"""Data: videos, text, records and datasets (the synthetic world: isr_dpo_jax/world)."""
