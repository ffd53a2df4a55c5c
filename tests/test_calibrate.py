import json
import os

import pytest
from click.testing import CliRunner

from edgetl.calibrate.api import calibrate, measure_bandwidth
from edgetl.cli import cli
from edgetl.device.latency import predict_latency
from edgetl.device.machine import read_cpu
from edgetl.device.profiles import load_profile, user_profile_dir
from edgetl.select import select
from edgetl.zoo.model_cost import trace_model

TINY = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5")


def test_read_cpu_and_bandwidth():
    cpu = read_cpu()
    assert cpu.cores >= 1 and cpu.ghz > 0 and cpu.ram_mb > 0
    assert measure_bandwidth(megabytes=32, repeats=2) > 0.1


@pytest.mark.slow
def test_calibrate_writes_a_valid_profile_that_select_finds():
    result = calibrate(name="ci-box", models=TINY, rounds=5, resolution=64, threads=1, kernel_models=TINY,
                       kernel_samples=12)
    assert result.path == user_profile_dir() / "ci-box.yaml"
    profile = load_profile("ci-box")
    assert profile.runtime == "onnxruntime" and profile.calibrated["threads"] == 1
    assert {r.model for r in profile.reference} == set(TINY)
    assert all(r.metric == "min" and r.resolution == 64 for r in profile.reference)
    assert all(r.used_for_fit for r in profile.reference) and not profile.held_out_references()  # fitted on them
    fit = profile.memory.rss_fit
    assert fit is not None and fit.conv_weights_factor > 1 and "fresh process" in fit.derived
    assert set(result.memory_mb) == set(TINY) and all(0.5 < r < 2.0 for r in result.memory_ratios.values())
    assert profile.int8_speedup is not None and "resnet18" in profile.int8_speedup.derived
    assert profile.compute["int8"].value == pytest.approx(profile.compute["fp32"].value * profile.int8_speedup.value,
                                                          rel=1e-2)
    assert all(0 < v <= 1 for v in profile.efficiency.model_dump().values() if isinstance(v, float))
    # the fit reproduces what it was fitted to within a factor of two
    assert all(0.5 < r < 2.0 for r in result.ratios.values()), result.ratios
    ranking = select(device="ci-box", models="mobilenet*", resolution=64)
    assert ranking.rows
    # kernel by kernel: the kernels were timed apart from the whole models, which check them (loosely: at 64 px these
    # networks take 0.3-3 ms, and the runtime's costs between kernels, which the kernel model leaves out, weigh)
    kernels = profile.kernels
    assert kernels is not None and kernels.threads == 1 and kernels.block in (1, 8, 16) and kernels.stream_gbs > 0
    assert "profiler" in kernels.derived and len(kernels.samples) > 20
    # how noisy the machine was is recorded beside the figures it may have shifted
    noise = result.noise
    # windows: 6 profiler chains, the 4 models, the micro-graphs, the streaming rate and the run overhead
    assert noise is not None and noise.windows > 6 + len(TINY) + 2 and noise.reference_us > 0
    assert f"coefficient of variation {noise.cv:.3f}" in kernels.derived
    assert "scaled to the machine at its quiet level" in kernels.derived
    assert f"at most {100 * noise.drift_max:+.1f}%" in kernels.derived
    assert "coefficient of variation of their runs" in profile.efficiency.derived
    predicted = {r.model: predict_latency(trace_model(r.model, 64), profile, "fp32").latency_ms
                 for r in profile.reference}
    assert all(1 / 4 < predicted[r.model] / r.latency_ms < 4 for r in profile.reference), (
        predicted, {r.model: r.latency_ms for r in profile.reference})
    assert max(predicted, key=predicted.get) == "resnet18"  # 0.6 GFLOP at 64 px against 0.02-0.07


@pytest.mark.slow
def test_select_measure_shows_predicted_and_measured(tmp_path):
    out = CliRunner().invoke(
        cli, ["select", "--device", "x86", "--filter", "squeezenet*", "--resolution", "64",
              "--measure", "2", "--threads", "1", "--json"],
    )
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["rows"]
    assert all(r["measured_ms"] > 0 for r in rows[:2])
    out = CliRunner().invoke(
        cli, ["select", "--device", "x86", "--filter", "squeezenet*", "--resolution", "64", "--measure", "1"],
    )
    assert out.exit_code == 0, out.output
    assert "measured ms (here)" in out.stdout and "not this machine" in out.stdout


def test_calibrate_rejects_bad_name():
    from edgetl.errors import ConfigError

    with pytest.raises(ConfigError, match="slug"):
        calibrate(name="My Box")


