"""`make oldconfig`: olddefconfig, except that every option the .config does not set yet is asked for.

Each answer is checked as it is given (range, y/n, choice member, a float that parses), so a typo is asked
again rather than refused at the end; an empty answer takes the default shown in brackets, `?` shows the help.
The .config is written once, validated, after the last answer: input that ends early writes nothing.
"""

import kconfiglib

from lib.config.kconfig import ConfigError, describe_allowed, took
from lib.config.load import settings_from_kconfig


class Questions:
    """The `ask` step of lib.config.edit.refresh: read answers with read_line(prompt) -> str (EOFError at the
    end of input) and write everything else with say(text)."""

    def __init__(self, read_line, say):
        self.read_line, self.say = read_line, say

    def __call__(self, kconf) -> None:
        # Answering one option can make an earlier one visible (its dependency was off): go round until a
        # pass asks nothing, as Linux's conf does.
        asked = True
        while asked:
            asked = False
            for node in kconf.node_iter():
                item = node.item
                if node.prompt is None or not isinstance(item, (kconfiglib.Symbol, kconfiglib.Choice)):
                    continue
                if not item.visibility or item.user_value is not None:
                    continue
                if isinstance(item, kconfiglib.Choice):
                    self._choice(kconf, node)
                    asked = True
                elif item.choice is None:
                    self._symbol(kconf, node)
                    asked = True

    def _answer(self, prompt: str, node) -> str:
        while True:
            try:
                answer = self.read_line(prompt).strip()
            except EOFError:
                raise ConfigError("oldconfig: the input ended before every new option was answered; "
                                  "nothing was written") from None
            if answer != "?":
                return answer
            self.say(node.help.strip() if node.help else "(no help text)")

    def _symbol(self, kconf, node) -> None:
        sym = node.item
        default = sym.str_value
        if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
            shown = "Y/n" if default == "y" else "y/N"
        else:
            shown = default
        while True:
            answer = self._answer(f"{node.prompt[0]} (CONFIG_{sym.name}) [{shown}] (NEW) ", node) or default
            if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
                answer = answer.lower()
            problem = self._set(kconf, sym, answer)
            if not problem:
                return
            sym.unset_value()
            self.say(f"  {problem}")

    def _set(self, kconf, sym, answer: str) -> str:
        """'' when `answer` took for sym, else why not (in the words a .config error would use)."""
        if not answer.isprintable():
            return f"{answer!r} holds control characters"
        sym.set_value(answer)
        if sym.user_value is None or not took(sym, answer):
            return f"{answer!r} is not allowed; allowed: {describe_allowed(sym)}"
        try:
            settings_from_kconfig(kconf, "answer")
        except ConfigError as error:
            if f"CONFIG_{sym.name}" in str(error):  # this answer's own fault (a float that does not parse)
                return str(error).removeprefix("answer: ")
        return ""  # other limits may still be met by later answers; the final write checks them all

    def _choice(self, kconf, node) -> None:
        choice = node.item
        members = [s for s in choice.syms if s.visibility]
        default = choice.selection
        self.say(f"{node.prompt[0]} (NEW)")
        for number, sym in enumerate(members, start=1):
            prompt = next((n.prompt[0] for n in sym.nodes if n.prompt), sym.name)
            mark = ">" if sym is default else " "
            self.say(f"  {mark} {number}. {prompt} (CONFIG_{sym.name})")
        while True:
            answer = self._answer(f"choice[1-{len(members)}?]: ", node)
            if not answer and default is not None:
                default.set_value("y")
                return
            if answer.isdigit() and 1 <= int(answer) <= len(members):
                members[int(answer) - 1].set_value("y")
                return
            self.say(f"  answer a number from 1 to {len(members)}")
