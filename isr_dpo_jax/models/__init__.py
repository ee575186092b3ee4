"""Video LMMs (Flax NNX) behind one interface, their registry and checkpoint I/O."""
from isr_dpo_jax.models.config import LlamaConfig
from isr_dpo_jax.models.config import RopeScaling
from isr_dpo_jax.models.config import VideoLlavaConfig
from isr_dpo_jax.models.config import VisionConfig
from isr_dpo_jax.models.interface import VideoInput
from isr_dpo_jax.models.interface import VideoLanguageModel
from isr_dpo_jax.models.llama import KVCache
from isr_dpo_jax.models.llama import Llama
from isr_dpo_jax.models.video_llava import VideoLlava
from isr_dpo_jax.models.vision import VisionTower
from isr_dpo_jax.models import registry
from isr_dpo_jax.models.checkpoints import load_pretrained
from isr_dpo_jax.models.checkpoints import load_tokenizer
from isr_dpo_jax.models.checkpoints import save_pretrained
