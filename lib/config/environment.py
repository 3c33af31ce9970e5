"""Environment variables that override one symbol for one invocation, validated like a .config line."""

import re

from lib.config.kconfig import ConfigError, describe_allowed, why_not_taken

ENV_OVERRIDES = {
    "GPT2_MAX_TIME": "GPT2_MAX_TIME",
    "GPT2_MAX_ITERS": "TRAIN_MAX_ITERS",
    "GPT2_SEED": "SEED",
    "GPT2_NUM_GPUS": "TRAIN_NUM_GPUS",
}


def apply_environment(kconf, environ) -> None:
    """GPT2_MAX_TIME and friends, validated as if they were .config lines."""
    for variable, symbol in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        value = value.strip()
        sym = kconf.syms[symbol]
        if not re.fullmatch(r"\d+", value):
            raise ConfigError(f"environment {variable}={value!r} is not a non-negative integer "
                              f"(it sets CONFIG_{symbol}; allowed: {describe_allowed(sym)})")
        sym.set_value(value)
        if sym.str_value != str(int(value)):
            raise ConfigError(f"environment {variable}={value} does not take for CONFIG_{symbol}; "
                              f"{why_not_taken(kconf, sym)}")
