"""`isr-dpo plan`: a tiny run compiled for a small TPU slice on this CPU host.

The plan's numbers must be XLA's own analysis of the programs the run
executes: the DPO update is compiled here again from a Trainer built as
`isr-dpo iterate` builds it, and its memory and cost must equal the plan's
row. Compiling for a TPU topology needs libtpu (in the test extra on Linux
x86_64, its only wheels); elsewhere those tests skip and say so.
"""
import importlib.util
import re
import types

import jax
import jax.numpy as jnp
import pytest
import tokenizers
import transformers

import conftest
from isr_dpo_jax import cli
from isr_dpo_jax import judge
from isr_dpo_jax import models
from isr_dpo_jax import plan
from isr_dpo_jax import policy
from isr_dpo_jax import settings
from isr_dpo_jax import train
from isr_dpo_jax.data import batching
from isr_dpo_jax.data import templates
from isr_dpo_jax.data import tokenize

TOPOLOGY = "v5e:2x2"  # 4 chips, one host
PROGRAMS = ["answers slots", "answers prefill", "answers decode",
            "contexts slots", "contexts prefill", "contexts decode",
            "judge score", "train video features",
            "reference log-probs", "dpo update", "sft video features",
            "sft update"]
needs_libtpu = conftest.needs_libtpu
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="JAX's CUDA plugin is not installed (pip install "
           "'isr_dpo_jax[gpu-plan]'); it compiles for GPUs without one")


def tiny_config():
  """The smoke run; prompts of at most 64 text tokens keep its programs small
  (136 video tokens + 64 + the 8 that a response keeps)."""
  return conftest.load_config("smoke", **{"data.max_length": 136 + 64 + 8})


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  cache = tmp_path_factory.mktemp("plan_cache")
  config = tiny_config()
  where, rows = plan.plan(config, TOPOLOGY, cache=cache)
  return config, where, rows, cache


@needs_libtpu
def test_every_program_of_the_run_compiles_for_the_slice(tiny_plan):
  _, where, rows, _ = tiny_plan
  assert [d.device_kind for d in where.devices] == ["TPU v5 lite"] * 4
  assert where.chip == plan.CHIPS["v5e"]
  assert [row.program.name for row in rows] == PROGRAMS
  assert all(row.analysis is not None for row in rows), rows


def _table_row(text: str, name: str) -> list[str]:
  (line,) = [l for l in text.splitlines() if l.startswith(f"| {name} |")]
  return [cell.strip() for cell in line.strip("|").split("|")]


@needs_libtpu
def test_dpo_update_row_is_xla_analysis_of_the_trainers_step(tiny_plan):
  config, where, rows, _ = tiny_plan
  mesh = plan.make_mesh(config, where)
  model = plan.abstract_model(config, plan.model_config(config)[0])
  shapes = plan.run_shapes(config, model.video.num_tokens)
  trainer = train.Trainer(model, settings.dpo_train_config(config), mesh,
                          total_steps=2)
  rows_of = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=trainer.batch_sharding)
  b = config.train.batch_size
  pairs = batching.PreferenceBatch(
      rows_of(b, shapes.dpo_prompt), rows_of(b, shapes.dpo_prompt, dtype=bool),
      *[rows_of(b, shapes.dpo_response, dtype=t) for t in (jnp.int32, bool)] * 2)
  state = trainer.abstract_state()
  frames = rows_of(b, *model.video.frames_shape, dtype=jnp.uint8)
  feats = trainer.encode_video.eval_shape(state.params, frames)
  feats = rows_of(*feats.shape, dtype=feats.dtype)
  reference = rows_of(b, dtype=jnp.float32)
  compiled = trainer.dpo_step.lower(state, pairs, feats, reference,
                                    reference).compile()
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()

  (row,) = [r for r in rows if r.program.name == "dpo update"]
  got = row.analysis
  assert got.arguments == memory.argument_size_in_bytes
  assert got.temporaries == memory.temp_size_in_bytes
  assert got.peak == (memory.argument_size_in_bytes + memory.output_size_in_bytes
                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                      + memory.generated_code_size_in_bytes)
  traced = trainer.dpo_step.trace(state, pairs, feats, reference, reference)
  flops, bytes_accessed = plan.uncounted_iterations(traced.jaxpr.jaxpr)
  assert flops > cost["flops"]  # 2 micro-batches of 2 scanned layers
  assert got.flops == pytest.approx(cost["flops"] + flops / 4, rel=1e-12)
  assert got.bytes_accessed == pytest.approx(
      cost["bytes accessed"] + bytes_accessed / 4, rel=1e-12)
  cells = _table_row(plan.table(rows, where.chip), "dpo update")
  arguments, temporaries, peak, hbm = map(float, cells[2:6])
  assert arguments == pytest.approx(got.arguments / plan.GiB, rel=5e-3)
  assert temporaries == pytest.approx(got.temporaries / plan.GiB, rel=5e-3)
  assert peak == pytest.approx(got.peak / plan.GiB, rel=5e-3)
  assert hbm == pytest.approx(plan.CHIPS["v5e"].hbm_bytes / plan.GiB, rel=5e-3)
  assert float(cells[7]) == pytest.approx(got.flops / 1e12, rel=5e-3)
  assert float(cells[8]) == pytest.approx(got.bytes_accessed / 1e9, rel=5e-3)
  chip = plan.CHIPS["v5e"]
  assert float(cells[9]) == pytest.approx(
      max(got.flops / chip.peak_flops, got.bytes_accessed / chip.hbm_bandwidth),
      rel=5e-3)


