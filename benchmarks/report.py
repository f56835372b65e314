"""`sdaot bench`, the reporting half: a run's measurements as JSON, a Markdown table with the machine named,
and a chart; nothing here times anything."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import psutil
import torch


def end_to_end(results: list[Any], components: list[str], steps: int) -> dict[str, float | None]:
    """Seconds per image per backend: text encoders + steps x UNet + VAE decoder (from the medians)."""
    totals: dict[str, float | None] = {}
    for backend in {m.backend for m in results}:
        times = {m.component: m.median_s for m in results if m.backend == backend}
        if any(times.get(c) is None for c in components):
            totals[backend] = None
            continue
        totals[backend] = round(sum(steps * t if c == "unet" else t for c, t in times.items()), 3)
    return totals


def machine_line() -> str:
    """CPU model, core count, relevant ISA flags and library versions, for the results' header."""
    import tvm

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                   cpu)
        present = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present)
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {psutil.cpu_count(logical=True)} threads, {flags}; torch {torch.__version__}, "
            f"TVM {tvm.__version__}")


def write_outputs(report: dict, out_dir: Path) -> None:
    """bench-<model>-<resolution>.json/.md/.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report['model']}-{report['weights']}-{report['resolution']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(report))
    chart(report, out_dir / f"{stem}.png")


def markdown(report: dict) -> str:
    """The results table: ratio to the fastest backend first, then absolute numbers."""
    lines = [f"### {report['model']} ({report['weights']} weights) at {report['resolution']}", "",
             f"Machine: {report['machine']}. Matmul peak {report['matmul_peak_gflops']} GFLOP/s. "
             f"Warm-up {report['warmup']}, {report['repeat']} timed runs, median.", "",
             f"tvm target: {report['target']} ({report.get('cpu_profile') or 'not a CPU'}). Peers' ISA limits: "
             + (", ".join(f"{k}={v}" for k, v in report.get("isa_limits", {}).items()) or "none") + ".", "",
             "| component | backend | precision | × fastest | median s | min–max s | GFLOP/s | % peak | setup s | "
             "tuned kernel sum s | rel. err. vs torch | RSS after MB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        def fmt(v, spec):
            return "–" if v is None else format(v, spec)
        spread = "–" if r["min_s"] is None else f"{r['min_s']:.4f}–{r['max_s']:.4f}"
        backend = r["backend"] + (f" ({r['conv_algorithm']} conv, weights transformed "
                                  f"{r.get('weight_transforms') or 'per-call'})" if r.get("conv_algorithm") else "")
        lines.append(f"| {r['component']} | {backend} | {r.get('precision') or '–'} | "
                     f"{fmt(r['ratio_to_fastest'], '.2f')} | "
                     f"{fmt(r['median_s'], '.4f')} | {spread} | {fmt(r['gflops_per_s'], '.1f')} | "
                     f"{fmt(r['percent_of_peak'], '.0f')} | {fmt(r['setup_s'], '.1f')} | "
                     f"{fmt(r.get('kernel_sum_s'), '.4f')} | {fmt(r.get('rel_err_vs_torch'), '.1e')} | "
                     f"{fmt(r.get('rss_after_mb'), '.0f')} | {' '.join(r['status'].split())} |")
    lines += ["", f"End-to-end seconds per image ({report['steps']} steps, from the medians): " + ", ".join(
        f"{b}: {t if t is not None else '–'}" for b, t in sorted(report["end_to_end_s_per_image"].items())), ""]
    quality = report.get("quality")
    if quality:
        verdict = "passes" if quality["passed"] else "FAILS"
        lines += [f"Quality gate ({quality['steps']} steps, seed {quality['seed']}): the image with the compiled "
                  f"artifacts ({', '.join(f'{c}: {b}' for c, b in quality['auto_backends'].items())}) is "
                  f"{quality['psnr_db']} dB PSNR from torch's; {verdict} the {quality['gate_db']} dB gate "
                  f"({quality['auto_seconds']} s against torch's {quality['torch_seconds']} s).", ""]
    for r in report["results"]:
        if r.get("profile"):
            total = r["profile_total_s"]
            lines += [f"Slowest functions of one {r['backend']} {r['component']} call "
                      f"({total:.4f} s in all functions):", "",
                      "| function | calls | seconds | share |", "|---|---|---|---|"]
            lines += [f"| {row['function']} | {row['calls']} | {row['seconds']:.4f} | "
                      f"{100 * row['seconds'] / total:.0f} % |" for row in r["profile"]]
            lines.append("")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    """A grouped bar chart of median seconds per component and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in report["results"] if r["median_s"]]
    components = list(dict.fromkeys(r["component"] for r in done))
    backends = list(dict.fromkeys(r["backend"] for r in done))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        values = [next((r["median_s"] for r in done if r["component"] == c and r["backend"] == backend), 0)
                  for c in components]
        ax.bar([x + i * width for x in range(len(components))], values, width, label=backend)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(components))], components)
    ax.set_ylabel("median seconds per call (log)")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']} {report['weights']} {report['resolution']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
