#!/usr/bin/env bash
# Checks optax_guard on a GPU machine in under 8.5 minutes of wall time.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh [--dry-run]
#
# Run from the repository root (the package need not be installed: PYTHONPATH
# is set to the checkout). It needs python3 with jax (CUDA), optax, flax, chex,
# hypothesis, pytest and scikit-learn, and no network. In order, each piece
# under its own `timeout`, clipped to what is left of the budget:
#
#   1. nvidia-smi -L, the versions and jax's devices;
#   2. python3 -m benchmarks on the GPT-2-small tree (float32, fewer rounds than
#      the documented run, StableAdamW, SPAM and AdaGC included; bfloat16 with the
#      clip only), on the wide tree and on a tree of 500 small leaves (the clip,
#      the fused spike guard and both inside optax.flatten);
#   3. python3 -m experiments --quick, timed;
#   4. pytest over every test file and the doctests (one pytest per file with
#      its own timeout, -m "not slow", a few files at a time, JAX_PLATFORMS=cuda),
#      with python3 -m benchmarks.false_skips --quick on the CPU alongside;
#   5. optionally (GPU_CHECK_WHOLE_STEP=1) the whole-step transformer benchmark.
#
# Files written to $OUT (9, each as soon as its piece ends; a run cut short
# keeps what it wrote): gpu_check.log (everything printed), timings.tsv (piece,
# status, seconds, timeout), bench-gpt2.md, bench-wide.md, bench-many.md,
# experiments-summary.md, false_skips.log, pytest.log (per-file results and
# totals) and results.tar.gz (the JSON results, junit XML and per-file logs).
#
# --dry-run checks the script's own logic on a CPU in about two minutes: the
# same pieces on the CPU at toy sizes (one test file, `experiments --help`).
#
# Environment: OUT (default: a new folder under /tmp), GPU_CHECK_BUDGET
# (seconds for all pieces, default 490), GPU_CHECK_JOBS (test files run at
# once, default 4), GPU_CHECK_FILE_TIMEOUT (seconds per test file, default
# 180), GPU_CHECK_TESTS (test paths instead of every tests/test_*.py and
# optax_guard), GPU_CHECK_WHOLE_STEP=1, PYTHON (default python3).

set -u -o pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ ! -f benchmarks/gpu_check.sh || ! -d optax_guard ]]; then
  echo "gpu_check.sh: run it from the repository root" >&2
  exit 2
fi

OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$WORK/pytest" "$WORK/junit" "$WORK/bench" "$WORK/logs"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-490}
JOBS=${GPU_CHECK_JOBS:-4}
FILE_TIMEOUT=${GPU_CHECK_FILE_TIMEOUT:-180}
START=$SECONDS
DEADLINE=$((START + BUDGET))

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis"  # nothing left in the checkout
if ((DRY)); then
  PLATFORM=cpu
else
  PLATFORM=cuda
fi

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
printf 'piece\tstatus\tseconds\ttimeout_s\n' > "$OUT/timings.tsv"

log() { echo "[gpu_check $((SECONDS - START))s] $*"; }

# piece NAME MAX_S MIN_S CMD...: runs CMD under timeout min(MAX_S, time left),
# or skips it when less than MIN_S is left; its output goes to the console and
# $WORK/logs/NAME.log; sets PIECE_RC.
piece() {
  local name=$1 max=$2 min=$3
  shift 3
  local left=$((DEADLINE - SECONDS))
  local limit=$((left < max ? left : max))
  if ((limit < min)); then
    log "== $name: SKIPPED, ${left}s of the budget left (needs ${min}s)"
    printf '%s\tskipped\t0\t%s\n' "$name" "$max" >> "$OUT/timings.tsv"
    PIECE_RC=125
    return
  fi
  log "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  PIECE_RC=$?
  local status=ok
  if ((PIECE_RC == 124 || PIECE_RC == 137)); then
    status=timeout
  elif ((PIECE_RC != 0)); then
    status="failed(rc=$PIECE_RC)"
  fi
  log "== $name: $status after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >> "$OUT/timings.tsv"
}

