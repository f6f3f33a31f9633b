"""Text of BENCHMARKS.md and of the tables `run.py` prints."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform

import torch

TARGETS = (("energy", "time_ratio", 2.0), ("energy", "peak_mb_ratio", 2.5), ("dual_sobolev", "time_ratio", 1.3),
           ("l2+dual_sobolev", "time_ratio", 1.3))
# issue 16 item 3: dual_sobolev alone at <= 2x an L2 step (the driver's whole step, benchmarks/driver_step.py)
RECIPE_TARGET = ("configs/toy/dual_sobolev_one_critic_step.yaml", 2.0)

# What was tried to make the gradient-projected objectives cheaper, measured while writing the
# benchmark (UNet2DModel 16x16 with mid attention, batch 32, 1 thread, shared 2-core machine under
# load, interleaved medians). Only numerically exact routes were considered; the last column says which were kept.
TRIED = """\
| route | exact? | measured effect (UNet 16x16, energy step vs plain energy step) | kept |
| --- | --- | --- | --- |
| plain: `autograd.grad(E, x, create_graph=True)` inside `forward`, then backward, stock `nn.SiLU` | reference | 3.2-3.9x L2 time, 2.02x L2 FLOPs, 3.3x L2 saved memory (264.7 MB) | until this report |
| `CompactSiLU` (`gradscore.double_backward.compact_silu`, applied by `EnergyScore` and `Critic`): SiLU's derivative as one autograd node saving `(grad, x)`, SiLU'' written out for the backward, instead of PyTorch's composite derivative under `create_graph` (sigmoid and products, each saving an activation-sized intermediate) | forward and first derivative: PyTorch's kernels; gradients to float32 rounding (tests/test_fast_paths.py: 7e-7 relative on a UNet) | saved 264.7 -> 168.2 MB, time 3.21x -> 3.00x L2 (5 interleaved rounds while developing; the tables above are with it). Since 2026-12-04 its SiLU'' is evaluated in place when no higher derivative follows: the toy energy step's peak 4.5 -> 4.0 MB (`peak_attribution.py --case toy`; L2: 2.0 MB), the 32x32 UNet's 809 -> 805 MB | yes, default |
| energy forms `inner` / `norm` / `residual` | (different models) | same FLOPs (33.26 GFLOP each) and same saved memory (264.7 MB); times within noise | - |
| non-reentrant checkpoint of the backbone call inside the energy (recomputed under the math SDPA kernel) | yes: loss and gradients bit-identical | time 4.0x L2 (+25%); saved 262 MB, peak 263 MB (-1%): the VJP graph re-holds the recomputed activations | no |
| reverse-over-forward: `score` from a custom `autograd.Function` whose backward takes the parameter gradient of the directional derivative `<a, grad_x E>` (forward-mode JVP of E along the detached cotangent `a`) | yes in exact arithmetic (tests/test_fast_paths.py, TimeMLP, float64) | on UNet2DModel in torch 2.13: forward AD of `group_norm` fails on the non-contiguous attention output ("view size is not compatible"), then `softmax` forward AD breaks the reverse pass (in-place on `exp`); without attention it ran at 5.3x L2 (plain: 3.2x) and its gradients disagreed with the plain route (not investigated). FLOPs: F + VJP to get `a`, then a primal+tangent forward and its backward, ~8F against ~6F | no |
| double-backward-friendly custom `Function`s for SiLU, GroupNorm, conv2d (backward written with differentiable ops: `conv_transpose2d`, analytic SiLU'' , GroupNorm formula; weight gradients skipped during the inner `autograd.grad`) | yes (rel. error 2e-7 to 2e-6 per op) | per-op double backward: conv 0.88x, SiLU 1.05x, GroupNorm 1.5x of native: no net gain in time, more code on the default path (memory was not measured then; the SiLU part came back as `CompactSiLU` above, for its memory) | no |
| `torch.compile` | - | refuses double backward (aot_autograd), docs/engineering.md "Double backward" | no |
| attention on slices of the batch (`math_attention(chunk_bytes)`, a `TorchFunctionMode` that splits `scaled_dot_product_attention` calls whose scores exceed 4 MiB; `EnergyScore` and `Critic` enter it when the backbone holds attention) | yes: each sample's computation unchanged (tests/test_attention_chunks.py: values, first and second derivatives to 1e-6) | UNet 32x32 (the 16x16 UNet's scores are below the chunk size): peak 1337 -> 840 MB (4.1x -> 2.6x L2), time 2.66-2.74x -> 2.59x L2 (two full runs) (the rows `energy[whole attention]` and `energy` above); the mode costs ~5% of the toy MLP's energy step, so it is not entered without attention | yes, default |
| attention's derivative written out (`double_backward.twice_differentiable_attention`, docs/theory.md section 10.1): the fused kernel's forward, the first derivative as one autograd node saving `q, k, v, dO, O`, the second derivative written out with the probabilities recomputed on slices of the batch of at most 4 MiB of scores; `EnergyScore` and `Critic` send every unmasked attention call to it | yes: gradcheck/gradgradcheck (float64); values, first and second derivatives to 1e-12 (float64) and 2e-6 (float32) of the math kernel's; a UNet's energy and dual_sobolev gradients to 1e-10 (tests/test_attention_chunks.py) | the rows `energy` and `energy[math attention]` in the tables above: no score-sized tensor is saved any more. Full run of 2026-12-06: unet32 saved 818 -> 619 MB, peak 840 -> 640 MB (2.55x -> 1.94x L2), time 2.57x -> 2.63x L2 (the price of recomputing the probabilities: the attention's double backward alone, `python benchmarks/attention_double_backward.py`, is 1.10-1.27x the math kernel's at [32, 8, 256, 8] in three runs of 30 interleaved rounds and 1.09x at 64 tokens; one earlier run of the same script gave 0.93x, the machine's noise); unet16 peak 194 -> 168 MB, time 2.33x -> 2.35x. A first version called the fused kernel on 3-D tensors, which silently fell back to the math kernel (the CPU kernel takes 4-D only): found by profiling, fixed | yes, default: the memory target needs it |
| `CompactGroupNorm` (commit cdcfc94, reverted): group norm's first derivative as one autograd node (PyTorch's `native_group_norm_backward`) with its second derivative written out per group (`d/dx = -r xh mean(v gx) - r^2 mean(gh xh) P(v) - r mean(v xh) gx`, `P` the projection off `1` and `xh`), instead of PyTorch's composite double backward | yes: gradcheck/gradgradcheck (float64), a UNet's parameter gradients to 1e-10 (float64), a symmetric score Jacobian at 3072 dimensions | unet16 energy step 2.46x vs 2.45x L2 with PyTorch's own (20 interleaved rounds), saved 159.2 vs 160.4 MB; one layer's forward + `create_graph` VJP + backward 0.8-1.3x PyTorch's own time ([32, 32, 16, 16] to [32, 64, 32, 32]): PyTorch's composite group-norm double backward is not where the time goes | no |
| the toy's energy input gradient as one node (`double_backward.silu_mlp_vjp`, taken by `EnergyScore` for a `TimeMLP` through the inner-product energy in training): `grad_x E = (f + J_f^T x) / (2 sigma_t)` with `J_f^T x` the MLP's gradient pass along the per-sample cotangent `x W / (2 sigma_t)`, both passes' adjoints written out (docs/theory.md section 10.2), the node the `TimeMLP` critic already used, generalised | yes: score, loss and every parameter gradient to 1e-12 (float64) and 2e-5 (float32) of the general route from d = 3 to 784, its third derivative included (tests/test_fast_paths.py) | the toy rows `energy` and `energy[general route]` above: fewer operators for the same matmuls, and no input gradient of the first layer in the outer backward. While writing it (30 interleaved rounds per run): 2.13-2.25x -> 1.80-1.85x L2 with every `c_k = delta_k silu'(a_k)` saved, but at a peak of 2.86x L2 (over the 2.5x target: the backward's adjoints on top of the saved graph); with `c_k` recomputed in the backward 1.92x (four runs) at a peak of 2.38x and 1.48x L2 saved (the general route: 1.96x). The UNets are unchanged | yes, default |
| timing with glibc's mmap threshold pinned (how every time ratio before 2026-12-04 was measured, for the memory columns) | - | every allocation over 64 KiB an mmap with fresh page faults: the ratios of the steps that allocate more were inflated, energy 3.2x -> 2.5x and dual_sobolev (toy) 2.46x -> 2.05x once timed unpinned; timings now run unpinned, memory in a fresh pinned process | fixed |
"""


# Measurements of the dual_sobolev min-max on the toy, kept verbatim (they come from training runs, not from run.py).
DUAL_SOBOLEV_STABILITY = (pathlib.Path(__file__).parent / "dual_sobolev_stability.md").read_text()
# The likelihood's cost (benchmarks/likelihood_cost.py, run on its own: minutes), kept verbatim.
LIKELIHOOD_COST = (pathlib.Path(__file__).parent / "likelihood_cost.md").read_text()
DIAGNOSTICS_COST = (pathlib.Path(__file__).parent / "diagnostics_cost.md").read_text()
# The diagnostics' standard errors against their spread over seeds (benchmarks/kl_stderr_calibration.py), kept verbatim.
STDERR_CALIBRATION = (pathlib.Path(__file__).parent / "stderr_calibration.md").read_text()
# The time ratios under bf16 autocast (run.py --bf16 beside run.py --times-only), kept verbatim.
BF16 = (pathlib.Path(__file__).parent / "bf16.md").read_text()


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None else fmt.format(v)


def case_table(case: dict) -> str:
    info, rows = case["info"], case["rows"]
    has_mem = any("saved_mb" in r for r in rows.values())
    has_flops = any("gflop" in r for r in rows.values())
    head = ["objective", "model", "critic / model params", "median ms", "time / L2"]
    if has_mem:
        head += ["saved MB", "saved / L2", "peak MB", "peak / L2"]
    if has_flops:
        head += ["GFLOP", "FLOP / L2", "time/L2 over FLOP/L2"]
    lines = [f"{info['backbone']}; {info['params']:,} parameters; batch {info['batch']}; critic {info['critic']} "
             f"({info['critic_params']:,} parameters, {100 * info['critic_params'] / info['params']:.0f}%); "
             f"{case['rounds']} interleaved rounds", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n, r in rows.items():
        share = r.get("critic_share")
        cells = [n, r["parametrisation"], "-" if share is None else f"{100 * share:.0f}%", f"{r['ms']:.1f}",
                 f"{r['time_ratio']:.2f}x"]
        if has_mem:
            cells += [_f(r.get("saved_mb"), "{:.1f}"), _f(r.get("saved_mb_ratio"), "{:.2f}x"),
                      _f(r.get("peak_mb"), "{:.1f}"), _f(r.get("peak_mb_ratio"), "{:.2f}x")]
        if has_flops:
            over = r["time_ratio"] / r["gflop_ratio"] if r.get("gflop_ratio") else None
            cells += [_f(r.get("gflop"), "{:.3f}"), _f(r.get("gflop_ratio"), "{:.2f}x"), _f(over, "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(results) -> str:
    lines = ["| target | case | measured | met |", "| --- | --- | --- | --- |"]
    for name, case in results["cases"].items():
        rows = case["rows"]
        for obj, key, bound in TARGETS:
            r = rows.get(obj)
            if r is None or r.get(key) is None:
                continue
            what = {"time_ratio": "time", "peak_mb_ratio": "peak memory"}[key]
            lines.append(f"| {obj} {what} <= {bound}x L2 | {name} | {r[key]:.2f}x | {'yes' if r[key] <= bound else 'NO'} |")
    for d in results.get("driver_step") or []:
        if d["config"] == RECIPE_TARGET[0]:
            lines.append(f"| dual_sobolev alone: driver step <= {RECIPE_TARGET[1]}x L2's (n_critic = 1 recipe, at "
                         f"n_critic = 5's quality) | {d['config']} | {d['ratio']:.2f}x | "
                         f"{'yes' if d['ratio'] <= RECIPE_TARGET[1] else 'NO'} |")
    for d in results.get("driver") or []:
        lines.append(f"| driver overhead <= 5% (vs the same recipe as a bare loop) | {d['config']} | {100 * d['overhead']:.1f}% | "
                     f"{'yes' if d['overhead'] <= 0.05 else 'NO'} |")
    return "\n".join(lines)


def tables(results) -> str:
    out = [f"threads {results['threads']}; wall {results['seconds']:.0f} s"
           + ("; every loss under bf16 autocast" if results.get("bf16") else "")]
    for name, case in results["cases"].items():
        out += ["", f"## {name}", case_table(case)]
    if results.get("driver_step"):
        from .driver_step import table
        out += ["", "## driver step (toy configs, interleaved)", table(results["driver_step"])]
    if any("peak_mb_ratio" in r for c in results["cases"].values() for r in c["rows"].values()) or results.get("driver"):
        out += ["", "## targets", targets_table(results)]
    return "\n".join(out)


def _versions():
    vs = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "accelerate", "numpy"):
        try:
            vs[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return ", ".join(f"{k} {v}" for k, v in vs.items())


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _limits(results) -> str:
    parts = []
    for name in ("unet16", "unet32"):
        r = results["cases"].get(name, {}).get("rows", {}).get("energy")
        if r and r.get("gflop_ratio"):
            parts.append(f"- {name}: energy step = {r['gflop_ratio']:.2f}x the L2 FLOPs, {r['time_ratio']:.2f}x the time, "
                         f"{_f(r.get('saved_mb_ratio'))}x the saved-for-backward bytes.")
    for name, case in results["cases"].items():
        rows = case.get("rows", {})
        w, m = rows.get("energy"), rows.get("energy[math attention]")
        if w and m:
            parts.append(f"- {name}: attention with its derivative written out (`energy`) against the math kernel's "
                         f"(`energy[math attention]`, the route until 2026-12-06): time {w['time_ratio']:.2f}x vs "
                         f"{m['time_ratio']:.2f}x L2, saved {_f(w.get('saved_mb'))} vs {_f(m.get('saved_mb'))} MB, "
                         f"peak {_f(w.get('peak_mb'))} vs {_f(m.get('peak_mb'))} MB.")
        f, g = rows.get("energy"), rows.get("energy[general route]")
        if f and g:
            parts.append(f"- {name}: the TimeMLP energy's input gradient as one fused node (`energy`, "
                         f"`double_backward.silu_mlp_vjp`) against autograd's double backward (`energy[general route]`, "
                         f"the route until 2026-12-06): time {f['time_ratio']:.2f}x vs {g['time_ratio']:.2f}x L2 for "
                         f"{_f(f.get('gflop_ratio'))}x vs {_f(g.get('gflop_ratio'))}x the FLOPs, peak "
                         f"{_f(f.get('peak_mb'))} vs {_f(g.get('peak_mb'))} MB.")
    p = results.get("profile")
    if p and "energy" in p and "l2" in p:
        e, ref = p["energy"], p["l2"]
        parts.append(f"- Profile of one step (unet16, self CPU time of aten ops): L2 {ref['total_ms']:.0f} ms "
                     f"({ref['matmul_ms']:.0f} ms convolution/matmul/attention, {ref['other_ms']:.0f} ms other); energy "
                     f"{e['total_ms']:.0f} ms ({e['matmul_ms']:.0f} ms convolution/matmul/attention = "
                     f"{e['matmul_ms'] / max(ref['matmul_ms'], 1e-9):.2f}x, {e['other_ms']:.0f} ms other = "
                     f"{e['other_ms'] / max(ref['other_ms'], 1e-9):.2f}x).")
    return "\n".join(parts)


CRITIC_CAPACITY = (
    'Does the toy need a big critic? `python -m gradscore_train.ablate configs/ablations/toy_critic.yaml` (the '
    '`make demo` budget: ring8, 1000 steps, 3 seeds; critic width 128 / 56 / 24 at depth 3 = 100% / 22% / 5.5% of '
    'the score MLP; quality re-measured 2026-11-24 with the score model and the critic clipped separately, 5 min '
    '24 s on a shared machine): `l2+dual_sobolev` gives energy distance 0.0114 at every width (+- 0.0006; L2 in '
    '`make demo`: 0.0114) at 4.68 / 3.57 / 3.23 ms per driver step (L2 in `make demo`: 1.67 ms; the step times '
    'are from the 2026-11-22 run, with one clip of the joint norm, on a quieter machine), so '
    '`configs/toy/l2+dual_sobolev.yaml` uses the 5.5% critic. `dual_sobolev` alone, whose only signal is the '
    'critic, degrades as the critic shrinks: 0.0145 +- 0.0010, 0.0190 +- 0.0014, 0.0355 +- 0.0125 at 20.1 / 15.1 '
    '/ 13.1 ms per step (n_critic 5; step times from the same earlier run), so its config keeps the wide critic.')


def _toy_critic(results) -> str:
    r = results["cases"].get("toy", {}).get("rows", {}).get("dual_sobolev")
    sweep = results.get("critic_sweep") or []
    if not r or not r.get("gflop_ratio"):
        return "Not measured."
    out = [f"dual_sobolev on the toy: {r['time_ratio']:.2f}x L2 time for {r['gflop_ratio']:.2f}x the FLOPs with a critic of "
           f"{100 * r['critic_share']:.0f}% of the score MLP's parameters. In an MLP the FLOPs of a pass are proportional "
           "to the parameters and the critic makes ~6 passes (forward, inner VJP, backward of both) against the score "
           "model's 3, so its FLOP share is about twice its parameter share. Smaller critics "
           "(`l2+dual_sobolev`, `benchmarks.run.critic_sweep`, interleaved with L2 as above):", "",
           "| batch | critic | critic / model params | FLOP / L2 | ATen ops per step (L2) | time / L2 |",
           "| --- | --- | --- | --- | --- | --- |"]
    for c in sweep:
        out.append(f"| {c['batch']} | {c['critic']} | {100 * c['share']:.0f}% | {c['flop_ratio']:.2f}x | "
                   f"{c.get('ops', '-')} ({c.get('l2_ops', '-')}) | {c['time_ratio']:.2f}x |")
    if sweep:
        small = min(sweep, key=lambda c: c["share"])
        same = [c["time_ratio"] for c in sweep if c["share"] == small["share"]]
        out += ["", f"A critic of {100 * small['share']:.0f}% of the parameters ({small['flop_ratio']:.2f}x the FLOPs) "
                f"costs {min(same):.2f}-{max(same):.2f}x: at these sizes the critic path's cost is per operator (and per "
                f"allocation), not per FLOP: it dispatches {small.get('ops', 0) - small.get('l2_ops', 0)} ATen operators "
                f"per step on top of L2's {small.get('l2_ops', '-')} (`benchmarks.measure.op_count`), whatever its width."]
    floor = results.get("critic_floor")
    out += ["", "Since 2026-12-04 the scalar `TimeMLP` critic's `grad_x psi` is one autograd node "
            "(`double_backward.silu_mlp_input_gradient`, taken by `Critic.forward` for exactly that backbone without "
            "hooks, autocast or conditioning): its backward is the adjoint of the forward and of the gradient pass "
            "written out, mostly in place, without the unused input gradient, the zero-weighted value term or SiLU's "
            "composite second derivative (tests/test_fast_paths.py: the general route's loss and every gradient to "
            "1e-12 in float64). Operators per dual_sobolev step 335 -> 275 (L2: 155); time 2.05x -> 1.81x L2 unpinned, "
            "2.49x -> 1.87x pinned (300 interleaved rounds each, measured while writing it)."]
    if floor:
        out += ["", f"What 1.3x would need: if the critic path were its {floor['products']} matrix products and nothing "
                f"else, the step would cost **{floor['floor']:.2f}x** L2 (`benchmarks.run.critic_matmul_floor`: the "
                "products a dual_sobolev step makes beyond L2's, recorded with their arguments and replayed interleaved "
                f"with both steps, {floor['rounds']} rounds; the step itself {floor['time_ratio']:.2f}x in the same "
                "rounds). The critic's products at width 59 (forward, gradient pass and their adjoints: half of L2's "
                "FLOPs) run at a fraction of the score MLP's throughput, so with a critic of a quarter of the "
                "parameters the 1.3x target is below the arithmetic floor of the 2-D MLP; a 2-6% critic (the sweep "
                "above) is the only route there, and it costs `dual_sobolev` alone quality "
                "(`configs/ablations/toy_critic.yaml`, below). The UNet's conv critic has 9-21% of the parameters but "
                "1.5-3% of the FLOPs (stride-2 convolutions) and costs 1.02-1.07x."]
    return "\n".join(out)


def markdown(results, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks: cost of each objective relative to L2",
        "",
        f"Generated by `{command}` on {now} in {results['seconds']:.0f} s "
        f"(`python benchmarks/run.py --quick` prints the timing tables and a JSON line in under a minute).",
        "",
        f"- Machine: {_cpu()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; no GPU used.",
        f"- Versions: {_versions()}.",
        f"- Threads: `torch.set_num_threads({results['threads']})` for every measurement. Every timing runs first, with "
        "glibc's allocator as a training run has it; only then is its mmap threshold pinned for the memory columns "
        f"(pinned: {results['malloc_pinned']}). Until 2026-12-04 the timings ran pinned too, which made every "
        "allocation above 64 KiB an mmap with fresh page faults (57 us instead of 5 us for a [512, 59] float32 tensor) "
        "and inflated the ratios of the steps that allocate more (the toy critic objectives 2.46x pinned against 2.05x "
        "unpinned).",
        "- Time: every objective's step (forward + backward + AdamW step with the driver's fused optimizer, fixed batch) runs interleaved with the others "
        "in one process, the order rotated each round; `time / L2` is the median over rounds of the step time divided "
        "by the L2 step time of the same round (drift of a shared machine cancels); `median ms` is absolute and only "
        "indicative on a shared CPU.",
        "- Memory: `saved MB` sums the distinct storages autograd saves for backward during the forward (a "
        "`saved_tensors_hooks` pack hook; parameters excluded): the activations the step's graph holds, independent "
        "of allocator caching and of other processes. `peak MB` is the resident-memory high-water mark during one "
        "warm step above its level just before (`/proc/self/clear_refs` reset, glibc pinned so freed tensors are "
        "unmapped), so it includes transient backward buffers. tracemalloc is not used: it does not see torch's "
        "allocator.",
        "- FLOPs: convolution/matmul/attention FLOPs of the whole step (forward, inner `autograd.grad`, backward) from "
        "`torch.utils.flop_counter`'s formulas; `time/L2 over FLOP/L2` > 1 is overhead beyond the arithmetic.",
        "",
    ]
    for name, case in results["cases"].items():
        out += [f"## {name}", "", case_table(case), ""]
    out += ["## Targets", "", targets_table(results), "",
            "## What limits the energy route", "", _limits(results), "",
            "- The energy objective differentiates `-grad_x E` once more: forward (F) + input-only VJP (~F) + backward "
            "of both graphs (~2F + ~2F) against F + 2F for L2, so the FLOP ratio is ~2.0x by construction: on the UNets, "
            "whose time is the convolutions', the 2.0x time target sits exactly at the arithmetic floor and any "
            "overhead misses it. The toy MLP meets it because its fused node does less arithmetic than the general "
            "route (the `toy` line above: no input gradient of the first layer in the outer backward) at about L2's "
            "time per FLOP; with a ratio near 1.0 between the two, its margin is small.",
            "- The rest is the double-backward formulas of GroupNorm and SiLU (many elementwise kernels over "
            "activation-sized tensors; writing GroupNorm's out as one node did not make it faster, \"Fast paths "
            "tried\"), the attention's second derivative (written out, its probabilities recomputed) and memory "
            "traffic: the `other` time grows much faster than the convolution time (profile above).",
            "- Memory: the inner `autograd.grad(create_graph=True)` graph holds every layer's cotangent and the inputs of "
            "the second-order formulas next to the forward activations; checkpointing cannot drop them because the "
            "inner VJP runs inside `forward` and re-holds what is recomputed. Saved bytes by autograd node (unet16, "
            "distinct storages, walking the graph of one step): with stock `nn.SiLU` the energy step held 122.5 MB in "
            "`MulBackward0` and 24.1 MB in `SigmoidBackward0` (SiLU's derivative recorded as elementwise products under "
            "`create_graph`) next to L2's 80.4 MB (convolution 27.4, GroupNorm 24.9, SiLU 24.2); `CompactSiLU` keeps one "
            "cotangent per SiLU instead. What remains above L2: the cotangents (SiLU derivative inputs, 22.4 MB in "
            "`ConvolutionBackwardBackward0`), the math-kernel attention's `bmm`/`softmax` inputs (14.7 MB) and "
            "GroupNorm's own composite double backward (26.1 MB of products of its normalised input). Peak memory adds "
            "the transients of the outer backward on top of what is saved. At 32x32 they set the peak, and "
            "`python benchmarks/peak_attribution.py --case unet32 --whole-attention` (every live tensor at the peak, by "
            "the operator that made it) names them: of the whole-attention energy step's 1280 MB peak (in the outer "
            "backward; L2's: 318 MB, in the forward), 659 MB were made by the backward, 576 MB of it tensors of the "
            "mid-block attention's score shape [32, 8, 256, 256] (five `mul`, two `sub`, an `add` and "
            "`_softmax_backward_data`: the math kernel's second-order softmax and product formulas). `EnergyScore` and "
            "`Critic` now call the attention on slices of the batch with at most 4 MiB of scores each "
            "(`double_backward.math_attention(chunk_bytes)`, exact: tests/test_attention_chunks.py): the unet32 peak "
            "fell from 4.1x to 2.6x L2's (the `energy[whole attention]` row beside `energy`) and the peak is now the "
            "saved graph itself (818 MB saved, 840 MB at the peak); finer slices (one sample) did not "
            "lower it further, since the engine interleaves the slices' backward nodes. At 16x16 the attention's scores "
            "are 32x smaller and are not sliced. Since 2026-12-06 an unmasked attention call (diffusers' default) does "
            "not reach the math kernel at all: `double_backward.twice_differentiable_attention` saves only `q, k, v` "
            "and the cotangent, and recomputes the probabilities on slices in its written-out second derivative (the "
            "`energy[math attention]` rows keep the sliced math-kernel route for comparison). What is left above L2 is "
            "saved memory: GroupNorm's and SiLU's inputs for the second-order formulas and the convolutions' cotangents.",
            "",
            "## Fast paths tried (exact routes only)", "", TRIED, "",
            "## What limits the critic objectives on the toy MLP", "", _toy_critic(results), "", CRITIC_CAPACITY, "",
            "The gradient-projected objectives with a critic (`dual_sobolev`, `l2+dual_sobolev`) are cheap by design: "
            "the score model sees an ordinary backward (its residual is dotted with a detached-in-theta `grad psi`) and "
            "only the critic pays a double backward; a critic with few FLOPs (strided convolutions, here "
            "`benchmarks.setups.ConvCritic`) keeps the overhead small even at a sizeable share of the parameters.",
            ""]
    drivers = results.get("driver")
    out += ["## Training driver overhead", ""]
    if not drivers:
        out += ["Not measured: `gradscore_train.loop` does not exist.", ""]
    else:
        out += ["`gradscore_train.loop.Trainer.train()` (end-of-run evaluation and checkpoint writing replaced by no-ops; the "
                "Trainer is built before the clock starts) against two bare PyTorch loops with the same model, "
                "objective, batch and optimizer (`benchmarks/driver_overhead.py`): **recipe** does the same training "
                "recipe written plainly (a fresh batch from the data source, `zero_grad`, `loss.backward()`, "
                "`clip_grad_norm_`, the same fused AdamW, an EMA of the weights with `torch._foreach_lerp_`), "
                "**minimal** only `zero_grad / backward / step` on batches drawn beforehand (less work than the "
                "driver: no data drawing, clipping or EMA). Driver and loops alternate; overhead = median of the "
                "per-repeat ratios - 1. The target is read against the recipe loop: the driver's own machinery "
                "(accelerate, per-micro-batch seeding, the non-finite guard, warm-up, logging) at the same arithmetic.", "",
                "| config | batch | steps x repeats | driver ms/step | recipe ms/step | minimal ms/step | overhead vs recipe | vs minimal |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in drivers:
            out.append(f"| {d['config']} | {d['batch']} | {d['steps']} x {d['repeats']} | {d['driver_ms']:.2f} | "
                       f"{d['recipe_ms']:.2f} | {d['minimal_ms']:.2f} | {100 * d['overhead']:.1f}% | "
                       f"{100 * d['overhead_minimal']:.1f}% |")
        out += ["",
                "What was removed from the driver's step (toy l2, 1 thread, measured block by block while changing it; "
                "tests/test_train_step.py checks every replacement against the plain computation): the per-micro-batch "
                "`torch.manual_seed` (it also queues a lazy CUDA seeding with a captured stack trace: 1.4 ms of a 6 ms "
                "step) became a CPU-generator seed; numpy's `SeedSequence` for the micro-batch seed (50 us) became "
                "SplitMix64 in Python (2 us); the per-parameter EMA loop became one `torch._foreach_lerp_`; AdamW became "
                "the fused kernel (0.06 ms instead of 0.23 ms for the toy MLP, driver and benchmarks alike); accelerate's "
                "`optimizer.step()` and `clip_grad_norm_` wrappers, which without a loss scaler, FSDP, DeepSpeed or XLA only "
                "forward to torch after an uncached `importlib` lookup and version checks (~0.1 ms a step, accelerate "
                "1.15), are bypassed in exactly that case; the `accumulate()` context is entered only with gradient "
                "accumulation; the non-finite guard reads two scalars instead of building and reducing a tensor on one "
                "process. Before these changes the same measurement gave 2.40 ms/step for the driver against 1.63 ms for the "
                "minimal loop (49%). What remains is a few small "
                "tensor operations per step (seeding, the loss accumulator, the guard) and Python bookkeeping, fixed "
                "per step: on the digits UNet the same code is within noise of the bare loop.", ""]
    q = results.get("quality")
    out += ["## gradient_error against a sample-based metric, at equal ranking ability", ""]
    if q is None:
        out += ["Not measured: `gradscore.diagnostics` does not exist.", ""]
    else:
        from .quality_cost import SIZES, STEPS, TIMES

        out += [f"Five scores of the ring8 mixture, `s_c = grad log p_t + c u` (a gradient error, "
                f"`||Pi_G e||^2 = c^2`), c in {list(SIZES)}. A budget ranks when all seeds order the five scores "
                f"exactly; seconds = median wall time of one ranking (five evaluations). gradient_error at "
                f"t = {list(TIMES)}; energy distance of reverse-SDE samples ({STEPS} steps) to held-out data.", "",
                "| metric | budget | seeds ranking exactly | seconds per ranking |", "| --- | --- | --- | --- |"]
        for r in q:
            out.append(f"| {r['metric']} | {r['budget']} | {r['ranks']} | {r['seconds']:.2f} |")
        out += ["", "On this 2-D toy sampling is cheap (a closed-form score), so the energy distance is not at a "
                "disadvantage; gradient_error's cost is mostly fixed (feature Gram eigendecompositions, jackknife), "
                "and it needs no sampler, which is what makes it cheap where sampling is expensive (a UNet, many "
                "steps). It also answers a different question: it sees only the observable part of the error at one t.",
                ""]
    out += [DUAL_SOBOLEV_STABILITY]
    if results.get("driver_step"):
        from .driver_step import table
        out += ["**What a run pays per step** (`python benchmarks/driver_step.py`, part of this run: the training "
                "driver's whole optimizer step of each toy config, critic-only steps included, interleaved; ratio to "
                "`configs/toy/l2.yaml`'s step in the same round, median of the rounds):", "",
                table(results["driver_step"]), ""]
    out += [LIKELIHOOD_COST, DIAGNOSTICS_COST, STDERR_CALIBRATION, BF16]
    return "\n".join(out)