@pytest.mark.tensorrt
def test_calibrate_on_a_jetson_with_tensorrt_writes_a_tensorrt_profile():
    result = calibrate(name="jetson-here", models=TINY, rounds=5, resolution=64)
    profile = load_profile("jetson-here")
    assert profile.runtime == "tensorrt" and profile.calibrated["runtime"] == "tensorrt"
    assert profile.is_this_machine() and profile.calibrated["fingerprint"]["tensorrt"]
    assert {(r.runtime, r.precision) for r in profile.reference} == {("tensorrt", "fp16")}
    assert set(result.measurements) == set(TINY) and all(m.runtime == "tensorrt" for m in result.measurements.values())


def test_measure_models_times_each_model_alone_in_its_steady_state():
    from edgetl.calibrate.measure import measure_models

    seen = []
    results = measure_models(("squeezenet1_1", "mobilenet_v3_small"), resolution=32, threads=1, rounds=4, warmup=2,
                             progress=lambda done, total, step: seen.append(step), passes=2)
    assert list(results) == ["squeezenet1_1", "mobilenet_v3_small"]
    for m in results.values():
        assert m.runs == 4 and m.resolution == 32 and m.runtime == "onnxruntime" and m.threads == 1
        assert 0 < m.min_ms <= m.p10_ms <= m.p50_ms
    assert seen[-1] == "timing"


def test_a_sessions_peak_rss_is_measured_in_a_fresh_process_and_grows_with_the_weights():
    from edgetl.calibrate.measure import measure_memory

    mb = measure_memory(("squeezenet1_1", "resnet18"), resolution=32, threads=1, runs=1)
    # resnet18 has 47 MB of fp32 weights, squeezenet1_1 5 MB; the runtime holds more than one copy
    assert 0 < mb["squeezenet1_1"] < mb["resnet18"] and mb["resnet18"] > 47


def _busy_loops(count: int) -> list:
    """Real load: ``count`` processes that spin on a core each until killed."""
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def test_a_window_that_drifted_is_timed_again_in_a_later_pass_and_counted_if_it_drifts_on_every_try():
    """The guard's decisions, on a reference whose times are given: 1000 us quiet, 1500 us loaded."""
    from edgetl.calibrate.noise import NoiseGuard

    # 5 start probes, then one after each window (the probe before a window is the one after the window before):
    # pass 1 (a, b, c, d), pass 2 (b, c), pass 3 (c)
    times = iter([1000.0] * 5 + [1000.0, 1500.0, 1000.0, 1000.0] + [1000.0, 1500.0] + [1000.0])
    ran: list[str] = []
    guard = NoiseGuard(lambda: next(times)).start()
    results = guard.run_all({k: (lambda k=k: ran.append(k) or k.upper()) for k in "abcd"})
    assert ran == ["a", "b", "c", "d", "b", "c", "c"]  # b drifted after, c before: both again, in a later pass
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    noise = guard.summary()
    assert (noise.windows, noise.repeated, noise.drifted) == (4, 2, ("c",))  # c drifted on every try
    assert noise.drift_max == pytest.approx(0.5) and noise.noisy  # 1 of 4 windows drifted on every try
    # the probe after each window's kept attempt: b's second (quiet) one, c's first (no later one was quieter)
    assert guard.state()["at"] == {"a": 5, "b": 9, "c": 7, "d": 8}
    # a machine loaded throughout: most windows drift; timing them again would only triple the run: the run is too
    # noisy
    times = iter([1000.0] * 5 + [1500.0] * 4)
    ran.clear()
    guard = NoiseGuard(lambda: next(times)).start()
    results = guard.run_all({k: (lambda k=k: ran.append(k) or k) for k in "abcd"})
    assert ran == ["a", "b", "c", "d"] and list(results.values()) == list("abcd")
    assert guard.summary().drifted == tuple("abcd") and guard.summary().noisy


