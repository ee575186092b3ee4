"""Small LLaMA-style tokenizers trained offline, for tiny models and tests.

Real runs load the checkpoint's tokenizer. The built-in synthetic world and
the tests need one that behaves like LLaMA's SentencePiece tokenizer (BPE
pieces that start at a word's "▁", byte fallback for unseen characters, bos
`<s>` prepended, eos `</s>`) but is trained in milliseconds from a few
sentences, with no hub access.
"""
from collections.abc import Iterable
import functools
import json

from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import Tokenizer
from tokenizers import trainers
import transformers

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    legacy: bool = False,
    extra_special_tokens: tuple[str, ...] = ("<video>",),
) -> transformers.PreTrainedTokenizerFast:
  """Trains a LLaMA-style BPE tokenizer on `corpus`.

  Args:
    corpus: training sentences.
    vocab_size: merges are learnt until the vocabulary (256 byte pieces
      included) reaches this size.
    legacy: as transformers' LLaMA conversion with legacy=True, the original
      SentencePiece behaviour: every piece of text between special tokens
      gets a "▁" prepended, even one that starts with a space (" The" ->
      "▁", "▁The"; "<video>\\n" -> "<video>", "▁", "\\n"). With False,
      only the start of the text does, and not twice.
    extra_special_tokens: added special tokens such as the video placeholder.

  Returns:
    A fast tokenizer with bos `<s>` (prepended), eos `</s>`, pad `<pad>`,
    unk `<unk>` and the extra special tokens.
  """
  specials = list(SPECIAL_TOKENS) + list(extra_special_tokens)
  byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
  # Merges never cross a word boundary, as in SentencePiece; the encoder then
  # runs unsplit, as transformers' LLaMA conversion does.
  trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
  trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(split=True)
  # Special tokens are whole tokens: no learnt piece may contain one.
  corpus = (functools.reduce(lambda text, t: text.replace(t, " "), specials, line)
            for line in corpus)
  trainer_tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size - len(byte_pieces), special_tokens=specials,
      show_progress=False))
  trained = json.loads(trainer_tok.to_str())["model"]
  vocab = trained["vocab"]
  for piece in byte_pieces:
    vocab.setdefault(piece, len(vocab))
  merges = [tuple(m) for m in trained["merges"]]

  tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>",
                             byte_fallback=True, fuse_unk=True))
  if legacy:
    tok.normalizer = normalizers.Sequence([
        normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        prepend_scheme="first", split=False)
  tok.decoder = decoders.Sequence([
      decoders.Metaspace(split=False), decoders.ByteFallback(),
      decoders.Fuse()])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>", unk_token="<unk>",
      additional_special_tokens=list(extra_special_tokens))

