"""The command line: every subcommand is reachable, and only the one being run is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamkd import cli


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ["run", *cli.COMMANDS]:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name


def test_an_unknown_subcommand_names_the_valid_ones(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(repr(name) in err for name in cli.COMMANDS)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_subcommand_has_its_own_help(name, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: streamkd {name} ")


def test_only_the_named_subcommand_is_imported() -> None:
    code = ("import sys; from streamkd import cli; cli.build_parser(['status', 'http://x']); "
            "print(sorted(m for m in sys.modules if m.startswith(('streamkd.commands', 'streamkd.serve'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "['streamkd.commands', 'streamkd.commands.status']"
