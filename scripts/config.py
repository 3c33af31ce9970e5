"""Configuration commands behind the Makefile's kconfig targets (--config, default $KCONFIG_CONFIG or .config).

    python -m scripts.config defconfig [NAME]   defconfigs/NAME (default: cpu-default) -> .config (validated, atomic)
    python -m scripts.config set SYMBOL=value.. change options of .config, validated like .config lines
    python -m scripts.config savedefconfig      .config (validated) -> ./defconfig (minimal form)
    python -m scripts.config olddefconfig       refresh .config after the Kconfig tree changed; says what changed
    python -m scripts.config oldconfig          the same, asking for every option .config does not set yet
    python -m scripts.config alldefconfig       every option at its default
    python -m scripts.config listnewconfig      options .config does not set yet
    python -m scripts.config menuconfig         the terminal UI; saves are validated
    python -m scripts.config show               the typed settings .config resolves to
    python -m scripts.config help               make targets, presets and environment overrides
"""

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from lib import config as cfg
from lib.config import edit
from lib.config.paths import DEFAULT_PRESET


def cmd_defconfig(args):
    name = args.name or DEFAULT_PRESET
    cfg.apply_defconfig(cfg.preset_path(name), args.config)
    print(f"{args.config}: written from defconfigs/{name}")


def cmd_set(args):
    for a in edit.set_values(args.config, args.assignments):
        print(f"{args.config}: CONFIG_{a.symbol}={a.value}")


def cmd_savedefconfig(args):
    edit.savedefconfig(args.config, args.out)
    print(f"{args.out}: minimal configuration written (copy it to defconfigs/<name> to make a preset)")


def cmd_olddefconfig(args):
    """Like Linux's olddefconfig: keep what still applies (and the preset header), default the rest, and say
    what changed."""
    for note in edit.refresh(args.config):
        print(f"olddefconfig: {note}", file=sys.stderr)
    print(f"{args.config}: updated")


def cmd_oldconfig(args):
    from lib.config.oldconfig import Questions

    for note in edit.refresh(args.config, ask=Questions(input, print)):
        print(f"oldconfig: {note}", file=sys.stderr)
    print(f"{args.config}: updated")


def cmd_alldefconfig(args):
    edit.alldefconfig(args.config)
    print(f"{args.config}: every option at its default")


def cmd_listnewconfig(args):
    for line in edit.new_options(args.config):
        print(line)


def cmd_menuconfig(args):
    from lib.config.menu import run_menuconfig

    status = run_menuconfig(args.config)
    if status == 0 and Path(args.config).is_file():
        cfg.load_settings(args.config, environ={})
        print(f"{args.config}: valid")
    return status


def cmd_show(args):
    settings = cfg.load_settings(args.config)
    for component in dataclasses.fields(settings):
        print(f"[{component.name}]")
        for name, value in dataclasses.asdict(getattr(settings, component.name)).items():
            print(f"  {name} = {value!r}")


def cmd_help(args):
    makefile = Path(cfg.REPO_ROOT, "Makefile").read_text()
    print("Targets:")
    for target, text in re.findall(r"^([\w%.<>-]+):[^#\n]*## (.*)$", makefile, flags=re.M):
        print(f"  {target.replace('%', '<preset>'):24s} {text}")
    print("\nPresets (make defconfig-<name>, or make <name>_defconfig):")
    for name in cfg.preset_names():
        print(f"  {name:28s} {cfg.preset_description(name)}")
    print("\nEnvironment overrides (validated like .config lines):")
    for variable, symbol in cfg.ENV_OVERRIDES.items():
        print(f"  {variable:16s} sets CONFIG_{symbol}")
    print("\nMake variables:")
    print('  ARGS             make set ARGS="ATTN_RA_RANK=8 SEED=3": the options to set (validated; .config is')
    print("                   left as it was on any error); bare NAME=value words after make are make's own")
    print("  KCONFIG_CONFIG   the configuration file every target reads and writes (default .config)")
    print('  DEFCONFIGS       make matrix DEFCONFIGS="a b": compare whole presets as cells')
    print("  RUN, DIR         make resume RUN=<run dir>, make report DIR=<dir>")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("KCONFIG_CONFIG") or ".config")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("defconfig").add_argument("name", nargs="?",
                                             help=f"a preset in defconfigs/ (default: {DEFAULT_PRESET})")
    sub.add_parser("set").add_argument("assignments", nargs="*", metavar="SYMBOL=value")
    sub.add_parser("savedefconfig").add_argument("--out", default="defconfig")
    for name in ("olddefconfig", "oldconfig", "alldefconfig", "listnewconfig", "menuconfig", "show", "help"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    try:
        return globals()[f"cmd_{args.command}"](args) or 0
    except cfg.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted; {args.config} is as it was", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
