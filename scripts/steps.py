"""`make steps`: list the ablation steps and the Kconfig symbols each one sets."""

from lib.config.steps import load_steps

if __name__ == "__main__":
    for step in load_steps().values():
        print(f"{step.id:4s} {step.description}")
        base = f"{step.extends} + " if step.extends else ""
        print(f"     {base}" + " ".join(f"{k}={v}" for k, v in step.own.items()))
