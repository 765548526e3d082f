"""Library errors name parameters, the CLI names flags (docs/architecture.md; flowmap_convert/vocabulary.py).

A Python user of `flowmap_convert` is told about the keyword they passed (`` `nfe` ``), never about a `--flag` they
did not type; the command line prints the same sentence with each backticked parameter turned into its flag
(`vocabulary.for_cli`). devtools/house_counts.py finds the library errors that still name a flag.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools import house_counts  # noqa: E402
from flowmap_convert.errors import FlowmapError  # noqa: E402
from flowmap_convert.vocabulary import PARAM_FLAGS, for_cli  # noqa: E402


# ---------------------------------------------------------------------------------------------------- the counter
@pytest.fixture(scope="module")
def library_messages():
    """Every error message of the package, read once for the tests below (a parse of every library module)."""
    return house_counts.messages()


def test_no_library_error_names_a_flag(library_messages):
    found = [m for m in library_messages if m.flags]  # house_counts.flagged() over the package
    assert not found, "library errors naming a flag (name the parameter in backticks instead):\n" + "\n".join(
        f"{m.path}:{m.line}: {m.text}" for m in found
    )


def test_the_counter_finds_flags_in_every_kind_of_error_message(tmp_path):
    """Each way a message reaches an error is read (so a regression of any kind fails the test above)."""
    (tmp_path / "flowmap_convert").mkdir()
    (tmp_path / "flowmap_convert" / "cli_x.py").write_text('raise ValueError("--cli-is-fine")\n')
    (tmp_path / "flowmap_convert" / "lib.py").write_text(
        textwrap.dedent(
            """
            from .errors import FlowmapError

            def check(name, value, flag="--default-flag"):
                raise FlowmapError(f"{name} {flag} is bad: {value}")

            def hint(n):
                return f"pass --hinted {n}"

            def fail(x):
                msg = f"{x} is wrong; pass --via-variable."
                if x:
                    raise FlowmapError(msg)
                raise FlowmapError(hint(x))

            def make():
                return FlowmapError("returned: pass --returned")

            def use():
                check("--helper-arg", 1)
                raise FlowmapError("run `flowmap convert x --in-a-command` first (a command line is fine)")

            def script():
                raise SystemExit("usage: --argparse-is-fine")

            def other():
                return "not an error: --not-counted"
            """
        )
    )
    found = {f for m in house_counts.flagged(tmp_path) for f in m.flags}
    assert found == {"--default-flag", "--hinted", "--via-variable", "--returned", "--helper-arg"}
    assert house_counts.main(["--root", str(tmp_path), "--quiet"]) == 0


# ---------------------------------------------------------------------------------------------------- mapping
def import_library() -> None:
    """Import every library module, as a command has by the time it prints an error (declarations register flags)."""
    import importlib

    for path in house_counts.library_files():
        parts = path.relative_to(ROOT).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        name = ".".join(parts if parts[0] == "flowmap_convert" else ("flowmap_convert", *parts))
        try:
            importlib.import_module(name)
        except ImportError:  # an optional dependency (triton, ...) this install lacks
            continue


def cli_options() -> dict[str, set[str]]:
    """{parameter name: its flags} over every command's options, read from the CLI itself."""
    from flowmap_convert.cli import app

    import_library()
    out: dict[str, set[str]] = {}
    for command in typer.main.get_command(app).commands.values():
        for p in command.params:
            if p.param_type_name == "option":
                out.setdefault(p.name, set()).update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return out


def test_every_backticked_parameter_in_library_errors_maps_to_a_flag_of_the_cli(library_messages):
    options = cli_options()  # building the commands imports every declaration that registers flags
    all_flags = set().union(*options.values())
    used = {name for m in library_messages for name in m.backticked}
    named_options = used & set(options)
    assert {"family", "nfe", "trust_pickle", "resume", "out", "num_heads"} <= named_options  # the sweep's names
    for name in sorted(named_options):
        assert PARAM_FLAGS.get(name) in options[name], f"`{name}` has the flags {options[name]}"
    for name in sorted(used & set(PARAM_FLAGS)):
        assert PARAM_FLAGS[name] in all_flags, f"`{name}` maps to {PARAM_FLAGS[name]}, which no command has"


def test_for_cli_turns_the_swept_parameters_into_their_flags():
    import flowmap_convert.finetuning.recipe  # noqa: F401  (registers the recipe's options)

    assert for_cli("drop `family` sit; set `trust_pickle`, `allow_nonfinite`, `num_heads` or `mg_scale`") == (
        "drop --family sit; set --trust-pickle, --allow-nonfinite, --num-heads or --mg-scale"
    )
    assert for_cli("`weights.0` and `not_a_parameter` stay as written") == (
        "`weights.0` and `not_a_parameter` stay as written"
    )


