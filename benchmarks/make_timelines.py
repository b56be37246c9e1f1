"""Regenerate the README's memory timeline pictures (docs/timeline_*.png).

    python benchmarks/make_timelines.py            # both models
    python benchmarks/make_timelines.py gpt        # one of them

Each example model at its default batch size: keep-all beside a recompute-only plan at
``Budget(fraction=0.5)`` (``compress=False``, SGD with momentum), or at the first fraction
above it that recompute reaches (the title says which), both measured in one real step
on this machine's CPU. The planned peak depends on the measured costs, so a
rerun on another machine can move the plan's line a little; keep-all's prediction is the
same everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import fedplan
from fedplan.modelfile import load_model_file
from fedplan.timeline import write_timeline
from fedplan.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet18": ROOT / "examples" / "resnet18.py", "gpt": ROOT / "examples" / "gpt.py"}
FRACTION = 0.5


def plan_at_least(model, inputs, targets, loss_fn, analysis) -> tuple[fedplan.Plan, float]:
    """The recompute-only plan at FRACTION, or at the first fraction above it (steps of
    0.05) that recompute reaches: ResNet-18 at batch 8 cannot go down to 0.5."""
    fraction = FRACTION
    while True:
        try:
            plan, _ = fedplan.plan(model, inputs, targets, budget=fedplan.Budget(
                fraction=fraction), loss_fn=loss_fn, compress=False, analysis=analysis)
            return plan, fraction
        except fedplan.BudgetInfeasibleError:
            if fraction >= 1.0:
                raise
            fraction = round(fraction + 0.05, 2)


def make(name: str, output: Path) -> None:
    spec = load_model_file(MODELS[name])
    batch_size = spec.default_batch_size
    model = spec.build()
    inputs, targets = spec.batch(batch_size)
    analysis = fedplan.analyze(model, inputs, targets, loss_fn=spec.loss_fn, compress=False,
                               repeats=1)
    plan, fraction = plan_at_least(model, inputs, targets, spec.loss_fn, analysis)
    counts = plan.counts()
    budget = (f"budget fraction {fraction}" if fraction == FRACTION else
              f"budget fraction {fraction} (recompute alone cannot reach {FRACTION})")
    title = (f"{name}, batch {batch_size}, SGD with momentum: keep-all and a recompute-only "
             f"plan at {budget}; {counts.get('recompute', 0)} of {sum(counts.values())} "
             f"tensors recomputed")
    picture = write_timeline(output / f"timeline_{name}.png", model, inputs, targets,
                             analysis=analysis, plan=plan, loss_fn=spec.loss_fn, title=title)
    print(f"{picture.path}: keep-all {format_bytes(picture.keep_all_peak_bytes)}, plan at "
          f"fraction {fraction}: predicted {format_bytes(picture.predicted_peak_bytes)}, "
          f"measured {format_bytes(picture.measured_peak_bytes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*",
                        help=f"which pictures to make, of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--output", default=str(ROOT / "docs"), help="folder of the PNGs")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"expected models from {', '.join(MODELS)}; found {', '.join(unknown)}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name in args.models or MODELS:
        make(name, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
