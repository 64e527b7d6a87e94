"""The command-line programs' flag parsing: ``--help``, and one ``error:`` line, exit 2.

absl parses the flags (and ml_collections loads the ``--config`` file and applies its
``--config.FIELD=VALUE`` overrides) before the program's ``main`` runs; any mistake there, an
unknown or misspelt field or group, a value of the wrong type, an unknown variant, a missing
file, is reported here as one line instead of absl's usage text or a traceback. ``--help``
(``-h``) prints the program's own description and flags and exits 0 (absl's own prints only a
usage line for console scripts, and exits 1).

A field given twice takes the last value, tuples too (ml_collections appends repeated tuple
overrides: ``--config.optim.milestones=(30,60) --config.optim.milestones=(50,)`` would give
``(30, 60, 50)``; see :func:`_last_tuple_override_wins`).
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from collections.abc import Callable

from absl import flags

from gdreg.program import exitcodes
from gdreg.program.config import base_config

#: How ``--help`` explains the overrides of a ``--config`` file.
CONFIG_OVERRIDES = (
    "Any config field is set as --config.GROUP.FIELD=VALUE (e.g. --config.optim.lr=0.4);\n"
    "docs/options.md lists every field with its default."
)


def _message(error: BaseException, argv: list[str]) -> str:
    """The gist of a parsing error, on one line."""
    text = str(error.args[0]) if isinstance(error, KeyError | AttributeError) else str(error)
    text = text.replace("\\n", "\n").replace("\\'", "'").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(error, KeyError | AttributeError) and lines:
        # ml_collections: "'lrr'\nDid you mean "lr" instead of "lrr"?" for an unknown field
        name = lines[0].strip("'\"")
        lines[-1] = lines[-1].strip("'\"")
        given = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        flag = next((arg for arg in given if arg.split(".")[-1] == name), None)
        if flag is not None:  # else raised inside the config file: reported as it is
            hint = f" ({lines[1][0].lower()}{lines[1][1:]})" if len(lines) > 1 else ""
            return f"{flag}: no such config field{hint}"
        group = next((arg for arg in given if name in arg.split(".")[1:-1]), None)
        if group is not None:  # a group that does not exist: --config.optimizer.lr
            groups = _config_groups()
            return f"{group}: no config group {name!r}; the groups are {', '.join(groups)}"
    if "Traceback (most recent call last)" in text:
        # an exception inside the config file's get_config: keep its last line, the message
        last = lines[-1]
        return f"{lines[0].split(': Error whilst')[0]}: {last.split(': ', 1)[-1]}"
    if isinstance(error, OSError) and error.__cause__ is not None:
        return _message(error.__cause__, argv)
    return " ".join(" ".join(lines).split())


def _config_groups() -> list[str]:
    """The groups of config fields (``data``, ``model``, ``optim``, ...)."""
    config = base_config()
    return sorted(key for key, value in config.items() if hasattr(value, "keys"))


def _config_path_problem(argv: list[str]) -> str | None:
    """The ``--config FILE[:ARG]`` that names no file, in one line (None when it is there)."""
    for index, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        else:
            continue
        path = value.split(":", 1)[0]
        if path and not os.path.isfile(path):
            return (
                f"--config: no such file {os.path.abspath(path)}; a config path is relative to "
                f"the current directory ({os.getcwd()})"
            )
    return None


def _help(description: str, argv: list[str]) -> str:
    """The program's description and its own flags (those of gdreg's modules)."""
    by_module = flags.FLAGS.flags_by_module_dict()
    # absl files a flag under its module's name, or under the script's path for ``python -m``.
    own = [
        module
        for module in by_module
        if module.split(".")[0] == "gdreg" or module in ("__main__", argv[0] if argv else "")
    ]
    # The docstring's reStructuredText markup, as plain text.
    plain = re.sub(r":\w+:`([^`]*)`", r"\1", description.strip()).replace("``", "")
    sections = [plain, "", "Flags:"]
    for module in own:
        for flag in sorted(by_module[module], key=lambda flag: flag.name):
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            sections.append(
                textwrap.fill(
                    f"--{flag.name}: {flag.help}{default}",
                    width=80,
                    initial_indent="  ",
                    subsequent_indent="      ",
                )
            )
    if any(flag.name == "config" for module in own for flag in by_module[module]):
        sections += ["", CONFIG_OVERRIDES]
    return "\n".join(sections)


def flags_parser(description: str) -> Callable[[list[str]], list[str]]:
    """``absl.app.run``'s ``flags_parser`` for a program described by ``description`` (its
    module docstring): ``--help`` prints it with the program's flags and exits 0; any mistake
    exits 2 with one ``error:`` line."""

    def parse(argv: list[str]) -> list[str]:
        if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
            print(_help(description, argv))
            sys.exit(exitcodes.DONE)
        return parse_flags(argv)

    return parse


def run_command(main: Callable[[list[str]], int], description: str) -> None:
    """Runs ``main(argv)`` as the program described by ``description`` (its module docstring):
    its flags parsed by :func:`flags_parser`, its return value the exit status."""
    from absl import app

    app.run(lambda argv: sys.exit(main(argv)), flags_parser=flags_parser(description))


def _last_tuple_override_wins() -> None:
    """Makes a repeated ``--config.FIELD=(...)`` replace the earlier value of a tuple field.

    ml_collections overrides tuple fields through absl's multi-value flag, whose every
    occurrence extends the list of the ones before; every other field takes the last value, as
    a command line built up from defaults plus a user's additions expects.
    """
    from ml_collections.config_flags import config_flags

    flag_class = getattr(config_flags, "_ConfigFieldMultiFlag", None)
    if flag_class is None or getattr(flag_class.parse, "last_wins", False):
        return
    original = flag_class.parse

    def parse(self, arguments):
        self.present = 0  # absl's MultiFlag.parse extends the value while present is set
        original(self, arguments)

    parse.last_wins = True
    flag_class.parse = parse


def parse_flags(argv: list[str]) -> list[str]:
    """``absl.app.run``'s ``flags_parser``: parses ``argv`` or exits 2 with one ``error:`` line."""
    problem = _config_path_problem(argv)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(exitcodes.BAD_INPUT)
    _last_tuple_override_wins()
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:  # optional: precision
            flags.FLAGS.config.keys()  # the file loads on first use: load it here
        return remaining
    except Exception as error:  # absl's flags.Error, or anything loading --config raised
        print(f"error: {_message(error, argv)}", file=sys.stderr)
    sys.exit(exitcodes.BAD_INPUT)
