"""Print the Markdown tables of RESULTS.md from the JSON results (no hand-copied numbers).

python benchmarks/tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def speed(path: Path):
    data = json.loads(path.read_text())
    info = data["info"]
    print(f"\n#### `{info['command']}`\n")
    print(f"{info.get('gpu', info['device'])}, backend {info['backend']}, torch {info.get('torch', '-')}, "
          f"TensorLy {info['tensorly']}, NumPy {info['numpy']}, {info['machine']}; baseline threads "
          f"{info.get('process_threads')}, ours {info.get('solver_threads') or 'their default policy (1 thread; on PyTorch, untouched since the *_s15 files)'}\n")
    print("| layer | dtype | solver | time (s) | [min-max] | sweeps | rel. sigma-error | peak MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        ratio = ""
        if "ratio_vs_tensorly" in r:
            ratio = f"{r['ratio_vs_tensorly']:.2f}x TensorLy"
        if "speedup_vs_reference" in r:
            ratio += f", reference/ours >= {r['speedup_vs_reference']:.1f}x"
        if r["method"].startswith("reference"):
            ratio = f"stopped: {r.get('reason')}"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "n/a"
        spread = f"[{r['seconds_min']:.3f}-{r['seconds_max']:.3f}] ({len(r['seconds_all'])} runs)" if "seconds_all" in r else "1 run"
        print(f"| {r['shape']} | {r['dtype']} | {r['method']} | {r['seconds']:.3f} | {spread} | {r['sweeps']} | "
              f"{r['sigma_error']:.4f} | {peak} | {ratio} |")


def is_headline(row: dict, info: dict, eval_images: int) -> bool:
    """Whether a sweep row belongs in the merged per-model table and plot.

    Option studies (rows run with extra ``compress_sequential`` options such as ``damping``,
    ``target_damping`` or ``budget_weighting``, or with ``--calib-flips``) and runs on another test split would overwrite the headline
    cells of the same (ratio, method, variant): RESULTS.md reports them in prose.
    """
    extra = set(row.get("sequential_options") or {}) - {"refit"}
    # Mirrored calibration images (--calib-flips) are an input study too.
    return not extra and not row.get("calib_flips") and info.get("eval_images") == eval_images


def accuracy(paths: list[Path]):
    """One table per model, merging its sweeps (e.g. one-shot and sequential runs)."""
    loaded = [json.loads(p.read_text()) for p in paths]
    eval_images = loaded[0]["info"]["eval_images"]
    rows = [r for d in loaded for r in d["rows"] if is_headline(r, d["info"], eval_images)]
    infos = [d["info"] for d in loaded if any(is_headline(r, d["info"], eval_images) for r in d["rows"])]
    info = infos[0]
    print(f"\n#### {info['model']}\n")
    for other in infos:
        print(f"* `{other['command']}` ({other['threads']} thread(s), torch {other['torch']}, {other['machine']})")
    print(f"\nOriginal accuracy {info['original_accuracy']:.4f} on {info['eval_images']} test images; "
          f"fine-tuning: one epoch over {info['finetune_images']} images ({info['finetune_source']}). "
          "Budget variants: the kept fraction they reached in parentheses.\n")
    table = defaultdict(dict)
    for r in rows:
        # Refit runs differ by what they refit: every dense layer (cross-validated ridge) or named ones.
        variant = r["variant"] + ("-all" if r.get("refit") == ["all"] else "")
        table[(r["ratio"], r["method"])][variant] = r
    columns = [
        ("Frobenius", "frobenius", "accuracy"), ("Frobenius + bias", "frobenius+bias", "accuracy"),
        ("Frobenius, 1 epoch FT", "frobenius", "accuracy_finetuned"), ("sigma", "sigma", "accuracy"),
        ("sigma, 1 epoch FT", "sigma", "accuracy_finetuned"), ("sigma (budget)", "sigma-budget", "accuracy"),
        ("**sequential**", "sequential", "accuracy"), ("**sequential (budget)**", "sequential-budget", "accuracy"),
        ("sequential + refit of the classifier (ridge 1e-6)", "sequential+refit", "accuracy"),
        ("**sequential + refit of every dense layer (cross-validated ridge)**", "sequential+refit-all", "accuracy"),
        ("**sequential (budget) + refit of every dense layer**", "sequential-budget+refit-all", "accuracy"),
    ]
    present = [c for c in columns if any(c[1] in v and c[2] in v[c[1]] for v in table.values())]
    print("| kept (target) | method | conv params | " + " | ".join(c[0] for c in present) + " |")
    print("|---|---|---|" + "---|" * len(present))
    for (ratio, method), v in sorted(table.items(), key=lambda kv: (kv[0][1] != "tucker2", -kv[0][0])):
        base = next((v[k] for k in ("sigma", "frobenius", "sequential") if k in v), next(iter(v.values())))
        kept = base["conv_params"] / base["conv_params_dense"]

        def cell(name, key):
            if name not in v or key not in v[name]:
                return "-"
            r = v[name]
            text = f"{r[key]:.4f}"
            if "-budget" in name:
                text += f" ({r['conv_params'] / r['conv_params_dense']:.1%})"
            return text

        print(f"| {kept:.3f} ({ratio}) | {method} | {base['conv_params']} | "
              + " | ".join(cell(c[1], c[2]) for c in present) + " |")


def transfer(path: Path):
    data = json.loads(path.read_text())
    print(f"\n#### `{data['info']['command']}`\n")
    print("| covariance from | kept (target) | method | variant | accuracy |")
    print("|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['source']} | {r['ratio']} | {r['method']} | {r['variant']} | {r['accuracy']:.4f} |")


def calibration(path: Path):
    data = json.loads(path.read_text())
    print(f"\n#### `{data['info']['command']}`\n")
    print("| calibration images | kept (target) | method | variant | accuracy |")
    print("|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['calibration_images']} | {r['ratio']} | {r['method']} | {r.get('variant', 'sigma')} | {r['accuracy']:.4f} |")


def sequential_speed(path: Path):
    data = json.loads(path.read_text())
    info = data["info"]
    print(f"\n#### `{info['command']}`\n")
    print(f"{info['method']} at ratio {info['ratio']}, {info['calib']} calibration images, n_iter_max "
          f"{info['n_iter_max']}, {info['threads']} thread(s), torch {info['torch']}, {info['machine']} "
          f"({info['cpus']} cores, shared).\n")
    print("| model | layers | one-shot (s), median | sequential (s), median | ratio of medians | paired ratios |")
    print("|---|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['model']} | {r['layers']} | {r['median']['one_shot']:.1f} | {r['median']['sequential']:.1f} | "
              f"{r['ratio_sequential_to_one_shot']:.2f}x | {', '.join(f'{x:.2f}' for x in r['paired_ratios'])} |")


def latency(path: Path):
    """Whole-model latency per model, thread count and batch (``benchmarks/latency.py``)."""
    data = json.loads(path.read_text())
    print(f"\n#### `{data['command']}`\n")
    print(f"torch {data['torch']}, {data['platform']}, {data['cpu_count']} cores; medians of interleaved runs "
          "[inter-quartile range]; speed-ups are ratios of medians.\n")
    for name, res in data["models"].items():
        info = res["info"]
        for setting in res["settings"]:
            whole = setting["whole_model"]
            load = setting.get("loadavg")
            print(f"\n{name}, {setting['threads']} thread(s), batch {setting['batch']}"
                  + (f" (load average {load[0]:.1f} when timed)" if load else "") + ":\n")
            print("| model | accuracy | params | latency (ms) | vs original | vs original optimized |")
            print("|---|---|---|---|---|---|")
            for key, s in whole.items():
                base = key.replace(" as compressed", "").replace(" optimized", "")
                i = info.get(base, info["original"])
                fair = s.get("speedup_vs_original_optimized")
                print(f"| {key} | {i['accuracy']:.4f} | {i['params']} | {s['median_ms']:.2f} [{s['q1_ms']:.2f}, "
                      f"{s['q3_ms']:.2f}] | {s['speedup_vs_original']:.2f}x | "
                      + (f"{fair:.2f}x |" if fair is not None else "- |"))
        if res.get("onnx_rel_diff"):
            worst = max(v for d in res["onnx_rel_diff"].values() for v in d.values() if v is not None)
            print(f"\nONNX Runtime against PyTorch, {name}, every model (chain and optimized): "
                  f"max relative difference {worst:.1e}.")


def speed_summary(paths: list[Path]):
    """One line per (backend, dtype, shape, thread setting): our time / TensorLy's, medians."""
    print("\n| backend | dtype | layer | threads (TensorLy) | Tucker-2: ours / `partial_tucker` | CP: ours / `parafac` | file |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        data = json.loads(path.read_text())
        info = data["info"]
        threads = "1" if all(v == 1 for v in info["process_threads"].values()) else "default"
        cells = defaultdict(dict)
        for r in data["rows"]:
            cells[(r["dtype"], r["shape"])][r["method"]] = r
        for (dtype, shape), rows in cells.items():
            out = []
            for ours, base in (("tucker2_sigma", "tensorly partial_tucker"), ("parafac_sigma", "tensorly parafac")):
                if ours in rows and base in rows:
                    a, b = rows[ours], rows[base]
                    out.append(f"{a['seconds']:.3f} s / {b['seconds']:.3f} s = **{a['ratio_vs_tensorly']:.2f}x**")
                else:
                    out.append("not run")
            print(f"| {info['backend']} | {dtype} | {shape} | {threads} | {out[0]} | {out[1]} | `results/{path.name}` |")


def speed_before_after(start: Path, end: Path, rev: str):
    """Our time and ratio at a session's start (``start``, run from a worktree of ``rev``)
    and at its end (``end``, the same command), with TensorLy's time in each run."""
    print(f"\n{start.name} (at `{rev}`) -> {end.name}\n")
    print("| backend | dtype | layer | solver | ours: start -> end | TensorLy in the same run: start / end "
          "| ratio: start -> end | rel. sigma-error: start / end |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [json.loads(path.read_text()) for path in (start, end)]
    first, last = ({(r["dtype"], r["shape"], r["method"]): r for r in run["rows"]} for run in runs)
    for (dtype, shape, method), a in first.items():
        base = {"tucker2_sigma": "tensorly partial_tucker", "parafac_sigma": "tensorly parafac"}.get(method)
        if base is None or (dtype, shape, method) not in last:
            continue
        b, ta, tb = last[(dtype, shape, method)], first[(dtype, shape, base)], last[(dtype, shape, base)]
        name = "Tucker-2" if method == "tucker2_sigma" else "CP"
        print(f"| {runs[0]['info']['backend']} | {dtype} | {shape} | {name} | {a['seconds']:.3f} s -> {b['seconds']:.3f} s "
              f"| {ta['seconds']:.3f} s / {tb['seconds']:.3f} s | {a['ratio_vs_tensorly']:.2f}x -> "
              f"**{b['ratio_vs_tensorly']:.2f}x** | {a['sigma_error']:.5f} / {b['sigma_error']:.5f} |")


def replicates(path: Path):
    """Paired replicates of fit weightings (``fisher_replicates.py``): one row per
    calibration set, each weighting's accuracy on both test sets, and the paired differences."""
    data = json.loads(path.read_text())
    info, rows = data["info"], data["rows"]
    weightings = list(dict.fromkeys(r["fit_weighting"] for r in rows))
    print(f"\n#### `{info['command']}`\n")
    print(f"Original: {info['original']['embedded']:.4f} (embedded 2000), {info['original']['heldout']:.4f} "
          f"(held-out 8000); {info['threads']} thread(s), torch {info['torch']}.\n")
    print("| budget | method | calibration images | "
          + " | ".join(f"`{w}`: embedded / held-out" for w in weightings)
          + (f" | `{weightings[1]}` - `{weightings[0]}`: embedded / held-out |" if len(weightings) == 2 else " |"))
    print("|---|---|---|" + "---|" * (len(weightings) + (len(weightings) == 2)))
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["budget"], r["method"], r["offset"])][r["fit_weighting"]] = r
    diffs = defaultdict(list)
    for (budget, method, offset), by in cells.items():
        line = f"| {budget:g} | {method} | {offset}-{offset + 499} | " + " | ".join(
            f"{by[w]['embedded']:.4f} / {by[w]['heldout']:.4f}" if w in by else "-" for w in weightings)
        if len(weightings) == 2 and all(w in by for w in weightings):
            d = [by[weightings[1]][k] - by[weightings[0]][k] for k in ("embedded", "heldout")]
            diffs[(budget, method)].append(d)
            line += f" | {100 * d[0]:+.2f} / {100 * d[1]:+.2f} point"
        print(line + " |")
    for (budget, method), d in diffs.items():
        mean = [100 * sum(x[i] for x in d) / len(d) for i in range(2)]
        print(f"\nMean paired difference, {method} at {budget:g}: {mean[0]:+.2f} (embedded) / {mean[1]:+.2f} "
              f"(held-out) point over {len(d)} calibration sets.")


def main():
    fresh = [p for p in sorted(RESULTS.glob("speed_cpu_*.json"))
             if any("seconds_all" in r for r in json.loads(p.read_text())["rows"])]
    if fresh:
        speed_summary(fresh)
    for start in sorted(RESULTS.glob("speed_cpu_*_at_*.json")):
        rev = start.name.split("_at_")[1].split("_")[0]
        end = start.with_name(start.name.replace(f"_at_{rev}", ""))
        if end.is_file():
            speed_before_after(start, end, rev)
    for path in sorted(RESULTS.glob("speed_*.json")):
        speed(path)
    by_model = defaultdict(list)
    for path in sorted(RESULTS.glob("accuracy_*.json")):
        by_model[json.loads(path.read_text())["info"]["model"]].append(path)
    for paths in by_model.values():
        accuracy(paths)
    for kind, fn in (("kfac_*.json", replicates), ("transfer_*.json", transfer), ("calibration_*.json", calibration),
                     ("sequential_speed*.json", sequential_speed), ("latency*.json", latency)):
        for path in sorted(RESULTS.glob(kind)):
            fn(path)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0]).parse_args()  # --help
    main()