# ---------------------------------------------------------------------------
# 1. Machine and versions

log "optax_guard GPU check$( ((DRY)) && echo ' (dry run: CPU, toy sizes)'); OUT=$OUT; budget ${BUDGET}s"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  log "nvidia-smi not found"
fi
piece versions 60 5 env JAX_PLATFORMS=$PLATFORM "$PY" -c '
import sys, platform
print("python", platform.python_version(), platform.platform())
import jax, jaxlib, optax
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "optax", optax.__version__)
for name in ("flax", "chex", "hypothesis", "pytest", "xdist", "sklearn", "numpy"):
  try:
    m = __import__(name)
    print(name, getattr(m, "__version__", "?"))
  except Exception as e:
    print(name, "MISSING", type(e).__name__, e)
import optax_guard
print("optax_guard", optax_guard.__version__, "from", optax_guard.__file__)
print("backend", jax.default_backend(), "devices", jax.devices())
'
if ((PIECE_RC != 0)); then
  log "WARNING: python3 could not start jax on $PLATFORM; the pieces below will likely fail"
fi

# ---------------------------------------------------------------------------
# 2. Benchmarks (alone on the machine: they time)

bench_md() {  # copy a benchmark's Markdown to $OUT under a short name
  if [[ -f "$WORK/bench/$1.md" ]]; then cp "$WORK/bench/$1.md" "$OUT/$2"; fi
}

if ((DRY)); then
  GPT2_ARGS=(--tree uniform:4 --scale 0.01 --rounds 1 --warmup 0 --only 'og.clip_by_global_norm')
  BF16_ARGS=(--tree uniform:2 --scale 0.01 --rounds 1 --warmup 0 --only 'og.clip_by_global_norm')
  WIDE_ARGS=(--tree wide --leaf-size 16 --rounds 1 --warmup 0)
  MANY_ARGS=(--tree many --leaves 8 --rounds 1 --warmup 0 --only 'og.clip_by_global_norm,flat:*')
else
  GPT2_ARGS=(--tree gpt2 --rounds 7 --warmup 2 --steps 5)
  BF16_ARGS=(--tree gpt2 --rounds 7 --warmup 2 --steps 5 --only 'og.clip_by_global_norm')
  WIDE_ARGS=(--tree wide --rounds 7 --warmup 2 --steps 10)
  # 500 leaves, not 2,000: each of the 2,000-leaf steps takes about a minute to compile
  MANY_ARGS=(--tree many --leaves 500 --rounds 9 --warmup 2 --steps 5
             --only 'og.clip_by_global_norm,og.skip_on_spike:fused,flat:*')
fi
piece bench-gpt2 90 30 env JAX_PLATFORMS=$PLATFORM "$PY" -m benchmarks "${GPT2_ARGS[@]}" \
  --no-compile --out "$WORK/bench" --name gpt2-float32
bench_md gpt2-float32 bench-gpt2.md
piece bench-gpt2-bf16 45 20 env JAX_PLATFORMS=$PLATFORM "$PY" -m benchmarks "${BF16_ARGS[@]}" \
  --dtype bfloat16 --no-compile --out "$WORK/bench" --name gpt2-bfloat16
piece bench-wide 100 40 env JAX_PLATFORMS=$PLATFORM "$PY" -m benchmarks "${WIDE_ARGS[@]}" \
  --no-compile --out "$WORK/bench" --name wide-float32
bench_md wide-float32 bench-wide.md
piece bench-many 90 30 env JAX_PLATFORMS=$PLATFORM "$PY" -m benchmarks "${MANY_ARGS[@]}" \
  --no-compile --out "$WORK/bench" --name many-float32
bench_md many-float32 bench-many.md

# ---------------------------------------------------------------------------
# 3. Experiments, quick profile (timed: the wall time is in timings.tsv)

