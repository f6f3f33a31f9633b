"""Cost of every training objective relative to L2 on the same backbone, batch and process.

    python benchmarks/run.py            # full run (~5-8 min on 2 cores), writes BENCHMARKS.md
    python benchmarks/run.py --quick    # < 1 min; prints the tables, then ONE JSON line of time ratios
    python benchmarks/run.py --times-only [--bf16]   # every case's time ratios (under bf16 autocast), no report

Cases: ``TimeMLP`` on the 2-D ring8 mixture; diffusers ``UNet2DModel`` (block_out_channels (32, 64),
mid attention) at 16x16 and 32x32, batch 32. Objectives come from ``gradscore.OBJECTIVES``
(``spec.parametrisation`` picks ``ScoreModel`` or ``EnergyScore``, ``spec.needs_critic`` adds a
``gradscore.Critic``). A step is forward + backward + Adam step. See ``measure.py`` for how time,
memory and FLOPs are measured. The last line printed is a JSON object ``{objective: time ratio
against l2}`` for the 16x16 UNet (``--case`` picks another).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                       # run as a script: import the repository's packages
    sys.path.insert(0, ROOT)

import torch

import gradscore
from benchmarks import benchmarks_md, measure
from benchmarks.setups import Step, n_params, toy_case, toy_critic_sweep_case, unet_case, wide_critic_step

CASES = {
    "toy": dict(build=lambda names=None: toy_case(batch=512, names=names), rounds=(10, 30)),
    "unet16": dict(build=lambda names=None: unet_case(16, 32, names=names), rounds=(3, 10)),
    "unet32": dict(build=lambda names=None: unet_case(32, 32, names=names), rounds=(0, 5)),
}

EXTRA_ROWS = {"toy": ("general_route",), "unet16": ("energy_forms", "math_attention", "wide_critic"),
              "unet32": ("math_attention",)}


def energy_form_steps(case_steps, energies=("norm", "residual")):
    """Extra rows: the ``energy`` objective with other energy forms on the same backbone."""
    base = case_steps.get("energy")
    if base is None:
        return {}
    import copy

    out = {}
    for e in energies:
        model = gradscore.EnergyScore(copy.deepcopy(base.model.backbone), base.model.sde, energy=e)
        out[f"energy[{e}]"] = Step(f"energy[{e}]", model, base.objective, base.x0)
    return out


def math_attention_step(case_steps):
    """Extra row: the ``energy`` objective with the math kernel's attention derivatives (``attention_written_derivative
    = False``: the default until 2026-12-06, slicing the batch where the scores exceed 4 MiB) instead of
    ``gradscore.double_backward.twice_differentiable_attention``."""
    import copy

    base = case_steps["energy"]
    model = copy.deepcopy(base.model)
    model.attention_written_derivative = False
    return {"energy[math attention]": Step("energy[math attention]", model, base.objective, base.x0)}


def general_route_step(case_steps):
    """Extra row: the ``energy`` objective on a ``TimeMLP`` through ``input_gradient`` (``fused_input_gradient =
    False``: the route until 2026-12-06) instead of the fused node ``gradscore.double_backward.silu_mlp_vjp``."""
    import copy

    base = case_steps["energy"]
    model = copy.deepcopy(base.model)
    model.fused_input_gradient = False
    return {"energy[general route]": Step("energy[general route]", model, base.objective, base.x0)}


def build_case(name, forms=(), bf16=False):
    """``(steps, info)`` of a case; ``forms``: extra rows, any of ``"energy_forms"``, ``"math_attention"``,
    ``"wide_critic"``, ``"general_route"``."""
    steps, info = CASES[name]["build"]()
    if "general_route" in forms and "energy" in steps:
        steps.update(general_route_step(steps))
    if "energy_forms" in forms:
        steps.update(energy_form_steps(steps))
    if "math_attention" in forms and "energy" in steps:
        steps.update(math_attention_step(steps))
    if "wide_critic" in forms and "dual_sobolev" in steps:
        steps["dual_sobolev[critic 48-96-160]"] = wide_critic_step(steps["l2"].x0.shape[-1], info["batch"])
    for s in steps.values():
        s.bf16 = bf16
    return steps, info


def time_case(name, steps, info, quick, log=print) -> dict:
    """The interleaved time ratios of a built case: ``{info, rounds, rows}``."""
    rounds = CASES[name]["rounds"][0 if quick else 1]
    t0 = time.perf_counter()
    times = measure.interleaved_times(steps, rounds)
    ratios = measure.paired_ratios(times, "l2")
    rows = {n: dict(ms=1e3 * measure.median(times[n]), time_ratio=ratios[n], parametrisation=type(s.model).__name__,
                    critic_share=(n_params(s.critic) / n_params(s.model) if s.critic is not None else None))
            for n, s in steps.items()}
    log(f"[{name}] {rounds} rounds in {time.perf_counter() - t0:.0f} s")
    return dict(info=info, rounds=rounds, rows=rows)


def _memory_in_subprocess(name: str, threads: int) -> dict:
    """``measure_case`` of the full run's case ``name`` in a fresh interpreter that pins glibc's allocator before
    allocating anything (pinning later does not take: the heap has already grown, and resident memory no longer
    follows live tensors). Returns ``{row: {saved_mb, peak_mb, gflop, ..._ratio}, "malloc_pinned": bool}``."""
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-case", name, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _memory_case_main(name: str) -> None:
    pinned = measure.pin_malloc()
    steps, info = build_case(name, EXTRA_ROWS.get(name, ()))
    case = dict(rows={n: {} for n in steps})
    measure_case(steps, case)
    print(json.dumps({**case["rows"], "malloc_pinned": pinned}))


def measure_case(steps, case: dict) -> None:
    """Saved and peak bytes (after ``measure.pin_malloc``) and FLOPs of every step, with their ratios to L2, into
    ``case["rows"]``."""
    rows = case["rows"]
    for n, s in steps.items():
        row = rows[n]
        row["saved_mb"] = measure.saved_bytes(s.forward, s.params) / 1e6
        peak = measure.peak_bytes(s.step)
        row["peak_mb"] = None if peak is None else peak / 1e6
        row["gflop"] = measure.step_flops(s.step) / 1e9
    ref = rows["l2"]
    for row in rows.values():
        for key in ("saved_mb", "peak_mb", "gflop"):
            if row.get(key) is not None and ref.get(key):
                row[key + "_ratio"] = row[key] / ref[key]


def critic_sweep(batches=((512, 30), (4096, 12)), log=print):
    """Toy MLP: ``l2+dual_sobolev`` time and FLOPs over L2 for critics of 24% down to 2% of the
    score model's parameters, at two batch sizes (is the critic's cost per operator or per FLOP?)."""
    out = []
    for batch, rounds in batches:
        steps, shares = toy_critic_sweep_case(batch)
        t0 = time.perf_counter()
        ratios = measure.paired_ratios(measure.interleaved_times(steps, rounds), "l2")
        ref, ref_ops = measure.step_flops(steps["l2"].step), measure.op_count(steps["l2"].step)
        for label, share in shares.items():
            out.append(dict(batch=batch, critic=label.split(" critic ")[1], share=share, time_ratio=ratios[label],
                            flop_ratio=measure.step_flops(steps[label].step) / ref,
                            ops=measure.op_count(steps[label].step), l2_ops=ref_ops))
        log(f"[critic sweep] batch {batch}: {rounds} rounds in {time.perf_counter() - t0:.0f} s")
    return out


def critic_matmul_floor(rounds=300, log=print):
    """Toy MLP, ``dual_sobolev``: what its step would cost over L2 if the critic path were its matrix products and
    nothing else. The ``mm``/``addmm`` calls of one L2 step and of one dual_sobolev step are recorded (with their
    arguments); the products the L2 step does not have are the critic's, replayed interleaved with the two steps:
    ``floor = 1 + time(critic products) / time(L2 step)``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    steps, _ = toy_case(batch=512, names=["l2", "dual_sobolev"])
    products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def record(step):
        calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in products:
                    calls.append((func, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
                return func(*args, **(kwargs or {}))

        step()
        with Mode():
            step()
        return calls

    def key(call):
        return str(call[0]), tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in call[1])

    left = {}
    for c in record(steps["l2"].step):
        left[key(c)] = left.get(key(c), 0) + 1
    extra = []
    for c in record(steps["dual_sobolev"].step):
        if left.get(key(c), 0) > 0:
            left[key(c)] -= 1
        else:
            extra.append(c)

    def replay():
        for func, args in extra:
            func(*args)

    t0 = time.perf_counter()
    ratios = measure.paired_ratios(measure.interleaved_times(
        {"l2": steps["l2"].step, "dual_sobolev": steps["dual_sobolev"].step, "critic products": replay}, rounds,
        warmup=5), "l2")
    log(f"[critic floor] {rounds} rounds in {time.perf_counter() - t0:.0f} s")
    return dict(products=len(extra), floor=1 + ratios["critic products"], time_ratio=ratios["dual_sobolev"],
                rounds=rounds)


def profile_split(case="unet16", names=("l2", "energy")):
    """Self CPU time of one step split into matmul-like kernels (convolution, mm, attention) and
    everything else (normalisation, activations and their double-backward formulas, copies)."""
    from torch.profiler import ProfilerActivity, profile

    steps, _ = CASES[case]["build"](names=list(names))
    heavy = ("conv", "mm", "matmul", "addmm", "bmm", "linear", "scaled_dot_product", "baddbmm")
    out = {}
    for n, s in steps.items():
        s.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s.step()
        total = other = 0.0
        for e in prof.key_averages():
            if not e.key.startswith("aten::"):
                continue
            total += e.self_cpu_time_total
            if not any(h in e.key for h in heavy):
                other += e.self_cpu_time_total
        out[n] = dict(total_ms=total / 1e3, matmul_ms=(total - other) / 1e3, other_ms=other / 1e3)
    return out


def _cpu_has_bf16() -> bool:
    """Whether /proc/cpuinfo lists native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``); True where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy and 16x16 UNet timing only (< 1 min)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: robust on a shared machine)")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="report written by the full run")
    ap.add_argument("--case", default="unet16", choices=list(CASES), help="case of the final JSON line")
    ap.add_argument("--times-only", action="store_true",
                    help="every case at full rounds, time ratios only (no memory, FLOPs or extras; no report written)")
    ap.add_argument("--bf16", action="store_true", help="every loss under bf16 autocast (implies --times-only)")
    ap.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)   # internal: _memory_in_subprocess
    args = ap.parse_args(argv)
    args.times_only = args.times_only or args.bf16

    torch.set_num_threads(args.threads)
    if args.memory_case:
        return _memory_case_main(args.memory_case)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    if args.bf16 and not _cpu_has_bf16():
        log("[bf16] warning: this CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo): PyTorch emulates bf16 "
            "here, so the ratios time the emulation, not the objectives (BENCHMARKS.md, 'bf16 autocast (CPU)')")
    started = time.perf_counter()
    results = dict(threads=args.threads, malloc_pinned=False, cases={})
    names = ["toy", "unet16"] if args.quick else list(CASES)
    if args.case not in names:
        names.append(args.case)
    brief = args.quick or args.times_only
    built = {name: build_case(name, () if brief else EXTRA_ROWS.get(name, ()), args.bf16) for name in names}
    # every timing with glibc's allocator as a training run has it; pin_malloc (for the peak memory, in a fresh
    # process below) makes every large allocation an mmap, which would tax the steps that allocate more
    for name in names:
        results["cases"][name] = time_case(name, *built[name], args.quick, log=log)
    if args.bf16:
        results["bf16"] = True
    else:
        from benchmarks import driver_step

        os.chdir(ROOT)
        results["driver_step"] = driver_step.run(rounds=3 if args.quick else 7, log=log)
    if not brief:
        results["critic_sweep"] = critic_sweep(log=log)
        results["critic_floor"] = critic_matmul_floor(log=log)
        log("[profile] unet16 l2 vs energy")
        results["profile"] = profile_split()
        from benchmarks import driver_overhead, quality_cost

        log("[driver] gradscore_train.loop vs bare loop")
        os.chdir(ROOT)
        driver = (driver_overhead.run("configs/toy/l2.yaml", steps=300, repeats=5),
                  driver_overhead.run("configs/digits/l2.yaml", steps=30))
        results["driver"] = [d for d in driver if d is not None] or None
        log("[quality] gradient_error vs energy distance")
        results["quality"] = quality_cost.run()
        del built
        for name in names:
            log(f"[{name}] memory and FLOPs (a fresh process)")
            measured = _memory_in_subprocess(name, args.threads)
            results["malloc_pinned"] = measured.pop("malloc_pinned")
            for row, values in measured.items():
                results["cases"][name]["rows"][row].update(values)
    results["seconds"] = time.perf_counter() - started
    print(benchmarks_md.tables(results))
    if not (args.quick or args.times_only):
        cmd = "python benchmarks/run.py" + (f" --threads {args.threads}" if args.threads != 1 else "")
        with open(args.out, "w") as f:
            f.write(benchmarks_md.markdown(results, cmd))
        log(f"wrote {args.out}")
    rows = results["cases"][args.case]["rows"]
    print(json.dumps({n: round(r["time_ratio"], 3) for n, r in rows.items() if "[" not in n}))


if __name__ == "__main__":
    main()
