#!/usr/bin/env bash
# One-call GPU check for sslam_kernels (run from the repository root on the lent GPU):
#   bash benchmarks/device_check.sh
# Stages (each reported, none aborts the others; under 8 minutes: stage timeouts
# 80 + 70 + 90 + 180 + 45 = 465 s, plus the versions and the install):
#   0. nvidia-smi -L, torch / triton versions; install the repo (no deps, no network)
#   1. pytest tests -m gpu -x -q            (every GPU-marked test of the project)
#   2. the kernel and swap-in tests on CUDA (compiled Triton, not the interpreter; timm here)
#   3. kernel benchmarks at real sizes, fast path and reference in the same run
#   4. end-to-end pretraining step (ViT-B, 12 clips), stage 1 and 2, fast vs original execution in
#      the same run: clips/s, MFU, peak memory, the largest batch that fits, the trainer's step
#   5. torch.profiler table of the top 25 kernels of the fast stage-2 step
# SSLAM_CHECK=compiled bash benchmarks/device_check.sh (a second call, up to 7 minutes): only the
# fast steps with train.compile's whole-step graph, into bench_model_compiled.json.
# Writes to $OUT (default ./device_check_out; at most 8 files come back from the device tool):
# logs.txt (every stage's log), bench_kernels.json (pytest-benchmark), bench_model.json,
# kernels_summary.json (every kernel figure), step_profile.txt (stage 5),
# step_<date>_<gpu>.json (one record per stage and execution: device, date, commit, stage,
# execution, clips_per_s, mfu, step_ms, peak_mem_gb, batch, max_batch; copy it to
# benchmarks/results/), and prints a short table last.
set -u
OUT="${OUT:-$PWD/device_check_out}"
LOGS=/tmp/device_check_logs
mkdir -p "$OUT" "$LOGS"
STATUS=()

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "=== $name ==="
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$LOGS/$name.log"
    STATUS+=("$name: rc=$rc in $((SECONDS - start)) s")
}

{
    nvidia-smi -L
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__); print(torch.cuda.get_device_name())"
    python -c "import timm; print('timm', timm.__version__)" 2>&1 | tail -n 1
} 2>&1 | tee "$LOGS/versions.log"

pip install --no-build-isolation --no-deps -q -e . > "$LOGS/install.log" 2>&1
if ! python -c "import sslam_kernels, sslam_fast" >> "$LOGS/install.log" 2>&1; then
    # no network there: fall back to exposing the package directories by name
    mkdir -p /tmp/sslam_pkgs
    ln -sfn "$PWD/kernels/sslam_kernels" /tmp/sslam_pkgs/sslam_kernels
    ln -sfn "$PWD/sslam_fast" /tmp/sslam_pkgs/sslam_fast
    export PYTHONPATH="/tmp/sslam_pkgs${PYTHONPATH:+:$PYTHONPATH}"
    echo "the editable install does not import (see install.log); using PYTHONPATH=$PYTHONPATH"
fi
python -c "import sslam_kernels; print('sslam_kernels from', sslam_kernels.__file__)"

