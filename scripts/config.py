"""Configuration commands behind the Makefile's kconfig targets.

    python -m scripts.config defconfig [NAME]   defconfigs/NAME (default: cpu-default) -> .config (validated, atomic)
    python -m scripts.config savedefconfig      .config -> ./defconfig (minimal form)
    python -m scripts.config olddefconfig       refresh .config after the Kconfig tree changed
    python -m scripts.config listnewconfig      options .config does not set yet
    python -m scripts.config menuconfig         the terminal UI; validates on exit
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
from lib.config import presets
from lib.config.paths import DEFAULT_PRESET


def cmd_defconfig(args):
    name = args.name or DEFAULT_PRESET
    cfg.apply_defconfig(cfg.preset_path(name), args.config)
    print(f"{args.config}: written from defconfigs/{name}")


def cmd_savedefconfig(args):
    kconf = cfg.load_strict(args.config)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    kconf.write_min_config(str(tmp))
    os.replace(tmp, out)
    print(f"{out}: minimal configuration written (copy it to defconfigs/<name> to make a preset)")


def cmd_olddefconfig(args):
    """Like Linux's olddefconfig: keep what still applies (and the preset header), default the rest, and say
    what was dropped."""
    kconf = cfg.load_kconfig()
    kconf.load_config(args.config, replace=True)
    for warning in kconf.warnings:
        print(f"note: {warning.replace('warning: ', '')}", file=sys.stderr)
    presets.rewrite_keeping_preset(kconf, args.config)
    print(f"{args.config}: updated")


def cmd_listnewconfig(args):
    kconf = cfg.load_kconfig()
    kconf.load_config(args.config, replace=True)
    for sym in kconf.unique_defined_syms:
        if sym.visibility and sym.user_value is None and any(n.prompt for n in sym.nodes) \
                and (sym.choice is None or sym.choice.user_selection is None):
            print(f"CONFIG_{sym.name}={sym.str_value}")


def cmd_menuconfig(args):
    import menuconfig  # kconfiglib's terminal UI

    os.environ["KCONFIG_CONFIG"] = args.config
    if Path(args.config).is_file():
        cfg.load_strict(args.config)  # refuse to open (and silently rewrite) a broken .config
    menuconfig.menuconfig(presets.kconfig_keeping_preset(args.config))  # its saves keep the preset header
    if Path(args.config).is_file():
        cfg.load_settings(args.config, environ={})
        print(f"{args.config}: valid")


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
    print("\nPresets (make defconfig-<name>):")
    for name in cfg.preset_names():
        print(f"  {name:28s} {cfg.preset_description(name)}")
    print("\nEnvironment overrides (validated like .config lines):")
    for variable, symbol in cfg.ENV_OVERRIDES.items():
        print(f"  {variable:16s} sets CONFIG_{symbol}")
    print("  DEFCONFIGS       make matrix DEFCONFIGS=\"a b\": compare whole presets as cells")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("KCONFIG_CONFIG", ".config"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("defconfig").add_argument("name", nargs="?",
                                             help=f"a preset in defconfigs/ (default: {DEFAULT_PRESET})")
    sub.add_parser("savedefconfig").add_argument("--out", default="defconfig")
    for name in ("olddefconfig", "listnewconfig", "menuconfig", "show", "help"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    try:
        globals()[f"cmd_{args.command}"](args)
    except cfg.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
