"""The trainer's fast path: a config switch that falls back on the CPU (same weights as off), a compiled
forward that falls back on errors in its first compiled calls (compile, CUDA-graph warm-up, recording, first
replay), autocast sampling; on a GPU, the same first losses from a forward that really ran compiled and
through recorded CUDA graphs."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.evaluation import sampling
from lawa_diffusion.training import fast_path
from lawa_diffusion.training import trainer as train_mod
from tests.helpers import tiny_config, tiny_unet, torchrun
from tests.helpers import train_run as run

NO_EVAL = {"every_n_steps": 0, "at_end": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models run on one thread (see conftest.one_thread)."""


def test_config_switch_values():
    assert TrainConfig().fast_path == "auto"
    assert TrainConfig(fast_path=True).fast_path == "on" and TrainConfig(fast_path=False).fast_path == "off"
    with pytest.raises(ValueError, match="fast_path must be one of auto, on, off, got 'fast'"):
        TrainConfig(fast_path="fast")


def test_switch_falls_back_on_cpu_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fast_path.enabled("auto", "cpu") and not fast_path.enabled("off", "cpu")
        assert not caught
        assert not fast_path.enabled("on", "cpu")
    assert len(caught) == 1 and "needs a CUDA device" in str(caught[0].message)
    assert fast_path.enabled("auto", "cuda:0") and fast_path.enabled("on", "cuda") and not fast_path.enabled("off", "cuda")
    assert fast_path.adamw_options(False) == {}
    assert fast_path.compile_mode(1) == "reduce-overhead" and fast_path.compile_mode(2) == "default"
    assert fast_path.compile_mode(1, num_processes=2) == "default"


def fast_config(out, setting, **changes):
    return tiny_config(out, fast_path=setting, max_train_steps=6, checkpointing_steps=0, eval=NO_EVAL, **changes)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, _one_thread):
    """Six steps with fast_path off, shared by the tests that compare weights with it."""
    out = tmp_path_factory.mktemp("fast") / "off"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lawa-cache")))
        run(fast_config(out, "off"))
    return out


def checkpoint_tensors(run_dir) -> list:
    return [load_file(run_dir / "checkpoint-6" / sub)
            for sub in ("model.safetensors", os.path.join("unet_ema", "diffusion_pytorch_model.safetensors"))]


def assert_same_tensors(got: list, want: list) -> None:
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trainer takes the GPU where there is one; "
                    "test_fast_path_keeps_the_first_losses_on_the_gpu covers it there")
def test_fast_path_on_trains_the_same_weights_on_cpu(tmp_path, plain_run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fast_config(tmp_path / "on", "on"))
    assert len([w for w in caught if "fast_path" in str(w.message)]) == 1
    assert_same_tensors(checkpoint_tensors(tmp_path / "on"), checkpoint_tensors(plain_run))


class Broken(Exception):
    pass


def test_compile_error_falls_back_to_the_plain_forward(monkeypatch):
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    expected = unet(x, t, return_dict=False)[0]

    def refuse(*args, **kwargs):
        raise Broken("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(UserWarning, match="fast_path: torch.compile.*Broken: no compiler here.*plain path"):
        forward = fast_path.TrainForward(unet, fast=True)
    assert not forward.is_compiled
    assert torch.equal(forward(x, t), expected)


def test_error_at_the_first_compiled_step_retries_it_on_the_plain_forward(monkeypatch):
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])

    def failing_compiled(*args, **kwargs):
        raise Broken("backend failed at the first call")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: failing_compiled)
    forward = fast_path.TrainForward(unet, fast=True, mode="default")
    assert forward.is_compiled
    resets = []

    def forward_backward():
        loss = forward(x, t).square().mean()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="backend failed at the first call"):
        loss = forward.run(forward_backward, reset=lambda: resets.append(1))
    assert resets == [1] and not forward.is_compiled
    assert torch.equal(loss, unet(x, t, return_dict=False)[0].square().mean())


class FlakyCompiled:
    """Stands in for the compiled module: runs the module itself, and raises at compiled call ``fail_at``, in the
    forward or (from a hook on the output) in the backward, as graph recording or replay might."""

    def __init__(self, module, fail_at: int, where: str):
        self.module, self.fail_at, self.where, self.calls = module, fail_at, where, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        failing = self.calls == self.fail_at
        if failing and self.where == "forward":
            raise Broken(f"graph recording failed at call {self.calls}")
        out = self.module(*args, **kwargs)
        if failing:
            def refuse(grad):
                raise Broken(f"graph replay failed at call {self.calls}")
            out[0].register_hook(refuse)
        return out