if ((DRY)); then
  piece experiments 30 10 env JAX_PLATFORMS=$PLATFORM "$PY" -m experiments --help
else
  piece experiments 110 60 env JAX_PLATFORMS=$PLATFORM "$PY" -m experiments --quick \
    --out "$WORK/experiments"
fi
if [[ -f "$WORK/experiments/summary.md" ]]; then
  cp "$WORK/experiments/summary.md" "$OUT/experiments-summary.md"
fi

# ---------------------------------------------------------------------------
# 4. Tests on the GPU, with the false-skip benchmark on the CPU alongside

if ((DRY)); then
  FS_ARGS=(--steps 150 --only warm-up --json "$WORK/logs/false_skips.json")
else
  FS_ARGS=(--quick --json "$WORK/logs/false_skips.json")
fi
FS_PID=
if "$PY" -c 'import benchmarks.false_skips' 2> /dev/null; then
  log "== false_skips (CPU, in the background): benchmarks.false_skips ${FS_ARGS[*]}"
  (
    t0=$SECONDS
    left=$((DEADLINE - SECONDS))
    limit=$((left < 150 ? left : 150))
    JAX_PLATFORMS=cpu timeout -k 10 "$limit" "$PY" -m benchmarks.false_skips "${FS_ARGS[@]}" \
      > "$OUT/false_skips.log" 2>&1
    rc=$?
    status=ok
    if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status="failed(rc=$rc)"; fi
    printf 'false_skips\t%s\t%s\t%s\n' "$status" "$((SECONDS - t0))" "$limit" >> "$OUT/timings.tsv"
    echo "[gpu_check] == false_skips: $status after $((SECONDS - t0))s"
  ) &
  FS_PID=$!
else
  log "== false_skips: benchmarks.false_skips not found, skipped"
fi

if [[ -n "${GPU_CHECK_TESTS:-}" ]]; then
  read -r -a TESTS <<< "$GPU_CHECK_TESTS"
elif ((DRY)); then
  TESTS=(tests/test_benchmarks.py)
else
  # the core files first, then the others, then the doctests
  FIRST=(clipping numerics adaptive guards apply feedback penalties schedules monitor contract
         checkpoint readme distributed)
  TESTS=()
  for f in "${FIRST[@]}"; do
    if [[ -f "tests/test_$f.py" ]]; then TESTS+=("tests/test_$f.py"); fi
  done
  for f in tests/test_*.py; do
    [[ " ${TESTS[*]} " == *" $f "* ]] || TESTS+=("$f")
  done
  TESTS+=(optax_guard)
fi
PYTEST_K=()
if ((DRY)); then PYTEST_K=(-k "trees or fault_codes"); fi

test_one() {  # test_one PATH LIMIT: one pytest, its log, junit and rc
  local path=$1 limit=$2 name
  name=$(basename "${path%.py}")
  local t0=$SECONDS
  JAX_PLATFORMS=$PLATFORM XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$limit" \
    "$PY" -m pytest -q -p no:cacheprovider -n 0 -m "not slow" "${PYTEST_K[@]}" \
    --junitxml="$WORK/junit/$name.xml" "$path" > "$WORK/pytest/$name.log" 2>&1
  local rc=$?
  local secs=$((SECONDS - t0))
  local last
  last=$(grep -E '(passed|failed|error|no tests ran|skipped|deselected)' "$WORK/pytest/$name.log" \
         | tail -n 1)
  if ((rc == 124 || rc == 137)); then last="TIMEOUT after ${limit}s; $last"; fi
  printf '%s\t%s\t%s\t%s\n' "$path" "$rc" "$secs" "$last" > "$WORK/pytest/$name.rc"
  echo "[gpu_check] pytest $path: rc=$rc ${secs}s $last"
}