if [ "${SSLAM_CHECK:-}" = compiled ]; then
    # the second call: stage 1 and 2 fast steps with train.compile's whole-step graph (minutes of
    # compiling), the same figures as the model_bench stage, in bench_model_compiled.json
    stage model_bench_compiled 420 env SSLAM_BENCH_COMPILE=1 SSLAM_BENCH_JSON="$OUT/bench_model_compiled.json" \
        python -m pytest benchmarks/bench_model.py -k "test_pretraining_step and fast" -q -rs -p no:cacheprovider \
        --benchmark-columns=median,rounds
    printf '%s\n' "${STATUS[@]}" > "$LOGS/stages.log"
    for f in "$LOGS"/*.log; do echo "=== $f"; cat "$f"; done > "$OUT/logs.txt"
    cat "$OUT/bench_model_compiled.json" 2>/dev/null
    exit 0
fi

stage gpu_tests 80 python -m pytest tests -m gpu -x -q -p no:cacheprovider
stage kernel_tests 70 python -m pytest tests/test_kernels_ema.py tests/test_kernels_masking.py \
    tests/test_kernels_gather.py tests/test_kernels_targets.py tests/test_kernels_losses.py \
    tests/test_kernels_norm_act.py tests/test_monkey_patch.py -q -p no:cacheprovider
stage kernel_bench 90 python -m pytest benchmarks/bench_kernels.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_kernels.json" --benchmark-columns=median,iqr,rounds
stage model_bench 180 env SSLAM_BENCH_JSON="$OUT/bench_model.json" python -m pytest benchmarks/bench_model.py \
    -q -rs -p no:cacheprovider --benchmark-columns=median,rounds
stage step_profile 45 python benchmarks/bench_model.py --profile "$OUT/step_profile.txt"

printf '%s\n' "${STATUS[@]}" > "$LOGS/stages.log"
for f in "$LOGS"/*.log; do echo "=== $f"; cat "$f"; done > "$OUT/logs.txt"
OUT="$OUT" python - <<'EOF'
import json, os
out = os.environ["OUT"]
path = os.path.join(out, "bench_kernels.json")
summary = {"stages": open("/tmp/device_check_logs/stages.log").read().splitlines(), "entries": [], "ratios": {}}
try:
    bench = json.load(open(path))
except (OSError, ValueError) as e:
    bench = {"benchmarks": []}
    summary["error"] = f"no benchmark json: {e}"
ms = {}
for b in bench["benchmarks"]:
    info = b.get("extra_info", {})
    key = (info.get("op"), info.get("provider"), info.get("student_dtype"))
    ms[key] = info.get("device_ms")
    summary["entries"].append({"name": b["name"], **info,
                               "host_median_ms_per_call": b["stats"]["median"] * 1e3 / info.get("inner", 1)})
    summary["device"] = info.get("device")

def ratio(name, slow, fast):
    if ms.get(slow) and ms.get(fast):
        summary["ratios"][name] = ms[slow] / ms[fast]

copy_gbs = next((e["gb_per_s"] for e in summary["entries"] if e.get("op") == "copy"), None)
summary["copy_gb_per_s"] = copy_gbs
for dt in ("fp32", "bf16"):
    t = ("ema", "triton", dt)
    ratio(f"ema_{dt}: loop / triton (goal >= 5)", ("ema", "loop", dt), t)
    ratio(f"ema_{dt}: foreach_lerp / triton (goal >= 1.5)", ("ema", "foreach_lerp", dt), t)
    ratio(f"ema_{dt}: foreach mul+add / triton", ("ema", "foreach", dt), t)
    e = next((e for e in summary["entries"] if e.get("op") == "ema" and e.get("provider") == "triton"
              and e.get("student_dtype") == dt), None)
    if e and copy_gbs:
        summary["ratios"][f"ema_{dt}: triton GB/s / copy GB/s (goal >= 0.8)"] = e["gb_per_s"] / copy_gbs
for op in ("mask+gather", "gather fwd+bwd", "decoder scatter", "layer target", "add+layernorm", "bias+gelu",
           "norm+gelu+residual"):
    ratio(f"{op}: torch / triton" + (" (goal >= 3)" if op == "mask+gather" else ""), (op, "torch", None), (op, "triton", None))
json.dump(summary, open(os.path.join(out, "kernels_summary.json"), "w"), indent=1)

print("\n".join(summary["stages"]))
print(f"\ndevice: {summary.get('device')}   copy bandwidth: {copy_gbs and round(copy_gbs)} GB/s")
print(f"{'op':<18}{'provider':<14}{'dtype':<7}{'device ms':>11}{'GB/s':>9}")
for e in summary["entries"]:
    gbs = e.get("gb_per_s")
    print(f"{e.get('op', ''):<18}{e.get('provider') or '':<14}{e.get('student_dtype') or '':<7}"
          f"{e['device_ms']:>11.4f}{'' if gbs is None else f'{gbs:9.0f}'}")
for k, v in summary["ratios"].items():
    print(f"{k:<52}{v:8.2f}")
EOF
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" OUT="$OUT" python - <<'EOF'
import datetime, json, os, re
out = os.environ["OUT"]
try:
    model = json.load(open(os.path.join(out, "bench_model.json")))
except (OSError, ValueError) as e:
    model = {}
    print(f"no end-to-end figures: {e}")
records = []
for key, v in model.items():
    if isinstance(v, dict) and "clips_per_s" in v:
        print(f"{key:<32}{v['clips_per_s']:10.1f} clips/s  MFU {v.get('mfu', 0):.3f}  step {v['step_s_median'] * 1e3:.1f} ms"
              f"  peak {v.get('peak_mem_gb', 0):.1f} GB  max batch {v.get('max_batch', '-')}")
        m = re.fullmatch(r"stage(\d)_(fast|original)", key)
        if m:
            records.append({"device": v["device"], "date": datetime.date.today().isoformat(),
                            "commit": os.environ["COMMIT"], "stage": int(m.group(1)), "execution": m.group(2),
                            "clips_per_s": v["clips_per_s"], "mfu": v.get("mfu"), "step_ms": v["step_s_median"] * 1e3,
                            "peak_mem_gb": v.get("peak_mem_gb"), "batch": v["batch"], "max_batch": v.get("max_batch")})
    elif not isinstance(v, dict):
        print(f"{key:<32}{v:10.2f}")
if records:
    gpu = re.sub(r"[^a-z0-9]+", "-", records[0]["device"].lower()).strip("-")
    path = os.path.join(out, f"step_{records[0]['date']}_{gpu}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {path}")
EOF
