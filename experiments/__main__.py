"""Suite runner: ``python -m experiments [--quick | --full] [--out DIR] [--only NAME ...] ...``.

Runs the experiments and writes, per experiment, ``<name>.json``,
``<name>.csv`` and ``<name>.png``, plus ``summary.md``, ``summary.json`` and
``run.json`` (command, versions, wall and CPU time, load average) into a new
folder ``runs/<timestamp>/`` (git ignores ``runs/``), and prints the summary
table. Nothing tracked by git is written unless ``--update-docs`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shutil
import sys
import time
import traceback

from experiments import EXPERIMENTS  # noqa: I001  (sets XLA_FLAGS before JAX starts)

DESCRIPTION = """\
Drive small models into exploding gradients, naturally and on real data, and
show which optax_guard defences let them learn (or not: the table reports
what happens).

  adding_problem        Pascanu et al. 2013: tanh RNN (spectral radius 1.2), plain
                        SGD at lr 0.1 on the adding problem, T=30: unclipped SGD
                        reaches NaN, clip_by_global_norm solves the task (test error
                        on 10,000 fresh sequences; predicting the mean: 36% wrong);
                        clip_by_value, zclip, autoclip compared.
  transformer_lr_sweep  Wortsman et al. 2023: learning-rate sweep of a small Flax NNX
                        transformer LM without qk-layernorm (a natural instability:
                        attention-logit growth); final loss vs lr for no defence,
                        global clipping, ZClip, AutoClip, skip_on_spike, QK-clip,
                        a longer warm-up, learning rates per tensor (embeddings
                        at the peak rate), and qk-layernorm as the architectural
                        reference.
  deep_mlp              real data (scikit-learn's bundled digits): a 32-layer ReLU MLP
                        with a too-large init is NaN at step 2; clipping, AGC, warm-up,
                        He init, BatchNorm...; test accuracy.
  transformer_injected  INJECTED faults: corrupted batches spike a transformer LM's loss
                        (global clipping, ZClip, AutoClip bound them), x1e4 gradients that
                        clipping cannot repair (skip_on_spike skips them).
  transformer_localized_spike
                        INJECTED x1e3 gradient spikes in one embedding row: global
                        clipping shrinks every other tensor's update, AdaGC and SPAM
                        cut the spike alone, skip_on_spike drops the step.
  float16_loss_scale    float16 computation with float32 master weights: a loss averaged
                        over 65,536 outputs gives gradients that underflow float16 and
                        training stalls; dynamic_loss_scale (PyTorch GradScaler's rule)
                        trains to the float16 rounding floor.
  data_parallel         the guarded step under jax.pmap and jit + NamedSharding over
                        every device (and every process with --coordinator), asserted
                        to match one device.

The default run takes under 5 minutes on 2 idle CPU cores (about 360 s of CPU
time), --quick under 2 (about 115 s); --full goes further (the adding problem at
T=50 and 100; about 25 minutes of CPU time).
Output goes to a new folder runs/<timestamp>/ unless --out is given.
"""

PROFILES = ("quick", "default", "full")
DOCS_FIGURES = os.path.join("docs", "_static", "experiments")
DOCS_PAGE = os.path.join("docs", "experiments.md")
MARK_START = "<!-- results: start (written by python -m experiments --update-docs) -->"
MARK_END = "<!-- results: end -->"
# What the page says under the run's header about the tables in its sections.
DOCS_LEGEND = (
    "Each experiment's section shows its table from this run. Unless a table says "
    "otherwise: a value is the mean over seeds, with the smallest and largest seed in "
    "brackets; *diverged*: seeds whose loss became non-finite or ended 10x above its start; "
    "*skipped steps*: steps a guard skipped, mean per seed; *final training loss*: the mean "
    "over the last 5% of steps, NaN if a seed diverged. The run's `summary.md` and "
    "`summary.json` hold every row in one table, with wall times.")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments", description=DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true",
                    help="smaller runs (under 2 minutes on 2 CPU cores)")
  size.add_argument("--full", action="store_true",
                    help="longer runs toward the papers' settings (about 25 minutes of CPU time)")
  p.add_argument("--out", metavar="DIR",
                 help="output folder (default: a new runs/<timestamp>/)")
  p.add_argument("--only", nargs="+", choices=EXPERIMENTS, metavar="NAME",
                 help=f"run only these experiments ({', '.join(EXPERIMENTS)})")
  p.add_argument("--steps", type=int, metavar="N",
                 help="training steps per run, for every experiment (overrides the profile)")
  p.add_argument("--seeds", type=int, metavar="N",
                 help="random seeds per setting (overrides the profile)")
  p.add_argument("--guards", nargs="+", metavar="NAME",
                 help="run only these defences (the no-defence baseline 'none' always "
                      "runs; extra ones listed by --list can be named too; data_parallel "
                      "always runs its one guarded optimizer)")
  p.add_argument("--jobs", type=int, metavar="N",
                 help="independent trainings run at once (default: CPU cores, at most 4); "
                      "results do not depend on it")
  p.add_argument("--list", action="store_true",
                 help="list the experiments and their defences, then exit")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--no-progress", action="store_true", help="no progress output")
  p.add_argument("--update-docs", action="store_true",
                 help=f"also copy the figures to {DOCS_FIGURES}/ and the summary table into "
                      f"{DOCS_PAGE} (tracked files: for regenerating the documentation)")
  multi = p.add_argument_group(
      "multi-process (multi-host) runs", "start one command per process, with the same "
      "--coordinator and --num-processes and its own --process-id; jax.distributed is "
      "initialised before anything else touches JAX")
  multi.add_argument("--coordinator", metavar="HOST:PORT",
                     help="address of process 0's coordination service")
  multi.add_argument("--num-processes", type=int, metavar="N")
  multi.add_argument("--process-id", type=int, metavar="I")
  return p


def _config(module, args):
  if args.quick:
    config = module.Config.quick()
  elif args.full:
    config = module.Config.full()
  else:
    config = module.Config()
  fields = {f.name for f in dataclasses.fields(config)}
  changes = {}
  if args.steps is not None and "steps" in fields:
    changes["steps"] = args.steps
  if args.seeds is not None and "seeds" in fields:
    changes["seeds"] = args.seeds
  return dataclasses.replace(config, **changes)


def _default_out() -> str:
  base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
  out, k = base, 1
  while os.path.exists(out):
    out, k = f"{base}-{k}", k + 1
  return out


def _initialize_distributed(args) -> None:
  """``jax.distributed.initialize`` (gloo collectives on CPU) before JAX is used."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id)


def _check_args(args) -> str | None:
  if args.steps is not None and args.steps < 1 or args.seeds is not None and args.seeds < 1:
    return "--steps and --seeds must be >= 1"
  if args.jobs is not None and args.jobs < 1:
    return "--jobs must be >= 1"
  multi = (args.coordinator, args.num_processes, args.process_id)
  if any(m is not None for m in multi) and not all(m is not None for m in multi):
    return "--coordinator, --num-processes and --process-id go together"
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    return "--process-id must be in [0, --num-processes)"
  return None


def marks(name: str) -> tuple[str, str]:
  """The comments around experiment ``name``'s own table in the documentation page."""
  return (f"<!-- results: {name} (written by python -m experiments --update-docs) -->",
          f"<!-- results: {name} end -->")


def _between(text: str, start: str, end: str, body: str) -> str | None:
  """``text`` with what lies between ``start`` and ``end`` replaced by ``body``."""
  if start not in text or end not in text:
    return None
  before, rest = text.split(start, 1)
  _, after = rest.split(end, 1)
  return f"{before}{start}\n{body}\n{end}{after}"


def update_docs(results, table_md: str, header: str, root: str = ".") -> list[str]:
  """Copies the figures into the docs and rewrites the marked tables in the page.

  ``header`` and ``table_md`` go between :data:`MARK_START` and :data:`MARK_END`;
  each experiment's own table (:func:`experiments._common.docs_table`) between
  its :func:`marks`, in the page's section about it.
  """
  from experiments import _common as C

  written = []
  figures = os.path.join(root, DOCS_FIGURES)
  os.makedirs(figures, exist_ok=True)
  for res in results:
    for f in res.files:
      if f.endswith(".png"):
        dst = os.path.join(figures, os.path.basename(f))
        shutil.copyfile(f, dst)
        written.append(dst)
  page = os.path.join(root, DOCS_PAGE)
  if os.path.exists(page):
    with open(page) as f:
      text = f.read()
    new = _between(text, MARK_START, MARK_END, f"{header}\n\n{table_md}") or text
    for res in results:
      new = _between(new, *marks(res.name), f"\n{C.docs_table(res)}\n") or new
    if new != text:
      with open(page, "w") as f:
        f.write(new)
      written.append(page)
  return written


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  error = _check_args(args)
  if error:
    print(error, file=sys.stderr)
    return 2
  names = args.only or list(EXPERIMENTS)
  if args.list:
    for n in names:
      m = importlib.import_module(f"experiments.{n}")
      default = list(m.Config().defences)
      extra = [d for d in getattr(m, "DEFENCES", {}) if d not in default]
      print(f"{n}: {', '.join(default)}" + (f" (extra: {', '.join(extra)})" if extra else ""))
    return 0

  if args.coordinator:
    _initialize_distributed(args)  # before anything else touches JAX
  import jax

  from experiments import _common as C

  modules = {n: importlib.import_module(f"experiments.{n}") for n in names}
  if args.jobs is not None:
    C.JOBS = args.jobs
  out = args.out or _default_out()
  if jax.process_count() > 1:
    out = os.path.join(out, f"process-{jax.process_index()}")
  profile = "quick" if args.quick else "full" if args.full else "default"
  devices = jax.devices()
  print(f"JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}, {jax.process_count()} process(es)); profile {profile}; "
        f"{C.JOBS} job(s); results in {out}", flush=True)
  results = []
  load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
  t0, c0 = time.perf_counter(), time.process_time()
  failed = []
  for n, m in modules.items():
    config = _config(m, args)
    print(f"[{n}] running ...", flush=True)
    c1 = time.process_time()
    try:
      res = m.run(config, guards=args.guards, progress=False if args.no_progress else None)
    except Exception:  # report it, run the other experiments, exit non-zero at the end
      traceback.print_exc()
      print(f"[{n}] FAILED (traceback above)", flush=True)
      failed.append(n)
      continue
    files = C.save(res, out, plot=not args.no_plots)
    print(f"[{n}] {res.wall_s:.1f}s wall, {time.process_time() - c1:.1f}s CPU; wrote "
          f"{', '.join(os.path.basename(f) for f in files)}", flush=True)
    for note in res.notes:
      print(f"[{n}] note: {note}", flush=True)
    for k, v in res.checks.items():
      print(f"[{n}] check: {k} = {v}", flush=True)
    results.append(res)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

  print()
  print(C.summary_table(results))
  print(f"\ntotal {wall:.1f}s wall, {cpu:.1f}s CPU (all threads)")
  if failed:
    print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
  command = " ".join(["python -m experiments", *(argv if argv is not None else sys.argv[1:])])
  header = (f"`{command}` ({profile} profile) on {len(devices)} x {devices[0].device_kind}, "
            f"{jax.process_count()} process(es), {C.JOBS} job(s): {wall:.0f} s wall, "
            f"{cpu:.0f} s CPU.")
  md = [
      "# Experiment summary",
      "",
      header,
      "",
      *(f"- `{res.name}` ({res.data}): {res.title}" for res in results),
      "",
      "final loss: training loss over the last 5% of steps, mean over seeds (min-max over "
      "seeds in brackets; nan if any seed diverged to NaN); diverged: seeds whose loss became "
      "non-finite or ended 10x above its start; skipped: steps skipped by a guard (mean over "
      "seeds); metric: mean over seeds (min-max); wall s: per row, compilation included "
      "(rows trained together under one vmap share its time). Settings that say INJECTED "
      "corrupt data on purpose; all others are natural runs.",
      "",
      C.summary_table(results, markdown=True),
      "",
  ]
  for n in failed:
    md.append(f"- {n}: FAILED (see the run's output)")
  for res in results:
    for note in res.notes:
      md.append(f"- {res.name}: {note}")
    for k, v in res.checks.items():
      md.append(f"- {res.name} check: `{k}` = {v}")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md).rstrip() + "\n")
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(C.summary_records(results), f, indent=1)
  info = {
      "command": command, "profile": profile, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
      "load_average_start": load0, "load_average_end": load1, "jobs": C.JOBS,
      "jax": jax.__version__, "python": platform.python_version(),
      "machine": platform.machine(), "processor": platform.processor(),
      "cpu_count": os.cpu_count(), "devices": f"{len(devices)} x {devices[0].device_kind}",
      "process_count": jax.process_count(), "process_index": jax.process_index(),
      "experiments": {res.name: round(res.wall_s, 2) for res in results},
      "failed": failed,
  }
  with open(os.path.join(out, "run.json"), "w") as f:
    json.dump(info, f, indent=1)
  print(f"wrote {os.path.join(out, 'summary.md')}, summary.json, run.json")
  if args.update_docs:
    written = update_docs(results, DOCS_LEGEND, header)
    print(f"updated the docs: {', '.join(written) or 'nothing'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