def test_a_steady_load_of_other_processes_is_read_from_the_cores_counters_and_named_in_the_warning():
    """Busy loops on half the cores through the whole run: a steady load slows the reference as much at its quietest
    as anywhere, so the probes (constant here) see nothing; the cores' counters do. The run's own work is not
    counted as another process's (compared with a run that sleeps, so a steady background does not matter)."""
    import time

    from edgetl.calibrate.noise import CpuCounters, NoiseGuard, NoiseSummary

    if CpuCounters.read() is None:
        pytest.skip("no /proc/stat: not Linux")
    cores = len(os.sched_getaffinity(0))
    loops = max(1, cores // 2)

    def spin() -> None:  # the run's own work: a core of this process, busy for half a second
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass

    def run(window, loops: int = 0) -> NoiseSummary:
        busy = _busy_loops(loops)
        try:
            guard = NoiseGuard(lambda: 1000.0, threads=cores).start()
            guard.run_all({"a": window, "b": window, "c": window})
            return NoiseSummary.of(json.loads(json.dumps(guard.state())))  # as a board sends it back
        finally:
            for p in busy:
                p.kill()
                p.wait()

    idle, working, loaded = run(lambda: time.sleep(0.5)), run(spin), run(spin, loops)
    assert working.cpu is not None and abs(working.cpu.others - idle.cpu.others) < 0.4, (idle.text(), working.text())
    assert loaded.over == 0 and loaded.cpu.others - working.cpu.others > 0.5 * loops, loaded.text()
    assert loaded.noisy and "other processes kept" in loaded.warning(), loaded.warning()


def test_windows_timed_under_lasting_load_are_scaled_to_the_quiet_machine_and_a_burst_is_not():
    from edgetl.calibrate.kernel_plan import at_quiet
    from edgetl.calibrate.noise import speed_factors

    # the reference at 1000 us for 20 probes with one burst (3000 us) among them, then at 1250 us for 20 (a job of
    # another tenant); the windows whose kept attempt ended at probes 5, 10 (the burst) and 35
    probes = [1000.0] * 10 + [3000.0] + [1000.0] * 9 + [1250.0] * 20
    factors = speed_factors({"probes": probes, "at": {"quiet": 5, "burst": 10, "loaded": 35}})
    assert factors == pytest.approx({"quiet": 1.0, "burst": 1.0, "loaded": 0.8})
    row = ["Conv", [[1, 8, 4, 4]], [[1, 8, 4, 4]], 0, 150.0]
    assert at_quiet("profile", [row], factors["loaded"])[0][4] == pytest.approx(120.0)
    assert at_quiet("plain", 50.0, 0.8) == pytest.approx(40.0)
    chains = at_quiet("chains", {"long_us": 300.0, "short_us": 100.0, "kernels": [row]}, 0.5)
    assert (chains["long_us"], chains["short_us"], chains["kernels"][0][4]) == (150.0, 50.0, 75.0)


def test_a_window_timed_under_real_load_is_timed_again_scaled_or_warned_about():
    """Kernels timed while other processes take both cores for the first second or so: the guard's reference kernel
    sees the load, and what it keeps, scaled to the quiet level, is no slower than the same kernels timed before the
    load (within 25%), or it says the machine was too noisy."""
    import threading
    from functools import partial

    from edgetl.calibrate.kernel_timing import micro_graph, reference_model
    from edgetl.calibrate.noise import DRIFT_THRESHOLD, NoiseGuard, speed_factors
    from edgetl.calibrate.profiler import profile_onnx
    from edgetl.zoo.cost import OpCost

    attempts: list[float] = []  # every time a window ran, as a ratio to its quiet time

    def kernel_us(op: OpCost, quiet: float = 0.0) -> float:
        us = sum(us for *_, us in profile_onnx(micro_graph(op)[0], None, threads=2, warmup=3, runs=8).kernels)
        attempts.append(us / quiet if quiet else 1.0)
        return us

    # 3x3 convolutions of 2-10 ms: long enough for a busy core to slow them
    ops = [OpCost("conv", "conv", 0, 0, 0, 0, False, geom=(c, c, 3, 3, 1, 1, 1, 1, 1, 56, 56, 56, 56))
           for c in (64, 96, 128)]
    guard = NoiseGuard.for_reference(reference_model(), 2)
    quiet = [kernel_us(op) for op in ops]
    windows = {f"w{i}": partial(kernel_us, ops[i % 3], quiet[i % 3]) for i in range(9)}
    busy = _busy_loops(2)

    def stop() -> None:
        for p in busy:
            p.kill()
            p.wait()

    timer = threading.Timer(1.5, stop)
    timer.start()
    try:
        timed = guard.run_all(windows)
    finally:
        timer.cancel()
        stop()
    noise = guard.summary()
    assert noise.windows == 9 and len(guard.probes) >= 5 + 9
    if max(attempts) < 1.25:
        pytest.skip(f"the load slowed no kernel by 25% (at most {max(attempts):.2f}x): nothing to catch")
    assert noise.drift_max > DRIFT_THRESHOLD, noise.text()  # the reference saw the load
    factors = speed_factors(guard.state())
    slowed = {k: round(v * factors[k] / quiet[int(k[1:]) % 3], 2) for k, v in timed.items()
              if v * factors[k] > 1.25 * quiet[int(k[1:]) % 3]}
    assert noise.noisy or not slowed, (noise.text(), slowed)