def unmapped(text: str) -> set[str]:
    """Known parameters still in backticks (none once the CLI has rendered a message)."""
    return set(house_counts.BACKTICKED.findall(text)) & set(PARAM_FLAGS)


def _raised(fn) -> str:
    with pytest.raises(FlowmapError) as e:
        fn()
    return str(e.value)


def _repa_legacy(encoder_depth):
    from flowmap_convert.adapters.repa import rename_legacy

    return lambda: rename_legacy({"blocks.0.attn.qkv.weight": 0, "decoder_blocks.0.mlp": 0}, encoder_depth)


def _ambiguous_family():
    from flowmap_convert.adapters import choose_family
    from test_dit_family import random_dit_sd

    return lambda: choose_family(random_dit_sd(), {"name": "model.pt"})


def _decoder_only_mf_rae():
    from flowmap_convert.adapters import FAMILIES
    from test_rae_family import ddt_state_dict

    from flowmap_convert.finetuning.common import Calls

    model = FAMILIES["mf-rae"].build(ddt_state_dict(meanflow=True, seed=26))
    return lambda: Calls(model, decoder_only=True)


def _plan(**kw):
    from flowmap_convert.search.plan import make_plan

    return lambda: make_plan(**kw)


def _device(name):
    from flowmap_convert.runtime import resolve_device

    return lambda: resolve_device(name)


def _threads(n):
    from flowmap_convert.runtime import choose_threads

    return lambda: choose_threads(n)


@pytest.mark.parametrize(
    "make, python, cli",
    [
        (lambda: _repa_legacy(None), "pass `encoder_depth`", "pass --encoder-depth"),
        (lambda: _repa_legacy(2), "pass `encoder_depth` 1", "pass --encoder-depth 1"),
        (_ambiguous_family, "pass `family` ", "pass --family "),
        (_decoder_only_mf_rae, "use `train` all", "use --train all"),
        (lambda: _plan(nfe=[1], best_for_nfe=4), "`best_for_nfe` 4", "--best-for-nfe 4 "),
        (lambda: _plan(nfe=[1, 1]), "`nfe` lists a value twice", "--nfe lists a value twice"),
        (lambda: _plan(nfe=[1], ci=1.5), "`ci` must be", "--ci must be"),
        (lambda: _device("bogus"), "unknown `device` 'bogus'", "unknown --device 'bogus'"),
        (lambda: _threads(0), "`threads` must be", "--threads must be"),
    ],
)
def test_a_library_error_names_the_parameter_and_the_cli_shows_the_flag(make, python, cli):
    import flowmap_convert.finetuning.recipe  # noqa: F401  (registers `train`, as the finetune command does)

    message = _raised(make())
    assert python in message and "--" not in message
    assert cli in for_cli(message) and not unmapped(for_cli(message))


# ---------------------------------------------------------------------------------------------------- end to end
def run(argv, capsys):
    """(exit code, stderr) of `flowmap ARGV` through the console-script entry point."""
    from flowmap_convert.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.e2e
def test_the_same_mistake_through_python_and_through_the_cli(tmp_path, monkeypatch, capsys):
    """The Python API names the keyword; `flowmap` names the flag, in the same sentence; nothing is written."""
    import flowmap_convert as fm
    from flowmap_convert.finetuning import finetune
    from flowmap_convert.search import search_depth

    monkeypatch.chdir(tmp_path)
    cases = [
        (
            lambda: finetune("builtin:digits-sit", data="builtin:digits", out="none", resume=True),
            ["finetune", "builtin:digits-sit", "--data", "builtin:digits", "--out", "none", "--resume"],
            "`resume`: none does not exist; drop `resume` to start a new run.",
        ),
        (
            lambda: search_depth("builtin:digits-sit", nfe=[1, 1]),
            ["search-depth", "builtin:digits-sit", "--nfe", "1,1"],
            "`nfe` lists a value twice ([1, 1]); list each NFE once.",
        ),
        (
            lambda: fm.load("builtin:digits-sit", family="nope"),
            ["convert", "builtin:digits-sit", "--family", "nope"],
            "drop `family` nope (or pass `family` flowmap).",
        ),
    ]
    for call, argv, sentence in cases:
        message = _raised(call)
        assert message.endswith(sentence) and "--" not in message
        code, err = run(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert for_cli(sentence) in err and not unmapped(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
