"""`runner plan`'s estimate of a training step's memory, checked against the peak RSS of real training runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runner import api
from runner.steps.memory import GIB, PEFT_AUTO, estimate, shape_from_config, shape_from_name
from tests.conftest import ROOT, run_subprocess, tiny_model_recipe

# a thread that samples this process's resident memory every millisecond: (time, bytes)
SAMPLER = """
import threading, time
samples, done = [], threading.Event()
def _sample():
    while not done.is_set():
        rss = next(x for x in open('/proc/self/status') if x.startswith('VmRSS'))
        samples.append((time.time(), int(rss.split()[1]) * 1024))
        time.sleep(0.001)
threading.Thread(target=_sample, daemon=True).start()
"""


def tiny(tmp_path: Path, hidden: int, layers: int, seq: int, batch: int) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(
        tiny_model_recipe(
            hidden=hidden,
            layers=layers,
            heads=hidden // 64,
            seed=None,
            vocab=2000,
            rest=f"lora: {{rank: 8}}\ntrain: {{seq_len: {seq}, batch_size: {batch}, max_steps: 3, packing: true}}\n",
        )
    )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("hidden,layers,seq,batch", [(64, 2, 64, 8), (512, 4, 256, 8)])
def test_estimate_is_within_a_quarter_of_the_measured_peak(
    tmp_path: Path, hidden: int, layers: int, seq: int, batch: int
) -> None:
    path = tiny(tmp_path, hidden, layers, seq, batch)
    env_cache = tmp_path / "c"
    assert run_subprocess("apply", str(path), "--target", "tokenize", cache=env_cache).returncode == 0
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across exec on Linux)
    code = SAMPLER + (
        "import sys; from runner.cli.main import main; main(['apply', sys.argv[1], '--target', 'train']); "
        "done.set(); from runner import api; m = api.artifact(api.load(sys.argv[1]), 'train').manifest; "
        "t0 = m['timings']['started']; t1 = t0 + m['timings']['seconds']; "
        "print('SAMPLED', max(r for t, r in samples if t0 <= t <= t1)); "
        "print('PEAK', next(x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "RUNNER_CACHE": str(env_cache)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK")).split()[1]) * 1024  # KiB on Linux
    build = api.load(path, cache_dir=env_cache)
    e = api.training_memory(build)
    assert 0.75 <= e.per_process / peak <= 1.25, (e, peak / GIB)
    # the train step's own figure: at most the process's peak (the DuckDB catalog written after it adds to the
    # memory training left), and at least what a thread sampling VmRSS saw while it ran (the largest sample)
    measured = api.artifact(build, "train").manifest["memory"]  # type: ignore[union-attr]
    sampled = int(next(x for x in proc.stdout.splitlines() if x.startswith("SAMPLED")).split()[1])
    assert measured["scope"] == "step" and sampled - 2**20 <= measured["peak_rss_bytes"] <= peak, (measured, peak)
    plan = run_subprocess("plan", str(path), cache=env_cache)
    assert f"train as built peaked at {measured['peak_rss_bytes'] / GIB:.1f} GiB" in plan.stdout, plan.stdout


def test_estimate_adds_up_and_scales() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    s = shape_from_config(config, "test")
    e = estimate(s, precision="bf16", rank=16, targets="auto", seq_len=1024, batch=1, gpu=True)
    params = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 2 * 128256 * 4096  # Llama-3-8B's layout
    assert params == pytest.approx(8.03e9, rel=0.01)
    assert e.weights == 2 * params
    assert e.lora == 16 * 6_815_744  # PEFT's print_trainable_parameters for Llama-3-8B, r=16, q_proj and v_proj
    every = estimate(s, precision="bf16", rank=16, targets="all-linear", seq_len=1024, batch=1, gpu=True)
    assert every.lora == 16 * 41_943_040  # the same, all linear layers
    q = estimate(s, precision="int4", rank=16, targets="auto", seq_len=1024, batch=1, gpu=True)
    assert q.weights == pytest.approx((params - 2 * 128256 * 4096) * 0.5 + 2 * 128256 * 4096 * 4)
    longer = estimate(s, precision="bf16", rank=16, targets="auto", seq_len=2048, batch=1, gpu=True)
    assert longer.activations == pytest.approx(2 * e.activations)
    falcon = shape_from_name("tiiuae/falcon-7b")
    assert falcon is not None and "guess" in falcon.source
    assert 6e9 < 12 * falcon.layers * falcon.hidden**2 < 8e9


def test_auto_targets_in_the_estimate_are_peft_s() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    for family in ("falcon", "gpt_neox", "llama", "qwen2", "mistral"):
        assert set(PEFT_TARGETS[family]) <= PEFT_AUTO, family


def test_plan_says_falcon_7b_will_not_fit_here(tmp_path: Path) -> None:
    proc = run_subprocess("plan", str(ROOT / "recipes" / "oasst-falcon7b.yaml"), cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("train needs about"))
    assert "a guess from the name 'tiiuae/falcon-7b'" in line and line.endswith("it will not fit")


def test_each_step_records_its_own_peak_memory(small_recipe: Path) -> None:
    """Every built step's manifest holds its peak RSS, which a thread sampling /proc/self/status every
    millisecond brackets: at least the largest sample taken during the step, and close above it (these steps
    allocate little; the process's own VmHWM is no bound here, since each step resets it)."""
    import threading
    import time

    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
            samples.append((time.time(), int(rss.split()[1]) * 1024))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = api.apply(api.load(small_recipe))
    finally:
        done.set()
        sampler.join()
    assert result.ok
    for step in result.steps:
        m = step.artifact.manifest  # type: ignore[union-attr]
        peak, (start, took) = m["memory"]["peak_rss_bytes"], (m["timings"]["started"], m["timings"]["seconds"])
        seen = [rss for t, rss in samples if start <= t <= start + took]
        around = [rss for t, rss in samples if start - 0.05 <= t <= start + took + 0.05]
        assert m["memory"]["scope"] == "step" and around, step.name
        # a sample taken as the step ended may already hold what came after it: a MiB of slack below
        assert not seen or peak >= max(seen) - 2**20, (step.name, peak, max(seen))
        assert peak <= max(around) + 32 * 2**20, (step.name, peak, max(around))
