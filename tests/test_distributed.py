"""Training with torchrun on the CPU: 2 gloo processes on the synthetic fixture.

The run finishes and writes each record once; the test metrics cover every test clip once; 2 processes x batch B
train like 1 process x batch 2B (SyncBatchNorm on, no randomness); a run whose rank 1 was killed resumes, with the
same torchrun command, into the weights of an uninterrupted run; off rank 0 nothing is written.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from data.dataset import make_loaders

from test_train_scripts import REPO, final_weights, run_main, tiny_overrides

SCRIPT = "train_simple_working"
# Audio only (the fastest model with BatchNorm; the visual placeholder token is a parameter DDP sees unused).
FAST = {"MODALITIES": ("audio",), "EPOCHS": 2, "BATCH_SIZE": 8, "PATIENCE": 99}
# Nothing random in training, so that 2 x 8 and 1 x 16 clips can be compared step by step.
DETERMINISTIC = {"DROPOUT": 0.0, "SPEC_AUGMENT": False, "FRAME_AUGMENT": False, "FEATURE_NOISE": 0.0,
                 "SYNC_BATCHNORM": True}
# sitecustomize for the workers: rank 1 kills itself (SIGKILL) when epoch 2 ends, after rank 0 saved epoch 1.
KILL_RANK_1 = """
import os, signal
if os.environ.get("RANK") == "1":
    import training.progress as progress
    original, calls = progress.end_epoch, []
    def end_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    progress.end_epoch = end_epoch
