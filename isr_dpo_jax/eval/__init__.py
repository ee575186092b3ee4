"""VideoQA evaluation pieces: test sets, judge prompt and clients, scores, tables.

`isr_dpo_jax.evaluate` puts them together into a resumable evaluation run.
"""