@pytest.mark.parametrize("fail_at,where", [(1, "backward"), (2, "forward"), (3, "backward")])
def test_error_in_a_guarded_compiled_call_retries_it_on_the_plain_forward(monkeypatch, fail_at, where):
    """Compile + warm-up, CUDA-graph recording and the first replay happen in the first three compiled calls: an
    error in any of them falls back with one warning, and the failed step is redone on the plain forward."""
    unet = tiny_unet()
    batches = [(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)), torch.tensor([3, 7 + i]))
               for i in range(5)]
    monkeypatch.setattr(torch, "compile", lambda module, **kw: FlakyCompiled(module, fail_at, where))
    forward = fast_path.TrainForward(unet, fast=True)
    grads, resets = [], []

    def forward_backward(x, t):
        unet.zero_grad(set_to_none=True)
        loss = forward(x, t).square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, t in batches:
            forward.run(lambda: forward_backward(x, t), reset=lambda: resets.append(1))
    messages = [str(w.message) for w in caught if "fast_path" in str(w.message)]
    assert len(messages) == 1 and f"at compiled call {fail_at} " in messages[0] and "Broken" in messages[0]
    assert resets == [1] and not forward.is_compiled and forward.fell_back.startswith("Broken")
    assert forward.compiled_calls == fail_at - 1 and len(grads) == len(batches)
    for (x, t), got in zip(batches, grads):  # every step's gradients are the plain forward's
        unet.zero_grad(set_to_none=True)
        unet(x, t, return_dict=False)[0].square().mean().backward()
        assert all(torch.equal(g, p.grad) for g, p in zip(got, unet.parameters()))


def test_error_after_the_guarded_calls_is_raised(monkeypatch):
    """Past the first replay an error is the step's own, not the compiler's: it is raised, not retried."""
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    monkeypatch.setattr(torch, "compile",
                        lambda module, **kw: FlakyCompiled(module, fast_path.GUARDED_CALLS + 1, "forward"))
    forward = fast_path.TrainForward(unet, fast=True)
    for _ in range(fast_path.GUARDED_CALLS):
        forward.run(lambda: forward(x, t).sum().backward(), reset=lambda: None)
    with pytest.raises(Broken):
        forward.run(lambda: forward(x, t).sum().backward(), reset=lambda: None)