"""


def torchrun(overrides: dict, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [f"--{key.lower()}={value!r}" if isinstance(value, tuple) else f"--{key.lower()}={value}"
            for key, value in overrides.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"{SCRIPT}.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(synthetic_root, synthetic_cache, tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp")
    overrides = {**tiny_overrides(synthetic_root, synthetic_cache, out), **FAST}
    done = torchrun({**overrides, "RUN_NAME": "straight"})
    assert done.returncode == 0, done.stderr[-3000:]
    return overrides, done


def test_two_processes_finish_write_once_and_test_every_clip_once(two_process_run, synthetic_cache):
    overrides, done = two_process_run
    run_dir = Path(overrides["OUTPUT_DIR"]) / SCRIPT / "straight" / "fold0"
    assert "2 processes (gloo)" in done.stdout
    assert done.stdout.count("fold 0 test (actors (1,))") == 1  # only rank 0 prints
    assert [r["epoch"] for r in read_log(run_dir)] == [1, 2]  # one writer: no line twice
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert state["progress"]["step"] == 4  # 32 training clips / (2 processes x 8) x 2 epochs
    assert len(state["rank_rngs"]) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((synthetic_cache / "manifest.json").read_text())
    test_clips = sorted(c["clip_id"] for c in manifest["clips"] if c["actor"] == 1)
    assert metrics["n"] == len(test_clips) == 16
    assert sorted(metrics["clip_ids"]) == test_clips and len(metrics["probabilities"]) == 16
    assert sum(map(sum, metrics["confusion"])) == 16
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt_best.pt", "ckpt_last.pt", "figures", "log.jsonl",
                                                         "metrics.json"]


def test_rank_1_killed_then_same_command_resumes_exactly(two_process_run, tmp_path):
    overrides, _ = two_process_run
    straight_dir = Path(overrides["OUTPUT_DIR"]) / SCRIPT / "straight" / "fold0"
    sitecustomize = tmp_path / "site"
    sitecustomize.mkdir()
    (sitecustomize / "sitecustomize.py").write_text(KILL_RANK_1)
    command = {**overrides, "OUTPUT_DIR": tmp_path, "RUN_NAME": "killed"}
    killed = torchrun(command, env={"PYTHONPATH": f"{sitecustomize}{os.pathsep}{REPO}"})
    run_dir = tmp_path / SCRIPT / "killed" / "fold0"
    assert killed.returncode != 0
    assert torch.load(run_dir / "ckpt_last.pt", weights_only=True)["progress"]["epoch"] == 1
    assert not (run_dir / "metrics.json").exists()

    resumed = torchrun(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert [r["epoch"] for r in read_log(run_dir)] == [1, 2]
    for straight, again in zip(read_log(straight_dir), read_log(run_dir)):
        assert straight["train_loss"] == pytest.approx(again["train_loss"], abs=1e-6)
    straight_weights = torch.load(straight_dir / "ckpt_last.pt", weights_only=True)["model"]
    resumed_weights = torch.load(run_dir / "ckpt_last.pt", weights_only=True)["model"]
    for key in straight_weights:
        assert torch.allclose(straight_weights[key].float(), resumed_weights[key].float(), atol=1e-6), key


def test_two_processes_of_batch_b_train_like_one_process_of_batch_2b(synthetic_root, synthetic_cache, tmp_path,
                                                                    monkeypatch):
    import data.setup
    import train_simple_working as script

    base = {**tiny_overrides(synthetic_root, synthetic_cache, tmp_path), **FAST, **DETERMINISTIC}
    done = torchrun({**base, "RUN_NAME": "two"})
    assert done.returncode == 0, done.stderr[-3000:]

    def loaders_in_the_two_processes_order(train, val, test, batch_size, *args):
        # One process shuffles with its DataLoader's generator; the ranks' DistributedSampler draws another
        # permutation. A one-replica DistributedSampler gives this process the union of the ranks' batches.
        _, val_loader, test_loader = make_loaders(train, val, test, batch_size, *args)
        sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(train, batch_size, sampler=sampler, generator=torch.Generator()), val_loader, test_loader

    monkeypatch.setattr(data.setup, "make_loaders", loaders_in_the_two_processes_order)
    saved = {k: v for k, v in vars(script).items() if k.isupper()}
    try:
        run_main(script, {**base, "BATCH_SIZE": 2 * base["BATCH_SIZE"], "RUN_NAME": "one"})
    finally:
        vars(script).update(saved)
    log_two, log_one = read_log(tmp_path / SCRIPT / "two" / "fold0"), read_log(tmp_path / SCRIPT / "one" / "fold0")
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == [2, 4]
    # Epoch 1 = the first two steps: the same clips in each step, BatchNorm over the 16, averaged gradients.
    assert log_two[0]["train_loss"] == pytest.approx(log_one[0]["train_loss"], rel=1e-5)
    # Later, Adam's first steps (about lr x sign of the gradient) turn float noise in gradients that are ~0 (e.g. of
    # scale-invariant weights before a BatchNorm) into lr-sized weight differences (and 1% in BatchNorm statistics);
    # float-tolerance equality of gradients and weights with SGD: test_off_rank_0_nothing_is_written_and_...
    assert log_two[1]["train_loss"] == pytest.approx(log_one[1]["train_loss"], rel=1e-3)
    two, one = final_weights(tmp_path, SCRIPT, "two"), final_weights(tmp_path, SCRIPT, "one")
    for key in one:
        assert torch.allclose(one[key].float(), two[key].float(), rtol=1e-2, atol=4 * script.LR), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_process(rank: int, port: int, roots: list[str], results: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from common import distributed
    from training.runs import RunFolder
    from training.runtime import setup_runtime

    setup_runtime("cpu", "float32", seed=0)
    # Every write of a run folder, called on both ranks with a folder of their own: only rank 0's may fill up.
    run = RunFolder("script", "run", roots[rank]).sub("fold0")
    run.write_config({"A": 1})
    run.log({"epoch": 1})
    run.write_metrics({"accuracy": 0.5})
    # GlooSyncBatchNorm on each rank's half = BatchNorm on the whole batch: output, input gradient, running stats.
    torch.manual_seed(0)
    whole = torch.randn(6, 3, 5) * 3 + 1
    probe = torch.randn(6, 3, 5)  # a loss that weighs every output differently
    reference = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.BatchNorm1d(3))
    reference[1].weight.data.uniform_(0.5, 1.5)
    synced = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.BatchNorm1d(3))
    synced.load_state_dict(reference.state_dict())
    distributed.convert_sync_batchnorm(synced, torch.device("cpu"))
    mine = slice(rank * 3, (rank + 1) * 3)
    full, part = whole.clone().requires_grad_(True), whole[mine].clone().requires_grad_(True)
    full_output, part_output = reference(full), synced(part)
    (full_output * probe).sum().backward()
    (part_output * probe[mine]).sum().backward()  # the ranks' losses add up to the whole batch's
    results[rank] = {
        "type": type(synced[1]).__name__,
        "output": torch.allclose(part_output, full_output[mine], atol=1e-5),
        "input_grad": torch.allclose(part.grad, full.grad[mine], atol=1e-5),
        "running_mean": torch.allclose(synced[1].running_mean, reference[1].running_mean, atol=1e-6),
        "running_var": torch.allclose(synced[1].running_var, reference[1].running_var, atol=1e-6),
        "from_main": distributed.from_main(lambda: f"computed on rank {distributed.rank()}"),
        "ddp_steps": _ddp_steps_match_one_process(rank),
    }
    distributed.cleanup()


def _ddp_steps_match_one_process(rank: int) -> bool:
    """3 SGD steps through wrap_model + train_step (SyncBatchNorm, clipping) on each rank's 4 clips = 3 steps of one
    model on all 8, to float tolerance (SGD, unlike Adam's early steps, keeps float noise float-sized)."""
    import copy

    from models import build_model
    from common import distributed
    from training.runtime import Runtime
    from training.step import train_step

    torch.manual_seed(0)  # the same initial weights and data on both ranks
    model = build_model("simple", {"modalities": ["audio"], "audio_channels": [4, 8], "dropout": 0.0})
    model.init_weights("kaiming")
    one_process = copy.deepcopy(model)  # plain BatchNorm, whole batch
    batches = [{"audio": torch.randn(8, 1, 64, 24), "has_audio": torch.ones(8, dtype=torch.bool),
                "has_visual": torch.zeros(8, dtype=torch.bool), "label": torch.randint(0, 8, (8,))} for _ in range(3)]
    runtime = Runtime(torch.device("cpu"), None)
    ddp_model = distributed.wrap_model(model, runtime.device, sync_batchnorm=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, one_process)]
    scalers = [runtime.make_scaler() for _ in range(2)]
    mine = slice(rank * 4, (rank + 1) * 4)
    norms = []
    for batch in batches:
        share = {key: value[mine] for key, value in batch.items()}
        norms.append((train_step(ddp_model, share, optimizers[0], scalers[0], runtime, clip_norm=1.0).grad_norm,
                      train_step(one_process, batch, optimizers[1], scalers[1], runtime, clip_norm=1.0).grad_norm))
    weights = model.state_dict()
    return all(a == pytest.approx(b, rel=1e-5) for a, b in norms) and all(
        torch.allclose(weights[key].float(), value.float(), rtol=1e-4, atol=1e-6)
        for key, value in one_process.state_dict().items())


def test_off_rank_0_nothing_is_written_and_sync_batchnorm_sees_the_global_batch(tmp_path):
    roots = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    results = mp.Manager().dict()
    mp.spawn(_rank_process, args=(_free_port(), roots, results), nprocs=2, join=True)
    written = {rank: sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())
               if Path(root).exists() else [] for rank, root in enumerate(roots)}
    assert written[0] == ["script/run/fold0/config.json", "script/run/fold0/log.jsonl", "script/run/fold0/metrics.json"]
    assert written[1] == []
    for rank in (0, 1):
        result = dict(results[rank])
        assert result.pop("from_main") == "computed on rank 0"
        assert result.pop("type") == "GlooSyncBatchNorm"
        assert all(result.values()), (rank, result)