log "== pytest: ${#TESTS[@]} paths, $JOBS at a time, at most ${FILE_TIMEOUT}s each, JAX_PLATFORMS=$PLATFORM"
PIDS=()
PT0=$SECONDS
for path in "${TESTS[@]}"; do
  while true; do
    alive=()
    for p in "${PIDS[@]}"; do
      if kill -0 "$p" 2> /dev/null; then alive+=("$p"); fi
    done
    PIDS=("${alive[@]}")
    ((${#PIDS[@]} < JOBS)) && break
    sleep 1
  done
  left=$((DEADLINE - SECONDS))
  if ((left < 20)); then
    log "pytest $path: SKIPPED, ${left}s of the budget left"
    printf '%s\tskipped\t0\tnot run: budget spent\n' "$path" \
      > "$WORK/pytest/$(basename "${path%.py}").rc"
    continue
  fi
  test_one "$path" $((left < FILE_TIMEOUT ? left : FILE_TIMEOUT)) &
  PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p"; done
printf 'pytest\tdone\t%s\t%s\n' "$((SECONDS - PT0))" "$FILE_TIMEOUT" >> "$OUT/timings.tsv"

{
  echo "# pytest per file (JAX_PLATFORMS=$PLATFORM, -m 'not slow', timeout ${FILE_TIMEOUT}s each)"
  echo
  printf 'path\trc\tseconds\tresult\n'
  for path in "${TESTS[@]}"; do
    f="$WORK/pytest/$(basename "${path%.py}").rc"
    if [[ -f $f ]]; then cat "$f"; else printf '%s\t?\t?\tno result\n' "$path"; fi
  done
  echo
  "$PY" - "$WORK/junit" <<'EOF'
import pathlib, sys, xml.etree.ElementTree as ET
tot = dict(tests=0, failures=0, errors=0, skipped=0)
bad = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
  try:
    root = ET.parse(f).getroot()
  except ET.ParseError:
    print(f"{f.name}: unreadable junit XML")
    continue
  for suite in root.iter("testsuite"):
    for k in tot:
      tot[k] += int(suite.get(k, 0))
  for case in root.iter("testcase"):
    for kind in ("failure", "error"):
      el = case.find(kind)
      if el is not None:
        msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
        bad.append(f"{kind.upper()} {case.get('classname')}::{case.get('name')}: {msg}")
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"TOTAL (files that finished): {passed} passed, {tot['failures']} failed, "
      f"{tot['errors']} errors, {tot['skipped']} skipped")
print("\n".join(bad))
EOF
  for path in "${TESTS[@]}"; do
    f="$WORK/pytest/$(basename "${path%.py}").log"
    if [[ -f $f ]]; then
      echo
      echo "======== $path"
      tail -n 60 "$f"
    fi
  done
} > "$OUT/pytest.log" 2>&1
grep -E '^TOTAL' "$OUT/pytest.log" || true

if [[ -n $FS_PID ]]; then wait "$FS_PID"; fi

# ---------------------------------------------------------------------------
# 5. Optional: the whole training step

if [[ ${GPU_CHECK_WHOLE_STEP:-0} == 1 ]]; then
  if ((DRY)); then
    WS_ARGS=(--width 16 --layers 1 --heads 2 --seq 8 --vocab 32 --batch 2 --rounds 1)
  else
    WS_ARGS=(--rounds 7 --steps 5)
  fi
  piece whole-step 240 90 env JAX_PLATFORMS=$PLATFORM "$PY" -m benchmarks.guard_in_step \
    --model transformer "${WS_ARGS[@]}"
fi

# ---------------------------------------------------------------------------
# Pack the rest

tar -czf "$OUT/results.tar.gz" -C "$WORK" \
  --exclude='*.png' --exclude='hypothesis' bench junit pytest logs \
  $( [[ -d "$WORK/experiments" ]] && echo experiments ) 2> /dev/null || log "tar failed"
log "done in $((SECONDS - START))s; files in $OUT:"
ls -la "$OUT"
cat "$OUT/timings.tsv"
rm -rf "$WORK"