@pytest.mark.parametrize("unroll", [1, 2])
def test_a_scans_cost_counts_every_iteration(unroll):
  """XLA's cost analysis counts a loop body once; the plan's cost of a
  scanned program (a scan of layers, each a scan of two blocks, the layer
  remat'd, and its gradient) is every product of every iteration."""
  def layer(x_BxD, w_DxD):
    halves = jax.lax.map(lambda x_HxD: x_HxD @ w_DxD, x_BxD.reshape(2, -1, 64))
    return jnp.tanh(halves.reshape(x_BxD.shape)), None

  def loss(w_LxDxD, x_BxD):
    return jnp.sum(jax.lax.scan(jax.checkpoint(layer), x_BxD, w_LxDxD,
                                unroll=unroll)[0])

  one_chip = jax.sharding.NamedSharding(
      jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]),
      jax.sharding.PartitionSpec())
  shapes = (jax.ShapeDtypeStruct((4, 64, 64), jnp.float32, sharding=one_chip),
            jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=one_chip))
  traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*shapes)
  compiled = traced.lower().compile()
  got = plan.Analysis.of(compiled, traced.jaxpr, num_chips=1)
  # Per block of 16 rows: the product, its recomputation, and two products
  # in the backward pass; 2 blocks a layer, 4 layers.
  products = 4 * 2 * 4
  assert compiled.cost_analysis()["flops"] < products * 2 * 16 * 64 * 64 / 3
  assert got.flops == pytest.approx(products * 2 * 16 * 64 * 64, rel=0.02)
  # Each reads its two operands and writes its result: 3 x 16 x 64 or
  # 2 x 16 x 64 + 64 x 64 floats.
  assert got.bytes_accessed > products * 4 * (2 * 16 * 64 + 16 * 64)


@needs_libtpu
def test_a_second_plan_reads_every_program_from_the_cache(tiny_plan):
  config, _, rows, cache = tiny_plan
  log = []
  _, again = plan.plan(config, TOPOLOGY, cache=cache, log=log.append)
  assert [r.analysis for r in again] == [r.analysis for r in rows]
  assert sum("from the plan cache" in line for line in log) == len(PROGRAMS)


@needs_libtpu
def test_the_report_estimates_an_iteration_from_the_rooflines(tiny_plan):
  config, where, rows, _ = tiny_plan
  text = plan.report(config, where, rows)
  seconds = {r.program.name: r.analysis.seconds(where.chip) for r in rows}
  total = re.search(r"rooflines: ([\d.]+) h", text)[1]
  # 16 prompts, batches of 8 (sampling) and 8 pairs (training), 1 epoch; a
  # decode row is one token, the reference and update rows a whole batch.
  want = (2 * (seconds["answers prefill"] + 12 * seconds["answers decode"])
          + 2 * (seconds["contexts prefill"] + 16 * seconds["contexts decode"])
          + 2 * seconds["judge score"]
          + 2 * (seconds["train video features"] + seconds["reference log-probs"])
          + 2 * (seconds["train video features"] + seconds["dpo update"]))
  assert float(total) == pytest.approx(want / 3600, abs=0.006)
  assert "Left out:" in text


