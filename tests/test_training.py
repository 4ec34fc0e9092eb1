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
from tests.conftest import ROOT, run_subprocess, sql_rows, tiny_model_recipe


def recipe(
    tmp_path: Path,
    *,
    precision: str = "fp32",
    arch: str = "falcon",
    extra: str = "",
    steps: int = 12,
    checkpoint_every: int = 50,
    nproc: int = 1,
    distributed: str = "",
) -> Path:
    text = tiny_model_recipe(
        arch=arch,
        data="  split: {validation: 0.1, seed: 1}\n",
        model=f"  precision: {precision}\n",
        rest=f"""lora: {{rank: 8, alpha: 16, dropout: 0.0}}
train:
  seq_len: 64
  batch_size: 8
  lr: 5.0e-3
  schedule: constant
  max_steps: {steps}
  seed: 3
  checkpoint_every: {checkpoint_every}
  distributed: {distributed or f"{{nproc: {nproc}}}"}
{extra}""",
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
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
    path = recipe(tmp_path, precision=precision, steps=40)
    path.write_text(path.read_text().replace("dropout: 0.0}", "dropout: 0.0, target_modules: all-linear}"))
    m = train_metrics(path)
    assert m["steps"] == 40 and m["precision"] == precision
    assert m["train_loss_last"] < m["train_loss_first"] - 0.3
    assert m["lora_targets"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
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
    from runner.serve.engine import Sampling
    from runner.serve.load import load_models
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
        out = model.generate_all([(model.codec.prompt([{"role": "user", "content": "Hi"}]), Sampling(max_tokens=3))])[0]
        assert out.completion_tokens >= 1


@pytest.mark.parametrize("arch", ["falcon", "llama"])
def test_mfu_counts_the_flops_torch_counts(tmp_path: Path, arch: str) -> None:
    """The manifest's FLOPs per token equal torch's FlopCounterMode over a real forward and backward of the run's
    own model on a row of its data; MFU is those FLOPs x tokens/s over the measured matmul peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from runner.steps.flops import attention_grads, linear_layers, per_token
    from runner.steps.trainer import _dataset, _lora_model

    b = api.load(recipe(tmp_path, arch=arch, steps=6))
    result = api.apply(b)
    assert result.ok
    m = next(s for s in result.steps if s.name == "train").artifact.manifest["metrics"]
    u = m["utilisation"]
    model, _ = _lora_model(b.graph.nodes["train"].params, b.built()["model.init"].path / "data" / "model")
    tokenized = b.built()["tokenize"]
    rows = _dataset(str(tokenized.file(tokenized.manifest["tables"]["train"])))
    # FlopCounterMode has no formula for the CPU's fused attention kernel: count attention through the eager path
    model.config._attn_implementation = "eager"
    for i in (0, 5):
        ids = torch.tensor([rows[i]["input_ids"]])
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        grads = attention_grads(model, ids[:, :8])
        counted = per_token(linear_layers(model, ids[:, :8]), model.config, ids.shape[1], grads)["total"] * ids.shape[1]
        assert counted == counter.get_total_flops()
    # the manifest's count is this one at the run's mean row length
    mean_len = sum(len(rows[i]["input_ids"]) for i in range(len(rows))) / len(rows)
    expected = per_token(linear_layers(model, ids[:, :8]), model.config, mean_len, grads)
    assert u["flops_per_token"] == {k: round(v) for k, v in expected.items()}
    trained = sum(len(rows[i]["input_ids"]) for i in range(len(rows))) * m["epochs_done"]
    achieved = u["flops_per_token"]["total"] * trained / m["train_seconds"]
    assert u["achieved_flops"] == pytest.approx(achieved, rel=1e-3)
    assert u["mfu"] == pytest.approx(u["achieved_flops"] / u["matmul_peak_flops"], abs=1e-4)
    assert 0 < u["mfu"] < 1 and u["matmul_peak_shape"][3] == "float32"


def test_auto_targets_are_peft_s_own_and_all_linear_is_every_linear_layer(tmp_path: Path) -> None:
    """`auto` is PEFT's mapping for the model type (no table of runner's own); `all-linear` wraps every linear
    layer of the blocks, the output head excepted."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    m = train_metrics(recipe(tmp_path, arch="llama", steps=3))
    assert m["lora_targets"] == sorted(PEFT_TARGETS["llama"]) == ["q_proj", "v_proj"]
    (tmp_path / "n").mkdir()
    m = train_metrics(recipe(tmp_path / "n", arch="gpt_neox", steps=3))
    assert m["lora_targets"] == PEFT_TARGETS["gpt_neox"] == ["query_key_value"]
    (tmp_path / "a").mkdir()
    path = recipe(tmp_path / "a", arch="llama", steps=3)
    path.write_text(path.read_text().replace("dropout: 0.0}", "dropout: 0.0, target_modules: all-linear}"))
    m = train_metrics(path)
    assert m["lora_targets"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


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
    # the held-out loss and its stderr, example by example on the merged model, with numpy's delta method
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(steps["merge"].file("model")).eval()
    val = pq.read_table(steps["tokenize"].file(steps["tokenize"].manifest["tables"]["validation"])).to_pylist()
    sums, counts = [], []
    with torch.no_grad():
        for row in val:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            keep = labels != -100
            sums.append(float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")))
            counts.append(int(keep.sum()))
    s, c = np.array(sums), np.array(counts)
    mean = s.sum() / c.sum()
    se = np.sqrt(np.var(s - mean * c, ddof=1) / len(s)) / c.mean()
    assert ev["val_loss"] == pytest.approx(mean, rel=1e-4) and ev["val_loss_stderr"] == pytest.approx(se, rel=1e-3)
    # runner diff: the loss's change with its 95% interval (two independent stderrs)
    from runner.diff import compare

    other = api.load(path, overrides=["train.merge=true", "lora.rank=2"])
    assert api.apply(other).ok
    ev2 = api.artifact(other, "eval").manifest["metrics"]  # type: ignore[union-attr]
    (row,) = [m for m in compare(b, other)["metrics"] if m["step"] == "eval" and m["metric"] == "val_loss"]
    sd = float(np.hypot(ev["val_loss_stderr"], ev2["val_loss_stderr"]))
    assert row["change"]["delta"] == pytest.approx(ev2["val_loss"] - ev["val_loss"])
    assert row["change"]["high"] - row["change"]["low"] == pytest.approx(2 * 1.959963984540054 * sd)
    gens = sql_rows(b, "select prompt, output from eval__generations")
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "apply", str(path)],
        cwd=ROOT,
        env={**os.environ, "RUNNER_CACHE": str(cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((cache / "scratch").glob("*/checkpoint-20")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    points = sorted(
        int(p.name.split("-")[1]) for p in (cache / "scratch").glob("*/checkpoint-*") if _complete(p)
    )  # a kill can land while a checkpoint is being written
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


def test_deepspeed_is_configured_for_gpus_and_refused_on_cpu(tmp_path: Path) -> None:
    """strategy deepspeed: the ZeRO config handed to transformers (GPU hosts; not run here: no GPU), and a clear
    refusal on a CPU-only machine."""
    import torch

    from runner.steps.train_config import Distributed

    cfg = Distributed(nproc=8, strategy="deepspeed", zero_stage=3, offload=True).deepspeed_config()
    zero = cfg["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    )
    assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
    assert (
        "offload_param" not in Distributed(strategy="deepspeed", offload=True).deepspeed_config()["zero_optimization"]
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for CPU-only machines")
    b = api.load(recipe(tmp_path, steps=2, nproc=2), overrides=["train.distributed.strategy=deepspeed"])
    train = next(s for s in api.apply(b).steps if s.name == "train")
    assert train.state == "failed" and "strategy deepspeed needs GPUs" in (train.error or "")


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
    path = recipe(tmp_path, steps=6, nproc=2)
    proc = run_subprocess("apply", str(path), cache=tmp_path / "c", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip().startswith("train: ")]
    assert len(lines) == 6 and "6/6" in lines[-1] and "tokens/s" in lines[-1], "the workers' progress is shown"
    art = api.artifact(api.load(path, cache_dir=tmp_path / "c"), "train")
    assert art.manifest["metrics"]["world_size"] == 2 and art.manifest["metrics"]["fsdp"] is False
    digests = {json.loads(art.file(f"ranks/rank{r}.json").read_text())["lora_sha256"] for r in (0, 1)}
    assert len(digests) == 1


@pytest.mark.slow
def test_two_nodes_of_one_process_train_what_one_node_of_two_does(tmp_path: Path) -> None:
    """Two torchrun launchers on this host, each a node of one process (c10d rendezvous on loopback), each with
    its own cache as if on its own machine: both hold the adapter that one node of two processes trains."""
    import socket

    one_node = train_artifact(recipe(tmp_path / "one", steps=6, nproc=2), tmp_path / "one" / "c")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = recipe(tmp_path, steps=6, distributed=f"{{nproc: 1, nnodes: 2, rdzv_endpoint: '127.0.0.1:{port}'}}")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runner",
                "apply",
                str(path),
                "--json",
                "--set",
                f"train.distributed.node_rank={rank}",
            ],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "RUNNER_CACHE": str(tmp_path / f"node{rank}")},
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [err[-2000:] for _, err in outs]
    keys, hashes = set(), set()
    for rank, (out, _) in enumerate(outs):
        key = next(s["key"] for s in json.loads(out)["steps"] if s["step"] == "train")
        keys.add(key)
        art = tmp_path / f"node{rank}" / "artifacts" / key[:2] / key
        hashes.add(json.loads((art / "manifest.json").read_text())["output_hash"])
        files = sorted(str(p.relative_to(art / "data")) for p in (art / "data").rglob("*") if p.is_file())
        assert files == [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "loss.png",
            "ranks/rank0.json",
            "ranks/rank1.json",
            "train_result.json",
        ]
        for f in files:  # the weights, the losses, every rank's hash; the plot's title names its own key
            if f != "loss.png":
                assert (art / "data" / f).read_bytes() == one_node.file(f).read_bytes(), (rank, f)
    assert len(keys) == 1, "where a node is and which one it is are not part of the key"
    assert len(hashes) == 1, "every node holds the same artifact"


def test_multi_node_recipe_errors(tmp_path: Path, cli) -> None:
    path = recipe(tmp_path, distributed="{nproc: 1, nnodes: 2}")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "nnodes > 1 needs rdzv_endpoint" in err
    path = recipe(tmp_path, distributed="{nproc: 1, nnodes: 2, node_rank: 2, rdzv_endpoint: 'h:1'}")
    code, _, err = cli("validate", str(path))
    assert code == 2 and "node_rank 2 is not below nnodes 2" in err


def test_torchrun_commands(tmp_path: Path) -> None:
    from runner.steps.train_config import Distributed
    from runner.steps.trainer import torchrun_command

    one = torchrun_command(tmp_path / "job.json", Distributed(nproc=2), "k" * 64)
    assert one[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    two = torchrun_command(
        tmp_path / "job.json", Distributed(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="h0:29400"), "k" * 64
    )
    assert two[3:10] == [
        "--nproc_per_node=4",
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=h0:29400",
        f"--rdzv_id=runner-{'k' * 16}",
        "--rdzv_conf=is_host=false",
    ]


def test_missing_hub_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path = recipe(tmp_path)
    text = (
        path.read_text()
        .replace(
            "base: {from_config: {architecture: falcon, hidden_size: 64, layers: 2, heads: 4, seed: 0}}",
            "base: tiiuae/falcon-7b",
        )
        .replace("  tokenizer: {train: {vocab_size: 400}}\n", "")
    )
    path.write_text(text)
    proc = run_subprocess("apply", str(path), "--target", "tokenizer", cache=tmp_path / "c")
    assert proc.returncode == 1
    assert "model tiiuae/falcon-7b (revision main) is not in the Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_of_a_training_recipe_imports_no_ml(tmp_path: Path) -> None:
    code = (
        "import sys; from runner.cli.main import main; main(['plan', sys.argv[1]]);"
        "print('IMPORTED', [m for m in ('torch', 'transformers', 'peft', 'duckdb') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "recipes" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNER_CACHE": str(tmp_path / "c")},
    )
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr


def test_package_adapter_merged_and_gguf_errors(tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # a stand-in for llama.cpp's converter that refuses the architecture, as the real one does for unknown ones
    refuse = tmp_path / "refuse.py"
    refuse.write_text(
        "import sys\nprint('ERROR: Model FalconForCausalLM is not supported', file=sys.stderr)\nsys.exit(1)\n"
    )
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
        proc = subprocess.run(
            [sys.executable, "-m", "runner", "apply", str(path), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "RUNNER_CACHE": str(tmp_path / f"c{seed}")},
        )
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
    # when each loss was known (the manifest only: clock readings are no part of the result)
    assert len(m["eval_seconds"]) == 4 and 0 < m["eval_seconds"][0] and m["eval_seconds"] == sorted(m["eval_seconds"])
    assert m["eval_seconds"][-1] <= m["train_seconds"] and "eval_seconds" not in json.dumps(result)
    assert art.file("loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # early stopping: the tiny model overfits the sample within 300 steps; patience 2 stops it well before
    (tmp_path / "hot").mkdir()
    hot = recipe(tmp_path / "hot", steps=300, checkpoint_every=10)
    hot.write_text(
        hot.read_text()
        .replace("  checkpoint_every: 10\n", "  checkpoint_every: 10\n  eval_every: 10\n  early_stopping: 2\n")
        .replace("lr: 5.0e-3", "lr: 3.0e-2")
    )
    art = train_artifact(hot)
    m, val = art.manifest["metrics"], json.loads(art.file("train_result.json").read_text())["validation"]
    assert m["early_stopped"] and m["steps"] < 300 and m["steps"] == val["steps"][-1]
    best = min(range(len(val["steps"])), key=lambda i: (val["losses"][i], val["steps"][i]))
    assert m["val_best_step"] == val["steps"][best] == m["steps"] - 20, (
        "stopped after 2 evaluations without a better one"
    )


def test_tensorboard_tracking_writes_readable_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    art = train_artifact(_with_train(recipe(tmp_path, steps=6), "  report_to: [tensorboard]\n"))
    events = EventAccumulator(str(art.file("tensorboard"))).Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    losses = json.loads(art.file("train_result.json").read_text())["losses"]
    assert len(logged) == 6 and logged == pytest.approx(losses, rel=1e-6)


def test_report_to_an_absent_tracker_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = api.apply(api.load(_with_train(recipe(tmp_path, steps=2), "  report_to: [wandb]\n")))
    failed = next(s for s in result.steps if s.name == "train")
    assert failed.state == "failed" and "train.report_to names wandb, which is not installed" in failed.error


def _with_train(path: Path, lines: str) -> Path:
    path.write_text(path.read_text().replace("  seed: 3\n", "  seed: 3\n" + lines))
    return path


def test_packaged_adapter_loads_alone_and_answers_as_the_server_does(tmp_path: Path) -> None:
    """`AutoPeftModelForCausalLM` and `AutoTokenizer` on the package's adapter dir alone: its chat template
    prompts as runner does, and greedy decoding gives the server's answer."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.serve.engine import Sampling
    from runner.serve.load import load_models

    path = recipe(tmp_path, steps=20, extra="package: {formats: [adapter, merged]}\nserve: {models: [tuned, merged]}\n")
    b = api.load(path)
    assert [n for n in b.graph.order if n == "merge"] == ["merge"], "package and serve share one merge step"
    assert "merge" in b.graph.nodes["package"].inputs
    assert api.apply(b).ok
    pkg = api.artifact(b, "package")
    config = json.loads(pkg.file("adapter/adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == pkg.file("base")
    adapter = str(pkg.file("adapter"))
    model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    served = load_models(b, ["tuned", "merged"])
    base = AutoModelForCausalLM.from_pretrained(pkg.file("base")).eval()
    questions = [
        "What is a good way to learn to cook?",
        "Hello",
        "Can you write a poem about the sea?",
        "Why is the sky blue?",
        "Tell me a joke",
        "What is the capital of France?",
    ]
    for question in questions:
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == f"<human>: {question}\n<bot>:"
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        mine = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("<human>:")[0].split("<bot>:")[0]
        for name, m in served.items():
            assert m.generate_all([(m.codec.prompt(messages), Sampling(max_tokens=24))])[0].text == mine, (
                name,
                question,
            )
            # past the end-of-text token too (a tiny model stops early): the same weights pick the same tokens
            with torch.no_grad():
                theirs = m.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=24,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=None,
                )
                ours = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=24,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=None,
                )
            assert theirs.tolist() == ours.tolist(), (name, question)
        with torch.no_grad():
            plain = base.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=None,
            )
        assert plain.tolist() != ours.tolist(), "the adapter changes what the model says"
    merged_files = sorted(p.name for p in pkg.file("merged").iterdir())
    assert merged_files == sorted(p.name for p in api.artifact(b, "merge").file("model").iterdir())


def test_vllm_engine_says_what_it_would_run(tmp_path: Path) -> None:
    """serve.engine vllm (GPU hosts): the merged model handed to vLLM's server; here, with no vLLM, one clear error
    carrying the command it would run."""
    from runner.serve.vllm import command as vllm_command

    path = recipe(tmp_path, steps=2, extra="serve: {engine: vllm, batch_size: 32}\n")
    b = api.load(path, cache_dir=tmp_path / "c")
    assert "merge" in b.graph.nodes and api.apply(b).ok
    cmd = vllm_command(b, "0.0.0.0", 8001)
    assert cmd[:3] == ["vllm", "serve", str(api.artifact(b, "merge").file("model"))]
    assert cmd[cmd.index("--served-model-name") + 1] == "t-merged" and cmd[cmd.index("--max-num-seqs") + 1] == "32"
    proc = run_subprocess("serve", str(path), "--port", "0", cache=tmp_path / "c")
    assert proc.returncode == 1 and "serve.engine vllm needs vLLM" in proc.stderr
    assert "it would run: vllm serve " in proc.stderr and "--served-model-name t-merged" in proc.stderr
