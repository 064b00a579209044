"""`python -m pipeline_src <stage> [--params params.yaml] [stage args]`: one entry point for every stage.

Bad input (params, data, checkpoints) ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline_src.errors import PipelineError

# stage -> one-line help; each is a module pipeline_src.stages.<stage> with add_arguments(parser), run(params, args)
STAGES = {
    "validate": "check params.yaml (and, with --model, the adapter dims) without writing anything",
    "download": "one task's splits from release files or the hub -> data/raw/<task>/",
    "tokenize": "data/raw/<task>/ -> data/tokenized/<task>/ for model.name",
    "pretrain": "multi-task pre-training of one adapter inventory (LoRA / Poly / MHR)",
    "subsets": "k-shot training and selection subsets of one held-out task, per seed",
    "adapt": "few-shot adaptation of one method to one held-out task (every seed), scored on its dev split",
    "zeroshot": "zero-shot evaluation of held-out tasks (multi-task LoRA, MHR-mu)",
    "glue_mtl": "GLUE multi-task training + evaluation of one task-specific-parameter configuration",
    "report": "tables, plots and results/metrics.json from every metrics file",
}


def build_parser(stage: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_src",
        description=__doc__.splitlines()[0],
        epilog="stages:\n" + "\n".join(f"  {name:<9} {text}" for name, text in STAGES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, text in STAGES.items():
        stage_parser = sub.add_parser(name, help=text, description=text)
        stage_parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if name == stage:  # import only the stage that runs: start-up stays fast
            module = importlib.import_module(f"pipeline_src.stages.{name}")
            module.add_arguments(stage_parser)
            stage_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = argv[0] if argv and argv[0] in STAGES else None
    args = build_parser(stage).parse_args(argv)
    try:
        from pipeline_src.config import load_config

        params = load_config(args.params, **getattr(args._module, "CONFIG_CHECKS", {}))
        args._module.run(params, args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
