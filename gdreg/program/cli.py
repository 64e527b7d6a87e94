"""The command-line programs' flag parsing: one ``error:`` line, exit 2.

absl parses the flags (and ml_collections loads the ``--config`` file and applies its
``--config.FIELD=VALUE`` overrides) before the program's ``main`` runs; any mistake there, an
unknown or misspelt field, a value of the wrong type, an unknown variant, a missing file, is
reported here as one line instead of absl's usage text or a traceback.

A field given twice takes the last value, tuples too (ml_collections appends repeated tuple
overrides: ``--config.optim.milestones=(30,60) --config.optim.milestones=(50,)`` would give
``(30, 60, 50)``; see :func:`_last_tuple_override_wins`).
"""

from __future__ import annotations

import sys

from absl import flags

from gdreg.program import exitcodes


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
    if "Traceback (most recent call last)" in text:
        # an exception inside the config file's get_config: keep its last line, the message
        last = lines[-1]
        return f"{lines[0].split(': Error whilst')[0]}: {last.split(': ', 1)[-1]}"
    if isinstance(error, OSError) and error.__cause__ is not None:
        return _message(error.__cause__, argv)
    return " ".join(" ".join(lines).split())


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
    _last_tuple_override_wins()
    try:
        remaining = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:  # optional: precision
            flags.FLAGS.config.keys()  # the file loads on first use: load it here
        return remaining
    except Exception as error:  # absl's flags.Error, or anything loading --config raised
        print(f"error: {_message(error, argv)}", file=sys.stderr)
    sys.exit(exitcodes.BAD_INPUT)