@pytest.mark.slow
def test_under_ddp_a_failed_compiled_backward_falls_back_on_every_process_with_the_right_gradients(tmp_path):
    """Two gloo processes under DDP; the compiled backward fails after DDP has sent some gradient buckets, on both
    processes or on one. Redoing that backward would run through DDP's half-finished reduction; instead the first
    compiled step is tried without gradient sync, both processes agree, and both fall back together. Every step's
    gradients are the mean of both processes' plain gradients (computed without DDP); with nothing failing, the
    trial leaves no gradient behind and the compiled forward serves every step."""
    import json

    done = torchrun("ddp_fast_path.py", 2, "--output_dir", str(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert list(seen) == ["none", "both", "rank1"], seen
        for name, got in seen.items():
            assert "error" not in got and len(got["diffs"]) == 3 and max(got["diffs"]) <= 1e-6, (rank, name, got)
        none = seen["none"]
        assert none["fell_back"] is None and none["compiled_calls"] == 3 and not none["warnings"]
        for name in ("both", "rank1"):
            assert seen[name]["fell_back"] is not None and len(seen[name]["warnings"]) == 1, (rank, name, seen[name])
        why = "failed on another process" if rank == 0 else "failed to compile"  # only rank 1's own step failed
        assert why in seen["rank1"]["fell_back"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the trainer would compile for real")
def test_trainer_goes_on_on_the_plain_path_after_a_failed_graph_replay(tmp_path, monkeypatch, plain_run):
    """The fast path forced on the CPU with a compiled forward whose first replay (compiled call 3) fails in the
    backward: one warning, training goes on, and the weights are those of fast_path off."""
    monkeypatch.setattr(fast_path, "enabled", lambda setting, device: setting != "off")
    monkeypatch.setattr(fast_path, "adamw_options", lambda fast: {})  # fused AdamW rounds differently
    made = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: made.append(FlakyCompiled(module, 3, "backward"))
                        or made[-1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fast_config(tmp_path / "on", "on"))
    messages = [str(w.message) for w in caught if "fast_path" in str(w.message)]
    assert len(messages) == 1 and "at compiled call 3 " in messages[0]
    assert len(made) == 1 and made[0].calls == 3  # compiled calls 1-3, then the plain forward
    assert_same_tensors(checkpoint_tensors(tmp_path / "on"), checkpoint_tensors(plain_run))


def test_sampling_runs_the_unet_in_the_training_precision():
    unet = tiny_unet().eval()
    seen = []
    unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scheduler = sampling.build_scheduler("ddim")
    plain = sampling.sample_uint8(unet, scheduler, [0, 1], num_inference_steps=2)
    assert set(seen) == {torch.float32}
    seen.clear()
    mixed = sampling.sample_uint8(unet, sampling.build_scheduler("ddim"), [0, 1], num_inference_steps=2,
                                  precision="bf16")
    assert set(seen) == {torch.bfloat16} and mixed.dtype == torch.uint8 and mixed.shape == plain.shape
    # bf16 rounding moves a few pixel values by a level or so, not the images
    assert (mixed.int() - plain.int()).abs().float().mean() < 2.0


class RecordedForwards:
    """Keeps every ``TrainForward`` the trainer makes (to read, after a run, what its compiled path did)."""

    def __init__(self, monkeypatch):
        self.made = []
        real = fast_path.TrainForward
        monkeypatch.setattr(fast_path, "TrainForward", lambda *a, **k: self.made.append(real(*a, **k)) or self.made[-1])


@pytest.mark.slow
def test_compiled_fused_trainer_matches_the_plain_one_on_cpu(tmp_path, monkeypatch):
    """The fast path's pieces (compiled forward, fused AdamW) forced on the CPU: the trainer runs them without
    falling back and ends near the plain path's weights (not bitwise: other kernels, other rounding). Inductor
    compiles the forward and backward but, on the CPU, without CUDA graphs: its skip counter moves, which gives
    one warning and the recorded reason."""
    from torch._dynamo.utils import counters

    plain = tmp_path / "plain"
    run(tiny_config(plain, fast_path="off", max_train_steps=4, checkpointing_steps=0, eval=NO_EVAL))
    monkeypatch.setattr(fast_path, "enabled", lambda setting, device: setting != "off")
    forwards = RecordedForwards(monkeypatch)
    fast = tmp_path / "fast"
    graphs, skips = counters["stats"]["unique_graphs"], fast_path.cudagraph_skips()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tiny_config(fast, fast_path="on", max_train_steps=4, checkpointing_steps=0, eval=NO_EVAL))
    messages = [str(w.message) for w in caught if "fast_path" in str(w.message)]
    want, got = (load_file(d / "checkpoint-4" / "model.safetensors") for d in (plain, fast))
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled forward did run
    (forward,) = forwards.made
    assert forward.mode == "reduce-overhead" and forward.is_compiled and forward.fell_back is None
    assert forward.compiled_calls == 4
    assert fast_path.cudagraph_skips() > skips and forward.cudagraph_skip is not None
    assert len(messages) == 1 and "without CUDA graphs" in messages[0]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_fast_path_keeps_the_first_losses_on_the_gpu(tmp_path, monkeypatch):
    """The same first losses (bf16 tolerance) with and without the fast path, on the same batches and noise; and
    the fast path really ran compiled (dynamo's graph counter moved, every step went through the compiled
    forward), through CUDA graphs (graph trees recorded the forward and backward, inductor skipped none) and
    without any fallback warning."""
    from torch._dynamo.utils import counters

    real_step = train_mod.train_step
    losses: dict = {}
    recorded = []  # graphs recorded after each step of the fast run (read while the compiled functions live)

    def recording(parts, step):
        loss = real_step(parts, step)
        losses.setdefault(parts.cfg.fast_path, []).append(loss.item())
        if parts.cfg.fast_path == "on":
            recorded.append(fast_path.cuda_graphs_recorded(torch.cuda.current_device()))
        return loss

    monkeypatch.setattr(train_mod, "train_step", recording)
    forwards = RecordedForwards(monkeypatch)
    before: dict = {}
    for setting in ("off", "on"):
        before = {"graphs": counters["stats"]["unique_graphs"], "skips": fast_path.cudagraph_skips(),
                  "recorded": fast_path.cuda_graphs_recorded(torch.cuda.current_device())}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(tiny_config(tmp_path / setting, fast_path=setting, max_train_steps=5, checkpointing_steps=0,
                            mixed_precision="bf16", eval=NO_EVAL))
        assert not [w for w in caught if "fast_path" in str(w.message)], setting
    assert len(losses["off"]) == len(losses["on"]) == 5
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=3e-2, atol=1e-3)
    off, on = forwards.made
    assert not off.is_compiled and off.compiled_calls == 0
    assert on.mode == "reduce-overhead" and on.is_compiled and on.fell_back is None and on.cudagraph_skip is None
    assert on.compiled_calls == 5
    assert counters["stats"]["unique_graphs"] > before["graphs"]
    assert fast_path.cudagraph_skips() == before["skips"]
    # the graphs (one for the forward, one for the backward) are recorded within the calls the fallback guards
    # (warm-up, recording, first replay), and only replayed after them
    last_guarded = fast_path.GUARDED_CALLS - 1
    assert recorded[last_guarded] >= before["recorded"] + 2, recorded
    assert recorded[last_guarded:] == [recorded[last_guarded]] * (5 - last_guarded), recorded
