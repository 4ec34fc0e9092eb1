"""Training on tiny models built from a config: precisions, quantization checks, resume after kill,
two-process torchrun, missing hub models, and that plan never imports the ML stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner import api
from tests.conftest import ROOT, run_subprocess

SAMPLE = ROOT / "recipes" / "data" / "sample.oasst.jsonl"


def recipe(tmp_path: Path, *, precision: str = "fp32", arch: str = "falcon", extra: str = "", steps: int = 12,
           checkpoint_every: int = 50, nproc: int = 1) -> Path:
    text = f"""
data:
  sources: [{{name: s, format: oasst, path: {SAMPLE}, lang: [en]}}]
  split: {{validation: 0.1, seed: 1}}
model:
  base: {{from_config: {{architecture: {arch}, hidden_size: 64, layers: 2, heads: 4, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 400}}}}
  precision: {precision}
lora: {{rank: 8, alpha: 16, dropout: 0.0}}
train:
  seq_len: 64
  batch_size: 8
  lr: 5.0e-3
  schedule: constant
  max_steps: {steps}
  seed: 3
  checkpoint_every: {checkpoint_every}
  distributed: {{nproc: {nproc}}}
{extra}"""
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def train_artifact(path: Path, cache: Path | None = None) -> Any:
    b = api.load(path, cache_dir=cache)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    return next(s for s in result.steps if s.name == "train").artifact


def train_metrics(path: Path, cache: Path | None = None) -> dict:
    return train_artifact(path, cache).manifest["metrics"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_trains_and_loss_falls(tmp_path: Path, precision: str) -> None:
    m = train_metrics(recipe(tmp_path, precision=precision, steps=40))
    assert m["steps"] == 40 and m["precision"] == precision
    assert m["train_loss_last"] < m["train_loss_first"] - 0.3
    assert m["lora_targets"] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert 0 < m["trainable_params"] < m["total_params"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_quantized_training_really_quantizes(tmp_path: Path, precision: str, arch: str) -> None:
    m = train_metrics(recipe(tmp_path, precision=precision, arch=arch, steps=20))
    per_layer = 4 if arch == "falcon" else 7  # falcon: qkv, dense, h_to_4h, 4h_to_h; llama: q k v o gate up down
    assert m["quantized_layers"] == 2 * per_layer  # every linear layer but the LM head, in both blocks
    assert m["train_loss_last"] < m["train_loss_first"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_models_are_evaluated_and_served_quantized(tmp_path: Path, precision: str) -> None:
    from runner.serving import Sampling, load_models
    from runner.steps.models import count_quantized

    path = recipe(tmp_path, precision=precision, steps=6, extra="eval: {max_new_tokens: 4}\n")
    b = api.load(path)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    assert next(s for s in result.steps if s.name == "eval").artifact.manifest["metrics"]["precision"] == precision
    models = load_models(b, ["tuned", "base"])
    for model in models.values():
        assert model.precision == precision and model.quantized_layers == 8  # 2 blocks x 4 linear layers
        assert count_quantized(model.model)[0] >= 8
        out = model.generate(model.prompt([{"role": "user", "content": "Hi"}]), Sampling(max_tokens=3))
        assert out.completion_tokens >= 1


def test_llama_and_gpt_neox_targets(tmp_path: Path) -> None:
    m = train_metrics(recipe(tmp_path, arch="llama", steps=3))
    assert m["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (tmp_path / "n").mkdir()
    m = train_metrics(recipe(tmp_path / "n", arch="gpt_neox", steps=3))
    assert m["lora_targets"] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def test_changing_a_train_param_does_not_retokenize(tmp_path: Path) -> None:
    path = recipe(tmp_path, steps=3)
    b = api.load(path)
    api.apply(b)
    b2 = api.load(path, overrides=["train.lr=0.001"])
    states = {p.name: p.state for p in api.plan(b2)}
    assert states["tokenize"] == "cached" and states["tokenizer"] == "cached" and states["train"] == "run"
    b3 = api.load(path, overrides=["train.seq_len=32"])
    assert {p.name: p.state for p in api.plan(b3)}["tokenize"] == "run"


def test_eval_merge_and_outputs(tmp_path: Path) -> None:
    path = recipe(tmp_path, steps=10, extra="eval: {prompts: ['What is the capital of France?'], max_new_tokens: 8}\n")
    b = api.load(path, overrides=["train.merge=true"])
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    steps = {s.name: s.artifact for s in result.steps}
    ev = steps["eval"].manifest["metrics"]
    assert ev["val_loss"] < ev["val_loss_base"] and ev["val_perplexity"] > 1
    gens = api.sql(b, "select prompt, output from eval__generations")[1]
    assert gens[0][0] == "What is the capital of France?" and isinstance(gens[0][1], str)
    assert (steps["train"].file("loss.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (steps["train"].file("adapter") / "adapter_model.safetensors").exists()
    assert (steps["merge"].file("model") / "model.safetensors").exists()


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "ref").mkdir()
    reference_art = train_artifact(recipe(tmp_path / "ref", steps=60, checkpoint_every=10), tmp_path / "c1")
    reference = reference_art.manifest["metrics"]
    path = recipe(tmp_path, steps=60, checkpoint_every=10)
    cache = tmp_path / "c2"
    proc = subprocess.Popen([sys.executable, "-m", "runner", "apply", str(path)], cwd=ROOT,
                            env={**os.environ, "RUNNER_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((cache / "scratch").glob("*/checkpoint-20")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    points = sorted(int(p.name.split("-")[1]) for p in (cache / "scratch").glob("*/checkpoint-*")
                    if _complete(p))  # a kill can land while a checkpoint is being written
    assert points and points[-1] < 60, "killed mid-training"
    resumed_art = train_artifact(path, cache)
    resumed = resumed_art.manifest["metrics"]
    # the same weights and the same result files: run facts (resumed or not) stay out of the output
    assert resumed_art.output_hash == reference_art.output_hash
    assert resumed["resumed_from"] == f"checkpoint-{points[-1]}"
    assert resumed["steps"] == reference["steps"] == 60
    assert abs(resumed["train_loss_last"] - reference["train_loss_last"]) < 0.05
    assert not list((cache / "scratch").glob("*")), "scratch is removed once the step is built"


def test_fsdp_without_gpus_is_refused_not_silently_ddp(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines")
    b = api.load(recipe(tmp_path, steps=2, nproc=2), overrides=["train.distributed.strategy=fsdp"])
    train = next(s for s in api.apply(b).steps if s.name == "train")
    assert train.state == "failed" and "strategy fsdp needs GPUs" in (train.error or "")


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def test_resume_skips_a_checkpoint_cut_off_by_a_kill(tmp_path: Path) -> None:
    from runner.steps.trainer import last_checkpoint

    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_st'), (30, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


@pytest.mark.slow
def test_two_process_torchrun_gives_identical_lora_weights(tmp_path: Path) -> None:
    b = api.load(recipe(tmp_path, steps=6, nproc=2))
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    art = next(s for s in result.steps if s.name == "train").artifact
    assert art.manifest["metrics"]["world_size"] == 2 and art.manifest["metrics"]["fsdp"] is False
    digests = {json.loads(art.file(f"ranks/rank{r}.json").read_text())["lora_sha256"] for r in (0, 1)}
    assert len(digests) == 1


def test_missing_hub_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = recipe(tmp_path)
    text = path.read_text().replace("base: {from_config: {architecture: falcon, hidden_size: 64, layers: 2, heads: 4, seed: 0}}",
                                    "base: tiiuae/falcon-7b").replace("  tokenizer: {train: {vocab_size: 400}}\n", "")
    path.write_text(text)
    proc = run_subprocess("apply", str(path), "--target", "tokenizer", cache=tmp_path / "c")
    assert proc.returncode == 1
    assert "model tiiuae/falcon-7b (revision main) is not in the Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_of_a_training_recipe_imports_no_ml(tmp_path: Path) -> None:
    code = ("import sys; from runner.cli.main import main; main(['plan', sys.argv[1]]);"
            "print('IMPORTED', [m for m in ('torch', 'transformers', 'peft', 'duckdb') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "recipes" / "quickstart.yaml")], capture_output=True,
                          text=True, env={**os.environ, "RUNNER_CACHE": str(tmp_path / "c")})
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr


def test_package_adapter_merged_and_gguf_errors(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # a stand-in for llama.cpp's converter that refuses the architecture, as the real one does for unknown ones
    refuse = tmp_path / "refuse.py"
    refuse.write_text("import sys\nprint('ERROR: Model FalconForCausalLM is not supported', file=sys.stderr)\nsys.exit(1)\n")
    path = recipe(tmp_path, steps=5, extra=f"package: {{formats: [adapter, merged, gguf], gguf_converter: {refuse}}}\n")
    b = api.load(path)
    result = api.apply(b, keep_going=True)
    failed = next(s for s in result.steps if s.name == "package")
    assert failed.state == "failed" and "GGUF conversion failed" in failed.error and "is not supported" in failed.error
    b = api.load(path, overrides=["package.formats=[adapter, merged]"])
    result = api.apply(b)
    assert result.ok
    art = next(s for s in result.steps if s.name == "package").artifact
    assert (art.file("adapter") / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(art.file("merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(api.artifact(b, "model.init").file("model"))
    tuned = PeftModel.from_pretrained(base, api.artifact(b, "train").file("adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)


def test_gguf_without_a_converter_is_a_recipe_error(tmp_path: Path, cli) -> None:
    path = recipe(tmp_path, extra="package: {formats: [gguf]}\n")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "gguf needs gguf_converter" in err


def test_training_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    """Run facts (time taken, resumed or not) stay in the manifest; the files are the result alone."""
    a = api.apply(api.load(recipe(tmp_path, steps=5), cache_dir=tmp_path / "c1"))
    b = api.apply(api.load(recipe(tmp_path, steps=5), cache_dir=tmp_path / "c2"))
    ta, tb = (next(s for s in r.steps if s.name == "train").artifact for r in (a, b))
    assert ta.output_hash == tb.output_hash
    assert "train_seconds" in ta.manifest["metrics"]


@pytest.mark.slow
def test_training_is_byte_identical_across_processes(tmp_path: Path) -> None:
    """Two processes (different hash seeds, so set orders differ) build identical training artifacts."""
    path = recipe(tmp_path, steps=4)
    hashes = []
    for seed in ("1", "2"):
        proc = subprocess.run([sys.executable, "-m", "runner", "apply", str(path), "--json"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed,
                                                                   "RUNNER_CACHE": str(tmp_path / f"c{seed}")})
        assert proc.returncode == 0, proc.stderr
        key = next(s["key"] for s in json.loads(proc.stdout)["steps"] if s["step"] == "train")
        manifest = json.loads((tmp_path / f"c{seed}" / "artifacts" / key[:2] / key / "manifest.json").read_text())
        hashes.append(manifest["output_hash"])
    assert hashes[0] == hashes[1]


def test_piped_apply_shows_training_progress_and_no_library_warnings(tmp_path: Path) -> None:
    path = recipe(tmp_path, steps=20)
    proc = run_subprocess("apply", str(path), cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip().startswith("train: ")]
    assert len(lines) >= 3 and "20/20" in lines[-1]
    assert all(k in lines[-1] for k in ("epoch", "loss", "lr", "tokens/s", "ETA"))
    assert "Warning" not in proc.stderr and "warnings.warn" not in proc.stderr
    logs = list((tmp_path / "c" / "logs").glob("*.log"))
    assert any("Could not find a config file" in f.read_text() for f in logs), "the warning went to the step log"


def test_turning_merge_on_does_not_retrain(tmp_path: Path) -> None:
    path = recipe(tmp_path, steps=3)
    assert api.apply(api.load(path)).ok
    plan = {p.name: p.state for p in api.plan(api.load(path, overrides=["train.merge=true"]))}
    assert plan["train"] == "cached" and plan["merge"] == "run"


def test_evaluation_during_training_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    path = recipe(tmp_path, steps=20, checkpoint_every=5, extra="")
    path.write_text(path.read_text().replace("  checkpoint_every: 5\n", "  checkpoint_every: 5\n  eval_every: 5\n"))
    art = train_artifact(path)
    result = json.loads(art.file("train_result.json").read_text())
    val = result["validation"]
    assert val["steps"] == [5, 10, 15, 20] and len(val["losses"]) == 4
    best = min(range(4), key=lambda i: (val["losses"][i], val["steps"][i]))
    m = art.manifest["metrics"]
    assert m["val_best_step"] == val["steps"][best] and m["val_loss_best"] == val["losses"][best]
    assert art.file("loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # early stopping: the tiny model overfits the sample within 300 steps; patience 2 stops it well before
    (tmp_path / "hot").mkdir()
    hot = recipe(tmp_path / "hot", steps=300, checkpoint_every=10)
    hot.write_text(hot.read_text().replace("  checkpoint_every: 10\n", "  checkpoint_every: 10\n  eval_every: 10\n"
                                           "  early_stopping: 2\n").replace("lr: 5.0e-3", "lr: 3.0e-2"))
    art = train_artifact(hot)
    m, val = art.manifest["metrics"], json.loads(art.file("train_result.json").read_text())["validation"]
    assert m["early_stopped"] and m["steps"] < 300 and m["steps"] == val["steps"][-1]
    best = min(range(len(val["steps"])), key=lambda i: (val["losses"][i], val["steps"][i]))
    assert m["val_best_step"] == val["steps"][best] == m["steps"] - 20, "stopped after 2 evaluations without a better one"
