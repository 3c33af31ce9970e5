"""Environment variables that override one symbol for one invocation, validated like a .config line."""

import re

from lib.config.kconfig import ConfigError, describe_allowed, did_you_mean, why_not_taken

ENV_OVERRIDES = {
    "GPT2_MAX_TIME": "GPT2_MAX_TIME",
    "GPT2_MAX_ITERS": "TRAIN_MAX_ITERS",
    "GPT2_SEED": "SEED",
    "GPT2_NUM_GPUS": "TRAIN_NUM_GPUS",
}

# GPT2_* variables that are ours but set no symbol: where each is read.
OTHER_VARIABLES = {
    "GPT2_BPE_FILE": "gpt2/data/tokenizer.py (a local copy of the GPT-2 BPE file)",
}


def check_no_unknown(environ) -> None:
    """A GPT2_* variable we do not read is a typo or a wish (GPT2_LR=1e-3), never silently ignored."""
    known = [*ENV_OVERRIDES, *OTHER_VARIABLES]
    unknown = sorted(v for v in environ if v.startswith("GPT2_") and v not in known)
    if unknown:
        named = ", ".join(v + did_you_mean(v, known, "GPT2_") for v in unknown)
        raise ConfigError(f"environment {named}: no such override; the known GPT2_* variables are "
                          f"{', '.join(known)} (set other options in .config, e.g. with make set or make menuconfig)")


def apply_environment(kconf, environ) -> dict:
    """GPT2_MAX_TIME and friends, validated as if they were .config lines; returns {variable: value} applied."""
    check_no_unknown(environ)
    applied = {}
    for variable, symbol in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        value = value.strip()
        sym = kconf.syms[symbol]
        if not re.fullmatch(r"[0-9]+", value):  # ASCII digits: \d would let '٣' through to kconfiglib
            raise ConfigError(f"environment {variable}={value!r} is not a non-negative integer "
                              f"(it sets CONFIG_{symbol}; allowed: {describe_allowed(sym)})")
        value = str(int(value))  # 007 means 7, as it would in a .config
        sym.set_value(value)
        if sym.str_value != str(int(value)):
            raise ConfigError(f"environment {variable}={value} does not take for CONFIG_{symbol}; "
                              f"{why_not_taken(kconf, sym)}")
        applied[variable] = value
    return applied
