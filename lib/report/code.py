"""Which code a run ran, from env.json's git record: its commit, or, when it ran with uncommitted changes, a
commit of this clone whose tree is the tree that ran.

A run records the commit its checkout was at and, since 2026-11-29, the tree id of its files as they were
(gpt2/train/run_dir.working_tree_id). Changes committed afterwards, or a copy of a checkout whose git metadata
was older than its files (a GPU machine sent the working tree), make the recorded commit "dirty" although a
commit with exactly those files exists: the tree id finds it. Only this clone's history is searched
(`git log --all`), so a commit that was never fetched here is not found and the run stays "uncommitted".
"""

import functools
import subprocess
from dataclasses import dataclass

from lib import config as kcfg


@dataclass(frozen=True)
class Code:
    commit: str | None  # the commit with the files that ran, when one is known
    recorded: str | None  # the commit env.json names (the checkout's HEAD)
    dirty: bool  # the files that ran are no commit this clone knows

    @property
    def same_as_recorded(self) -> bool:
        return self.commit == self.recorded


@functools.lru_cache(maxsize=4)
def commits_by_tree(repo_root=None) -> dict:
    """{tree id: newest commit with that tree} over every ref of the clone at repo_root ({} without git)."""
    try:
        proc = subprocess.run(["git", "log", "--all", "--format=%H %T"], cwd=repo_root or kcfg.REPO_ROOT,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        commit, _, tree = line.partition(" ")
        found.setdefault(tree, commit)  # git log lists the newest first
    return found


def ran_code(env: dict, repo_root=None) -> Code:
    git = (env or {}).get("git") or {}
    recorded = git.get("commit")
    if not git.get("dirty"):
        return Code(recorded, recorded, False)
    match = commits_by_tree(repo_root).get(git.get("tree")) if git.get("tree") else None
    return Code(match, recorded, False) if match else Code(recorded, recorded, True)
