"""`deepsc <command>`: a thin front door over the stage functions.

Each command lives in the module that implements its stage; that module provides
``add_cli(parser)`` (its arguments) and ``run_cli(args, params) -> int`` (maps the arguments to
one call of the stage function). DVC stages and KFP components call the same stage functions.
Errors written for people (:class:`deepsc.errors.DeepSCError`) are printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deepsc.errors import DeepSCError

# command -> (module, one-line help). Modules are imported lazily, one per invocation.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("deepsc.data.synth_cli", "write the deterministic synthetic chest-CT cohort into data/"),
    "import": ("deepsc.data.manifest", "build data/manifest.csv from a folder of public CT data"),
    "split": ("deepsc.data.split", "stratified train/test split and k folds of the manifest"),
    "lungseg": ("deepsc.data.lungseg", "segment the lungs of one scan (or measure Dice on the cohort)"),
    "validate": ("deepsc.data.validate", "great-expectations gate: manifest and volume checks"),
    "preprocess": ("deepsc.data.preprocess", "window, lung-mask, resample; classification input and patches"),
    "analyze": ("deepsc.data.analysis", "lesion statistics of a cohort with masks (the paper's Fig. 1)"),
    "train": ("deepsc.train.stages", "train one stage: pretrain-seg | pretrain-cls | finetune"),
    "ablate": ("deepsc.train.ablation", "run the paper's ablation grid under one parent MLflow run"),
    "baseline": ("deepsc.train.baselines", "train MONAI baselines (3D UNet, DenseNet121/ResNet 3D)"),
    "evaluate": ("deepsc.evaluate", "Table II metrics on the held-out split, ROC, confusion matrix"),
    "diagnose": ("deepsc.diagnose", "explainable diagnosis of one scan (NIfTI or DICOM folder)"),
    "register": ("deepsc.registry", "log the model to the MLflow registry and promote by aliases"),
    "pipeline": ("deepsc.pipeline", "compile or submit the Kubeflow pipeline"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (one broken stage never breaks the rest)."""
    parser = argparse.ArgumentParser(prog="deepsc", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="settings profile (default: the file's `profile`)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser.set_defaults(_module=module_name)
        if name == command:
            _module(module_name).add_cli(command_parser)
    return parser


def _module(name: str):
    return importlib.import_module(name)


GLOBAL_OPTIONS_WITH_VALUE = ("--params", "--profile")


def _command_in(argv: list[str]) -> str | None:
    """The command: the first argument that is neither a global option nor its value (a
    profile may be called like a command)."""
    arguments = iter(argv)
    for arg in arguments:
        if arg in GLOBAL_OPTIONS_WITH_VALUE:
            next(arguments, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser(_command_in(argv)).parse_args(argv)
        from deepsc.config import load_params

        params = load_params(args.params, args.profile) if _needs_params(args) else {}
        return int(_module(args._module).run_cli(args, params) or 0)
    except DeepSCError as exc:
        if debug:
            raise
        print(f"deepsc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("deepsc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so briefly, --debug shows the traceback
        if debug:
            raise
        print(f"deepsc: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _needs_params(args: argparse.Namespace) -> bool:
    """Commands that work on one file (diagnose with --model) may run without params.yaml, but
    not with a profile: there would be nothing to choose it from."""
    from pathlib import Path

    from deepsc.errors import ConfigError

    needed = Path(args.params).is_file() or args.params != "params.yaml"
    if not needed and args.profile:
        raise ConfigError(f"--profile {args.profile} needs a settings file: {args.params} not found (run in the "
                          "project folder or give --params)")
    return needed


if __name__ == "__main__":
    sys.exit(main())