@needs_libtpu
def test_a_lora_plan_trains_adapters_on_the_frozen_model(tiny_plan):
  _, where, full_rows, _ = tiny_plan
  config = tiny_config()
  config.train.lora.rank = 4
  mesh = plan.make_mesh(config, where)
  model = plan.abstract_model(config, plan.model_config(config)[0])
  programs = plan.training_programs(
      config, model, mesh, plan.run_shapes(config, model.video.num_tokens), 2)
  rows = plan.analyse(programs, where, mesh, None, log=lambda _: None)
  assert [r.program.name for r in rows] == [
      "train video features", "reference log-probs", "dpo update",
      "merge adapters", "sft video features", "sft update"]
  assert all(r.analysis is not None for r in rows), rows
  # The update's arguments: the model (frozen) and the adapters' AdamW state
  # instead of the model's own, so fewer bytes than full fine-tuning's.
  update = lambda rows_: next(r.analysis for r in rows_
                              if r.program.name == "dpo update")
  assert update(rows).arguments < update(full_rows).arguments
  names = {r.program.name for r in rows}
  sampling_rows = [r for r in full_rows if r.program.name not in names]
  estimate = plan.iteration_estimate(config, sampling_rows + rows, where.chip)
  assert "merge" in estimate


@needs_cuda_plugin
def test_a_tiny_run_plans_for_gpu_hosts_without_a_gpu():
  """Two hosts of 4 H100s from the target description alone: XLA:GPU's own
  memory analysis, and the matrix products' FLOPs where it gives no cost."""
  config = tiny_config()
  config.mesh = dict(data=-1, fsdp=4, tensor=1)
  where, rows = plan.plan(config, "h100:2x4", programs=["dpo update"])
  features, row = rows
  mesh = plan.make_mesh(config, where)
  done = {features.program.name: features.analysis.abstract_outputs(
      features.program.trace({}).lower(), mesh)}
  assert [d.device_kind for d in where.devices] == ["NVIDIA H100 80GB HBM3"] * 8
  assert where.chip == plan.CHIPS["h100"]
  traced = row.program.trace(done)
  flops, _ = plan._matmul_costs(traced.jaxpr.jaxpr)[0]
  assert row.analysis.flops == pytest.approx(flops / 8)
  memory = traced.lower().compile(where.compiler_options).memory_analysis()
  assert row.analysis.temporaries == memory.temp_size_in_bytes > 0
  assert row.analysis.arguments == memory.argument_size_in_bytes > 0


def test_gpu_hosts_without_the_cuda_plugin_are_one_line(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "jax_cuda12_plugin" else real(name, *a)))
  with pytest.raises(plan.PlanError, match=re.escape(
      "planning for GPUs needs JAX's CUDA plugin (pip install "
      "'isr_dpo_jax[gpu-plan]')")):
    plan.target("h100:8")


@needs_libtpu
def test_a_slice_smaller_than_a_host_is_one_chip():
  where = plan.target("v5p:1x1x1")
  assert [d.device_kind for d in where.devices] == ["TPU v5"]


def test_the_7b_config_plans_the_longest_rows_its_loader_makes():
  config = conftest.load_config("video_llava_7b")
  model = plan.abstract_model(config, plan.model_config(config)[0])
  shapes = plan.run_shapes(config, model.video.num_tokens)
  # 2,056 video tokens and up to 2040 of text: the 2048 bucket.
  assert shapes.prompt == shapes.dpo_prompt == 2056 + 2048
  # An answer cut at max_new_tokens=256 gets its stop text when the pair is
  # tokenised again: 257 tokens, the 512 bucket.
  assert shapes.dpo_response == 512


