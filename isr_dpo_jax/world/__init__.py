"""The built-in synthetic video world, everything a run on it needs.

- scenes.py: the world: clips with their ground truth, frames, texts, question
  / answer pairs and answer checking, written as videos and jsonl files;
- vocab.py: small LLaMA-style tokenizers trained offline on its text;
- build.py: a config's world on disk, its tokenizer and a tiny random model
  (what bootstrap.prepare makes for the smoke config and the demo);
- sft_data.py: the demo's SFT data (captions; the mix that teaches QA,
  judging and revision) built from the world's ground truth;
- pi0/: the demo's shipped pi_0, the model `isr-dpo demo --stage=sft` trains.
"""
