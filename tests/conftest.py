"""Test setup: 8 fake CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is first imported, so it happens here at the
top of the test session (the Makefile sets the same values).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# CPU devices only: with libtpu installed (the test extra), JAX would probe
# for a TPU in every process, 1.4 s each. test_plan's TPU topologies need no
# TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Real clips: the project's shared videos, next to the repository.
VIDEOS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "videos"
REAL_CLIPS = sorted(VIDEOS.glob("*.mp4"))
needs_real_clips = pytest.mark.skipif(not REAL_CLIPS,
                                      reason=f"no real clips in {VIDEOS}")

# Compiling for a TPU topology (isr_dpo_jax.plan) needs libtpu.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'isr_dpo_jax[tpu]'; it has "
           "wheels for Linux x86_64 only)")


def load_config(name: str, **overrides):
  """configs/<name>.py's config, with flattened overrides ("self_judge.threshold")."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(name="load_config", scope="session")
def load_config_fixture():
  return load_config