def _character_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Every character its own token: the most tokens any text can make."""
  vocab = {"<pad>": 0, **{chr(c): c for c in range(1, 256)}}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(
      tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend,
                                                   pad_token="<pad>")
  tokenize.add_video_token(tokenizer)
  return tokenizer


def test_the_judge_suffix_holds_the_longest_orders_a_tokenizer_can_make():
  """The judge's orders of two longest answers (max_new_tokens + 1 tokens,
  one character each), split as Policy splits them, continue their shared
  start by no more tokens than the plan compiles: for the 7B config, the
  1,024 bucket (two 257-token answers and the question after them), not a
  whole prompt's 2,048."""
  config = conftest.load_config("video_llava_7b")
  tokenizer = _character_tokenizer()
  video = models.VideoInput(num_frames=1, frame_size=1, num_tokens=4,
                            token_id=tokenize.add_video_token(tokenizer))
  encoder = tokenize.TextEncoder(
      tokenizer, templates.resolve(config.data.template), video.token_id,
      video.num_tokens, config.data.max_length)
  policy_ = policy.Policy(types.SimpleNamespace(video=video), tokenizer, encoder,
                          None, None, 1, config.sampling.buckets)
  answer = config.sampling.answer.max_new_tokens + 1
  orders = judge.judge_questions(settings.prompts(config), "What happens?",
                                 "a" * answer, "b" * answer, "A cat sits.")
  (first, second) = policy_._prompt(orders, None).suffixes
  assert max(len(first), len(second)) <= plan._judge_suffix(config)
  assert len(first) > 2 * answer
  model = plan.abstract_model(config, plan.model_config(config)[0])
  assert plan.run_shapes(config, model.video.num_tokens).suffix == 1024


@pytest.mark.parametrize("topology, message", [
    ("v5p-16", "unknown topology 'v5p-16': give <chip>:<shape>"),
    ("v9:2x2", "unknown topology 'v9:2x2'"),
])
def test_an_unknown_topology_is_one_line(topology, message):
  with pytest.raises(plan.PlanError, match=re.escape(message)) as error:
    plan.plan(tiny_config(), topology)
  assert "\n" not in str(error.value)


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(plan.PlanError, match=re.escape("pip install 'isr_dpo_jax[tpu]'")):
    plan.plan(tiny_config(), TOPOLOGY)


@needs_libtpu
def test_a_mesh_larger_than_the_slice_is_one_line():
  config = tiny_config()
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  with pytest.raises(plan.PlanError, match=re.escape(
      "config.mesh {'data': 2, 'fsdp': 4, 'tensor': 1} does not fit v5e:2x2 "
      "(4 chips)")) as error:
    plan.plan(config, TOPOLOGY)
  assert "\n" not in str(error.value)


def test_a_max_length_without_room_for_a_prompt_is_one_line():
  config = tiny_config()
  config.data.max_length = 136
  with pytest.raises(plan.PlanError, match="data.max_length=136 leaves no room"):
    plan.plan(config, None)


def test_on_local_cpu_devices_there_is_no_chip_to_size_against():
  where = plan.target(None)
  assert len(where.devices) == 8 and where.chip is None


def _cli(argv, capsys) -> tuple[int | None, str, str]:
  with pytest.raises(SystemExit) as exit_:
    cli.main(["isr-dpo", "plan", f"--config={conftest.CONFIGS / 'smoke.py'}",
              *argv])
  out = capsys.readouterr()
  return exit_.value.code, out.out, out.err


def test_the_command_names_an_unknown_topology_in_one_line(capsys):
  code, _, err = _cli(["--topology=v9:2x2"], capsys)
  assert code == 2 and err.count("\n") == 1
  assert err.startswith("isr-dpo plan: error: unknown topology 'v9:2x2'")


@needs_libtpu
def test_the_command_prints_the_table(tiny_plan, monkeypatch, capsys):
  monkeypatch.setattr(plan, "cache_dir", lambda: tiny_plan[3])  # compiled once
  code, out, _ = _cli([f"--config.data.max_length={136 + 64 + 8}",
                       f"--topology={TOPOLOGY}"], capsys)
  assert code in (None, 0)
  assert [_table_row(out, name)[0] for name in PROGRAMS] == PROGRAMS
  assert "One ISR-DPO iteration of 16 prompts" in out
