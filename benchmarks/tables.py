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
          f"TensorLy {info['tensorly']}, NumPy {info['numpy']}, {info['machine']}\n")
    print("| layer | dtype | solver | time (s) | sweeps | rel. sigma-error | peak MiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        ratio = ""
        if "ratio_vs_tensorly" in r:
            ratio = f"{r['ratio_vs_tensorly']:.2f}x TensorLy"
        if "speedup_vs_reference" in r:
            ratio += f", reference/ours >= {r['speedup_vs_reference']:.1f}x"
        if r["method"].startswith("reference"):
            ratio = f"stopped: {r.get('reason')}"
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "n/a"
        print(f"| {r['shape']} | {r['dtype']} | {r['method']} | {r['seconds']:.3f} | {r['sweeps']} | "
              f"{r['sigma_error']:.4f} | {peak} | {ratio} |")


def accuracy(path: Path):
    data = json.loads(path.read_text())
    info = data["info"]
    print(f"\n#### `{info['command']}`\n")
    print(f"Original accuracy {info['original_accuracy']:.4f} on {info['eval_images']} test images; "
          f"fine-tuning: one epoch over {info['finetune_images']} images ({info['finetune_source']}); "
          f"torch {info['torch']}, {info['threads']} thread(s), {info['machine']}.\n")
    table = defaultdict(dict)
    for r in data["rows"]:
        table[(r["ratio"], r["method"])][r["variant"]] = r
    print("| kept (target) | method | conv params | sigma | Frobenius | Frobenius + bias | sigma, 1 epoch FT | Frobenius, 1 epoch FT |")
    print("|---|---|---|---|---|---|---|---|")
    for (ratio, method), v in table.items():
        any_row = next(iter(v.values()))
        kept = any_row["conv_params"] / any_row["conv_params_dense"]

        def acc(name, key="accuracy"):
            return f"{v[name][key]:.4f}" if name in v and key in v[name] else "-"

        print(f"| {kept:.3f} ({ratio}) | {method} | {any_row['conv_params']} | {acc('sigma')} | {acc('frobenius')} | "
              f"{acc('frobenius+bias')} | {acc('sigma', 'accuracy_finetuned')} | {acc('frobenius', 'accuracy_finetuned')} |")


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
    print("| calibration images | kept (target) | method | accuracy |")
    print("|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['calibration_images']} | {r['ratio']} | {r['method']} | {r['accuracy']:.4f} |")


def main():
    for kind, fn in (("speed_*.json", speed), ("accuracy_*.json", accuracy), ("transfer_*.json", transfer),
                     ("calibration_*.json", calibration)):
        for path in sorted(RESULTS.glob(kind)):
            fn(path)


if __name__ == "__main__":
    main()
