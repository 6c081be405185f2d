"""Suite runner: ``python -m experiments [--quick] [--out DIR] [--only NAME ...] ...``.

Runs the experiments, writes ``<name>.json``, ``<name>.csv`` and ``<name>.png``
per experiment plus ``summary.md`` under ``--out`` and prints the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time

from experiments import EXPERIMENTS  # noqa: I001  (sets XLA_FLAGS before JAX starts)

DESCRIPTION = """\
Reproduce exploding gradients on small synthetic problems and show each
optax_guard defence preventing it (or not: the table reports what happens).

  adding_problem      Pascanu et al. 2013's adding problem, tanh RNN, SGD, T=50/100,
                      3 learning rates: no clipping vs clip_by_global_norm,
                      clip_by_value, zclip (with and without max_norm), autoclip,
                      and clipping + reduce_on_plateau fed the loss as value=;
                      test error on 10,000 fresh sequences (predicting the mean:
                      36% wrong).
  deep_mlp            32-layer ReLU MLP with a too-large initialisation: NaN at
                      step 2 without defences; clipping, AGC, skip_nonfinite,
                      He/Xavier init, BatchNorm, L2 penalty, warmup + decay schedules.
  transformer_spikes  small Flax NNX transformer LM, Adam at a high learning rate
                      with warmup + inverse-sqrt decay, rare corrupted batches:
                      loss spikes; global clipping, ZClip, AutoClip, skip_on_spike;
                      guard_stats logged every step.
  data_parallel       the guarded training step under jax.pmap (pmean-ed gradients)
                      and jit + NamedSharding over all local devices, asserted to
                      match the single-device run.

Defaults finish in about 4 minutes on a 2-core CPU; --quick in under 2.
Scale up with --steps / --seeds (and the Config classes in each module).
"""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments", description=DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smaller runs (about 2 minutes on 2 CPU cores)")
  p.add_argument("--out", default=os.path.join("experiments", "results"), metavar="DIR",
                 help="output folder (default: %(default)s)")
  p.add_argument("--only", nargs="+", choices=EXPERIMENTS, metavar="NAME",
                 help=f"run only these experiments ({', '.join(EXPERIMENTS)})")
  p.add_argument("--steps", type=int, metavar="N",
                 help="training steps per run, for every experiment (overrides the defaults)")
  p.add_argument("--seeds", type=int, metavar="N",
                 help="random seeds per setting (overrides the defaults)")
  p.add_argument("--guards", nargs="+", metavar="NAME",
                 help="run only these defences (the no-defence baseline 'none' always "
                      "runs; extra ones listed by --list can be named too; data_parallel "
                      "always runs its one guarded optimizer)")
  p.add_argument("--list", action="store_true",
                 help="list the experiments and their defences, then exit")
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def _config(module, args):
  config = module.Config.quick() if args.quick else module.Config()
  fields = {f.name for f in dataclasses.fields(config)}
  changes = {}
  if args.steps is not None and "steps" in fields:
    changes["steps"] = args.steps
  if args.seeds is not None and "seeds" in fields:
    changes["seeds"] = args.seeds
  return dataclasses.replace(config, **changes)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  names = args.only or list(EXPERIMENTS)
  modules = {n: importlib.import_module(f"experiments.{n}") for n in names}
  if args.list:
    for n, m in modules.items():
      default = list(m.Config().defences)
      extra = [d for d in getattr(m, "DEFENCES", {}) if d not in default]
      print(f"{n}: {', '.join(default)}" + (f" (extra: {', '.join(extra)})" if extra else ""))
    return 0
  if args.steps is not None and args.steps < 1 or args.seeds is not None and args.seeds < 1:
    print("--steps and --seeds must be >= 1", file=sys.stderr)
    return 2

  import jax

  from experiments import _common as C

  devices = jax.devices()
  print(f"JAX {jax.__version__} on {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}); results in {args.out}", flush=True)
  results = []
  t0 = time.perf_counter()
  for n, m in modules.items():
    config = _config(m, args)
    print(f"[{n}] running ...", flush=True)
    res = m.run(config, guards=args.guards, progress=False if args.no_progress else None)
    files = C.save(res, args.out, plot=not args.no_plots)
    print(f"[{n}] {res.wall_s:.1f}s; wrote {', '.join(os.path.basename(f) for f in files)}",
          flush=True)
    for note in res.notes:
      print(f"[{n}] note: {note}", flush=True)
    for k, v in res.checks.items():
      print(f"[{n}] check: {k} = {v}", flush=True)
    results.append(res)
  total = time.perf_counter() - t0

  table = C.summary_table(results)
  print()
  print(table)
  print(f"\ntotal wall time {total:.1f}s")
  command = " ".join(["python -m experiments", *(argv if argv is not None else sys.argv[1:])])
  md = [
      "# Experiment summary",
      "",
      f"`{command}` on {len(devices)} x {devices[0].device_kind}, {total:.0f} s in all.",
      "",
      *(f"- `{res.name}`: {res.title}" for res in results),
      "",
      "final loss: training loss over the last 5% of steps, mean over seeds (nan if any seed "
      "diverged to NaN); diverged: seeds whose loss became non-finite or ended 10x above its "
      "start; skipped: steps skipped by a guard (mean over seeds); wall s: per row, "
      "compilation included (rows trained together under one vmap share its time).",
      "",
      C.summary_table(results, markdown=True),
      "",
  ]
  for res in results:
    for note in res.notes:
      md.append(f"- {res.name}: {note}")
    for k, v in res.checks.items():
      md.append(f"- {res.name} check: `{k}` = {v}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(md).rstrip() + "\n")
  print(f"wrote {os.path.join(args.out, 'summary.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
